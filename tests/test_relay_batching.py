"""One socket read, one client write: the upstream client hands the sink what a read held, in one piece.

Under load a read often holds several token chunks; writing each on its own cost a client write (and a
wake-up of the client) per chunk. These pin the batching: what the sink sees per read, that good bytes
before a malformed chunk still arrive, that a sink's own error surfaces, and that the NDJSON parser reads
a piece of several token lines exactly as its slow path would.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proxy.forward.streams import Flavor, make_parser
from proxy.forward.streams.ndjson import NdjsonParser
from proxy.forward.upstream_client import UpstreamClosed, UpstreamPool
from proxy.upstream_url import Upstream
from tests.hostile.rawhttp import Conn, RawUpstream
from tests.test_streams import ND, SAMPLES

HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: application/x-ndjson\r\nTransfer-Encoding: chunked\r\n\r\n"
THREE = b"3\r\nabc\r\n3\r\ndef\r\n3\r\nghi\r\n"


@pytest.fixture
async def raw() -> AsyncIterator[RawUpstream]:
    up = RawUpstream()
    yield up
    await up.stop()


async def _stream(addr: str, sink_error: Exception | None = None) -> tuple[list[bytes], UpstreamPool]:
    pool = UpstreamPool(Upstream.parse(addr), connect_timeout_s=5, idle_timeout_s=10)
    ex, _head = await pool.exchange("GET", "/x", [("Host", "x")], None)
    calls: list[bytes] = []

    def sink(data: bytes) -> bool:
        calls.append(data)
        if sink_error is not None:
            raise sink_error
        return False

    async def drain() -> None:
        return None

    try:
        await ex.stream(sink, drain)
    except BaseException:
        ex.abort()
        await pool.close()
        raise
    ex.release()
    return calls, pool


async def test_chunks_of_one_read_reach_the_sink_as_one_piece(raw: RawUpstream) -> None:
    async def script(conn: Conn) -> None:
        await conn.request()
        await conn.send(HEAD)
        await asyncio.sleep(0.1)  # the head is read alone; the sink is attached before the body comes
        await conn.send(THREE + b"0\r\n\r\n")  # three chunks and the end in one write
        await conn.closed_by_peer()

    calls, pool = await _stream(await raw.start(script))
    await pool.close()
    assert calls == [b"abcdefghi"]


async def test_chunks_read_with_the_head_reach_the_sink_as_one_piece(raw: RawUpstream) -> None:
    async def script(conn: Conn) -> None:
        await conn.request()
        await conn.send(HEAD + THREE + b"0\r\n\r\n")
        await conn.closed_by_peer()

    calls, pool = await _stream(await raw.start(script))
    await pool.close()
    assert calls == [b"abcdefghi"]


async def test_good_chunks_before_a_malformed_one_still_arrive(raw: RawUpstream) -> None:
    async def script(conn: Conn) -> None:
        await conn.request()
        await conn.send(HEAD)
        await asyncio.sleep(0.1)
        await conn.send(THREE + b"zz\r\nnot a chunk\r\n")
        await conn.closed_by_peer()

    addr = await raw.start(script)
    pool = UpstreamPool(Upstream.parse(addr), connect_timeout_s=5, idle_timeout_s=10)
    ex, _ = await pool.exchange("GET", "/x", [("Host", "x")], None)
    got: list[bytes] = []

    async def drain() -> None:
        return None

    try:
        with pytest.raises(UpstreamClosed, match="malformed"):
            await ex.stream(lambda d: bool(got.append(d)), drain)
    finally:
        ex.abort()
        await pool.close()
    assert got == [b"abcdefghi"]


async def test_a_sink_error_surfaces_even_when_the_answer_completed(raw: RawUpstream) -> None:
    async def script(conn: Conn) -> None:
        await conn.request()
        await conn.send(HEAD)
        await asyncio.sleep(0.1)
        await conn.send(THREE + b"0\r\n\r\n")  # complete in the read whose sink call fails
        await conn.closed_by_peer()

    with pytest.raises(RuntimeError, match="sink bug"):
        await _stream(await raw.start(script), RuntimeError("sink bug"))


class _SlowPathOnly(NdjsonParser):
    """The NDJSON parser with every fast path off: the reference the fast paths must agree with."""

    def feed(self, chunk: bytes) -> int:
        self._fast_ok = False
        return super().feed(chunk)

    def _scan_model(self, buf: bytes, start: int, end: int) -> None:
        super()._scan_model(buf, start, end)
        self._fast_ok = False


def _both(flavor: Flavor, body: bytes) -> tuple[object, object, int, int]:
    fast = make_parser(flavor, ND)
    slow = _SlowPathOnly(flavor)
    n_fast, n_slow = fast.feed(body), slow.feed(body)
    return fast.finish(), slow.finish(), n_fast, n_slow


def test_ndjson_samples_read_whole_match_the_slow_path() -> None:
    checked = 0
    for sample in SAMPLES:
        if sample.content_type != ND:
            continue
        fast, slow, n_fast, n_slow = _both(sample.flavor, sample.body)
        assert (fast, n_fast) == (slow, n_slow), sample.name
        checked += 1
    assert checked >= 5


def _line(flavor: Flavor, text: str) -> bytes:
    ts = '"created_at":"2025-10-26T17:15:24.097767Z"'
    body = orjson.dumps(text).decode()[1:-1]
    if flavor is Flavor.CHAT:
        inner = '"message":{"role":"assistant","content":"' + body + '"}'
    else:
        inner = '"response":"' + body + '"'
    return ('{"model":"llama3.2",' + ts + "," + inner + ',"done":false}\n').encode()


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    flavor=st.sampled_from([Flavor.GENERATE, Flavor.CHAT]),
    texts=st.lists(
        st.text(max_size=10) | st.sampled_from(['"', "\\", 'a\\"b', "", "\\n", "é", 'x","done":false}']),
        max_size=12,
    ),
)
def test_token_lines_read_together_match_the_slow_path(flavor: Flavor, texts: list[str]) -> None:
    done = b'{"model":"llama3.2","done":true,"done_reason":"stop","eval_count":3}\n'
    body = b"".join(_line(flavor, t) for t in texts) + done
    fast, slow, n_fast, n_slow = _both(flavor, body)
    assert (fast, n_fast) == (slow, n_slow)
