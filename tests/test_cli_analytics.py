"""The analytics CLI as subprocesses on a real database (and against a running proxy), ``top`` in a pty."""

from __future__ import annotations

import asyncio
import csv
import fcntl
import io
import itertools
import os
import pty
import random
import re
import select
import signal
import sqlite3
import struct
import subprocess
import sys
import termios
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import pytest

from storage.browse import RequestQuery, recent_requests
from storage.queries import summary
from storage.records import iso_utc
from tests.analytics_gen import open_store, records_between, write
from tests.fixtures.cli import ollamon
from tests.fixtures.proxy import ProxyHandle

NOW = time.time()


@pytest.fixture
async def db(tmp_path: Path) -> Path:
    path = tmp_path / "cli.db"
    store = await open_store(path)
    await write(store, records_between(random.Random(11), NOW - 40 * 86400, NOW - 1, 1500))
    await store.close()
    return path


async def test_stats_requests_and_db_stats(db: Path, tmp_path: Path) -> None:
    r = ollamon("stats", "--db", str(db), "--since", "3d", "--json", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    data = orjson.loads(r.stdout)
    conn = sqlite3.connect(db)
    direct = summary(conn, NOW - 3 * 86400, NOW)
    assert data["overall"]["requests"] == direct["overall"]["requests"] > 0
    assert data["overall"]["failed"] == direct["overall"]["failed"]

    r = ollamon("stats", "--db", str(db), "--since", "3d", "--model", "mistral", cwd=tmp_path)
    assert r.returncode == 0 and "requests" in r.stdout and "mistral" in r.stdout
    mistral = summary(conn, NOW - 3 * 86400, NOW, exact=False)["models"]
    count = next(m["requests"] for m in mistral if m["model"] == "mistral:latest")
    assert f"{count:,}" in r.stdout

    r = ollamon("requests", "--db", str(db), "--limit", "5", "--failed", "--json", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    rows = orjson.loads(r.stdout)["requests"]
    assert rows == recent_requests(conn, RequestQuery(limit=5, success=False))["requests"]
    r = ollamon("requests", "--db", str(db), "--limit", "3", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    newest = recent_requests(conn, RequestQuery(limit=3))["requests"]
    assert all(row["request_id"] in r.stdout for row in newest)

    r = ollamon("db", "stats", "--db", str(db), "--json", cwd=tmp_path)
    stats = orjson.loads(r.stdout)
    assert stats["tables"]["inference_metrics"] == 1500
    r = ollamon("db", "stats", "--db", str(db), cwd=tmp_path)
    assert r.returncode == 0 and "inference_metrics" in r.stdout and "1,500" in r.stdout


async def test_bad_input_exits_2_naming_it(db: Path, tmp_path: Path) -> None:
    r = ollamon("stats", "--db", str(db), "--since", "yesterday", cwd=tmp_path)
    assert r.returncode == 2 and "'since'" in r.stderr
    r = ollamon("stats", "--db", str(tmp_path / "missing.db"), cwd=tmp_path)
    assert r.returncode == 1 and "no database" in r.stderr
    r = ollamon("export", "--db", str(db), "--table", "nope", cwd=tmp_path)
    assert r.returncode == 2 and "--table" in r.stderr


async def test_export_csv_and_jsonl(db: Path, tmp_path: Path) -> None:
    since = iso_utc(NOW - 10 * 86400)
    conn = sqlite3.connect(db)
    want = conn.execute("SELECT request_id FROM inference_metrics WHERE timestamp >= ? ORDER BY id", (since,))
    ids = [row[0] for row in want]
    r = ollamon("export", "--db", str(db), "--since", since, "--format", "csv", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    rows = list(csv.DictReader(io.StringIO(r.stdout)))
    assert [row["request_id"] for row in rows] == ids
    out = tmp_path / "e.jsonl"
    r = ollamon(
        "export", "--db", str(db), "--since", "10d", "--format", "jsonl", "-o", str(out), cwd=tmp_path
    )
    assert r.returncode == 0, r.stderr
    lines = [orjson.loads(x) for x in out.read_text().splitlines()]
    assert len(lines) in (len(ids), len(ids) - 1, len(ids) + 1)  # "10d" is relative to a later now
    assert set(lines[0]) >= {"request_id", "ttft_ms", "metadata"}


async def test_db_prune_dry_run_then_real(db: Path, tmp_path: Path) -> None:
    conn = sqlite3.connect(db)
    total = conn.execute("SELECT COUNT(*) FROM inference_metrics").fetchone()[0]
    conn.close()
    r = ollamon("db", "prune", "--db", str(db), "--dry-run", "--json", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    dry = orjson.loads(r.stdout)
    assert 0 < dry["deleted"]["inference_metrics"] < total
    conn = sqlite3.connect(db)
    assert conn.execute("SELECT COUNT(*) FROM inference_metrics").fetchone()[0] == total
    conn.close()
    r = ollamon("db", "prune", "--db", str(db), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    conn = sqlite3.connect(db)
    assert conn.execute("SELECT COUNT(*) FROM inference_metrics").fetchone()[0] == (
        total - dry["deleted"]["inference_metrics"]
    )
    assert conn.execute("SELECT COUNT(*) FROM retention_runs").fetchone()[0] == 1


async def test_url_mode_against_a_running_proxy(emulator: Any, proxy: ProxyHandle, tmp_path: Path) -> None:
    import aiohttp

    async with aiohttp.ClientSession() as s:
        for i in range(3):
            async with s.post(
                f"{proxy.url}/api/generate", json={"model": "llama3.2", "prompt": str(i)}
            ) as resp:
                await resp.read()
    await proxy.wait_rows(3)
    r = await asyncio.to_thread(
        ollamon, "stats", "--url", proxy.url, "--since", "10m", "--json", cwd=tmp_path
    )
    assert r.returncode == 0, r.stderr
    assert orjson.loads(r.stdout)["overall"]["requests"] == 3
    r = await asyncio.to_thread(ollamon, "requests", "--url", proxy.url, "--json", cwd=tmp_path)
    assert len(orjson.loads(r.stdout)["requests"]) == 3
    r = await asyncio.to_thread(ollamon, "stats", "--url", proxy.url, "--since", "bad", cwd=tmp_path)
    assert r.returncode == 2 and "'since'" in r.stderr
    r = await asyncio.to_thread(ollamon, "db", "stats", "--url", proxy.url, "--json", cwd=tmp_path)
    assert orjson.loads(r.stdout)["writer"]["written"] >= 3


def _columns(dashes: str) -> list[tuple[int, int]]:
    """(start, end) of each column, from a table's underline."""
    return [m.span() for m in re.finditer(r"-+", dashes)]


def assert_aligned(lines: list[str]) -> None:
    """Every row fills the columns the underline draws: separators stay blank, columns start in place."""
    header, dashes, *rows = lines
    spans = _columns(dashes)
    assert len(spans) == len(header.split()), lines[:2]
    for row in rows:
        for (_, end), (start, _) in itertools.pairwise(spans):
            assert row[end:start].strip() == "", (row, lines[:2])
        last, end = spans[-1]
        # The last column starts in place (text, left-aligned) or ends in place (a number).
        assert row[last - 1] == " " and (row[last] != " " or len(row) == end), (row, lines[:2])


def test_requests_follow_prints_the_last_rows_then_only_newer_ones(db: Path, tmp_path: Path) -> None:
    conn = sqlite3.connect(db)
    first = [r["request_id"] for r in reversed(recent_requests(conn, RequestQuery(limit=3))["requests"])]
    conn.close()
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    argv = ["requests", "--db", str(db), "--follow", "--limit", "3", "--interval", "0.1"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "proxy", *argv],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=tmp_path,
        env=env,
    )
    assert proc.stdout is not None and proc.stderr is not None
    fd = proc.stdout.fileno()

    def add(ids: range) -> None:
        # Written later but stamped two days earlier (a long request finishing late): "newer" is
        # the order rows are written in, not their timestamps.
        recs = records_between(random.Random(ids[0]), NOW - 2 * 86400, NOW - 86400, len(ids), ids[0])

        async def go() -> None:
            store = await open_store(db)
            await write(store, recs)
            await store.close()

        asyncio.run(go())

    try:
        out = read_until(fd, lambda b: first[-1].encode() in b)
        add(range(900000, 900002))
        out += read_until(fd, lambda b: b"r0900001" in out + b)
        add(range(900002, 900003))  # the poll that prints this one would repeat anything wrongly seen
        out += read_until(fd, lambda b: b"r0900002" in out + b)
        proc.send_signal(signal.SIGINT)
        rest, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err
    lines = (out + rest).decode().splitlines()
    ids = [line.split()[-1] for line in lines[2:]]
    assert ids == [*first, "r0900000", "r0900001", "r0900002"], lines
    head = "timestamp model endpoint status ok response_time_ms ttft_ms completion_tokens request_id"
    assert lines[0].split() == head.split()
    assert_aligned(lines)


async def test_numbers_sizes_and_times_for_humans(db: Path, tmp_path: Path) -> None:
    r = ollamon("stats", "--db", str(db), "--since", "40d", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert not re.search(r"\d[eE][+-]?\d", r.stdout), r.stdout  # no scientific notation anywhere
    # 1,500 requests over 40 days is 0.000434/s: a tiny rate is written out, not 4.34e-04.
    per_s = next(line for line in r.stdout.splitlines() if line.startswith("requests_per_s")).split()[1]
    assert per_s.startswith("0.000") and float(per_s) == pytest.approx(1500 / (40 * 86400), rel=0.05)
    assert_aligned(r.stdout.splitlines()[1:26])

    r = ollamon("requests", "--db", str(db), "--limit", "5", cwd=tmp_path)
    lines = r.stdout.splitlines()
    assert_aligned(lines)
    assert all(ISO_UTC.fullmatch(line.split()[0].encode()) for line in lines[2:]), lines

    r = ollamon("db", "stats", "--db", str(db), cwd=tmp_path)
    file_bytes = sqlite3.connect(db).execute("PRAGMA page_count").fetchone()[0] * 4096
    shown = re.search(r"^file_bytes +([\d,.]+) (KiB|MiB)$", r.stdout, re.M)
    assert shown, r.stdout
    scale = {"KiB": 1024, "MiB": 1024 * 1024}[shown[2]]
    assert float(shown[1].replace(",", "")) == pytest.approx(file_bytes / scale, abs=0.05)


def read_until(fd: int, done: Callable[[bytes], bool], within: float = 60.0) -> bytes:
    """Read ``fd`` until ``done(all read so far)``, its end, or ``within`` seconds (generous: no timing
    is asserted, a busy machine only makes this wait longer)."""
    out = b""
    deadline = time.monotonic() + within
    while not done(out) and time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], 0.05)
        if ready:
            try:
                chunk = os.read(fd, 65536)
            except OSError:  # a pty whose other side has closed
                break
            if not chunk:
                break
            out += chunk
    return out


def in_pty(*args: str, cwd: Path) -> tuple[subprocess.Popen[bytes], int]:
    """``ollamon *args`` on a 30x120 pseudo-terminal, as a person runs it; returns it and the pty's fd."""
    fd, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 30, 120, 0, 0))
    env = {**os.environ, "TERM": "xterm", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.Popen(
        [sys.executable, "-m", "proxy", *args],
        stdin=slave,
        stdout=slave,
        stderr=slave,
        env=env,
        cwd=cwd,
        start_new_session=True,
    )
    os.close(slave)
    return proc, fd


ISO_UTC = re.compile(rb"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z")


def test_top_draws_live_frames_in_a_pty(tmp_path: Path) -> None:
    import asyncio as aio

    path = tmp_path / "top.db"

    async def seed(models: tuple[str, ...], n: int, first: int) -> None:
        store = await open_store(path)
        recs = records_between(random.Random(first), time.time() - 30, time.time() - 1, n, first)
        for r in recs:
            r.model_name = random.Random(r.request_id).choice(models)
        await write(store, recs)
        await store.close()

    aio.run(seed(("llama3.2", "qwen3:0.6b"), 40, 0))
    proc, fd = in_pty("top", "--db", str(path), "--interval", "0.2", cwd=tmp_path)
    try:
        first = read_until(fd, lambda b: b"llama3.2" in b and b"qwen3:0.6b" in b and b"CPU n/a" in b)
        assert b"requests/s" in first and b"llama3.2" in first and b"qwen3:0.6b" in first, first[-2000:]
        assert b"CPU n/a" in first  # no system_metrics samples in this database
        assert ISO_UTC.search(first) and b"ttft_ms_p95" in first  # one time format, units in headers
        aio.run(seed(("mistral-new",), 10, 1000))  # a model appears: a later frame must show it
        later = read_until(fd, lambda b: b"mistral-new" in b)
        assert b"mistral-new" in later, later[-2000:]
        os.write(fd, b"q")
        read_until(fd, lambda _: proc.poll() is not None)
        assert proc.wait(timeout=30) == 0, "top did not quit on q"
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=10)
        os.close(fd)


def test_top_stops_on_ctrl_c_and_gives_the_terminal_back(tmp_path: Path) -> None:
    """SIGINT (what Ctrl-C sends) ends ``top`` with status 0 within the poll, and curses restores the
    terminal (the alternate screen is left: ESC [ ? 1049 l), as ``requests --follow`` stops on it."""
    import asyncio as aio

    path = tmp_path / "top.db"

    async def seed() -> None:
        store = await open_store(path)
        await write(store, records_between(random.Random(3), time.time() - 30, time.time() - 1, 10, 0))
        await store.close()

    aio.run(seed())
    proc, fd = in_pty("top", "--db", str(path), "--interval", "5", cwd=tmp_path)
    try:
        read_until(fd, lambda b: b"requests/s" in b)
        proc.send_signal(signal.SIGINT)
        tail = read_until(fd, lambda _: proc.poll() is not None)
        assert proc.wait(timeout=30) == 0, "top did not stop on SIGINT"
        assert b"\x1b[?1049l" in tail or b"\x1b[?47l" in tail, tail[-300:]
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=10)
        os.close(fd)
