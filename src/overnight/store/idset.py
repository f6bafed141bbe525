"""The ids a job's items hold, as this process's ingest knows them, in about 8 bytes each.

Ranges have no index on their ids, so the ledger refuses a repeated id against this set
(SQLLedger._seen_ids). A Python set of the id strings took ~90 MB per million short ids
(a 5,000,000-row table: ~450 MB, growing with the table); this keeps each id's 64-bit hash
in sorted numpy arrays instead (5,000,000 ids: ~40 MB). A hash only says "maybe": the ledger
confirms every hit against its rows (SQLLedger._first_line), so two ids that share a hash
cost one lookup, never a refused or a skipped record.

The hashes are Python's own `hash()` of the id string: cached on the string, and the same
within one process, which is all this set lives in.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np


def _hashes(ids: Iterable[str]) -> np.ndarray:
    return np.fromiter(map(hash, ids), dtype=np.int64)


class IdHashes:
    """Membership of ids by their hash: `maybe(ids)` is True for every id added (and, rarely,
    for another with the same hash)."""

    def __init__(self, ids: Iterable[str] = ()) -> None:
        # Sorted arrays, each less than half the size of the one before it (merged as they
        # fill, as a log-structured merge tree does): a lookup searches log2(n / batch) of them.
        self._levels: list[np.ndarray] = []
        self.update(ids)

    def __len__(self) -> int:
        return sum(len(level) for level in self._levels)

    def update(self, ids: Iterable[str]) -> None:
        level = _hashes(ids)
        if not len(level):
            return
        level.sort()
        levels = self._levels
        levels.append(level)
        while len(levels) > 1 and len(levels[-2]) < 2 * len(levels[-1]):
            newer, older = levels.pop(), levels.pop()
            merged = np.concatenate((older, newer))
            merged.sort(kind="stable")  # two sorted runs: timsort merges them in linear time
            levels.append(merged)

    def maybe(self, ids: list[str]) -> list[bool]:
        """Per id, whether it may have been added (False: it was not)."""
        if not ids or not self._levels:
            return [False] * len(ids)
        hashes = _hashes(ids)
        order = np.argsort(hashes)
        needles = hashes[order]  # sorted: each search starts where the one before ended
        hit = np.zeros(len(ids), dtype=bool)
        for level in self._levels:
            at = np.searchsorted(level, needles)
            np.minimum(at, len(level) - 1, out=at)
            hit |= level[at] == needles
        found = np.empty_like(hit)
        found[order] = hit
        return found.tolist()

    def isdisjoint(self, ids: list[str]) -> bool:
        """True when none of `ids` was added (False may be a shared hash)."""
        return not any(self.maybe(ids))
