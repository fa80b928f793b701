"""The fault proxy itself: each fault does what tests rely on, seen from both ends of real sockets."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Literal

import pytest

from tests.faults import FaultProxy, Mode
from tests.fixtures.ports import free_port

Serve = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


class Upstream:
    """A loopback TCP server running ``serve`` per connection; counts accepts and records what ends."""

    def __init__(self, serve: Serve) -> None:
        self._serve = serve
        self.accepted = 0
        self.received = bytearray()
        self.ends: list[str] = []  # "eof" or "reset" per connection, as the server saw it
        self.port = 0
        self._server: asyncio.Server | None = None
        self._writers: list[asyncio.StreamWriter] = []

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        self._writers.append(writer)
        try:
            await self._serve(reader, writer)
        except ConnectionResetError:
            self.ends.append("reset")
        finally:
            writer.transport.abort()

    async def __aenter__(self) -> Upstream:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = int(self._server.sockets[0].getsockname()[1])
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for w in self._writers:
            w.transport.abort()
        await self._server.wait_closed()


def echo(up: Upstream) -> Serve:
    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(65536):
            up.received += data
            writer.write(data)
            await writer.drain()
        up.ends.append("eof")
        writer.close()

    return serve


def talker(payload: bytes, pieces: int = 1, gap_s: float = 0.0) -> Serve:
    """Send ``payload`` in ``pieces`` writes ``gap_s`` apart, then wait for the peer to go."""

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        size = -(-len(payload) // pieces)
        for i in range(0, len(payload), size):
            writer.write(payload[i : i + size])
            await writer.drain()
            if gap_s:
                await asyncio.sleep(gap_s)
        await reader.read()

    return serve


@contextlib.asynccontextmanager
async def chain(serve_factory: Callable[[Upstream], Serve]) -> AsyncIterator[tuple[Upstream, FaultProxy]]:
    up = Upstream(lambda r, w: asyncio.sleep(0))
    up._serve = serve_factory(up)
    async with up, FaultProxy(up.port) as fp:
        yield up, fp


async def connect(fp: FaultProxy) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection("127.0.0.1", fp.port)


async def nothing_arrives(reader: asyncio.StreamReader, within_s: float = 0.3) -> None:
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(within_s):
            await reader.read(1)


async def test_pass_through_forwards_both_ways_counts_and_passes_the_end() -> None:
    async with chain(echo) as (up, fp):
        reader, writer = await connect(fp)
        writer.write(b"hello fault proxy")
        await writer.drain()
        assert await reader.readexactly(17) == b"hello fault proxy"
        writer.write_eof()
        assert await reader.read() == b""  # the upstream's close came through as a clean end
        writer.close()
        await fp.wait_for(lambda: fp.active == 0)
    assert up.received == b"hello fault proxy" and up.ends == ["eof"]
    assert (fp.connections, fp.bytes_up, fp.bytes_down, fp.resets) == (1, 17, 17, 0)


async def test_latency_delays_every_chunk_without_throttling() -> None:
    # 20 pieces 10 ms apart; 0.2 s latency per chunk as a delay line: all of it arrives about 0.2 s
    # after it was sent. A throttle (sleep per chunk in turn) would take 20 x 0.2 = 4 s.
    payload = bytes(range(200)) * 10
    async with chain(lambda up: talker(payload, pieces=20, gap_s=0.01)) as (_, fp):
        fp.latency_s = 0.2
        start = time.monotonic()
        reader, writer = await connect(fp)
        first = await reader.readexactly(1)
        first_at = time.monotonic() - start
        rest = await reader.readexactly(len(payload) - 1)
        took = time.monotonic() - start
        writer.close()
    assert first + rest == payload
    assert first_at >= 0.2
    assert took < 2.0, f"{took:.2f} s: latency throttled the stream instead of shifting it"


async def test_stall_holds_bytes_keeps_sockets_open_then_releases_them_in_order() -> None:
    async with chain(echo) as (up, fp):
        reader, writer = await connect(fp)
        writer.write(b"one")
        assert await reader.readexactly(3) == b"one"
        fp.stall()
        writer.write(b"two")
        writer.write(b"three")
        await writer.drain()
        await nothing_arrives(reader)
        assert up.received == b"one" and up.ends == [] and fp.active == 1  # held, not lost, still open
        fp.pass_through()
        assert await reader.readexactly(8) == b"twothree"
        writer.close()
    assert up.received == b"onetwothree"


async def test_blackhole_accepts_but_never_connects_or_answers() -> None:
    async with chain(echo) as (up, fp):
        fp.blackhole()
        reader, writer = await connect(fp)  # the connect itself succeeds
        writer.write(b"anyone there?")
        await writer.drain()
        await nothing_arrives(reader)
        await fp.wait_for(lambda: fp.bytes_dropped == 13)
        assert up.accepted == 0 and fp.connections == 1
        # Turning the blackhole off does not revive a connection that never had an upstream.
        fp.pass_through()
        await nothing_arrives(reader, 0.1)
        writer.close()


async def test_blackhole_swallows_a_live_connection_including_its_end() -> None:
    async with chain(echo) as (up, fp):
        reader, writer = await connect(fp)
        writer.write(b"x")
        assert await reader.readexactly(1) == b"x"
        fp.blackhole()
        writer.write(b"lost")
        writer.write_eof()
        await writer.drain()
        await nothing_arrives(reader)
        assert up.received == b"x" and up.ends == []  # neither the bytes nor the FIN reached it
        assert fp.bytes_dropped == 4
        writer.close()


async def test_reset_sends_rst_to_live_and_new_connections() -> None:
    async with chain(echo) as (up, fp):
        reader, writer = await connect(fp)
        writer.write(b"x")
        assert await reader.readexactly(1) == b"x"
        fp.reset()
        # A RST, not a FIN: reading raises instead of returning b"".
        with pytest.raises(ConnectionResetError):
            await reader.read(10)
        writer.close()
        await fp.wait_for(lambda: up.ends == ["reset"])  # the upstream side was reset too
        assert fp.mode is Mode.RESET
        reader2, writer2 = await connect(fp)
        with pytest.raises(ConnectionResetError):
            await reader2.read(10)
        writer2.close()
        assert fp.resets == 2 and fp.connections == 2 and up.accepted == 1


@pytest.mark.parametrize(("how", "ending"), [("reset", ConnectionResetError), ("close", None)])
async def test_truncate_after_n_upstream_bytes(
    how: Literal["reset", "close"], ending: type[Exception] | None
) -> None:
    payload = bytes(1000)
    async with chain(lambda up: talker(payload, pieces=4, gap_s=0.01)) as (_, fp):
        fp.truncate_after(300, how)
        reader, writer = await connect(fp)
        got = await reader.readexactly(300)
        if ending is None:
            assert await reader.read() == b""  # a clean-looking TCP end after exactly 300 bytes
        else:
            with pytest.raises(ending):
                await reader.read(10)
        writer.close()
    assert len(got) == 300 and fp.bytes_down == 300


async def test_truncate_counts_from_the_call_on_a_live_connection() -> None:
    async with chain(echo) as (_, fp):
        reader, writer = await connect(fp)
        writer.write(b"a" * 100)
        assert len(await reader.readexactly(100)) == 100
        fp.truncate_after(10)
        writer.write(b"b" * 100)
        assert await reader.readexactly(10) == b"b" * 10
        with pytest.raises(ConnectionResetError):
            await reader.read(10)
        writer.close()
    assert fp.bytes_down == 110


async def test_dead_upstream_resets_the_client() -> None:
    async with FaultProxy(free_port()) as fp:
        reader, writer = await connect(fp)
        with pytest.raises(ConnectionResetError):
            await reader.read(10)
        writer.close()
    assert fp.resets == 1 and fp.connections == 1


async def test_close_ends_stalled_and_blackholed_connections_promptly() -> None:
    async with chain(echo) as (_, fp):
        fp.stall()
        r1, w1 = await connect(fp)
        w1.write(b"held")
        fp.blackhole()
        r2, w2 = await connect(fp)
        await fp.wait_for(lambda: fp.active == 2)
        start = time.monotonic()
        await fp.close()
        took = time.monotonic() - start
        for reader in (r1, r2):
            with pytest.raises(ConnectionResetError):
                await reader.read(10)
        w1.close()
        w2.close()
    assert fp.active == 0 and took < 3.0
