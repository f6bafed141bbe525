"""inputs.py / outputs.py: the job picks its input and output from a table of kinds, and
another kind plugs in by registering, without touching the job."""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import orjson

import overnight
from overnight import inputs, outputs
from overnight.inputs import FileInput, InputKind, Reader, SqlInput, input_for
from overnight.outputs import FileOutput, SqlOutput, output_for
from overnight.records import Cursor, Fingerprint, Row
from overnight.spec import parse_spec


def _spec(source: dict, output: dict | None = None):
    return parse_spec(
        {
            "source": source,
            "model": {"backend": "python", "function": "m:f"},
            "output": output or {},
        },
        origin="test",
    )


def test_the_kinds_are_picked_from_the_spec(tmp_path):
    f = _spec({"path": "in.jsonl", "id": "id"})
    s = _spec(
        {"url": "sqlite:///db.sqlite", "table": "t", "id": "id"},
        {"url": "sqlite:///o", "table": "o"},
    )
    assert isinstance(input_for(f, tmp_path), FileInput)
    assert input_for(f, tmp_path).describe() == str(tmp_path / "in.jsonl")
    assert isinstance(input_for(s, tmp_path), SqlInput)
    assert isinstance(output_for(f, tmp_path, "j"), FileOutput)
    assert output_for(f, tmp_path, "j").path == tmp_path / "j.out.jsonl"
    assert output_for(f, tmp_path, "j").errors_path == tmp_path / "j.out.errors.jsonl"
    assert isinstance(output_for(s, tmp_path, "j"), SqlOutput)


@dataclass
class MemoryInput:
    """A third kind: records held in memory, named by [source] path = "memory:..."."""

    records: list[dict]

    def describe(self) -> str:
        return "memory"

    def check(self) -> None:
        pass

    def reader(self, chunk: int) -> Reader:
        def read(cursor: Cursor) -> Iterator[list[Row]]:
            rows = [
                Row(i + 1, str(r["id"]), orjson.dumps(r), r, None)
                for i, r in enumerate(self.records)
            ][cursor.records :]
            for at in range(0, len(rows), chunk):
                yield rows[at : at + chunk]

        return read

    def fingerprint(self) -> tuple[Fingerprint, str]:
        digest = hashlib.blake2b(orjson.dumps(self.records)).hexdigest()[:32]
        return Fingerprint(len(self.records), 0, digest), digest

    def same_input(self, stored: Fingerprint) -> bool:
        return self.fingerprint()[0].digest == stored.digest

    def changed_while_read(self, stored: Fingerprint) -> bool:
        return False

    def since(self, stored: Fingerprint) -> None:
        return None

    def estimate_records(self) -> int:
        return len(self.records)

    def kept_files(self) -> Iterator[tuple[str, Path]]:
        return iter(())


def test_a_third_input_kind_plugs_in_by_registering(tmp_path):
    name = f"fn_{uuid.uuid4().hex[:10]}"
    (tmp_path / f"{name}.py").write_text(
        "def fn(records):\n    return [r['n'] * 2 for r in records]\n"
    )
    records = [{"id": f"r{i}", "n": i} for i in range(5)]
    kind = InputKind(
        "memory",
        lambda spec: (spec.source.path or "").startswith("memory:"),
        lambda spec, base_dir, origin, id_field: MemoryInput(records),
    )
    inputs.register_input(kind)
    try:
        job = overnight.Job(
            source={"path": "memory:numbers", "id": "id"},
            model={"backend": "python", "function": f"{name}:fn"},
            base_dir=tmp_path,
            state=tmp_path / "ledger.db",
        )
        assert job.input_name == "memory"
        report = job.run()
        assert report.exit_code == 0
        assert job.run().exit_code == 0  # the same input again: nothing to do
    finally:
        inputs.INPUTS.remove(kind)
    rows = [orjson.loads(x) for x in (tmp_path / "job.out.jsonl").read_bytes().splitlines()]
    assert rows == [{"id": f"r{i}", "output": 2 * i} for i in range(5)]
    assert inputs.input_kind(_spec({"path": "memory:x", "id": "id"})).name == "file"
    assert [k.name for k in outputs.OUTPUTS] == ["queue", "sql", "file"]
