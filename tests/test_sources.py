"""Readers: records with their line (or row) numbers, ids, per-record errors that never stop
the reader, resume from a cursor, and the input fingerprint."""

from __future__ import annotations

import os
from pathlib import Path

import orjson
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from overnight import sources
from overnight.records import Cursor, Row, cursor_after
from overnight.sources import fingerprint


def read_rows(fmt: str, path: Path, id_field: str | None, start: Cursor = Cursor(), chunk=2000):
    return [row for rows in sources.read(fmt, path, id_field, start, chunk) for row in rows]


def summary(rows: list[Row]) -> list[tuple]:
    return [(r.line, r.custom_id, r.record, r.error) for r in rows]


# -- JSONL -----------------------------------------------------------------------------------


def test_jsonl_records_ids_and_physical_line_numbers(tmp_path):
    p = tmp_path / "in.jsonl"
    p.write_bytes(b'{"id": "a", "n": 1}\n\n   \n{"id": 7, "n": 2}\r\n\n{"id": "c", "n": 3}')
    rows = read_rows("jsonl", p, "id")
    assert summary(rows) == [
        (1, "a", {"id": "a", "n": 1}, None),
        (4, "7", {"id": 7, "n": 2}, None),  # ints become strings
        (6, "c", {"id": "c", "n": 3}, None),
    ]
    assert [r.payload for r in rows] == [
        b'{"id": "a", "n": 1}',
        b'{"id": 7, "n": 2}',
        b'{"id": "c", "n": 3}',
    ]
    # `end` is the byte offset just past each record's line
    data = p.read_bytes()
    assert rows[0].end == data.index(b"\n") + 1
    assert rows[1].end == data.index(b"\r\n") + 2
    assert rows[2].end == len(data)


def test_jsonl_bad_records_are_rows_with_errors(tmp_path):
    p = tmp_path / "in.jsonl"
    p.write_bytes(
        b'{"id": "a"}\n'  # 1 ok
        b"not json\n"  # 2 malformed
        b"[1, 2]\n"  # 3 not an object
        b'"text"\n'  # 4 not an object
        b'{"id": "u", "t": "\xff\xfe"}\n'  # 5 invalid UTF-8
        b'{"other": 1}\n'  # 6 missing id
        b'{"id": ""}\n'  # 7 empty id
        b'{"id": null}\n'  # 8 null id
        b'{"id": 0}\n'  # 9 ok: 0 is an id
        b'{"id": "z"\n'  # 10 truncated
        b'{"id": "last"}\n'  # 11 ok
    )
    rows = read_rows("jsonl", p, "id")
    assert [r.line for r in rows] == list(range(1, 12))
    assert [r.custom_id for r in rows] == ["a"] + [None] * 7 + ["0", None, "last"]
    errors = {r.line: r.error for r in rows if r.error}
    assert set(errors) == {2, 3, 4, 5, 6, 7, 8, 10}
    assert errors[2].startswith("line 2: malformed JSON")
    assert errors[3] == "line 3: not a JSON object"
    assert errors[4] == "line 4: not a JSON object"
    assert errors[5] == "line 5: not valid UTF-8"
    assert errors[6] == "line 6: record has no 'id'"
    assert errors[7] == "line 7: record has no 'id'"
    assert errors[8] == "line 8: record has no 'id'"
    assert errors[10].startswith("line 10: malformed JSON")
    for r in rows:
        if r.error:
            assert r.record is None


def test_jsonl_hashed_ids_are_stable_and_distinct(tmp_path):
    p = tmp_path / "in.jsonl"
    p.write_bytes(b'{"t": "a"}\n{"t": "b"}\n{"t": "a"}\n')
    first = read_rows("jsonl", p, None)
    second = read_rows("jsonl", p, None)
    assert [r.custom_id for r in first] == [r.custom_id for r in second]
    assert first[0].custom_id == sources.content_id(b'{"t": "a"}')
    assert first[0].custom_id == first[2].custom_id  # same content, same id
    assert first[0].custom_id != first[1].custom_id
    assert all(isinstance(r.custom_id, str) and len(r.custom_id) == 24 for r in first)
    assert all(r.error is None for r in first)


def test_jsonl_chunks(tmp_path):
    p = tmp_path / "in.jsonl"
    p.write_bytes(b"".join(orjson.dumps({"id": i}) + b"\n" for i in range(10)))
    chunks = list(sources.read("jsonl", p, "id", Cursor(), 4))
    assert [len(c) for c in chunks] == [4, 4, 2]
    assert [r.custom_id for c in chunks for r in c] == [str(i) for i in range(10)]


# -- CSV ---------------------------------------------------------------------------------------


def test_csv_records_and_start_lines_of_multiline_fields(tmp_path):
    p = tmp_path / "in.csv"
    p.write_bytes(
        b"id,text\n"  # 1 header
        b'1,"first\nsecond\nthird"\n'  # 2-4
        b"\n"  # 5 blank
        b"2,plain\n"  # 6
        b'3,"a ""quoted"" word"\n'  # 7
        b'4,"x\r\ny"\n'  # 8-9
        b"5,end\n"  # 10
    )
    rows = read_rows("csv", p, "id")
    assert summary(rows) == [
        (2, "1", {"id": "1", "text": "first\nsecond\nthird"}, None),
        (6, "2", {"id": "2", "text": "plain"}, None),
        (7, "3", {"id": "3", "text": 'a "quoted" word'}, None),
        (8, "4", {"id": "4", "text": "x\r\ny"}, None),
        (10, "5", {"id": "5", "text": "end"}, None),
    ]
    assert orjson.loads(rows[0].payload) == {"id": "1", "text": "first\nsecond\nthird"}


def test_csv_bom_header(tmp_path):
    p = tmp_path / "in.csv"
    p.write_bytes("\ufeffid,text\nk1,hello\n".encode())
    rows = read_rows("csv", p, "id")
    assert summary(rows) == [(2, "k1", {"id": "k1", "text": "hello"}, None)]


def test_csv_bad_records_are_rows_with_errors(tmp_path):
    p = tmp_path / "in.csv"
    p.write_bytes(
        b"id,text\n"
        b"1,ok\n"  # 2
        b"2,too,many\n"  # 3
        b"3\n"  # 4 too few
        b'4,"\xff\xfe"\n'  # 5 invalid UTF-8
        b",no id\n"  # 6 empty id
        b"7,fine\n"  # 7
    )
    rows = read_rows("csv", p, "id")
    assert [r.line for r in rows] == [2, 3, 4, 5, 6, 7]
    assert [r.custom_id for r in rows] == ["1", None, None, None, None, "7"]
    assert [r.error for r in rows] == [
        None,
        "line 3: 3 fields, header has 2",
        "line 4: 1 fields, header has 2",
        "line 5: not valid UTF-8",
        "line 6: record has no 'id'",
        None,
    ]


def test_csv_hashed_ids(tmp_path):
    p = tmp_path / "in.csv"
    p.write_bytes(b"a,b\n1,2\n3,4\n1,2\n")
    rows = read_rows("csv", p, None)
    again = read_rows("csv", p, None)
    assert [r.custom_id for r in rows] == [r.custom_id for r in again]
    assert rows[0].custom_id == rows[2].custom_id != rows[1].custom_id
    assert rows[0].custom_id == sources.content_id(orjson.dumps({"a": "1", "b": "2"}))


# -- Parquet -----------------------------------------------------------------------------------


def write_parquet(path: Path, records: list[dict], row_group_size: int | None = None) -> Path:
    pq.write_table(pa.Table.from_pylist(records), path, row_group_size=row_group_size)
    return path


def test_parquet_records_row_numbers_and_int_ids(tmp_path):
    p = write_parquet(
        tmp_path / "in.parquet",
        [{"id": 10, "t": "a"}, {"id": 20, "t": "b"}, {"id": None, "t": "c"}, {"id": 40, "t": None}],
    )
    rows = read_rows("parquet", p, "id")
    assert summary(rows) == [
        (1, "10", {"id": 10, "t": "a"}, None),
        (2, "20", {"id": 20, "t": "b"}, None),
        (3, None, None, "line 3: record has no 'id'"),
        (4, "40", {"id": 40, "t": None}, None),
    ]
    assert orjson.loads(rows[0].payload) == {"id": 10, "t": "a"}


def test_parquet_hashed_ids(tmp_path):
    p = write_parquet(tmp_path / "in.parquet", [{"t": "a"}, {"t": "b"}, {"t": "a"}])
    rows = read_rows("parquet", p, None)
    assert rows[0].custom_id == rows[2].custom_id != rows[1].custom_id
    assert rows[0].custom_id == sources.content_id(orjson.dumps({"t": "a"}))
    assert [r.custom_id for r in read_rows("parquet", p, None)] == [r.custom_id for r in rows]


# -- empty inputs ------------------------------------------------------------------------------


def test_empty_jsonl(tmp_path):
    p = tmp_path / "in.jsonl"
    p.write_bytes(b"")
    assert read_rows("jsonl", p, "id") == []
    p.write_bytes(b"\n\n  \n")
    assert read_rows("jsonl", p, "id") == []


def test_empty_csv(tmp_path):
    p = tmp_path / "in.csv"
    p.write_bytes(b"")
    assert read_rows("csv", p, "id") == []
    p.write_bytes(b"id,text\n")
    assert read_rows("csv", p, "id") == []
    p.write_bytes(b"id,text\n\n\n")
    assert read_rows("csv", p, "id") == []


def test_empty_parquet(tmp_path):
    p = tmp_path / "in.parquet"
    pq.write_table(pa.table({"id": pa.array([], pa.string())}), p)
    assert read_rows("parquet", p, "id") == []


# -- resume from a cursor ------------------------------------------------------------------------


def make_jsonl(tmp_path: Path) -> Path:
    p = tmp_path / "in.jsonl"
    lines = []
    for i in range(12):
        if i % 4 == 1:
            lines.append(b"")  # blank line
        if i == 5:
            lines.append(b"{broken")
        lines.append(orjson.dumps({"id": f"k{i}", "n": i}))
    p.write_bytes(b"\n".join(lines) + b"\n")
    return p


def make_csv(tmp_path: Path) -> Path:
    p = tmp_path / "in.csv"
    out = [b"id,text"]
    for i in range(12):
        if i % 4 == 1:
            out.append(b"")
        if i == 3:
            out.append(b'k3,"multi\nline"')
        elif i == 6:
            out.append(b"k6,too,many")
        else:
            out.append(f"k{i},t{i}".encode())
    p.write_bytes(b"\n".join(out) + b"\n")
    return p


def make_parquet(tmp_path: Path) -> Path:
    return write_parquet(
        tmp_path / "in.parquet",
        [{"id": f"k{i}" if i != 4 else None, "n": i} for i in range(11)],
        row_group_size=3,
    )


MAKERS = {"jsonl": make_jsonl, "csv": make_csv, "parquet": make_parquet}


@pytest.mark.parametrize("fmt", ["jsonl", "csv", "parquet"])
@pytest.mark.parametrize("chunk", [2000, 3])
def test_resume_from_every_cursor_gives_exactly_the_rest(tmp_path, fmt, chunk):
    p = MAKERS[fmt](tmp_path)
    rows = read_rows(fmt, p, "id")
    assert len(rows) >= 11
    assert any(r.error for r in rows)  # resuming across bad records too
    for k in range(1, len(rows) + 1):
        cursor = cursor_after(rows[k - 1], k)
        assert cursor.records == k
        assert cursor.line == rows[k - 1].line + 1
        rest = read_rows(fmt, p, "id", cursor, chunk)
        assert rest == rows[k:], f"resume after record {k}"


def test_resume_sanity_counts(tmp_path):
    assert [r.custom_id for r in read_rows("jsonl", make_jsonl(tmp_path), "id")] == (
        [f"k{i}" for i in range(5)] + [None] + [f"k{i}" for i in range(5, 12)]
    )
    csv_rows = read_rows("csv", make_csv(tmp_path), "id")
    assert [r.custom_id for r in csv_rows] == (
        [f"k{i}" for i in range(6)] + [None] + [f"k{i}" for i in range(7, 12)]
    )
    assert csv_rows[3].record == {"id": "k3", "text": "multi\nline"}
    parquet_rows = read_rows("parquet", make_parquet(tmp_path), "id")
    assert [r.line for r in parquet_rows] == list(range(1, 12))
    assert parquet_rows[4].error == "line 5: record has no 'id'"


def test_jsonl_resume_continues_line_numbers(tmp_path):
    p = tmp_path / "in.jsonl"
    p.write_bytes(b'{"id": "a"}\n\n\n{"id": "b"}\n\n{"id": "c"}\n')
    rows = read_rows("jsonl", p, "id")
    rest = read_rows("jsonl", p, "id", cursor_after(rows[0], 1))
    assert [(r.line, r.custom_id) for r in rest] == [(4, "b"), (6, "c")]


def test_resume_at_the_end_yields_nothing(tmp_path):
    for fmt, make in MAKERS.items():
        p = make(tmp_path)
        rows = read_rows(fmt, p, "id")
        assert read_rows(fmt, p, "id", cursor_after(rows[-1], len(rows))) == [], fmt


# -- fingerprint -------------------------------------------------------------------------------


def test_fingerprint_detects_content_change(tmp_path):
    p = tmp_path / "in.jsonl"
    p.write_bytes(b'{"id": "a"}\n')
    fp = fingerprint(p)
    assert fp.size == 12
    assert fp.mtime_ns == os.stat(p).st_mtime_ns
    assert fingerprint(p) == fp  # deterministic
    p.write_bytes(b'{"id": "b"}\n')  # same size
    os.utime(p, ns=(fp.mtime_ns + 10**9, fp.mtime_ns + 10**9))
    changed = fingerprint(p, known=fp)
    assert changed.digest != fp.digest
    assert changed.size == fp.size


def test_fingerprint_touch_keeps_digest(tmp_path):
    p = tmp_path / "in.jsonl"
    p.write_bytes(b'{"id": "a"}\n')
    fp = fingerprint(p)
    os.utime(p, ns=(fp.mtime_ns + 5 * 10**9, fp.mtime_ns + 5 * 10**9))
    touched = fingerprint(p, known=fp)
    assert touched.digest == fp.digest
    assert touched.mtime_ns == fp.mtime_ns + 5 * 10**9


def test_fingerprint_skips_rehash_when_size_and_mtime_match(tmp_path):
    p = tmp_path / "in.jsonl"
    p.write_bytes(b'{"id": "a"}\n')
    fp = fingerprint(p)
    # Different content, same size, mtime put back: the stored fingerprint is trusted.
    p.write_bytes(b'{"id": "z"}\n')
    os.utime(p, ns=(fp.mtime_ns, fp.mtime_ns))
    assert fingerprint(p, known=fp) is fp
    # Without what was stored, the content is hashed.
    assert fingerprint(p).digest != fp.digest


# -- inputs that cannot be read at all: one SourceError naming the file and the key ---------------


def test_csv_id_column_missing_from_a_semicolon_header_hints_the_delimiter(tmp_path):
    p = tmp_path / "in.csv"
    p.write_bytes(b"ticket_id;subject\nT1;hello\nT2;bye\n")
    with pytest.raises(sources.SourceError) as info:
        read_rows("csv", p, "ticket_id")
    err = info.value
    assert err.key == "id" and str(p) in str(err)
    assert str(err).startswith("[source] id: ")
    assert "no column 'ticket_id'" in str(err)
    assert '[source] delimiter = ";"' in str(err)


def test_tab_separated_header_hints_a_tab(tmp_path):
    p = tmp_path / "in.csv"
    p.write_bytes(b"id\ttext\n1\ta\n")
    with pytest.raises(sources.SourceError, match=r'delimiter = "\\t"'):
        read_rows("csv", p, "id")


def test_a_near_miss_id_column_is_suggested(tmp_path):
    p = tmp_path / "in.csv"
    p.write_bytes(b"ticket_id,text\n1,a\n")
    with pytest.raises(sources.SourceError, match=r'did you mean \[source\] id = "ticket_id"'):
        read_rows("csv", p, "ticketid")


def test_a_utf16_csv_is_recognised_by_its_nul_bytes(tmp_path):
    p = tmp_path / "in.csv"
    p.write_bytes("id,text\n1,a\n".encode("utf-16-le"))
    with pytest.raises(sources.SourceError, match="UTF-16"):
        read_rows("csv", p, "id")


def test_delimiter_reads_semicolon_csv_and_its_estimate(tmp_path):
    p = tmp_path / "in.csv"
    p.write_bytes(b'ticket_id;text\nT1;a,b\nT2;"c;d"\n')
    rows = [r for rs in sources.read("csv", p, "ticket_id", delimiter=";") for r in rs]
    assert summary(rows) == [
        (2, "T1", {"ticket_id": "T1", "text": "a,b"}, None),
        (3, "T2", {"ticket_id": "T2", "text": "c;d"}, None),
    ]
    assert sources.estimate_records("csv", p, ";") == 2


def test_parquet_without_the_id_column(tmp_path):
    p = write_parquet(tmp_path / "in.parquet", [{"ticket_id": "a", "t": "x"}])
    with pytest.raises(sources.SourceError) as info:
        read_rows("parquet", p, "ticketid")
    assert info.value.key == "id" and 'did you mean [source] id = "ticket_id"' in str(info.value)


def test_a_file_that_is_not_parquet(tmp_path):
    p = tmp_path / "in.parquet"
    p.write_bytes(b"id,text\n1,a\n")
    for call in (
        lambda: read_rows("parquet", p, "id"),
        lambda: sources.estimate_records("parquet", p),
        lambda: sources.first_row("parquet", p, "id"),
    ):
        with pytest.raises(sources.SourceError) as info:
            call()
        assert info.value.key == "path"
        assert f"{p}: not a readable Parquet file" in str(info.value)


def test_a_truncated_parquet_file(tmp_path):
    p = write_parquet(tmp_path / "in.parquet", [{"id": str(i)} for i in range(100)])
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])
    with pytest.raises(sources.SourceError, match="not a readable Parquet file"):
        read_rows("parquet", p, "id")


def corrupt_second_row_group(path: Path) -> Path:
    """A Parquet file whose footer is intact but whose second row group's pages are not:
    pyarrow finds out only when it reads them."""
    write_parquet(path, [{"id": str(i), "t": "x" * 50 + str(i)} for i in range(3000)], 1000)
    column = pq.ParquetFile(path).metadata.row_group(1).column(1)
    data = bytearray(path.read_bytes())
    for i in range(column.data_page_offset, column.data_page_offset + 200):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))
    return path


def test_a_parquet_file_corrupt_inside_fails_with_a_message_not_a_traceback(tmp_path):
    p = corrupt_second_row_group(tmp_path / "in.parquet")
    with pytest.raises(sources.SourceError) as info:
        read_rows("parquet", p, "id", chunk=100)
    assert f"{p}: cannot read the Parquet file after row" in str(info.value)


def unreadable_file(tmp_path: Path) -> Path:
    """A file that exists and cannot be read: no read permission, or (as root, whom
    permissions do not stop) /proc/self/mem, whose first page read fails with EIO."""
    if os.geteuid() != 0:
        p = tmp_path / "locked.jsonl"
        p.write_bytes(b'{"id": "1"}\n')
        p.chmod(0)
        return p
    return Path("/proc/self/mem")


def test_an_unreadable_input(tmp_path):
    p = unreadable_file(tmp_path)
    with pytest.raises(sources.SourceError) as info:
        sources.first_row("jsonl", p, "id")
    assert f"[source] path: {p}: cannot read the input" in str(info.value)


def test_first_row_and_empty_inputs(tmp_path):
    p = tmp_path / "in.jsonl"
    p.write_bytes(b"\n\n")
    assert sources.first_row("jsonl", p, "id") is None
    p.write_bytes(b'\n{"id": "a"}\n{"id": "b"}\n')
    assert sources.first_row("jsonl", p, "id").custom_id == "a"
    c = tmp_path / "in.csv"
    c.write_bytes(b"id,text\n")
    assert sources.first_row("csv", c, "id") is None


def test_read_all_reports_an_unreadable_file_by_name(tmp_path):
    p = tmp_path / "labelled.parquet"
    p.write_bytes(b"garbage")
    with pytest.raises(ValueError, match=f"{p}: not a readable Parquet file"):
        sources.read_all(p, "parquet")


def test_a_parquet_path_that_cannot_be_opened_is_not_called_corrupt(tmp_path):
    with pytest.raises(sources.SourceError) as info:
        sources.first_row("parquet", tmp_path, "id")  # a folder: pyarrow's OSError
    assert f"[source] path: {tmp_path}: cannot read the input: " in str(info.value)
    assert "not a readable Parquet file" not in str(info.value)
