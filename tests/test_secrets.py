"""API keys: read from the environment cleaned of the whitespace around them, refused (exit 2,
naming the variable, never the value) when they hold anything no HTTP header may carry, and
redacted in every form a message may quote them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.parse
from pathlib import Path

import orjson
import pytest
from llm_helpers import llm_job, write_records

from overnight import llm_job as llm_settings
from overnight.errors import UsageError, redact, secret_forms
from overnight.testing.fake_provider import FakeProvider

CORE = "0123456789abcdef"  # in every secret below: no trace of it may survive redaction


@pytest.mark.parametrize(
    ("secret", "render"),
    [
        (f"sk-{CORE}", str),  # as is
        (f"sk-{CORE}\n", str.strip),  # stripped (the key the client really sent)
        (f"sk-{CORE}\n", lambda k: repr(k)[1:-1]),  # escaped: \n as two characters
        (f"sk-{CORE}\\x", str),  # a backslash inside, as is ...
        (f"sk-{CORE}\\x", repr),  # ... and doubled by repr
        (f"sk-é{CORE}\\x", repr),  # repr keeps the é, json and ascii do not
        (f"sk-é{CORE}", ascii),  # non-ASCII, escaped by ascii()
        (f'sk-"{CORE}', json.dumps),  # JSON-quoted: the quote inside is escaped
        (f"sk-{CORE}/+=", lambda k: urllib.parse.quote(k, safe="")),  # URL-encoded
        (f"sk-{CORE} x", urllib.parse.quote_plus),  # form-encoded: the space as + ...
        (f"sk-{CORE} x", lambda k: urllib.parse.quote(k, safe="")),  # ... or as %20
        (f"sk-{CORE}\n", lambda k: urllib.parse.quote(k.strip(), safe="")),
    ],
)
def test_redact_catches_every_form(
    secret: str, render: object, monkeypatch: pytest.MonkeyPatch
) -> None:
    message = f"Illegal header value b'Bearer {render(secret)}' (see {render(secret)})"  # type: ignore[operator]
    assert CORE in message
    for cleaned in (
        redact(message, secret),  # the predictor's own key
        redact(message, secret.strip()),  # ... which it holds stripped
    ):
        assert CORE not in cleaned and "***" in cleaned, cleaned
    monkeypatch.setenv("MY_SERVICE_API_KEY", secret)  # from the environment, by its name
    assert CORE not in redact(message)


def test_redact_leaves_short_values_and_other_names_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLAG_TOKEN", "yes")  # too short to be a secret: words stay
    monkeypatch.setenv("HOME_DIRECTORY", "/home/someone-else")  # not a secret's name
    text = "yes, /home/someone-else"
    assert redact(text) == text
    assert all(len(form) >= 8 for form in secret_forms("yes\n"))


def key_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, value: str) -> str:
    monkeypatch.setenv("OPENAI_API_KEY", value)
    spec = llm_job(tmp_path, "openai", "http://127.0.0.1:9/v1").spec
    with pytest.raises(UsageError) as info:
        llm_settings.api_key(spec)
    assert info.value.exit_code == 2
    return str(info.value)


def test_key_whitespace_around_is_stripped_inside_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spec = llm_job(tmp_path, "openai", "http://127.0.0.1:9/v1").spec
    monkeypatch.setenv("OPENAI_API_KEY", f"  sk-{CORE}\r\n")
    assert llm_settings.api_key(spec) == f"sk-{CORE}"
    for bad in (f"sk-{CORE} x", f"sk-{CORE}\tx", f"sk-{CORE}\x7fx", f"sk-é{CORE}", "\n \t"):
        message = key_error(tmp_path, monkeypatch, bad)
        assert "OPENAI_API_KEY" in message and CORE not in message, message


def test_api_key_env_names_the_variable(
    tmp_path: Path, fake: FakeProvider, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`[model] api_key_env`: the key comes from that variable, not the provider's default
    (which here holds a key the server refuses); unset, it is exit 2 naming it."""
    write_records(tmp_path, 3)
    secret = f"sk-{CORE}-own"
    fake.knobs.require_key = secret
    monkeypatch.setenv("OPENAI_API_KEY", "sk-the-wrong-one-000000")
    monkeypatch.setenv("TEAM_LLM_CREDENTIAL", secret + "\n")  # not a name `redact` knows
    job = llm_job(tmp_path, "openai", fake.openai_url, model={"api_key_env": "TEAM_LLM_CREDENTIAL"})
    report = job.run()
    assert report.exit_code == 0 and report.counts["succeeded"] == 3
    assert fake.stats.status_counts[401] == 0
    monkeypatch.delenv("TEAM_LLM_CREDENTIAL")
    again = llm_job(
        tmp_path, "openai", fake.openai_url, name="j2", model={"api_key_env": "TEAM_LLM_CREDENTIAL"}
    )
    with pytest.raises(UsageError, match="TEAM_LLM_CREDENTIAL") as info:
        again.run()
    assert info.value.exit_code == 2


JOB = """
[source]
path = "in.jsonl"
id = "id"

[task]
kind = "generate"
text = "Reply to: {{{{ text }}}}"

[model]
backend = "openai"
name = "gpt-4o-mini"
base_url = "{url}"

[output]
path = "out.jsonl"
"""


def cli_run(tmp_path: Path, key: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OPENAI_API_KEY": key}
    return subprocess.run(
        [sys.executable, "-m", "overnight", "run", "job.toml", "--json"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )


def test_cli_key_with_a_trailing_newline_works_and_never_leaks(
    tmp_path: Path, fake: FakeProvider
) -> None:
    """As read from a secret file. It used to fail every request with "connection error:
    Illegal header value b'Bearer sk-…\\n'", the key in full in stdout, the errors file and
    the ledger."""
    write_records(tmp_path, 6)
    (tmp_path / "job.toml").write_text(JOB.format(url=fake.openai_url))
    key = f"sk-proj-{CORE}/+=\n"
    fake.knobs.require_key = key.strip()  # the server takes the key, not the newline
    fake.knobs.fail_next = 2  # and some errors on the way, with their messages
    proc = cli_run(tmp_path, key)
    assert proc.returncode == 0, proc.stderr
    assert orjson.loads(proc.stdout)["succeeded"] == 6
    blobs = {"stdout": proc.stdout.encode(), "stderr": proc.stderr.encode()}
    blobs.update({str(p): p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()})
    assert any(".overnight" in name and name.endswith(".db") for name in blobs)
    assert {"out.jsonl", "out.errors.jsonl"} <= {Path(name).name for name in blobs}
    for name, blob in blobs.items():
        assert CORE.encode() not in blob, name
        assert not any(form.encode() in blob for form in secret_forms(key)), name


def test_cli_key_with_whitespace_inside_is_exit_2_naming_the_variable(
    tmp_path: Path, fake: FakeProvider
) -> None:
    write_records(tmp_path, 2)
    (tmp_path / "job.toml").write_text(JOB.format(url=fake.openai_url))
    proc = cli_run(tmp_path, f"sk-proj-{CORE} pasted twice sk-proj-{CORE}")
    assert proc.returncode == 2
    assert "OPENAI_API_KEY" in proc.stderr and "Traceback" not in proc.stderr
    assert CORE not in proc.stdout + proc.stderr
    assert sum(fake.stats.requests.values()) == 0
    assert not (tmp_path / ".overnight").exists()  # refused before anything was read
