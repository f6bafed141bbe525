"""Summarise the last `make mutate` (mutmut 3's results in mutants/): mutants per module by
status, then every survivor with its diff. A survivor whose change is only the letter case of
a string is marked "sql-case": SQL keywords and names are case-blind, so it is equivalent
(a quoted value such as 'leased' is not, and a case change there is not marked).

Run from the repository root: .venv/bin/python tools/mutation_summary.py [--diffs]
"""

from __future__ import annotations

import re
import sys
from collections import Counter, defaultdict

from mutmut.mutation.data import SourceFileMutationData
from mutmut.mutation.diff_apply import get_diff_for_mutant
from mutmut.stats import status_by_exit_code
from mutmut.utils.file_utils import walk_mutatable_files

STATUSES = ["killed", "timeout", "survived", "no tests", "not checked"]
QUOTED = re.compile(r"'[^']*'")


def changed_lines(diff: str) -> tuple[list[str], list[str]]:
    lines = diff.splitlines()
    old = [x[1:] for x in lines if x.startswith("-") and not x.startswith("---")]
    new = [x[1:] for x in lines if x.startswith("+") and not x.startswith("+++")]
    return old, new


def sql_case_only(diff: str) -> bool:
    old, new = changed_lines(diff)
    return (
        bool(old)
        and old != new
        and [x.lower() for x in old] == [x.lower() for x in new]
        and [QUOTED.findall(x) for x in old] == [QUOTED.findall(x) for x in new]
    )


def main() -> None:
    diffs = "--diffs" in sys.argv
    table: dict[str, Counter[str]] = defaultdict(Counter)
    survivors: list[tuple[str, str]] = []
    for path in walk_mutatable_files():
        data = SourceFileMutationData(path=path)
        data.load()
        module = str(path).removeprefix("src/").removesuffix(".py").replace("/", ".")
        for name, code in data.exit_code_by_key.items():
            status = status_by_exit_code[code]
            table[module][status] += 1
            if status == "survived":
                survivors.append((name, get_diff_for_mutant(name, path=path)))
    print("| module | total | " + " | ".join(STATUSES) + " |")
    print("|---|---:|" + "---:|" * len(STATUSES))
    for module, counts in sorted(table.items()):
        cells = " | ".join(str(counts[s]) for s in STATUSES)
        print(f"| {module} | {sum(counts.values())} | {cells} |")
    print()
    for name, diff in survivors:
        tag = "sql-case" if sql_case_only(diff) else "survived"
        print(f"{tag}: {name}")
        if diffs and tag != "sql-case":
            old, new = changed_lines(diff)
            for line in old:
                print(f"    - {line.strip()}")
            for line in new:
                print(f"    + {line.strip()}")


if __name__ == "__main__":
    main()
