"""Client-controlled strings cannot drive the terminal of whoever reads ollamon's CLI.

Hostile model names, endpoints, user agents, user ids, error messages and alert labels are written through
the real storage; the real ``ollamon`` runs as a subprocess (or on a pseudo-terminal, as a person runs it),
and its raw bytes are checked: no control, bidi or separator character, and the escaped form shown.
"""

from __future__ import annotations

import asyncio
import csv
import io
import os
import random
import subprocess
import sys
import time
import unicodedata
from pathlib import Path

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from alerts.state import Alert
from alerts.store import AlertStore
from proxy.cli.terminal import json_text, visible
from proxy.cli.top import lines_of
from storage.sqlite import SQLiteStore
from storage.writer import Writer
from tests.analytics_gen import open_store, records_between, write
from tests.test_cli_analytics import in_pty, read_until

# A title change (OSC ... BEL), a screen clear (CSI 2J), a right-to-left override, an 8-bit CSI (C1).
MODEL = "evil\x1b]0;pwned\x07\x1b[2J\u202egpj\x9b31m"
MODEL_SHOWN = r"evil\x1b]0;pwned\x07\x1b[2J\u202egpj\x9b31m"
ENDPOINT = "/api/chat\x1b[8m"
ENDPOINT_SHOWN = r"/api/chat\x1b[8m"
USER_AGENT = "curl\x1b[31m\r\nfake row\x7f"
USER_AGENT_SHOWN = r"curl\x1b[31m\r\nfake row\x7f"
ERROR = "upstream said \x1b]52;c;cHduZWQ=\x07 \u2066hidden\u2069"
ERROR_SHOWN = r"upstream said \x1b]52;c;cHduZWQ=\x07 \u2066hidden\u2069"

_BIDI = set("\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")


def raw_controls(text: str) -> list[str]:
    """The characters in ``text`` that a terminal would act on (line breaks between lines excepted)."""
    unsafe = ("Cc", "Cs", "Zl", "Zp")
    return [c for line in text.split("\n") for c in line if unicodedata.category(c) in unsafe or c in _BIDI]


def run(*args: str, cwd: Path) -> tuple[int, str, str]:
    """``ollamon *args``; stdout and stderr decoded from their exact bytes (text mode would turn \\r into \\n)."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2]), "PYTHONIOENCODING": "utf-8"}
    r = subprocess.run(
        [sys.executable, "-m", "proxy", *args], capture_output=True, timeout=60, cwd=cwd, env=env
    )
    return r.returncode, r.stdout.decode("utf-8"), r.stderr.decode("utf-8")


@pytest.fixture
async def hostile_db(tmp_path: Path) -> Path:
    """Ordinary traffic, then the hostile request last (and failed, so it also has an error row)."""
    path = tmp_path / "hostile.db"
    recs = records_between(random.Random(3), time.time() - 600, time.time() - 1, 20)
    evil = recs[-1]
    evil.model_name, evil.endpoint, evil.user_agent, evil.user_id = MODEL, ENDPOINT, USER_AGENT, "\x1b[8m"
    evil.success, evil.cancelled, evil.error_message, evil.done_reason = False, False, ERROR, None
    store = await open_store(path)
    await write(store, recs)
    await store.close()
    return path


@settings(max_examples=300, deadline=None)
@given(st.text())
def test_visible_and_json_text_leave_nothing_a_terminal_acts_on(text: str) -> None:
    assert raw_controls(visible(text)) == []
    assert visible(visible(text)) == visible(text)
    if not any(unicodedata.category(c) == "Cs" for c in text):  # JSON cannot hold lone surrogates
        assert raw_controls(json_text({"v": text})) == []
        assert orjson.loads(json_text({"v": text}, indent=True)) == {"v": text}  # still exact data


def test_visible_escapes_and_keeps() -> None:
    assert visible(MODEL) == MODEL_SHOWN
    assert visible("a\tb\nc\rd\x00\x7f\x85\u2028") == r"a\tb\nc\rd\x00\x7f\x85\u2028"
    for ordinary in ("qwen3:0.6b", "hf.co/org/Llama-3.2-GGUF:Q4_K_M", "模型-7b", "naïve 🦙", r"C:\db\x.db"):
        assert visible(ordinary) == ordinary


async def test_tables_show_hostile_values_escaped(hostile_db: Path, tmp_path: Path) -> None:
    commands = {
        ("stats", "--since", "1h"): [MODEL_SHOWN],
        ("requests", "--limit", "5"): [MODEL_SHOWN, ENDPOINT_SHOWN],
        ("requests", "--failed", "--model", MODEL): [MODEL_SHOWN, ENDPOINT_SHOWN],
        ("db", "stats"): ["inference_metrics"],
    }
    for argv, shown in commands.items():
        rc, out, err = await asyncio.to_thread(run, *argv, "--db", str(hostile_db), cwd=tmp_path)
        assert rc == 0, (argv, err)
        assert raw_controls(out) == [] and raw_controls(err) == [], (argv, out)
        for text in shown:
            assert text in out, (argv, out)


async def test_json_is_exact_and_terminal_safe(hostile_db: Path, tmp_path: Path) -> None:
    rc, out, _ = await asyncio.to_thread(run, "requests", "--db", str(hostile_db), "--json", cwd=tmp_path)
    assert rc == 0 and raw_controls(out) == []
    newest = orjson.loads(out)["requests"][0]
    assert (newest["model_name"], newest["endpoint"], newest["user_agent"]) == (MODEL, ENDPOINT, USER_AGENT)
    assert newest["error_message"] == ERROR

    rc, out, _ = await asyncio.to_thread(run, "stats", "--db", str(hostile_db), "--json", cwd=tmp_path)
    assert rc == 0 and raw_controls(out) == []
    assert MODEL in {m["model"] for m in orjson.loads(out)["models"]}

    argv = ("export", "--db", str(hostile_db), "--format", "jsonl")
    rc, out, _ = await asyncio.to_thread(run, *argv, cwd=tmp_path)
    assert rc == 0 and raw_controls(out) == []
    assert orjson.loads(out.splitlines()[-1])["user_agent"] == USER_AGENT


async def test_csv_is_exact_through_a_pipe_and_escaped_on_a_terminal(
    hostile_db: Path, tmp_path: Path
) -> None:
    argv = ("export", "--db", str(hostile_db), "--format", "csv")
    rc, out, _ = await asyncio.to_thread(run, *argv, cwd=tmp_path)
    assert rc == 0
    rows = list(csv.DictReader(io.StringIO(out, newline="")))
    assert (rows[-1]["model_name"], rows[-1]["user_agent"]) == (MODEL, USER_AGENT)  # the data, exactly

    proc, fd = in_pty(*argv, cwd=tmp_path)
    try:
        seen = await asyncio.to_thread(read_until, fd, lambda _: False)  # until the command ends
    finally:
        proc.wait(timeout=30)
        os.close(fd)
    text = seen.decode().replace("\r\r\n", "\n")  # CSV's \r\n, to which the terminal adds its \r
    assert proc.returncode == 0 and raw_controls(text) == [], text[-500:]
    assert MODEL_SHOWN in text and USER_AGENT_SHOWN in text


async def test_error_messages_escape_what_they_echo(hostile_db: Path, tmp_path: Path) -> None:
    rc, _, err = await asyncio.to_thread(
        run, "export", "--db", str(hostile_db), "--table", "t\x1b[2J", cwd=tmp_path
    )
    assert rc == 2 and r"t\x1b[2J" in err and raw_controls(err) == []
    missing = tmp_path / "gone\x1b]0;pwned\x07.db"
    for argv in (("stats", "--db", str(missing)), ("alerts", "--db", str(missing))):
        rc, _, err = await asyncio.to_thread(run, *argv, cwd=tmp_path)
        assert rc == 1 and r"gone\x1b]0;pwned\x07.db" in err and raw_controls(err) == [], (argv, err)


async def test_alerts_table_escapes_labels_and_errors(hostile_db: Path, tmp_path: Path) -> None:
    db = SQLiteStore(hostile_db)
    await db.open()
    writer = Writer(db)
    await writer.start()
    store = AlertStore(writer, db.reads)
    await store.open()
    alert = Alert(
        rule="slow-model",
        fingerprint=orjson.dumps({"model": MODEL}).decode(),
        labels={"model": MODEL},
        severity="warning",
        threshold=10000.0,
        state="firing",
        value=12345.678,
        started_at=time.time() - 60,
        fired_at=time.time() - 30,
    )
    await store.save(alert, [("inactive", "firing")], time.time())
    assert alert.id is not None
    await store.record_delivery(alert.id, ERROR, time.time())
    await store.close()
    await writer.stop()
    await db.close()

    rc, out, err = await asyncio.to_thread(run, "alerts", "--db", str(hostile_db), cwd=tmp_path)
    assert rc == 0, err
    assert raw_controls(out) == [] and f"model={MODEL_SHOWN}" in out and ERROR_SHOWN[:40] in out
    assert "12,345.68" in out and "10,000.00" in out  # not 1.235e+04
    rc, out, _ = await asyncio.to_thread(run, "alerts", "--db", str(hostile_db), "--json", cwd=tmp_path)
    (row,) = orjson.loads(out)
    assert rc == 0 and raw_controls(out) == [] and row["labels"] == {"model": MODEL}
    assert row["last_error"] == ERROR


def test_top_lines_are_escaped() -> None:
    figures = {"requests_per_s": 1.0, "tokens_per_s": 2.0, "ttft_ms_p95": 3.0, "response_time_ms_p95": 4.0}
    figures |= {"failed": 0, "requests": 5, "error_rate": 0.0}
    frame = {
        "at": "2026-11-26T10:00:00.000Z",
        "summary": {"window": {"seconds": 60}, "overall": figures, "models": [{"model": MODEL, **figures}]},
        "system": None,
    }
    lines = [text for text, _ in lines_of(frame, "http://h\x1b[2J")]
    assert all(raw_controls(line) == [] for line in lines), lines
    assert any(r"evil\x1b]0;pwned\x07" in line for line in lines), lines
    assert r"http://h\x1b[2J" in lines[0]
    error = lines_of({"at": "now", "error": ERROR}, "db")
    assert raw_controls(error[-1][0]) == [] and ERROR_SHOWN in error[-1][0]


def test_top_on_a_terminal_shows_hostile_model_names_escaped(tmp_path: Path) -> None:
    path = tmp_path / "top.db"
    short = "x\x1b[2J\u202ey"  # short enough for top's model column once escaped

    async def seed() -> None:
        recs = records_between(random.Random(5), time.time() - 30, time.time() - 1, 10)
        for r in recs:
            r.model_name = short
        store = await open_store(path)
        await write(store, recs)
        await store.close()

    asyncio.run(seed())
    proc, fd = in_pty("top", "--db", str(path), "--interval", "0.2", cwd=tmp_path)
    try:
        seen = read_until(fd, lambda b: rb"x\x1b[2J\u202ey" in b)
        os.write(fd, b"q")
        read_until(fd, lambda _: proc.poll() is not None)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=30)
        os.close(fd)
    assert rb"x\x1b[2J\u202ey" in seen, seen[-2000:]
    # curses writes escape sequences of its own; the hostile ones must not be among them.
    assert short.encode() not in seen and "\u202e".encode() not in seen and b"x\x1b[2J" not in seen
