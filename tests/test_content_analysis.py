"""Content analysis end to end: a real proxy with content.enabled, the emulator as Ollama and as guard model.

The guard model is the emulator's own ``llama-guard3`` (proxy/emulator/guard.py): it answers ``safe``,
or ``unsafe`` with the categories of an ``[unsafe:S1,S10]`` marker in the text it judges.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sqlite3
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import redis.asyncio as aioredis

from proxy.api.content import ANALYZER_KEY
from proxy.content.analyzer import ContentAnalyzer
from proxy.content.guard import GuardError, parse_verdict
from proxy.emulator.config import ModelSpec, default_models
from storage.content import CONTENT_COLUMNS
from storage.migrations import apply_migrations
from storage.records import InferenceRecord, Record
from tests.fixtures.emulator import MakeEmulator, RunningEmulator
from tests.fixtures.proxy import MakeProxy, ProxyHandle
from tests.polling import until

GUARD = ModelSpec(name="llama-guard3:latest", parameter_size="8.0B", capabilities=("completion",))
SHIELD = ModelSpec(name="shieldgemma:2b", family="gemma2", capabilities=("completion",))


async def chat(proxy: ProxyHandle, content: str, model: str = "llama3.2") -> dict[str, Any]:
    body = {"model": model, "messages": [{"role": "user", "content": content}], "stream": False}
    async with aiohttp.ClientSession() as s, s.post(f"{proxy.url}/api/chat", json=body) as r:
        assert r.status == 200, await r.text()
        data: dict[str, Any] = await r.json()
        return data


async def get_json(proxy: ProxyHandle, path: str) -> tuple[int, dict[str, Any]]:
    async with aiohttp.ClientSession() as s, s.get(f"{proxy.url}{path}") as r:
        return r.status, await r.json()


def by_request(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {r["request_id"]: r for r in rows}


async def test_rows_appear_with_pii_language_and_lexical_scores(
    emulator: RunningEmulator, make_proxy: MakeProxy
) -> None:
    proxy = await make_proxy(emulator.url, content__enabled=True)
    await chat(proxy, "Please email alice@example.com about the invoice; my card is 4111 1111 1111 1111.")
    await chat(proxy, "Bonjour, pouvez-vous m'expliquer comment fonctionne la photosynthèse des plantes ?")
    rows = await proxy.wait_rows(2, "content_analysis")
    records = by_request(proxy.rows())
    assert set(by_request(rows)) == set(records)  # keyed by the request's id
    first, second = rows
    assert first["status"] == "ok" and first["error"] is None
    assert json.loads(first["prompt_pii"]) == {"email": 1, "card": 1}
    assert first["pii_count"] == 2 + sum(json.loads(first["response_pii"]).values())
    assert first["prompt_language"] == "en" and 0.5 < first["prompt_language_confidence"] <= 1
    assert second["prompt_language"] == "fr"
    assert json.loads(second["prompt_pii"]) == {}
    assert first["guard_model"] is None and first["verdict"] is None  # no guard model: lexical scores
    assert first["toxicity"] is not None and -1 <= first["sentiment"] <= 1
    assert first["timestamp"] == records[first["request_id"]]["timestamp"]
    status, health = await get_json(proxy, "/ollamon/health")
    part = health["content"]
    assert status == 200
    assert part["enabled"] is True and part["analysed"] == 2 and part["dropped"] == 0


async def test_guard_model_verdicts_and_categories(
    make_emulator: MakeEmulator, make_proxy: MakeProxy
) -> None:
    emu = await make_emulator(models=[*default_models(), GUARD])
    proxy = await make_proxy(emu.url, content__enabled=True, content__guard_model="llama-guard3")
    safe = await chat(proxy, "How do I bake bread?")
    unsafe = await chat(proxy, "Tell me how to do [unsafe:S1,S10] things")
    assert safe["message"]["content"] and unsafe["done"] is True  # the client's answers are the model's
    rows = by_request(await proxy.wait_rows(2, "content_analysis"))
    recorded = proxy.rows()
    assert len(recorded) == 2  # the guard's own calls go straight to Ollama: never recorded or analysed
    verdicts = {rows[r["request_id"]]["verdict"]: rows[r["request_id"]] for r in recorded}
    assert set(verdicts) == {"safe", "unsafe"}
    assert json.loads(verdicts["unsafe"]["categories"]) == ["S1", "S10"]
    assert json.loads(verdicts["safe"]["categories"]) == []
    for row in rows.values():
        assert row["status"] == "ok" and row["guard_model"] == "llama-guard3"
        assert row["guard_latency_ms"] > 0 and row["toxicity"] is None  # lexical only without a guard
    guard_calls = [e for e in emu.emu.log if (e.model or "").startswith("llama-guard3")]
    assert sorted(e.response_text for e in guard_calls) == ["safe", "unsafe\nS1,S10"]  # Llama Guard 3's form
    status, body = await get_json(proxy, "/ollamon/api/content?window=1h&by=model")
    assert status == 200
    assert body["overall"]["analysed"] == 2 and body["overall"]["unsafe_rate"] == 0.5
    assert body["groups"][0]["model"] == "llama3.2:latest" and body["groups"][0]["unsafe"] == 1


async def test_guard_model_down_leaves_requests_alone(
    emulator: RunningEmulator, make_proxy: MakeProxy
) -> None:
    """The guard model is not installed (Ollama answers 404): clients see nothing; rows say failed."""
    proxy = await make_proxy(emulator.url, content__enabled=True, content__guard_model="llama-guard3")
    answers = [await chat(proxy, f"question {i} for bob@example.com") for i in range(3)]
    assert all(a["done"] for a in answers)
    rows = await proxy.wait_rows(3, "content_analysis")
    assert {r["status"] for r in rows} == {"failed"}
    assert all("guard" in r["error"] and "404" in r["error"] for r in rows)
    assert all(json.loads(r["prompt_pii"]) == {"email": 1} for r in rows)  # the local checks still ran
    assert all(r["success"] == 1 for r in proxy.rows())
    health = proxy.app[ANALYZER_KEY].stats()
    assert health["guard_failures"] == 3 and health["failed"] == 3


async def test_sampling_and_disabled(emulator: RunningEmulator, make_proxy: MakeProxy) -> None:
    sampled = await make_proxy(emulator.url, content__enabled=True, content__sample_rate=0.0)
    off = await make_proxy(emulator.url)
    await chat(sampled, "hello there, how are you doing today?")
    await chat(off, "hello there, how are you doing today?")
    await sampled.wait_rows(1)
    await off.wait_rows(1)
    await until(lambda: sampled.app[ANALYZER_KEY].sampled_out == 1, what="sampled out")
    assert sampled.rows("content_analysis") == [] and off.rows("content_analysis") == []
    status, body = await get_json(off, "/ollamon/api/content")
    assert status == 200 and body["enabled"] is False and body["overall"]["analysed"] == 0
    status, body = await get_json(off, "/ollamon/api/content?by=team")
    assert status == 400 and "by" in body["error"]
    status, body = await get_json(off, "/ollamon/api/content?window=banana")
    assert status == 400


async def test_queue_cap_drops_and_counts() -> None:
    """A full queue drops at once (offer never waits) and counts it."""
    submitted: list[Record] = []
    analyzer = ContentAnalyzer(submitted.append, queue_size=2)  # not started: nothing drains the queue
    recs = [InferenceRecord(timestamp="t", request_id=str(i), content_text=("hi", "there")) for i in range(5)]
    analyzer.offer(recs)
    assert (analyzer.offered, analyzer.dropped, analyzer.stats()["queue_depth"]) == (5, 3, 2)
    assert all(r.content_text is None for r in recs)  # the text lives on in the queued jobs only
    await analyzer.stop()


def test_parse_verdicts() -> None:
    assert parse_verdict("safe").verdict == "safe"
    v = parse_verdict("unsafe\nS1,S10")
    assert (v.verdict, v.categories) == ("unsafe", ("S1", "S10"))
    assert parse_verdict("  unsafe\nS14 ").categories == ("S14",)
    assert parse_verdict("unsafe\nS99").categories == ()  # not a Llama Guard 3 category
    assert parse_verdict("Yes").verdict == "unsafe" and parse_verdict("No").verdict == "safe"
    for bad in ("", "maybe", "I cannot help with that"):
        with pytest.raises(GuardError):
            parse_verdict(bad)


async def test_shieldgemma_answers_yes_no(make_emulator: MakeEmulator, make_proxy: MakeProxy) -> None:
    emu = await make_emulator(models=[*default_models(), SHIELD])
    proxy = await make_proxy(emu.url, content__enabled=True, content__guard_model="shieldgemma:2b")
    await chat(proxy, "a [unsafe] request")
    rows = await proxy.wait_rows(1, "content_analysis")
    assert rows[0]["verdict"] == "unsafe" and json.loads(rows[0]["categories"]) == []


async def _redis_dump(url: str) -> bytes:
    client = aioredis.from_url(url)
    out = bytearray()
    try:
        async for key in client.scan_iter():
            out += key
            kind = (await client.type(key)).decode()
            if kind == "string":
                out += await client.get(key) or b""
            elif kind == "hash":
                for k, v in (await client.hgetall(key)).items():
                    out += k + v
            elif kind == "list":
                out += b"".join(await client.lrange(key, 0, -1))
            elif kind == "zset":
                out += b"".join(await client.zrange(key, 0, -1))
            elif kind == "set":
                out += b"".join(await client.smembers(key))
            elif kind == "stream":
                for _, fields in await client.xrange(key):
                    out += b"".join(k + v for k, v in fields.items())
    finally:
        await client.aclose()
    return bytes(out)


async def test_secrets_never_stored_and_text_is_redacted(
    emulator: RunningEmulator, make_proxy: MakeProxy, redis_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """With text storage on and redaction on, a known secret reaches no file, no Redis key and no log."""
    caplog.set_level(logging.DEBUG)
    secret_key = "sk-proj-Zq8vX2nLw4Rt6Yp0Hs3Kd5Mf7Bc9Ga1Je"
    secret_mail = "zebra.quartz.4417@example.org"
    proxy = await make_proxy(
        emulator.url,
        content__enabled=True,
        content__redact=True,
        storage__store_text=True,
        redis__url=redis_url,
    )
    await chat(proxy, f"My key is {secret_key}, mail {secret_mail} if it leaks.")
    rows = await proxy.wait_rows(1, "content_analysis")
    assert json.loads(rows[0]["prompt_pii"]) == {"api_key": 1, "email": 1}
    text = proxy.rows("request_text")
    assert text[0]["prompt_text"] == "My key is <API_KEY>, mail <EMAIL> if it leaks."
    await until(lambda: proxy.writer_stats["written"] >= 2, what="both rows written")
    redis_bytes = b""

    async def redis_has_record() -> None:
        nonlocal redis_bytes
        for _ in range(200):
            redis_bytes = await _redis_dump(redis_url)
            if rows[0]["request_id"].encode() in redis_bytes:
                return
            await asyncio.sleep(0.05)
        raise AssertionError("the record never reached Redis")

    await redis_has_record()
    files = [Path(str(proxy.db_path) + suffix) for suffix in ("", "-wal", "-shm")]
    before_stop = b"".join(p.read_bytes() for p in files if p.exists())
    await proxy.stop()
    after_stop = b"".join(p.read_bytes() for p in files if p.exists())
    logs = "\n".join(r.getMessage() + (r.exc_text or "") for r in caplog.records).encode()
    assert b"<API_KEY>" in before_stop + after_stop  # the scan reads the text that was stored
    for secret in (secret_key.encode(), secret_mail.encode()):
        for where, blob in (("db", before_stop), ("db after close", after_stop), ("redis", redis_bytes)):
            assert secret not in blob, where
        assert secret not in logs


def test_migration_makes_the_table_with_exactly_the_record_columns(tmp_path: Path) -> None:
    conn = sqlite3.connect(tmp_path / "m.db")
    try:
        assert "m011_content_analysis" in apply_migrations(conn)
        cols = tuple(r[1] for r in conn.execute("PRAGMA table_info(content_analysis)"))
        assert cols == CONTENT_COLUMNS
        assert apply_migrations(conn) == []  # applied once
    finally:
        conn.close()


async def test_a_dead_worker_process_is_replaced(emulator: RunningEmulator, make_proxy: MakeProxy) -> None:
    """The analysis worker is killed (as by the OOM killer): that job fails, the next ones are analysed."""
    proxy = await make_proxy(emulator.url, content__enabled=True)
    analyzer = proxy.app[ANALYZER_KEY]
    await chat(proxy, "first question, about the weather in Paris today")
    await proxy.wait_rows(1, "content_analysis")
    for proc in list(analyzer._pool._processes.values()):
        proc.kill()
        proc.join(5)
    await chat(proxy, "second question, about the weather in Rome today")
    await proxy.wait_rows(2, "content_analysis", within=30)
    await chat(proxy, "third question, about the weather in Oslo today")
    rows = await proxy.wait_rows(3, "content_analysis", within=30)
    assert rows[0]["status"] == "ok" and rows[2]["status"] == "ok"
    assert rows[1]["status"] == "failed" and "died" in rows[1]["error"]
    assert analyzer.analysed >= 2
