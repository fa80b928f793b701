"""The analytics CLI as subprocesses on a real database (and against a running proxy), ``top`` in a pty."""

from __future__ import annotations

import asyncio
import csv
import fcntl
import io
import os
import pty
import random
import select
import sqlite3
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path
from typing import Any

import orjson
import pytest

from storage.browse import RequestQuery, recent_requests
from storage.queries import summary
from storage.records import iso_utc
from tests.analytics_gen import open_store, records_between, write
from tests.fixtures.proxy import ProxyHandle

NOW = time.time()


def ollamon(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    return subprocess.run(
        [sys.executable, "-m", "proxy", *args], capture_output=True, text=True, timeout=60, cwd=cwd, env=env
    )


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
    count = next(m["requests"] for m in mistral if m["model"] == "mistral")
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


def _read_for(fd: int, seconds: float) -> bytes:
    out = b""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], 0.05)
        if ready:
            try:
                out += os.read(fd, 65536)
            except OSError:
                break
    return out


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
    fd, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 30, 120, 0, 0))
    env = {**os.environ, "TERM": "xterm", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.Popen(
        [sys.executable, "-m", "proxy", "top", "--db", str(path), "--interval", "0.2"],
        stdin=slave,
        stdout=slave,
        stderr=slave,
        env=env,
        cwd=tmp_path,
        start_new_session=True,
    )
    os.close(slave)
    try:
        first = _read_for(fd, 3.0)
        assert b"requests/s" in first and b"llama3.2" in first and b"qwen3:0.6b" in first, first[-2000:]
        assert b"CPU n/a" in first  # no system_metrics samples in this database
        aio.run(seed(("mistral-new",), 10, 1000))  # a model appears: a later frame must show it
        later = _read_for(fd, 3.0)
        assert b"mistral-new" in later, later[-2000:]
        os.write(fd, b"q")
        deadline = time.monotonic() + 10
        while proc.poll() is None and time.monotonic() < deadline:
            _read_for(fd, 0.1)
        assert proc.returncode == 0, "top did not quit on q"
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=10)
        os.close(fd)
