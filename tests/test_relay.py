"""The upstream HTTP/1.1 client on the hot path: reuse, stale connections, back-pressure, odd answers."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import pytest

from proxy.keys import FORWARDER_KEY
from tests.fixtures.proxy import MakeProxy

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


async def read_request(reader: asyncio.StreamReader) -> bytes:
    head = await reader.readuntil(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":")[1])
    return head + (await reader.readexactly(length) if length else b"")


@pytest.fixture
async def raw_upstream() -> AsyncIterator[Callable[[Handler], Awaitable[str]]]:
    servers: list[asyncio.Server] = []

    async def start(handler: Handler) -> str:
        async def closing(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                await handler(reader, writer)
            except (ConnectionError, asyncio.IncompleteReadError):
                pass
            finally:
                writer.close()

        server = await asyncio.start_server(closing, "127.0.0.1", 0)
        servers.append(server)
        return f"127.0.0.1:{server.sockets[0].getsockname()[1]}"

    yield start
    for s in servers:
        s.close()
        await s.wait_closed()


async def test_connections_are_reused(emulator: Any, make_proxy: MakeProxy) -> None:
    proxy = await make_proxy(emulator.url)
    async with aiohttp.ClientSession() as s:
        for _ in range(5):
            async with s.get(f"{proxy.url}/api/tags") as r:
                assert r.status == 200
            async with s.post(f"{proxy.url}/api/generate", json={"model": "llama3.2", "prompt": "x"}) as r:
                await r.read()
            async with s.head(f"{proxy.url}/") as r:
                assert r.status == 200
    assert proxy.app[FORWARDER_KEY].pool.connects <= 2


async def test_stale_pooled_connection_is_retried(raw_upstream: Any, make_proxy: MakeProxy) -> None:
    served = 0

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal served
        await read_request(reader)
        served += 1
        if served == 2:
            writer.close()  # the keep-alive connection died just as the next request came
            return
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()
        while True:  # keep the connection open for reuse
            await read_request(reader)
            served += 1
            writer.close()
            return

    proxy = await make_proxy(await raw_upstream(handler))
    async with aiohttp.ClientSession() as s:
        for _ in range(2):
            async with s.get(f"{proxy.url}/api/version") as r:
                assert r.status == 200 and await r.read() == b"ok"
    assert served == 3


async def test_slow_client_pauses_the_upstream(raw_upstream: Any, make_proxy: MakeProxy) -> None:
    size = 64 << 20
    upstream_buffer: list[int] = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\nContent-Length: %d\r\n\r\n" % size
        )
        block = b"x" * (1 << 20)
        for _ in range(size >> 20):
            writer.write(block)
            upstream_buffer.append(writer.transport.get_write_buffer_size())
            if writer.transport.get_write_buffer_size() > 8 << 20:
                await writer.drain()
        await writer.drain()

    proxy = await make_proxy(await raw_upstream(handler))
    async with aiohttp.ClientSession(read_bufsize=1 << 16) as s:
        async with s.get(f"{proxy.url}/big") as r:
            first = await r.content.read(1 << 16)
            await asyncio.sleep(1.0)  # a slow reader: the proxy must stop reading the upstream
            stuck = max(upstream_buffer)
            rest = await r.read()
    assert len(first) + len(rest) == size
    # The upstream could not get rid of its bytes while the client slept: the proxy had paused.
    assert stuck > 4 << 20


@pytest.mark.parametrize(
    ("answer", "status"),
    [
        (b"HTTP/1.1 204 No Content\r\n\r\n", 204),
        (b"garbage that is not http\r\n\r\n", 502),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort", None),
    ],
)
async def test_odd_upstream_answers(
    raw_upstream: Any, make_proxy: MakeProxy, answer: bytes, status: int | None
) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(answer)
        await writer.drain()
        writer.close()

    proxy = await make_proxy(await raw_upstream(handler))
    async with aiohttp.ClientSession() as s:
        if status is None:  # a body cut short must reach the client as a broken body, not a clean end
            with pytest.raises(aiohttp.ClientPayloadError):
                async with s.get(f"{proxy.url}/x") as r:
                    await r.read()
            return
        async with s.get(f"{proxy.url}/x") as r:
            assert r.status == status
            body = await r.read()
    if status == 502:
        assert b"failed before answering" in body


async def test_chunked_request_body_is_streamed_upstream(emulator: Any, make_proxy: MakeProxy) -> None:
    import hashlib
    import os

    proxy = await make_proxy(emulator.url)
    data = os.urandom(3 << 20)
    digest = hashlib.sha256(data).hexdigest()

    async def gen() -> AsyncIterator[bytes]:
        for i in range(0, len(data), 1 << 18):
            yield data[i : i + (1 << 18)]

    async with aiohttp.ClientSession() as s:  # no Content-Length: aiohttp sends it chunked
        async with s.post(f"{proxy.url}/api/blobs/sha256:{digest}", data=gen()) as r:
            assert r.status == 201, await r.text()


async def test_upstream_sees_the_header_rules(raw_upstream: Any, make_proxy: MakeProxy) -> None:
    seen: list[bytes] = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        seen.append(await read_request(reader))
        writer.write(
            b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close, X-Up-Hop\r\nX-Up-Hop: 1\r\n\r\nok"
        )
        await writer.drain()

    upstream = await raw_upstream(handler)
    proxy = await make_proxy(upstream, server__allowed_hosts=["evil.example.com"])
    headers = {
        "Host": "evil.example.com",
        "Authorization": "Bearer secret",
        "Connection": "keep-alive, X-Hop",
        "X-Hop": "1",
        "X-Forwarded-For": "6.6.6.6",
        "X-Custom": "kept",
    }
    async with aiohttp.ClientSession() as s:
        async with s.post(f"{proxy.url}/api/show?verbose=1", data=b'{"model":"x"}', headers=headers) as r:
            assert await r.read() == b"ok"
            assert "X-Up-Hop" not in r.headers and r.headers["X-Request-Id"]
            rid = r.headers["X-Request-Id"]
    (raw,) = seen
    lines = raw.split(b"\r\n\r\n")[0].decode().split("\r\n")
    assert lines[0] == "POST /api/show?verbose=1 HTTP/1.1"
    got = {k.lower(): v for k, v in (line.split(": ", 1) for line in lines[1:])}
    assert got["host"] == upstream
    assert got["authorization"] == "Bearer secret" and got["x-custom"] == "kept"
    assert "x-hop" not in got and got.get("connection") is None
    assert got["x-forwarded-for"] == "127.0.0.1" and got["x-forwarded-host"] == "evil.example.com"
    assert got["x-forwarded-proto"] == "http" and got["x-request-id"] == rid
    assert got["content-length"] == "13" and raw.endswith(b'{"model":"x"}')
