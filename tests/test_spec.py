"""Job file validation: one clear message per mistake, naming the file and the key; the CLI
exits 2 and ingests nothing when the job file, the input or the function is wrong."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

import orjson
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import overnight
from overnight.errors import JobFileError, UsageError
from overnight.spec import JobSpec, load_job_file, parse_spec
from overnight.store import SQLiteLedger

# -- helpers ---------------------------------------------------------------------------------


def make_function(folder: Path, body: str = "def fn(records):\n    return records\n") -> str:
    name = f"fn_{uuid.uuid4().hex[:10]}"
    (folder / f"{name}.py").write_text(body)
    return f"{name}:fn"


def write_job(folder: Path, text: str, name: str = "job.toml") -> Path:
    path = folder / name
    path.write_text(text)
    return path


def good_toml(function: str, *, source: str = "in.jsonl", extra: str = "") -> str:
    return f"""\
name = "specjob"

[source]
path = "{source}"
id = "id"

[model]
backend = "python"
function = "{function}"
{extra}
"""


def base() -> dict:
    return {
        "source": {"path": "in.jsonl", "id": "id"},
        "model": {"backend": "python", "function": "mod:fn"},
    }


def with_(**sections) -> dict:
    d = base()
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(d.get(key), dict):
            d[key] = {**d[key], **value}
        else:
            d[key] = value
    return d


def error_of(data: dict, origin: str = "job.toml") -> str:
    with pytest.raises(JobFileError) as info:
        parse_spec(data, origin)
    return str(info.value)


# -- parse_spec: the message names the file and the key ------------------------------------


def test_valid_minimal_spec_has_defaults():
    spec = parse_spec(base(), "job.toml")
    assert isinstance(spec, JobSpec)
    assert spec.source.path == "in.jsonl"
    assert spec.source.id == "id"
    assert spec.task.kind == "map"
    assert spec.run.batch_size == "auto"
    assert spec.run.max_attempts == 3
    assert spec.output.include == []
    assert spec.output.schema_ is None


def test_unknown_top_level_key():
    msg = error_of(with_(colour="red"))
    assert msg == "job.toml: colour: unknown key"


def test_unknown_key_inside_a_section():
    msg = error_of(with_(task={"colour": "red"}))
    assert msg == "job.toml: [task] colour: unknown key"


@pytest.mark.parametrize("section", ["source", "model", "run", "output"])
def test_unknown_key_in_each_section(section):
    msg = error_of(with_(**{section: {"bogus_key": 1}}))
    assert f"job.toml: [{section}] bogus_key: unknown key" in msg.splitlines()


def test_wrong_type_max_attempts():
    msg = error_of(with_(run={"max_attempts": "three"}))
    assert msg.startswith("job.toml: [run] max_attempts: ")
    assert "'three'" in msg
    assert "integer" in msg


def test_wrong_type_bool_is_not_an_int():
    msg = error_of(with_(run={"max_attempts": True}))
    assert msg.startswith("job.toml: [run] max_attempts: ")


def test_wrong_type_batch_size_string_number():
    msg = error_of(with_(run={"batch_size": "32"}))
    assert "job.toml: [run] batch_size" in msg
    assert "'32'" in msg


@pytest.mark.parametrize(
    ("section", "key", "value"),
    [("run", "batch_size", "32"), ("output", "schema", 5)],
)
def test_wrong_type_of_a_union_names_the_key_cleanly(section, key, value):
    msg = error_of(with_(**{section: {key: value}}))
    assert f"{key}[" not in msg
    assert all(line.startswith(f"job.toml: [{section}] {key}: ") for line in msg.splitlines())


def test_batch_size_zero_is_refused():
    msg = error_of(with_(run={"batch_size": 0}))
    assert "batch_size" in msg and "positive" in msg


def test_max_attempts_zero_is_refused():
    msg = error_of(with_(run={"max_attempts": 0}))
    assert msg.startswith("job.toml: [run] max_attempts: ")
    assert "(got 0)" in msg


def test_unknown_backend():
    msg = error_of(with_(model={"backend": "gpt-9000"}))
    assert msg.startswith("job.toml: [model] backend: ")
    assert "'gpt-9000'" in msg
    assert "'python'" in msg and "'local'" in msg


def test_missing_required_section():
    d = base()
    del d["source"]
    assert error_of(d) == "job.toml: [source]: required key is missing"


def test_missing_required_key_in_section():
    d = base()
    del d["source"]["path"]
    assert error_of(d) == (
        "job.toml: [source]: set `path` (a file), `url` (a database, with `table` or `query`)"
        " or `queue` (a message queue)"
    )
    d["source"].update(path="in.jsonl", url="sqlite:///x.db", table="t")
    assert error_of(d) == (
        "job.toml: [source]: set `path` (a file), `url` (a database, with `table` or `query`)"
        " or `queue` (a message queue), not both `path` and `url`"
    )


def test_missing_backend():
    d = base()
    d["model"] = {"function": "mod:fn"}
    assert "job.toml: [model] backend: required key is missing" in error_of(d).splitlines()


def test_invalid_jinja_template():
    d = with_(task={"kind": "embed", "text": "{{ subject "}, model={"backend": "local"})
    del d["model"]["function"]
    msg = error_of(d)
    assert msg.startswith("job.toml: ")
    assert "task" in msg
    assert "not a valid Jinja2 template" in msg


def test_classify_without_labels():
    d = {
        "source": {"path": "in.jsonl"},
        "task": {"kind": "classify"},
        "model": {"backend": "local"},
    }
    msg = error_of(d)
    assert msg.startswith("job.toml: ")
    assert "task" in msg
    assert "needs `labels`" in msg


def test_labels_only_for_classify():
    d = {
        "source": {"path": "in.jsonl"},
        "task": {"kind": "embed", "labels": ["a"]},
        "model": {"backend": "local"},
    }
    assert "only apply to kind = 'classify'" in error_of(d)


def test_python_backend_without_function():
    d = base()
    del d["model"]["function"]
    msg = error_of(d)
    assert msg.startswith("job.toml: ")
    assert "model" in msg
    assert "needs `function" in msg


def test_function_without_colon():
    msg = error_of(with_(model={"function": "just_a_module"}))
    assert "module:function" in msg
    assert "'just_a_module'" in msg


def test_python_backend_runs_only_map():
    d = with_(task={"kind": "classify", "labels": ["a", "b"]})
    msg = error_of(d)
    assert "backend = 'python' runs kind = 'map'" in msg


def test_unknown_source_format():
    msg = error_of(with_(source={"format": "xml"}))
    assert msg.startswith("job.toml: [source] format: ")
    assert "'xml'" in msg


def test_every_mistake_is_reported():
    d = with_(colour=1, run={"max_attempts": "three"}, task={"shade": 2})
    lines = error_of(d).splitlines()
    assert "job.toml: colour: unknown key" in lines
    assert "job.toml: [task] shade: unknown key" in lines
    assert any(line.startswith("job.toml: [run] max_attempts: ") for line in lines)


# -- load_job_file: TOML ------------------------------------------------------------------


def test_load_job_file_ok(tmp_path):
    path = write_job(tmp_path, good_toml("mod:fn", extra="[run]\nbatch_size = 32\n"))
    spec = load_job_file(path)
    assert spec.name == "specjob"
    assert spec.run.batch_size == 32
    assert spec.model.function == "mod:fn"


def test_toml_syntax_error_names_the_file(tmp_path):
    path = write_job(tmp_path, 'name = "x"\n[source\npath = "in.jsonl"\n')
    with pytest.raises(JobFileError) as info:
        load_job_file(path)
    msg = str(info.value)
    assert msg.startswith(f"{path}: not valid TOML")
    assert "line 2" in msg


def test_missing_job_file(tmp_path):
    with pytest.raises(JobFileError) as info:
        load_job_file(tmp_path / "nope.toml")
    assert str(info.value) == f"{tmp_path / 'nope.toml'}: job file not found"


def test_load_job_file_unknown_key_names_file_and_key(tmp_path):
    path = write_job(tmp_path, good_toml("mod:fn", extra='[task]\ncolour = "red"\n'))
    with pytest.raises(JobFileError) as info:
        load_job_file(path)
    assert str(info.value) == f"{path}: [task] colour: unknown key"


def test_load_job_file_wrong_type_from_toml(tmp_path):
    path = write_job(tmp_path, good_toml("mod:fn", extra='[run]\nbatch_size = "32"\n'))
    with pytest.raises(JobFileError) as info:
        load_job_file(path)
    assert f"{path}: [run] batch_size" in str(info.value)


def test_job_file_error_is_a_usage_error():
    assert issubclass(JobFileError, UsageError)
    assert JobFileError("x").exit_code == 2


# -- the Python API --------------------------------------------------------------------------


def test_job_from_keyword_sections_runs(tmp_path):
    (tmp_path / "in.jsonl").write_bytes(b'{"id": "a", "n": 1}\n{"id": "b", "n": 2}\n')
    fn = make_function(tmp_path, "def fn(records):\n    return [r['n'] * 10 for r in records]\n")
    job = overnight.Job(
        source={"path": "in.jsonl", "id": "id"},
        model={"backend": "python", "function": fn},
        base_dir=tmp_path,
    )
    assert job.name == "job"
    report = job.run()
    assert report.exit_code == 0
    rows = [orjson.loads(x) for x in (tmp_path / "job.out.jsonl").read_bytes().splitlines()]
    assert rows == [{"id": "a", "output": 10}, {"id": "b", "output": 20}]


def test_job_with_bad_sections_raises(tmp_path):
    bad = {
        "source": {"path": "in.jsonl"},
        "model": {"backend": "python", "function": "m:f"},
        "colour": "red",
    }
    with pytest.raises(JobFileError) as info:
        overnight.Job(**bad, base_dir=tmp_path)
    assert str(info.value) == "Job(...): colour: unknown key"


def test_job_with_wrong_type_raises(tmp_path):
    with pytest.raises(JobFileError) as info:
        overnight.Job(
            source={"path": "in.jsonl"},
            model={"backend": "python", "function": "m:f"},
            run={"max_attempts": "three"},
            base_dir=tmp_path,
        )
    assert str(info.value).startswith("Job(...): [run] max_attempts: ")


def test_job_with_dict_spec(tmp_path):
    job = overnight.Job(base(), base_dir=tmp_path)
    assert job.spec.source.id == "id"
    assert job.source_path == tmp_path.resolve() / "in.jsonl"


# -- the CLI: exit 2, message on stderr, nothing ingested ------------------------------------


def cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    env.pop("FORCE_COLOR", None)
    return subprocess.run(
        [sys.executable, "-m", "overnight", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def assert_nothing_ingested(folder: Path, name: str = "specjob") -> None:
    db = folder / ".overnight" / "ledger.db"
    if db.exists():
        ledger = SQLiteLedger(db)
        try:
            assert ledger.get_job(name) is None
        finally:
            ledger.close()
    assert not (folder / "out.jsonl").exists()


def _case_missing_input(folder: Path) -> str:
    return good_toml(make_function(folder), source="missing.jsonl")


def _case_unknown_key(folder: Path) -> str:
    return good_toml(make_function(folder), extra='[task]\ncolour = "red"\n')


def _case_wrong_type(folder: Path) -> str:
    return good_toml(make_function(folder), extra='[run]\nmax_attempts = "three"\n')


def _case_unknown_backend(folder: Path) -> str:
    return good_toml(make_function(folder)).replace('backend = "python"', 'backend = "gpt"')


def _case_unimportable(folder: Path) -> str:
    return good_toml(f"no_such_module_{uuid.uuid4().hex[:8]}:fn")


def _case_missing_attribute(folder: Path) -> str:
    return good_toml(make_function(folder).replace(":fn", ":nope"))


def _case_module_raises_on_import(folder: Path) -> str:
    return good_toml(make_function(folder, "raise RuntimeError('boom at import')\n"))


def _case_parquet_garbage(folder: Path) -> str:
    (folder / "in.parquet").write_bytes(b'{"id": "a"}\n')
    return good_toml(make_function(folder), source="in.parquet")


def _case_parquet_missing_id(folder: Path) -> str:
    pq.write_table(pa.Table.from_pylist([{"key": "a"}]), folder / "in.parquet")
    return good_toml(make_function(folder), source="in.parquet")


def _case_semicolon_csv(folder: Path) -> str:
    (folder / "in.csv").write_bytes(b"id;text\na;x\nb;y\n")
    return good_toml(make_function(folder), source="in.csv")


def _case_unreadable_input(folder: Path) -> str:
    if os.geteuid() != 0:  # root reads whatever the mode bits say: see unreadable_file there
        (folder / "locked.jsonl").write_bytes(b'{"id": "a"}\n')
        (folder / "locked.jsonl").chmod(0)
        return good_toml(make_function(folder), source="locked.jsonl")
    toml = good_toml(make_function(folder), source="/proc/self/mem")
    return toml.replace('id = "id"', 'id = "id"\nformat = "jsonl"')


def _case_corrupt_examples(folder: Path) -> str:
    (folder / "labelled.parquet").write_bytes(b"not parquet at all")
    return """\
name = "specjob"
[source]
path = "in.jsonl"
id = "id"
[task]
kind = "classify"
labels = ["a", "b"]
examples = "labelled.parquet"
[model]
backend = "local"
"""


def _case_near_miss_key(folder: Path) -> str:
    return good_toml(make_function(folder)).replace('id = "id"', 'idd = "id"')


def _case_delimiter_on_jsonl(folder: Path) -> str:
    return good_toml(make_function(folder)).replace('id = "id"', 'id = "id"\ndelimiter = ";"')


# case -> (job file maker, full message on stderr, a fragment without the [section] tag)
CLI_CASES = {
    "parquet_garbage": (
        _case_parquet_garbage,
        "[source] path: ",
        "in.parquet: not a readable Parquet file",
    ),
    "parquet_missing_id": (_case_parquet_missing_id, "[source] id: ", "no column 'id'"),
    "semicolon_csv": (_case_semicolon_csv, "[source] id: ", 'delimiter = ";"'),
    "unreadable_input": (_case_unreadable_input, "[source] path: ", "cannot read the input"),
    "corrupt_examples": (
        _case_corrupt_examples,
        "[task] examples: ",
        "labelled.parquet: not a readable Parquet file",
    ),
    "near_miss_key": (_case_near_miss_key, "[source] idd: ", "did you mean `id`?"),
    "delimiter_on_jsonl": (
        _case_delimiter_on_jsonl,
        "[source]",
        "`delimiter` applies to CSV input only",
    ),
    "missing_input": (_case_missing_input, "[source] path: input file not found", "missing.jsonl"),
    "unknown_key": (_case_unknown_key, "[task] colour: unknown key", "colour: unknown key"),
    "wrong_type": (_case_wrong_type, "[run] max_attempts: ", "max_attempts: "),
    "unknown_backend": (_case_unknown_backend, "[model] backend: ", "'gpt'"),
    "unimportable": (
        _case_unimportable,
        "[model] function: cannot import module",
        "no_such_module_",
    ),
    "missing_attribute": (_case_missing_attribute, "[model] function: module", "has no 'nope'"),
    "import_raises": (
        _case_module_raises_on_import,
        "[model] function: cannot import",
        "boom at import",
    ),
}


@pytest.mark.parametrize("case", list(CLI_CASES))
def test_cli_usage_error_exits_2_and_ingests_nothing(tmp_path, case):
    make, _, fragment = CLI_CASES[case]
    (tmp_path / "in.jsonl").write_bytes(b'{"id": "a"}\n{"id": "b"}\n')
    write_job(tmp_path, make(tmp_path))
    proc = cli("run", "job.toml", cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("error: ")
    assert fragment in proc.stderr
    assert "Traceback" not in proc.stderr
    assert_nothing_ingested(tmp_path)


@pytest.mark.parametrize("case", list(CLI_CASES))
def test_cli_usage_error_message_keeps_the_section(tmp_path, case):
    make, expected, _ = CLI_CASES[case]
    (tmp_path / "in.jsonl").write_bytes(b'{"id": "a"}\n')
    write_job(tmp_path, make(tmp_path))
    proc = cli("run", "job.toml", cwd=tmp_path)
    assert proc.returncode == 2
    assert expected in proc.stderr


def test_cli_toml_syntax_error_exits_2(tmp_path):
    write_job(tmp_path, 'name = "specjob"\n[source\n')
    proc = cli("run", "job.toml", cwd=tmp_path)
    assert proc.returncode == 2
    assert "not valid TOML" in proc.stderr
    assert_nothing_ingested(tmp_path)


def test_cli_missing_job_file_exits_2(tmp_path):
    proc = cli("run", "absent.toml", cwd=tmp_path)
    assert proc.returncode == 2
    assert "job file not found" in proc.stderr
    assert not (tmp_path / ".overnight").exists()


def test_cli_bad_job_file_after_a_good_run_keeps_the_ledger(tmp_path):
    """A mistake made later does not touch what an earlier run committed."""
    (tmp_path / "in.jsonl").write_bytes(b'{"id": "a"}\n')
    fn = make_function(tmp_path)
    write_job(tmp_path, good_toml(fn, extra='[output]\npath = "out.jsonl"\n'))
    assert cli("run", "job.toml", cwd=tmp_path).returncode == 0
    write_job(tmp_path, good_toml(fn, extra='[run]\nmax_attempts = "three"\n'))
    proc = cli("run", "job.toml", cwd=tmp_path)
    assert proc.returncode == 2
    ledger = SQLiteLedger(tmp_path / ".overnight" / "ledger.db")
    try:
        job = ledger.get_job("specjob")
        assert job is not None
        assert ledger.counts(job.id).by_state == {"succeeded": 1}
    finally:
        ledger.close()


def test_unknown_input_suffix_needs_a_format(tmp_path):
    (tmp_path / "data.txt").write_bytes(b'{"id": "a"}\n')
    fn = make_function(tmp_path)
    job = overnight.Job(
        source={"path": "data.txt", "id": "id"},
        model={"backend": "python", "function": fn},
        base_dir=tmp_path,
    )
    with pytest.raises(JobFileError) as info:
        job.run()
    assert "[source] path" in str(info.value)
    assert "data.txt" in str(info.value)
    assert not (tmp_path / ".overnight").exists()
    job = overnight.Job(
        source={"path": "data.txt", "id": "id", "format": "jsonl"},
        model={"backend": "python", "function": fn},
        output={"path": "out.jsonl"},
        base_dir=tmp_path,
    )
    assert job.run().exit_code == 0
    assert orjson.loads((tmp_path / "out.jsonl").read_bytes()) == {"id": "a", "output": {"id": "a"}}


def test_bad_schema_is_a_usage_error_before_ingest(tmp_path):
    (tmp_path / "in.jsonl").write_bytes(b'{"id": "a"}\n')
    fn = make_function(tmp_path)
    for schema, fragment in (
        ("missing.json", "[output] schema: file not found"),
        ({"type": "no-such-type"}, "[output] schema: not a valid JSON Schema"),
    ):
        job = overnight.Job(
            source={"path": "in.jsonl", "id": "id"},
            model={"backend": "python", "function": fn},
            output={"schema": schema},
            base_dir=tmp_path,
        )
        with pytest.raises(UsageError) as info:
            job.run()
        assert fragment in str(info.value)
    assert not (tmp_path / ".overnight").exists()


# -- job files that cannot be read, and did-you-mean -------------------------------------------


def test_job_path_that_is_a_folder(tmp_path):
    (tmp_path / "jobs").mkdir()
    with pytest.raises(JobFileError, match="jobs: is a folder; give the job file"):
        load_job_file(tmp_path / "jobs")
    proc = cli("run", "jobs", cwd=tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.startswith("error: jobs: is a folder")


def test_job_file_that_is_not_utf8_names_the_line(tmp_path):
    path = tmp_path / "job.toml"
    path.write_bytes(good_toml("mod:fn").encode() + b"[run]\n# caf\xe9\n")
    with pytest.raises(JobFileError) as info:
        load_job_file(path)
    line = good_toml("mod:fn").count("\n") + 2
    assert str(info.value) == f"{path}: not UTF-8 text (line {line}); save the job file as UTF-8"
    proc = cli("run", "job.toml", cwd=tmp_path)
    assert proc.returncode == 2 and "not UTF-8 text" in proc.stderr


def test_unreadable_job_file(tmp_path):
    if os.geteuid() != 0:
        path = write_job(tmp_path, good_toml("mod:fn"))
        path.chmod(0)
    else:  # root reads any mode: /proc/self/mem exists and fails its first read (EIO)
        path = Path("/proc/self/mem")
    with pytest.raises(JobFileError, match=f"{path}: cannot read the job file: "):
        load_job_file(path)


@pytest.mark.parametrize(
    ("data", "where", "suggestion"),
    [
        (with_(source={"idd": "id"}), "[source] idd", "id"),
        (with_(source={"delimeter": ";"}), "[source] delimeter", "delimiter"),
        (with_(task={"kidn": "map"}), "[task] kidn", "kind"),
        (with_(task={"schem": "x.json"}), "[task] schem", "schema"),  # the alias, not schema_
        (with_(model={"fucntion": "m:f"}), "[model] fucntion", "function"),
        (with_(run={"max_atempts": 3}), "[run] max_atempts", "max_attempts"),
        (with_(output={"inclde": []}), "[output] inclde", "include"),
        (with_(modle={}), "modle", "model"),
    ],
)
def test_unknown_key_says_did_you_mean(data, where, suggestion):
    assert (
        f"job.toml: {where}: unknown key (did you mean `{suggestion}`?)"
        in error_of(data).splitlines()
    )


def test_no_suggestion_for_a_key_like_nothing():
    assert "job.toml: [run] zzzzzz: unknown key" in error_of(with_(run={"zzzzzz": 1})).splitlines()


@pytest.mark.parametrize(
    ("source", "message"),
    [
        ({"path": "in.jsonl", "delimiter": ";"}, "`delimiter` applies to CSV input only"),
        ({"path": "in.txt", "format": "jsonl", "delimiter": ";"}, "applies to CSV input only"),
        ({"path": "in.csv", "delimiter": ";;"}, "`delimiter` must be one character"),
        ({"path": "in.csv", "delimiter": '"'}, "`delimiter` must be one character"),
    ],
)
def test_delimiter_validation(source, message):
    assert message in error_of(with_(source=source))


def test_delimiter_accepted_for_csv():
    assert parse_spec(with_(source={"path": "in.csv", "delimiter": ";"})).source.delimiter == ";"
    spec = parse_spec(with_(source={"path": "in.txt", "format": "csv", "delimiter": "\t"}))
    assert spec.source.delimiter == "\t"
