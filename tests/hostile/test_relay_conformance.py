"""The upstream client against every odd answer an upstream can give, alone and behind the whole proxy.

Each case is a raw byte script from tests/hostile/rawhttp.py. For each: what the caller gets (status,
body, headers), whether the connection may be used again, and that nothing of a poisoned connection
ever reaches a later request.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass

import aiohttp
import pytest

from proxy.forward.upstream_client import UpstreamClosed, UpstreamPool, UpstreamTimeout
from proxy.keys import FORWARDER_KEY
from proxy.upstream_url import Upstream
from tests.fixtures.proxy import MakeProxy
from tests.hostile.rawhttp import Conn, RawUpstream

OK = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 4\r\n\r\nnext"


@dataclass(frozen=True)
class Case:
    answer: bytes
    method: str = "GET"
    status: int | None = 200  # None: the exchange fails before a head (UpstreamClosed)
    body: bytes = b""
    reusable: bool = True  # the connection may serve the next request
    close: bool = False  # the upstream closes after the answer
    absent: tuple[str, ...] = ()  # headers that must not reach the client
    split: bytes = b""  # send the answer in two writes, 50 ms apart, cut before this marker


CASES: dict[str, Case] = {
    "content-length": Case(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello", body=b"hello"),
    "chunked": Case(
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nhe\r\n3\r\nllo\r\n0\r\n\r\n",
        body=b"hello",
    ),
    "204": Case(b"HTTP/1.1 204 No Content\r\n\r\n", status=204),
    "304": Case(b'HTTP/1.1 304 Not Modified\r\nETag: "x"\r\nContent-Length: 9\r\n\r\n', status=304),
    "head": Case(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n", method="HEAD"),
    "close-delimited": Case(
        b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\nhello world",
        body=b"hello world",
        reusable=False,
        close=True,
    ),
    "trailers": Case(
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTrailer: X-Evil\r\n\r\n"
        b"5\r\nhello\r\n0\r\nX-Evil: promoted\r\n\r\n",
        body=b"hello",
        absent=("X-Evil",),
    ),
    "100-then-200": Case(
        b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok", body=b"ok"
    ),
    "100-then-200-split": Case(
        b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
        body=b"ok",
        split=b"HTTP/1.1 200",
    ),
    "103-then-200": Case(
        b"HTTP/1.1 103 Early Hints\r\nLink: </evil>; rel=preload\r\n\r\n"
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
        body=b"ok",
        absent=("Link",),
    ),
    "bytes-after-length": Case(
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nokHTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nevil",
        body=b"ok",
        reusable=False,
    ),
    "garbage-after-length": Case(
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok\x00\x01garbage", body=b"ok", reusable=False
    ),
    "body-after-head": Case(
        b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nevil", method="HEAD", reusable=False
    ),
    "101-upgrade": Case(
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n\x81\x05hello",
        status=None,
        reusable=False,
    ),
    "huge-head": Case(
        b"HTTP/1.1 200 OK\r\n"
        + b"".join(b"X-Pad-%d: %s\r\n" % (i, b"a" * 1000) for i in range(80))
        + b"Content-Length: 2\r\n\r\nok",
        status=None,
        reusable=False,
    ),
    "not-http": Case(b"SSH-2.0-OpenSSH\r\n\r\n", status=None, reusable=False),
}


async def scripted(conn: Conn) -> None:
    while True:
        req = await conn.request()
        name = req.target.rsplit("/", 1)[-1]
        if name == "next":
            await conn.send(OK)
            continue
        case = CASES[name]
        if case.split:
            cut = case.answer.index(case.split)
            await conn.send(case.answer[:cut])
            await asyncio.sleep(0.05)
            await conn.send(case.answer[cut:])
        else:
            await conn.send(case.answer)
        if case.close:
            return


@pytest.fixture
async def raw() -> AsyncIterator[RawUpstream]:
    up = RawUpstream()
    yield up
    await up.stop()


async def _relay_once(pool: UpstreamPool, method: str, path: str) -> tuple[int, bytes, list[tuple[str, str]]]:
    ex, head = await pool.exchange(method, path, [("Host", "x")], None)
    got = bytearray()

    def sink(data: bytes) -> bool:
        got.extend(data)
        return False

    async def drain() -> None:
        return None

    try:
        await ex.stream(sink, drain)
    except BaseException:
        ex.abort()
        raise
    ex.release()
    return head.status, bytes(got), head.headers


@pytest.mark.parametrize("name", list(CASES))
async def test_relay_alone(raw: RawUpstream, name: str) -> None:
    case = CASES[name]
    addr = await raw.start(scripted)
    pool = UpstreamPool(Upstream.parse(addr), connect_timeout_s=5, idle_timeout_s=5)
    try:
        if case.status is None:
            with pytest.raises(UpstreamClosed):
                await _relay_once(pool, case.method, f"/case/{name}")
        else:
            status, body, headers = await _relay_once(pool, case.method, f"/case/{name}")
            assert (status, body) == (case.status, case.body)
            names = {k.lower() for k, _ in headers}
            for h in case.absent:
                assert h.lower() not in names
        await asyncio.sleep(0.05)  # let stray bytes or a close arrive
        assert pool.idle == (1 if case.reusable else 0)
        # Whatever happened, the next request gets its own answer, never a leftover.
        status, body, _ = await _relay_once(pool, "GET", "/case/next")
        assert (status, body) == (200, b"next")
        assert raw.connections == (1 if case.reusable else 2)
    finally:
        await pool.close()


@pytest.mark.parametrize("name", list(CASES))
async def test_through_the_proxy(raw: RawUpstream, make_proxy: MakeProxy, name: str) -> None:
    case = CASES[name]
    proxy = await make_proxy(await raw.start(scripted), server__idle_timeout_s=5)
    async with aiohttp.ClientSession() as s:
        async with s.request(case.method, f"{proxy.url}/case/{name}") as r:
            body = await r.read()
            if case.status is None:
                assert r.status == 502
                assert (await r.json())["error"].startswith("ollamon: upstream")
            else:
                assert (r.status, body) == (case.status, case.body)
                for h in case.absent:
                    assert h not in r.headers
        await asyncio.sleep(0.05)
        async with s.get(f"{proxy.url}/case/next") as r:
            assert (r.status, await r.read()) == (200, b"next")
    assert raw.connections == (1 if case.reusable else 2)
    assert len(raw.requests) == 2


async def test_interim_answer_then_silence_times_out(raw: RawUpstream, make_proxy: MakeProxy) -> None:
    async def handler(conn: Conn) -> None:
        await conn.request()
        await conn.send(b"HTTP/1.1 100 Continue\r\n\r\n")
        await conn.closed_by_peer()

    addr = await raw.start(handler)
    pool = UpstreamPool(Upstream.parse(addr), connect_timeout_s=5, idle_timeout_s=0.5)
    try:
        with pytest.raises(UpstreamTimeout):
            await asyncio.wait_for(_relay_once(pool, "POST", "/api/generate"), 10)
    finally:
        await pool.close()
    proxy = await make_proxy(addr, server__idle_timeout_s=0.5)
    async with aiohttp.ClientSession() as s:
        async with s.post(f"{proxy.url}/api/generate", json={"model": "m", "prompt": "p"}) as r:
            assert r.status == 504
            assert "no response from upstream" in (await r.json())["error"]
    (row,) = await proxy.wait_rows(1)
    assert row["success"] == 0 and row["status_code"] == 504


async def test_close_delimited_stream_ends_cleanly_for_the_client(
    raw: RawUpstream, make_proxy: MakeProxy
) -> None:
    """A body that ends at the upstream's close is a whole body: the client sees a clean end, not a cut."""

    async def handler(conn: Conn) -> None:
        await conn.request()
        await conn.send(b"HTTP/1.1 200 OK\r\nContent-Type: application/x-ndjson\r\n\r\n")
        await conn.send(b'{"model":"m","response":"a","done":false}\n')
        await asyncio.sleep(0.05)
        await conn.send(b'{"model":"m","response":"","done":true,"done_reason":"stop","eval_count":1}\n')

    proxy = await make_proxy(await raw.start(handler))
    async with aiohttp.ClientSession() as s:
        async with s.post(f"{proxy.url}/api/generate", json={"model": "m", "prompt": "p"}) as r:
            assert r.status == 200 and r.headers["Transfer-Encoding"] == "chunked"
            lines = (await r.read()).splitlines()
    assert len(lines) == 2
    (row,) = await proxy.wait_rows(1)
    assert row["success"] == 1 and row["completion_tokens"] == 1
    assert proxy.app[FORWARDER_KEY].pool.idle == 0
