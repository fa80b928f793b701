"""ollamon serving on PostgreSQL, end to end: the real proxy, the emulator behind it, the official client.

What this proves that tests/test_pg_reads.py (every read, one history, both backends) does not: the app
itself writes through storage/postgres/ and answers from it. Traffic through ``ollama.AsyncClient`` lands in
PostgreSQL row for row with the emulator's ground truth; every /ollamon/api endpoint answers on PostgreSQL
what it answers on SQLite for the same records (a second proxy on a SQLite file fed the very batches the
first one committed); the CLI reads, exports, prunes and manages keys on the database URL; and an outage of
PostgreSQL loses no record and answers 503 in Ollama's ``{"error": ...}`` shape while it lasts.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import ollama
import pytest

from proxy.keys import CONFIG_KEY
from proxy.resources.sampler import SAMPLER_KEY
from storage.postgres import PostgresStore
from storage.sqlite import SQLiteStore
from tests.fixtures.fleet import (
    Tee,
    block,
    get,
    partition_days,
    pg_count,
    pg_rows,
    same,
    tee_into,
    unblock,
    wait_pg_rows,
)
from tests.fixtures.postgres import PgServer
from tests.fixtures.proxy import MakeProxy, ProxyHandle
from tests.fixtures.records import rec

pytestmark = pytest.mark.timeout(180)

QUIET = {"retention__enabled": False, "sampling__enabled": False}  # nothing written but the traffic


async def traffic(base: str) -> int:
    """Chat and generate, streamed and not, a two-turn conversation, an unknown model, an embed: 7 requests."""
    async with ollama.AsyncClient(host=base) as client:
        history = [{"role": "user", "content": "hello there"}]
        reply = await client.chat(model="llama3.2", messages=history)
        history += [
            {"role": "assistant", "content": reply.message.content or ""},
            {"role": "user", "content": "and?"},
        ]
        await client.chat(model="llama3.2", messages=history)
        parts = [p async for p in await client.chat(model="qwen3:0.6b", messages=history[:1], stream=True)]
        assert parts[-1].done
        assert (await client.generate(model="llama3.2", prompt="hi")).done
        chunks = [p async for p in await client.generate(model="qwen3:0.6b", prompt="hi", stream=True)]
        assert chunks[-1].done and chunks[-1].eval_count
        with pytest.raises(ollama.ResponseError) as missing:
            await client.generate(model="nope", prompt="x")
        assert missing.value.status_code == 404
        assert len((await client.embed(model="all-minilm", input=["a b", "c"])).embeddings) == 2
    return 7


def cli(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """``ollamon ...`` as a user runs it (a process of its own)."""
    out = subprocess.run(
        [sys.executable, "-m", "proxy", *args], capture_output=True, text=True, timeout=90, check=False
    )
    if check:
        assert out.returncode == 0, f"ollamon {' '.join(args)}: {out.returncode}\n{out.stderr[-3000:]}"
    return out


async def test_official_client_traffic_lands_in_postgres_as_the_emulator_saw_it(
    pg_url: str, emulator: Any, make_proxy: MakeProxy
) -> None:
    p = await make_proxy(emulator.url, storage__url=pg_url, **QUIET)
    sent = await traffic(p.url)
    rows = await wait_pg_rows(pg_url, sent)
    await asyncio.sleep(0.5)  # nothing more arrives
    assert await pg_count(pg_url) == sent
    truth = {e.request_id: e for e in emulator.emu.log}
    assert len(truth) == sent and {r["request_id"] for r in rows} == set(truth)
    for r in rows:
        e = truth[r["request_id"]]
        assert (r["endpoint"], r["status_code"], r["stream"]) == (e.path, e.status, int(bool(e.stream))), r
        if e.status == 200:
            assert r["success"] == 1 and r["token_source"] == "ollama"
            assert r["prompt_tokens"] == e.prompt_eval_count, r
            assert r["completion_tokens"] == (e.eval_count or 0), r
        else:
            assert r["success"] == 0 and r["model_name"] == "nope:latest"
    (err,) = await pg_rows(pg_url, "error_metrics")
    assert err["request_id"] == next(r["request_id"] for r in rows if r["status_code"] == 404)
    assert {r["instance"] for r in rows} == {p.app[CONFIG_KEY].server.instance_name}
    async with aiohttp.ClientSession() as s:
        status, health = await get(s, f"{p.url}/ollamon/health")
    assert status == 200 and health["db"] == "ok" and health["status"] == "ok"
    assert health["writer"]["written"] >= sent and health["writer"]["lost"] == 0


# -- the API: PostgreSQL answers what SQLite answers ------------------------------------------------


def _iso(t: float) -> str:
    return dt.datetime.fromtimestamp(t, dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.000Z")


async def _pages(s: aiohttp.ClientSession, base: str, limit: int) -> list[list[dict[str, Any]]]:
    """Every page of /requests, following ``next_cursor``."""
    pages: list[list[dict[str, Any]]] = []
    url = f"{base}/ollamon/api/requests?limit={limit}"
    while True:
        status, body = await get(s, url)
        assert status == 200, body
        pages.append(body["requests"])
        cursor = body.get("next_cursor")
        if not cursor:
            return pages
        url = f"{base}/ollamon/api/requests?limit={limit}&cursor={cursor}"


@dataclass
class Twins:
    """A proxy on PostgreSQL that served real traffic, and one on a SQLite file holding the same records."""

    pg: ProxyHandle
    sq: ProxyHandle
    pg_url: str
    path: Path
    since: float
    until: float
    sent: int

    @property
    def window(self) -> str:
        return f"since={_iso(self.since)}&until={_iso(self.until)}"


@pytest.fixture
async def twins(pg_url: str, emulator: Any, make_proxy: MakeProxy, tmp_path: Path) -> Twins:
    """Traffic through the PostgreSQL proxy; every batch its writer committed is written, in order, to a
    SQLite file, which a second proxy then serves (writing nothing of its own)."""
    tee = Tee()
    pg = await make_proxy(
        emulator.url,
        prepare=tee_into(tee),
        storage__url=pg_url,
        retention__enabled=False,
        sampling__store_every_s=0.2,
        sampling__interval_s=0.1,
        sampling__gpu=False,
    )
    since = time.time() - 1
    sent = await traffic(pg.url) + await traffic(pg.url)
    await wait_pg_rows(pg_url, sent)
    await wait_pg_rows(pg_url, 1, "system_metrics")
    pg.app[SAMPLER_KEY].writer = None  # no more samples stored: both databases must hold the same rows
    await asyncio.sleep(0.6)  # the last batch is committed and offered
    tee.frozen = True
    path = tmp_path / "same.db"
    lite = SQLiteStore(path)
    await lite.open()
    for batch in tee.batches:
        await lite.write_batch(batch)
    await lite.close()
    sq = await make_proxy(emulator.url, db=path, **QUIET)
    return Twins(pg, sq, pg_url, path, since, time.time() + 1, sent)


async def test_every_api_answer_on_postgres_equals_sqlite_for_the_same_records(twins: Twins) -> None:
    pg, sq, pg_url, sent, window = twins.pg, twins.sq, twins.pg_url, twins.sent, twins.window
    async with aiohttp.ClientSession() as s:
        rid = (await pg_rows(pg_url))[-1]["request_id"]
        paths = [
            f"summary?{window}",
            f"summary?{window}&exact=true",
            f"summary?{window}&by=upstream",
            f"summary?{window}&by=instance",
            f"summary?{window}&model=llama3.2",
            f"timeseries?{window}&bucket=1m",
            f"timeseries?{window}&bucket=1m&metric=requests,ttft_ms_p95&exact=true",
            f"requests?{window}&limit=1000",
            "requests?success=false",
            f"requests/{rid}",
            "requests/nope",
            f"errors?{window}",
            "alerts",
            "alerts?state=firing",
            f"usage?{window}",
            f"usage?{window}&by=user",
            f"conversations?{window}",
        ]
        for path in paths:
            a = await get(s, f"{pg.url}/ollamon/api/{path}")
            b = await get(s, f"{sq.url}/ollamon/api/{path}")
            if path.startswith("requests?"):  # where the page came from: each backend names itself
                assert (a[1].pop("source"), b[1].pop("source")) == ("postgresql", "sqlite"), path
            same(a, b, f"/ollamon/api/{path}")
            assert a[0] in (200, 404), (path, a)
        paged = await _pages(s, pg.url, 3)
        same(paged, await _pages(s, sq.url, 3), "requests pages")
        assert [len(p) for p in paged] == [3] * (sent // 3) + ([sent % 3] if sent % 3 else [])
        assert len({r["request_id"] for page in paged for r in page}) == sent
        status, conv = await get(s, f"{pg.url}/ollamon/api/conversations?{window}")
        assert status == 200 and conv["conversations"], conv
        cid = conv["conversations"][0]["conversation_id"]
        one = f"/ollamon/api/conversations/{cid}"
        same(await get(s, pg.url + one), await get(s, sq.url + one), one)
        status, summary = await get(s, f"{pg.url}/ollamon/api/summary?{window}")
        assert summary["overall"]["requests"] == sent, summary
        # /stats: the same rows counted; PostgreSQL shows its partitions where SQLite shows its file.
        (_, pst), (_, sst) = [await get(s, f"{u}/ollamon/api/stats") for u in (pg.url, sq.url)]
        assert pst["backend"] == "postgresql" and pst["partitions"]["inference_metrics"]["partitions"] >= 1
        own = {"_migrations", "ollamon_leases"}  # each backend's migrations; the fleet's leases (PostgreSQL)
        assert {k: v for k, v in pst["tables"].items() if k not in own} == {
            k: v for k, v in sst["tables"].items() if k not in own
        }
        assert pst["records"] == sst["records"] and pst["tables"]["inference_metrics"] == sent
        status, system = await get(s, f"{pg.url}/ollamon/api/system?minutes=60")
        assert status == 200 and system["source"] == "database", system
        assert len(system["history"]) == await pg_count(pg_url, "system_metrics") >= 1
        status, health = await get(s, f"{pg.url}/ollamon/health")
        assert status == 200 and health["db"] == "ok"


# -- the CLI on the database URL ---------------------------------------------------------------------


def cli_json(*args: str) -> Any:
    return json.loads(cli(*args).stdout)


async def test_cli_reads_postgres_as_it_reads_sqlite(twins: Twins) -> None:
    url, path = twins.pg_url, str(twins.path)
    span = ("--since", _iso(twins.since), "--until", _iso(twins.until))
    reads = [
        ("stats", *span, "--json"),
        ("stats", *span, "--by", "instance", "--json"),
        ("requests", "--limit", "100", "--json"),
        ("requests", "--failed", "--json"),
        ("usage", *span, "--format", "json"),
        ("conversations", "--since", "1h", "--json"),
        ("alerts", "--json"),
    ]
    for args in reads:
        on_pg, on_file = await asyncio.gather(
            asyncio.to_thread(cli_json, *args, "--db", url), asyncio.to_thread(cli_json, *args, "--db", path)
        )
        same(on_pg, on_file, " ".join(args))
    assert cli_json("stats", *span, "--json", "--db", url)["overall"]["requests"] == twins.sent
    for table in ("inference_metrics", "error_metrics", "system_metrics"):
        exports = [
            [
                json.loads(line)
                for line in cli(
                    "export", "--table", table, "--format", "jsonl", "--db", db
                ).stdout.splitlines()
            ]
            for db in (url, path)
        ]
        same(exports[0], exports[1], f"export {table}")
        assert len(exports[0]) == await pg_count(url, table) > 0, table
    csvs = [cli("export", "--format", "csv", "--db", db).stdout for db in (url, path)]
    assert csvs[0] == csvs[1] and len(csvs[0].splitlines()) == twins.sent + 1
    st = cli_json("db", "stats", "--json", "--db", url)
    assert st["backend"] == "postgresql" and st["tables"]["inference_metrics"] == twins.sent
    today = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d")
    part = st["partitions"]["inference_metrics"]
    assert part["first_day"] <= today <= part["last_day"] and part["partitions"] >= 2, part
    text = cli("db", "stats", "--db", url).stdout
    assert "inference_metrics" in text and "postgres@" in text


async def test_prune_on_postgres_drops_old_partitions(pg_url: str) -> None:
    now = dt.datetime.now(dt.UTC)
    old = [(now - dt.timedelta(days=d)).strftime("%Y-%m-%dT12:00:00.000Z") for d in (40, 39, 1)]
    store = PostgresStore(pg_url)
    await store.open()
    try:
        await store.write_batch([rec(i, ts) for i, ts in enumerate(old)])
    finally:
        await store.close()
    days_before = await partition_days(pg_url)
    gone = {t[:10] for t in old[:2]}
    assert gone <= days_before
    dry = cli_json("db", "prune", "--dry-run", "--json", "--db", pg_url)
    assert dry["dry_run"] and dry["deleted"]["inference_metrics"] == 2, dry
    assert await pg_count(pg_url) == 3 and await partition_days(pg_url) == days_before
    done = cli_json("db", "prune", "--json", "--db", pg_url)
    assert done["partitions_dropped"] == {"inference_metrics": 2}, done
    assert done["deleted"]["inference_metrics"] == 2 and done["error"] is None, done
    days_after = await partition_days(pg_url)
    assert not gone & days_after and old[2][:10] in days_after
    assert [r["request_id"] for r in await pg_rows(pg_url)] == ["req-2"]


async def test_keys_made_by_the_cli_on_postgres_are_accepted_then_refused_after_revoke(
    pg_url: str, emulator: Any, make_proxy: MakeProxy
) -> None:
    key = cli("keys", "create", "ci", "--team", "research", "--db", pg_url).stdout.strip().splitlines()[-1]
    assert key.startswith("olm_")
    (listed,) = cli_json("keys", "list", "--json", "--db", pg_url)
    assert listed["name"] == "ci" and listed["team"] == "research" and not listed.get("revoked_at")
    p = await make_proxy(
        emulator.url, storage__url=pg_url, auth__mode="required", auth__reload_interval_s=0.2, **QUIET
    )
    gen = {"model": "llama3.2", "prompt": "hi", "stream": False}
    async with aiohttp.ClientSession() as s:

        async def status(k: str | None) -> int:
            headers = {"Authorization": f"Bearer {k}"} if k else {}
            async with s.post(f"{p.url}/api/generate", json=gen, headers=headers) as r:
                await r.read()
                return r.status

        assert await status(key) == 200
        assert await status(None) == 401
        cli("keys", "revoke", "ci", "--db", pg_url)
        (revoked,) = cli_json("keys", "list", "--json", "--db", pg_url)
        assert revoked.get("revoked_at") or revoked.get("revoked"), revoked
        deadline = time.monotonic() + 5
        codes = [await status(key)]
        while codes[-1] != 401 and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
            codes.append(await status(key))
        assert codes[-1] == 401, codes
    rows = await wait_pg_rows(pg_url, len(codes) + 2)
    ok = rows[0]
    assert ok["status_code"] == 200 and ok["team"] == "research" and ok["api_key_id"].startswith("k_")
    assert rows[-1]["status_code"] == 401


# -- an outage of PostgreSQL --------------------------------------------------------------------------


# Every read endpoint: 503 and Ollama's error shape, never a 500 or a hang.
OUTAGE_PATHS = (
    "summary", "summary?by=upstream", "timeseries", "requests", "requests/x", "errors", "stats",
    "alerts", "alerts/1", "usage", "conversations", "conversations/c1", "system?minutes=60",
)  # fmt: skip


async def test_postgres_outage_loses_no_record_and_answers_503_meanwhile(
    pg_url: str, pg_server: PgServer, emulator: Any, make_proxy: MakeProxy
) -> None:
    p = await make_proxy(emulator.url, storage__url=pg_url, retention__enabled=False, sampling__gpu=False)
    gen = {"model": "llama3.2", "prompt": "hi", "stream": False}
    async with aiohttp.ClientSession() as s:

        async def generate() -> int:
            async with s.post(f"{p.url}/api/generate", json=gen) as r:
                await r.read()
                return r.status

        before = [await generate() for _ in range(3)]
        await wait_pg_rows(pg_url, 3)
        await block(pg_server, pg_url)
        try:
            during = [await generate() for _ in range(20)]  # forwarding does not need the database
            for path in OUTAGE_PATHS:
                status, body = await get(s, f"{p.url}/ollamon/api/{path}")
                assert status == 503 and set(body) == {"error"} and isinstance(body["error"], str), (
                    path,
                    body,
                )
            status, health = await get(s, f"{p.url}/ollamon/health")
            assert status == 200 and health["db"] == "down" and health["status"] == "degraded", health["db"]
            await asyncio.sleep(1.0)  # the writer has tried, failed and keeps the batch
            assert p.writer_stats["failed_writes"] >= 1 and p.writer_stats["lost"] == 0
        finally:
            await unblock(pg_server, pg_url)
        after = [await generate() for _ in range(2)]
        assert before + during + after == [200] * 25
        rows = await wait_pg_rows(pg_url, 25, within=30.0)
        truth = [e.request_id for e in emulator.emu.log if e.path == "/api/generate"]
        assert sorted(r["request_id"] for r in rows) == sorted(truth) and len(rows) == 25
        status, health = await get(s, f"{p.url}/ollamon/health")
        assert health["db"] == "ok" and health["writer"]["lost"] == 0 and health["writer"]["dropped"] == 0
        status, summary = await get(s, f"{p.url}/ollamon/api/summary")
        assert status == 200 and summary["overall"]["requests"] == 25
