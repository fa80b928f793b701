"""Usage reports: totals equal the raw rows inside raw retention and the hourly rollups beyond it; the API
and ``ollamon usage`` give the same figures as table, CSV and JSON, and refuse bad parameters with 400.

Rows go through the real store, writer and batch hooks (a real SQLite file), retention runs for real, and
expected figures are summed here from the records that were written.
"""

from __future__ import annotations

import asyncio
import csv
import io
import json
import random
import sqlite3
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from proxy.cli.main import main
from storage.records import InferenceRecord, iso_utc
from storage.retention import Retention, RetentionPolicy, floor_hour
from storage.sqlite import SQLiteStore
from storage.usage_reads import usage
from storage.usage_rollup import UsageHook
from storage.writer import Writer
from tests.fixtures.emulator import RunningEmulator
from tests.fixtures.proxy import MakeProxy
from tests.polling import until

DAY = 86400.0
KEYS = [("k1", "red"), ("k2", "red"), ("k3", "blue"), (None, None)]
MODELS = ["llama3.2:latest", "qwen3:0.6b", "gpt-oss:120b-cloud"]
USERS = ["alice", "bob", None]


def _records(now: float, n: int = 600, seed: int = 3) -> list[InferenceRecord]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        at = now - rng.uniform(0, 40 * DAY)
        key, team = rng.choice(KEYS)
        status = rng.choice([200] * 8 + [500, 429])
        rec = InferenceRecord(
            timestamp=iso_utc(at),
            request_id=f"r{i}",
            model_name=rng.choice(MODELS),
            endpoint="/api/chat",
            prompt_tokens=rng.randint(1, 5000),
            completion_tokens=rng.choice([None, rng.randint(0, 900)]),
            success=status == 200,
            cancelled=False,
            status_code=status,
            user_id=rng.choice(USERS),
            api_key_id=key,
            team=team,
            cost_usd=round(rng.uniform(0, 0.01), 6),
            cloud_equiv_usd=rng.choice([None, 0.002]),
            energy_j=rng.choice([None, rng.uniform(1, 500)]),
        )
        rec.energy_cost_usd = None if rec.energy_j is None else rec.energy_j / 3.6e6 * 0.3
        out.append(rec)
    # a load call: not an inference, counted nowhere
    out.append(
        InferenceRecord(
            timestamp=iso_utc(now - 60),
            request_id="load",
            model_name=MODELS[0],
            endpoint="/api/generate",
            done_reason="load",
            prompt_tokens=999,
        )
    )
    return out


def _expected(
    records: list[InferenceRecord], dim: str, since: float, until: float
) -> dict[Any, dict[str, Any]]:
    out: dict[Any, dict[str, Any]] = defaultdict(lambda: defaultdict(float))
    lo, hi = iso_utc(since), iso_utc(until)
    for r in records:
        if r.done_reason == "load" or not lo <= r.timestamp < hi:
            continue
        e = out[getattr(r, dim)]
        e["requests"] += 1
        e["failed"] += not r.success
        e["rate_limited"] += r.status_code == 429
        if r.status_code == 429:
            continue  # refused: not served, so no tokens, cost or energy
        e["prompt_tokens"] += r.prompt_tokens or 0
        e["completion_tokens"] += r.completion_tokens or 0
        e["cost_usd"] += r.cost_usd or 0
        e["cloud_equiv_usd"] += r.cloud_equiv_usd or 0
        e["energy_j"] += r.energy_j or 0
        e["energy_cost_usd"] += r.energy_cost_usd or 0
    return out


def _check(report: dict[str, Any], expected: dict[Any, dict[str, Any]], by: str) -> None:
    got = {r[by]: r for r in report["rows"]}
    assert set(got) == set(expected), (set(got), set(expected))
    for name, e in expected.items():
        for figure, value in e.items():
            assert got[name][figure] == pytest.approx(value, rel=1e-9, abs=1e-9), (name, figure)
        assert got[name]["total_tokens"] == e["prompt_tokens"] + e["completion_tokens"]
    assert report["total"]["requests"] == sum(e["requests"] for e in expected.values())
    assert report["total"]["cost_usd"] == pytest.approx(sum(e["cost_usd"] for e in expected.values()))


async def _write(path: Path, records: list[InferenceRecord]) -> tuple[SQLiteStore, Writer]:
    store = SQLiteStore(path)
    await store.open()
    store.add_hook(UsageHook())
    writer = Writer(store, batch_rows=64, flush_interval_s=0.01)
    await writer.start()
    for r in records:
        writer.submit(r)
    await until(lambda: writer.stats()["written"] >= len(records), within=30, what="all records written")
    return store, writer


async def test_totals_equal_raw_rows_inside_retention_and_rollups_beyond_it(tmp_path: Path) -> None:
    now = time.time()
    records = _records(now)
    path = tmp_path / "usage.db"
    store, writer = await _write(path, records)
    try:
        conn = sqlite3.connect(path)
        # Inside raw retention, any window (edges mid-hour): the report equals the raw rows' sums.
        since, until_ = now - 10 * DAY - 1234.5, now - 77.7
        for by, dim in (
            ("key", "api_key_id"),
            ("team", "team"),
            ("model", "model_name"),
            ("user", "user_id"),
        ):
            report = usage(conn, since, until_, by)
            _check(report, _expected(records, dim, since, until_), by)
        assert report["sources"]["hours"] is not None and len(report["sources"]["raw"]) == 2
        # ... and the raw rows in SQL agree with what was written
        raw = conn.execute(
            "SELECT COUNT(*), TOTAL(CASE WHEN status_code = 429 THEN 0 ELSE cost_usd END) FROM inference_metrics WHERE timestamp >= ? AND timestamp < ? "
            "AND (done_reason IS NULL OR done_reason != 'load')",
            (iso_utc(since), iso_utc(until_)),
        ).fetchone()
        assert raw[0] == report["total"]["requests"] and raw[1] == pytest.approx(report["total"]["cost_usd"])

        # Retention deletes raw rows older than 30 days; a 40-day report still has all of them.
        result = await Retention(RetentionPolicy(raw_days=30, rollup_days=400), path).run_once(
            writer, now=now
        )
        assert result["error"] is None and result["deleted"]["inference_metrics"] > 50
        oldest = conn.execute("SELECT MIN(timestamp) FROM inference_metrics").fetchone()[0]
        assert oldest >= iso_utc(floor_hour(now - 30 * DAY))
        since = floor_hour(now - 41 * DAY)
        for by, dim in (("key", "api_key_id"), ("team", "team"), ("user", "user_id")):
            _check(usage(conn, since, now + 1, by), _expected(records, dim, since, now + 1), by)
        conn.close()
    finally:
        await writer.stop()
        await store.close()


def test_migration_backfills_usage_from_existing_rows(tmp_path: Path) -> None:
    from storage.migrations import MIGRATIONS, apply_migrations

    path = tmp_path / "old.db"
    conn = sqlite3.connect(path)
    upto = [m.__name__ for m in MIGRATIONS].index("m009_usage_cost")
    apply_migrations(conn, MIGRATIONS[:upto])
    now = floor_hour(time.time())
    rows = [
        (iso_utc(now - 7200 + 5), "a", "m1", 10, 5, 1, 0, 200, "k1", "t1", "u1"),
        (iso_utc(now - 7200 + 50), "b", "m1", 1, 2, 0, 0, 429, "k1", "t1", "u1"),
        (iso_utc(now - 3600 + 1), "c", "m2", 7, None, 1, 0, 200, None, None, None),
    ]
    conn.executemany(
        "INSERT INTO inference_metrics (timestamp, request_id, model_name, prompt_tokens, completion_tokens, "
        "success, cancelled, status_code, api_key_id, team, user_id, endpoint) VALUES (?,?,?,?,?,?,?,?,?,?,?,'/x')",
        rows,
    )
    conn.commit()
    apply_migrations(conn)
    got = conn.execute(
        "SELECT bucket, api_key_id, model_name, requests, failed, rate_limited, prompt_tokens, completion_tokens "
        "FROM usage_hour ORDER BY bucket"
    ).fetchall()
    assert got == [(now - 7200, "k1", "m1", 2, 1, 1, 10, 5), (now - 3600, "", "m2", 1, 0, 0, 7, 0)]
    conn.close()


async def _chat(url: str, user: str, tokens: int) -> None:
    body = {"model": "llama3.2", "messages": [{"role": "user", "content": "hi"}], "stream": False}
    headers = {"X-User-Id": user, "X-Emulate": f"tokens={tokens}"}
    async with aiohttp.ClientSession() as s, s.post(f"{url}/api/chat", json=body, headers=headers) as resp:
        assert resp.status == 200
        await resp.read()


async def test_api_and_cli_report_the_recorded_requests(
    emulator: RunningEmulator, make_proxy: MakeProxy, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    db = tmp_path / "api.db"
    prices = [{"model": "llama3*", "input_per_1m": 1.0, "output_per_1m": 2.0}]
    proxy = await make_proxy(emulator.url, db=db, usage__prices=prices)
    for user, tokens in (("alice", 10), ("alice", 20), ('=HYPERLINK("x")', 5)):
        await _chat(proxy.url, user, tokens)
    rows = await proxy.wait_rows(3)
    by_user: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    for r in rows:
        by_user[r["user_id"]]["requests"] += 1
        by_user[r["user_id"]]["completion_tokens"] += r["completion_tokens"]
        by_user[r["user_id"]]["prompt_tokens"] += r["prompt_tokens"]
        by_user[r["user_id"]]["cost_usd"] += (r["prompt_tokens"] * 1.0 + r["completion_tokens"] * 2.0) / 1e6
    assert by_user["alice"]["completion_tokens"] == 30
    async with aiohttp.ClientSession() as s:
        async with s.get(f"{proxy.url}/ollamon/api/usage", params={"by": "user", "window": "1h"}) as resp:
            assert resp.status == 200
            api = await resp.json()
        for params, name in (
            ({"by": "owner"}, "by"),
            ({"by": "key", "window": "30 days"}, "window"),
            ({"by": "key", "window": "0d"}, "window"),
            ({"by": "key", "bogus": "1"}, "bogus"),
            ({"by": "key", "format": "xml"}, "format"),
            ({"since": "1h", "window": "1h"}, "window"),
            ({"limit": "0"}, "limit"),
        ):
            async with s.get(f"{proxy.url}/ollamon/api/usage", params=params) as resp:
                assert resp.status == 400, params
                assert f"'{name}'" in (await resp.json())["error"]
        async with s.get(f"{proxy.url}/ollamon/api/usage", params={"by": "user", "format": "csv"}) as resp:
            assert resp.status == 200 and resp.content_type == "text/csv"
            api_csv = await resp.text()
    _check(api, by_user, "user")
    assert api["quotas"] == []
    assert list(csv.DictReader(io.StringIO(api_csv)))[-1]["user"] == "(total)"

    # The CLI, from the file, in its three formats.
    base = ["usage", "--db", str(db), "--by", "user", "--since", "1h"]
    assert main([*base, "--format", "json"]) == 0
    _check(json.loads(capsys.readouterr().out), by_user, "user")
    assert main([*base, "--format", "csv"]) == 0
    table = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    # largest cost first, total last; a hostile id is not a formula in a spreadsheet
    assert [r["user"] for r in table] == ["alice", '\'=HYPERLINK("x")', "(total)"]
    assert int(table[0]["completion_tokens"]) == 30 and int(table[2]["requests"]) == 3
    assert float(table[0]["cost_usd"]) == pytest.approx(by_user["alice"]["cost_usd"], abs=1e-6)
    assert main([*base, "--format", "table"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("usage by user, ")
    header = lines[1].split()
    assert header[:3] == ["user", "requests", "failed"]
    cells = {line.split()[0]: line.split() for line in lines[2:] if line.strip() and not line.startswith("-")}
    assert cells["alice"][header.index("requests")] == "2"
    assert cells["(total)"][header.index("completion_tokens")] == "35"
    # A bad window from the CLI: status 2 and a message naming the parameter.
    assert main([*base[:-1], "yesterday"]) == 2
    assert "'since'" in capsys.readouterr().err
    # ... and from the running proxy's API (--url): the same figures (run on a thread: the proxy shares
    # this event loop).
    argv = ["usage", "--url", proxy.url, "--by", "user", "--since", "1h", "--format", "json"]
    assert await asyncio.to_thread(main, argv) == 0
    _check(json.loads(capsys.readouterr().out), by_user, "user")
    assert await asyncio.to_thread(main, [*argv[:3], "--since", "soon"]) == 2
    assert "'since'" in capsys.readouterr().err
