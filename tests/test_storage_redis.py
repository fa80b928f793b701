"""The Redis hot view against a private redis-server: recent list, counters, and outages."""

from __future__ import annotations

import asyncio
import logging
import statistics
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import redis

from storage.records import INFERENCE_COLUMNS, ErrorRecord, InferenceRecord, Record
from storage.redis_view import RedisView, close_redis_client
from storage.sqlite import SQLiteStore
from storage.writer import Writer
from tests.fixtures.redis_server import RedisServer
from tests.polling import until


def rec(i: int, model: str | None = "m1", **over: Any) -> InferenceRecord:
    values: dict[str, Any] = dict(
        timestamp=f"2026-11-26T23:00:{i // 1000 % 60:02d}.{i % 1000:03d}Z",
        request_id=f"req-{i}",
        model_name=model,
        endpoint="/api/chat",
        prompt_tokens=i,
        completion_tokens=2 * i,
        response_time_ms=10.5 * i,
        prompt_text="never in redis",
    )
    values.update(over)
    return InferenceRecord(**values)


@pytest.fixture
async def view(redis_server: RedisServer) -> AsyncIterator[RedisView]:
    v = RedisView(redis_server.url, recent=5, key_prefix="t:")
    await v.start()
    try:
        yield v
    finally:
        await v.stop()


async def test_recent_list_is_capped_newest_first_without_text(view: RedisView) -> None:
    view.offer([rec(i) for i in range(8)])
    view.offer([rec(i) for i in range(8, 12)])
    await until(lambda: view.written_batches == 2)
    recent = await view.recent(100)
    assert [r["request_id"] for r in recent] == [f"req-{i}" for i in (11, 10, 9, 8, 7)]
    assert set(recent[0]) == set(INFERENCE_COLUMNS)
    assert "prompt_text" not in recent[0]
    assert recent[0]["success"] is True and recent[0]["metadata"] is None
    assert [r["request_id"] for r in await view.recent(2)] == ["req-11", "req-10"]
    assert view.status() == "ok"


async def test_counters_per_model_and_totals(view: RedisView) -> None:
    batch1 = [rec(1, "a"), rec(2, "a", success=False), rec(3, "b", cancelled=True, success=False)]
    batch2: list[Record] = [
        rec(4, "a", prompt_tokens=None, completion_tokens=None, response_time_ms=None),
        rec(5, None),
        ErrorRecord(
            timestamp="2026-11-26T23:00:00.000Z", request_id=None, error_type="internal", error_message="x"
        ),
    ]
    view.offer(batch1)
    view.offer(batch2)
    await until(lambda: view.written_batches == 2)
    counters = await view.counters()
    assert set(counters) == {"a", "b", "unknown"}
    assert counters["a"] == {
        "requests": 3,
        "success": 2,
        "failed": 1,
        "prompt_tokens": 1 + 2,
        "completion_tokens": 2 + 4,
        "response_time_ms_sum": 10.5 + 21.0,
        "last_seen": rec(4).timestamp,
    }
    assert counters["b"]["cancelled"] == 1 and counters["b"]["failed"] == 1 and "success" not in counters["b"]
    assert counters["unknown"]["requests"] == 1
    totals = await view.totals()
    assert totals["requests"] == 5 and totals["failed"] == 2 and totals["errors"] == 1
    assert totals["prompt_tokens"] == 1 + 2 + 3 + 5
    assert totals["response_time_ms_sum"] == pytest.approx(10.5 * (1 + 2 + 3 + 5))
    # the keys are the documented ones
    client = redis.Redis.from_url(view.url)
    try:
        assert client.smembers("t:models") == {b"a", b"b", b"unknown"}
        assert client.hget("t:model:a", "requests") == b"3"
        assert client.llen("t:recent") == 5
    finally:
        client.close()


async def test_offer_drops_oldest_batches_when_behind(redis_server: RedisServer) -> None:
    v = RedisView(redis_server.url, max_pending_batches=3, key_prefix="t:")  # not started: nothing drains
    for i in range(5):
        v.offer([rec(i)])
    assert v.dropped_batches == 2 and v.stats()["pending_batches"] == 3
    await v.start()
    try:
        await until(lambda: v.written_batches == 3)
        assert [r["request_id"] for r in await v.recent(10)] == ["req-4", "req-3", "req-2"]
    finally:
        await v.stop()


async def test_starts_down_when_redis_is_absent_then_connects(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    redis_server.stop()
    v = RedisView(redis_server.url, backoff_initial_s=0.05, backoff_max_s=0.2)
    await v.start()
    try:
        assert v.status() == "down"
        v.offer([rec(1)])
        redis_server.start()
        await until(lambda: v.status() == "ok", within=5)
        await until(lambda: v.written_batches == 1)  # queued while down, pushed once up
    finally:
        await v.stop()


async def test_redis_killed_mid_run_sqlite_keeps_everything(
    tmp_path: Path, redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="storage.redis_view")
    store = SQLiteStore(tmp_path / "o.db")
    await store.open()
    hot = RedisView(redis_server.url, backoff_initial_s=0.05, backoff_max_s=0.2, key_prefix="o:")
    writer = Writer(store, batch_rows=20, flush_interval_s=0.01, hot=hot)
    worst = 0.0
    times: list[float] = []
    n = 0

    async def produce(count: int) -> None:
        nonlocal worst, n
        for _ in range(count):
            t0 = time.perf_counter()
            assert writer.submit(rec(n))
            times.append(time.perf_counter() - t0)
            worst = max(worst, times[-1])
            n += 1
            if n % 10 == 0:
                await asyncio.sleep(0.001)

    try:
        await hot.start()
        await writer.start()
        await produce(200)
        await until(lambda: writer.written == 200 and hot.written_batches > 0)
        assert hot.status() == "ok"

        redis_server.stop()
        await produce(300)
        await until(lambda: hot.status() == "down", within=5)
        await produce(200)
        await until(lambda: writer.written == 700)

        redis_server.start()
        await until(lambda: hot.status() == "ok", within=5)
        await produce(100)
        await until(lambda: writer.written == 800)
        await until(lambda: any(r["request_id"] == "req-799" for r in _sync_recent(hot)), within=5)
    finally:
        await writer.stop()
        await hot.stop()
        await store.close()
    assert await _count(tmp_path / "o.db") == 800
    assert writer.lost == 0 and writer.dropped == 0
    # submit() is synchronous: it cannot await Redis, and any I/O in it would show in every call. The
    # median catches that; the max only has to rule out a stall (an OS preemption can cost a millisecond).
    assert statistics.median(times) < 0.0001, f"median submit {statistics.median(times) * 1e6:.1f} us"
    assert worst < 0.02, f"submit took {worst * 1000:.3f} ms"
    downs = [r for r in caplog.records if "is down" in r.getMessage()]
    assert len(downs) == 1  # once per outage
    assert any("is back" in r.getMessage() for r in caplog.records)


async def test_hung_redis_never_slows_the_writer(tmp_path: Path, redis_server: RedisServer) -> None:
    """SIGSTOPped Redis: connections open, no answers. The writer must not wait on it."""
    store = SQLiteStore(tmp_path / "h.db")
    await store.open()
    hot = RedisView(redis_server.url, timeout_s=0.1, backoff_initial_s=0.05, backoff_max_s=0.2)
    writer = Writer(store, batch_rows=10, flush_interval_s=0.01, hot=hot)
    try:
        await hot.start()
        await writer.start()
        redis_server.freeze()
        t0 = time.monotonic()
        for i in range(100):
            writer.submit(rec(i))
            if i % 10 == 0:
                await asyncio.sleep(0.001)
        await until(lambda: writer.written == 100, within=5)
        assert time.monotonic() - t0 < 2.0
        await until(lambda: hot.status() == "down", within=3)
        redis_server.thaw()
        await until(lambda: hot.status() == "ok", within=5)
    finally:
        redis_server.thaw()
        await writer.stop()
        await hot.stop()
        await store.close()
    assert writer.lost == 0


def _sync_recent(view: RedisView) -> list[dict[str, Any]]:
    import orjson

    client = redis.Redis.from_url(view.url, socket_timeout=1)
    try:
        return [orjson.loads(v) for v in client.lrange(view.key_recent, 0, 10)]
    finally:
        client.close()


async def _count(path: Path) -> int:
    import sqlite3

    with sqlite3.connect(path) as conn:
        return int(conn.execute("SELECT count(*) FROM inference_metrics").fetchone()[0])


class Relay:
    """A loopback TCP relay in front of Redis that a test can make misbehave: ``hold()`` keeps Redis's
    answers back (requests still reach Redis and are applied: a Redis that hangs, then answers), and
    ``blackhole()`` swallows requests (nothing reaches Redis)."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = 0
        self._replies = asyncio.Event()
        self._replies.set()
        self._forward = True
        self._server: asyncio.Server | None = None
        self._handlers: set[asyncio.Future[Any]] = set()
        self._writers: list[asyncio.StreamWriter] = []

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def hold(self) -> None:
        self._replies.clear()

    def blackhole(self) -> None:
        self._forward = False

    def restore(self) -> None:
        self._forward = True
        self._replies.set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        assert self._server is not None
        self._server.close()
        self.restore()
        for w in self._writers:
            w.close()
        if self._handlers:
            await asyncio.wait(self._handlers, timeout=5)
        await self._server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.append(writer)
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            writer.close()
            return
        self._writers.append(up_writer)

        async def requests() -> None:
            while data := await reader.read(65536):
                if self._forward:
                    up_writer.write(data)
                    await up_writer.drain()
            up_writer.close()

        async def replies() -> None:
            while data := await up_reader.read(65536):
                await self._replies.wait()
                writer.write(data)
                await writer.drain()
            writer.close()

        both = asyncio.gather(requests(), replies(), return_exceptions=True)
        self._handlers.add(both)
        await both
        for w in (writer, up_writer):
            w.close()
            try:
                await w.wait_closed()
            except OSError:
                pass


@pytest.fixture
async def relay(redis_server: RedisServer) -> AsyncIterator[Relay]:
    r = Relay(redis_server.port)
    await r.start()
    try:
        yield r
    finally:
        await r.stop()


def _direct_totals(server: RedisServer, prefix: str) -> int:
    client = redis.Redis(port=server.port, socket_timeout=2)
    try:
        return int(client.hget(f"{prefix}totals", "requests") or 0)
    finally:
        client.close()


async def test_a_push_that_timed_out_but_was_applied_is_not_counted_as_lost(
    relay: Relay, redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    """Redis hangs, then answers: the pipeline reached it and was applied, only the answer came too late.
    Once Redis answers again the view's marker shows the batch landed: written, not failed."""
    caplog.set_level(logging.WARNING, logger="storage.redis_view")
    v = RedisView(relay.url, timeout_s=0.1, backoff_initial_s=0.05, backoff_max_s=0.2, key_prefix="h:")
    await v.start()
    try:
        v.offer([rec(i) for i in range(5)])
        await until(lambda: v.written_batches == 1)
        relay.hold()
        v.offer([rec(i) for i in range(5, 8)])
        await until(lambda: v.status() == "down", within=5)  # the push timed out on our side ...
        assert _direct_totals(redis_server, "h:") == 8  # ... but Redis applied it
        assert v.failed_batches == 0  # not known yet: not counted either way
        relay.restore()
        await until(lambda: v.status() == "ok", within=5)
        assert (v.written_batches, v.failed_batches) == (2, 0)
        v.offer([rec(8)])
        await until(lambda: v.written_batches == 3)
        assert _direct_totals(redis_server, "h:") == 9
    finally:
        await v.stop()
    (back,) = [r.getMessage() for r in caplog.records if "is back" in r.getMessage()]
    assert "0 batches were not pushed" in back


async def test_a_push_that_never_reached_redis_is_counted_once(
    relay: Relay, redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="storage.redis_view")
    v = RedisView(relay.url, timeout_s=0.1, backoff_initial_s=0.05, backoff_max_s=0.2, key_prefix="b:")
    await v.start()
    try:
        v.offer([rec(i) for i in range(5)])
        await until(lambda: v.written_batches == 1)
        relay.blackhole()
        v.offer([rec(i) for i in range(5, 8)])
        await until(lambda: v.status() == "down", within=5)
        relay.restore()
        await until(lambda: v.status() == "ok", within=5)
        assert (v.written_batches, v.failed_batches) == (1, 1)
        assert _direct_totals(redis_server, "b:") == 5
        # A second outage reports its own count, not the running total.
        relay.blackhole()
        v.offer([rec(9)])
        await until(lambda: v.status() == "down", within=5)
        relay.restore()
        await until(lambda: v.status() == "ok", within=5)
        assert v.failed_batches == 2
    finally:
        await v.stop()
    backs = [r.getMessage() for r in caplog.records if "is back" in r.getMessage()]
    assert len(backs) == 2 and all("; 1 batches were not pushed" in m for m in backs)


def _pings(server: RedisServer) -> int:
    client = redis.Redis(port=server.port, socket_timeout=2)
    try:
        stats = client.info("commandstats")
        return int(stats.get("cmdstat_ping", {}).get("calls", 0))
    finally:
        client.close()


async def test_check_is_active_cached_shared_and_bounded(redis_server: RedisServer) -> None:
    """health asks check(): a PING now (not what the last push saw), one per TTL however many ask, never
    longer than the timeout, and an answer cuts the push task's back-off short."""
    v = RedisView(
        redis_server.url, timeout_s=0.1, backoff_initial_s=60.0, backoff_max_s=60.0, check_ttl_s=0.3
    )
    await v.start()
    try:
        before = _pings(redis_server)
        assert set(await asyncio.gather(*(v.check() for _ in range(20)))) == {"ok"}
        assert _pings(redis_server) - before == 1  # one PING for twenty callers
        redis_server.stop()
        assert await v.check() == "ok"  # cached for check_ttl_s
        await asyncio.sleep(0.35)
        assert v.status() == "ok"  # nothing has tried Redis: the passive state is stale ...
        assert await v.check() == "down"  # ... the active check is not
        assert v.status() == "down"
        redis_server.start()
        redis_server.freeze()  # up but hung: the check must still answer within the timeout
        await asyncio.sleep(0.35)
        t0 = time.monotonic()
        assert await v.check() == "down"
        assert time.monotonic() - t0 < 1.0
        redis_server.thaw()
        await asyncio.sleep(0.35)
        assert await v.check() == "ok"
        # The push task sleeps 60 s between probes; the check's answer wakes it.
        await until(lambda: v.status() == "ok", within=5)
    finally:
        redis_server.thaw()
        await v.stop()


async def test_closing_a_client_that_hangs_is_bounded_and_said(caplog: pytest.LogCaptureFixture) -> None:
    """Shutdown closes every Redis client through close_redis_client: one whose close never returns (a
    stand-in here: a real client's close cannot be made to hang on demand) costs the bound, not the
    shutdown, and the log says which client it was; one that fails to close is logged, not raised."""

    class Hangs:
        async def aclose(self) -> None:
            await asyncio.sleep(3600)

    class Fails:
        async def aclose(self) -> None:
            raise ConnectionResetError("reset by peer")

    caplog.set_level(logging.WARNING, logger="storage.redis_view")
    start = time.monotonic()
    await close_redis_client(Hangs(), "the test's client", within_s=0.2)
    assert 0.15 < time.monotonic() - start < 5
    await close_redis_client(Fails(), "the failing client")
    text = caplog.text
    assert "the test's client: closing the Redis client took over 0.2 s" in text
    assert "the failing client: closing the Redis client: ConnectionResetError: reset by peer" in text
