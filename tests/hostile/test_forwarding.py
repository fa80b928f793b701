"""The forwarding path against hostile clients and misbehaving upstreams (the hardening issue, §1 and §2)."""

from __future__ import annotations

import asyncio
import base64
import io
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web

from proxy.forward.upstream_client import UpstreamPool
from proxy.keys import FORWARDER_KEY
from proxy.upstream_url import Upstream
from tests.fixtures.proxy import MakeProxy, ProxyHandle
from tests.hostile.rawhttp import Conn, RawUpstream
from tests.polling import until

NDJSON_HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: application/x-ndjson\r\nTransfer-Encoding: chunked\r\n\r\n"


@pytest.fixture
async def raw() -> AsyncIterator[RawUpstream]:
    up = RawUpstream()
    yield up
    await up.stop()


async def raw_exchange(url: str, data: bytes, *, read_for: float = 2.0) -> bytes:
    """Send exact bytes to the proxy, return what came back within ``read_for`` seconds (or until close)."""
    host, port = url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(data)
    await writer.drain()
    got = bytearray()
    try:
        async with asyncio.timeout(read_for):
            while chunk := await reader.read(65536):
                got += chunk
    except TimeoutError:
        pass
    writer.close()
    return bytes(got)


def error_types(proxy: ProxyHandle) -> list[str]:
    return [r["error_type"] for r in proxy.rows("error_metrics")]


# -- §1: framing is always ollamon's -------------------------------------------------------------
@pytest.mark.parametrize(
    "connection", ["keep-alive, Content-Length", "Content-Length", "close, content-length, transfer-encoding"]
)
async def test_connection_header_cannot_remove_request_framing(
    raw: RawUpstream, make_proxy: MakeProxy, connection: str
) -> None:
    """A body that is a second request stays a body: Ollama sees one request, framed by ollamon."""
    smuggled = b"GET /api/delete-everything HTTP/1.1\r\nHost: x\r\n\r\n"
    body = b'{"model":"m","prompt":"p"}' + smuggled

    async def handler(conn: Conn) -> None:
        while True:
            await conn.request()
            await conn.send(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")

    proxy = await make_proxy(await raw.start(handler))
    head = (
        f"POST /api/generate HTTP/1.1\r\nHost: {proxy.host_port}\r\nConnection: {connection}\r\n"
        f"Content-Length: {len(body)}\r\nContent-Type: application/json\r\n\r\n"
    ).encode()
    answer = await raw_exchange(proxy.url, head + body, read_for=1.0)
    assert answer.startswith(b"HTTP/1.1 200") and answer.count(b"HTTP/1.1") == 1
    # Whatever the client's Connection header said, the upstream got exactly one request, this body.
    assert [(r.method, r.target) for r in raw.requests] == [("POST", "/api/generate")]
    assert raw.requests[0].body == body
    assert raw.requests[0].header("Content-Length") == str(len(body))
    assert raw.requests[0].header("Transfer-Encoding") is None
    (row,) = await proxy.wait_rows(1)
    assert row["endpoint"] == "/api/generate"


async def test_chunked_upload_is_reframed_by_ollamon(raw: RawUpstream, make_proxy: MakeProxy) -> None:
    body = b"A" * 200_000

    async def handler(conn: Conn) -> None:
        await conn.request()
        await conn.send(b"HTTP/1.1 201 Created\r\nContent-Length: 0\r\n\r\n")

    proxy = await make_proxy(await raw.start(handler))
    chunks = b"".join(
        b"%x\r\n%s\r\n" % (len(body[i : i + 70000]), body[i : i + 70000]) for i in range(0, len(body), 70000)
    )
    head = (
        f"POST /api/blobs/sha256:x HTTP/1.1\r\nHost: {proxy.host_port}\r\nConnection: Transfer-Encoding\r\n"
        "Transfer-Encoding: chunked\r\n\r\n"
    ).encode()
    answer = await raw_exchange(proxy.url, head + chunks + b"0\r\n\r\n", read_for=1.0)
    assert answer.startswith(b"HTTP/1.1 201")
    (req,) = raw.requests
    assert req.body == body and req.header("Transfer-Encoding") == "chunked"


# -- §1: no replay of what may have run ------------------------------------------------------------
async def test_post_is_never_replayed_on_a_fresh_connection(raw: RawUpstream, make_proxy: MakeProxy) -> None:
    async def handler(conn: Conn) -> None:
        await conn.request()
        await conn.send(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await conn.request()  # the POST reached the upstream ... which dies without answering
        # (closing here, after reading: the request may have started a generation)

    proxy = await make_proxy(await raw.start(handler))
    async with aiohttp.ClientSession() as s:
        async with s.get(f"{proxy.url}/api/version") as r:
            assert await r.read() == b"ok"
        async with s.post(f"{proxy.url}/api/generate", json={"model": "m", "prompt": "p"}) as r:
            assert r.status == 502
            assert "failed before answering" in (await r.json())["error"]
    assert [r.method for r in raw.requests] == ["GET", "POST"]  # sent once, not twice
    (row,) = await proxy.wait_rows(1)
    assert row["success"] == 0
    assert error_types(proxy) == ["upstream_closed"]


async def test_safe_request_is_replayed_once(raw: RawUpstream, make_proxy: MakeProxy) -> None:
    async def handler(conn: Conn) -> None:
        await conn.request()
        await conn.send(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        if raw.connections == 1:
            await conn.request()  # read and die: a GET may be sent again
        else:
            while True:
                await conn.request()
                await conn.send(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")

    proxy = await make_proxy(await raw.start(handler))
    async with aiohttp.ClientSession() as s:
        for _ in range(2):
            async with s.get(f"{proxy.url}/api/tags") as r:
                assert (r.status, await r.read()) == (200, b"ok")
    assert len(raw.requests) == 3 and proxy.app[FORWARDER_KEY].pool.replays == 1


async def test_stale_pooled_connection_is_detected_before_writing(raw: RawUpstream) -> None:
    """The upstream closed an idle connection and the loop has not seen it yet: the POST goes elsewhere."""

    async def handler(conn: Conn) -> None:
        await conn.request()
        await conn.send(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        if raw.connections == 1:
            return  # close the kept-alive connection while it idles in the pool
        while True:
            await conn.request()
            await conn.send(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")

    pool = UpstreamPool(Upstream.parse(await raw.start(handler)), idle_timeout_s=5)
    try:

        async def once(method: str, body: bytes | None) -> bytes:
            ex, _ = await pool.exchange(method, "/api/generate", [("Host", "x")], body)
            got = bytearray()

            def sink(d: bytes) -> bool:
                got.extend(d)
                return False

            async def drain() -> None:
                return None

            await ex.stream(sink, drain)
            ex.release()
            return bytes(got)

        assert await once("GET", None) == b"ok"
        assert pool.idle == 1
        await until(raw.conns[0].writer.is_closing, 5, "upstream closed the idle connection")
        # The FIN is in our socket, but the event loop has not run since: only a look finds it.
        time.sleep(0.2)  # noqa: ASYNC251 - blocking on purpose
        assert await once("POST", b"{}") == b"ok"
    finally:
        await pool.close()
    assert pool.stale == 1 and [r.method for r in raw.requests] == ["GET", "POST"]


# -- §2: a client that leaves frees Ollama's slot --------------------------------------------------
@pytest.mark.parametrize("reused", [False, True])
async def test_disconnect_before_first_byte_cancels_upstream(
    make_emulator: Any, make_proxy: MakeProxy, reused: bool
) -> None:
    emu = await make_emulator()
    proxy = await make_proxy(emu.url)
    async with aiohttp.ClientSession() as s:
        if reused:  # an earlier request leaves a pooled upstream connection, as in production
            async with s.post(f"{proxy.url}/api/generate", json={"model": "llama3.2", "prompt": "hi"}) as r:
                await r.read()
            assert proxy.app[FORWARDER_KEY].pool.idle == 1
        task = asyncio.ensure_future(
            s.post(
                f"{proxy.url}/api/generate",
                json={"model": "llama3.2", "prompt": "a long prompt"},
                headers={"X-Emulate": "prompt_eval_ms=3000"},
            )
        )
        await until(lambda: emu.emu.ground_truth.in_flight, 10, "request at the emulator")
        await asyncio.sleep(0.2)
        left = time.monotonic()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    await until(lambda: not emu.emu.ground_truth.in_flight, 5, "emulator request ended")
    entry = emu.emu.ground_truth.entries[-1]
    assert entry.cancelled and entry.finished_at is not None
    assert entry.finished_at - left < 1.0  # Ollama's slot is free within a second, not after 3 s
    rows = await proxy.wait_rows(2 if reused else 1)
    assert rows[-1]["cancelled"] == 1
    assert proxy.app[FORWARDER_KEY].pool.connects == 1  # the cancelled request used the pooled one


# -- §2: slow clients ------------------------------------------------------------------------------
async def _big_ndjson(conn: Conn, lines: int = 4000, close_early: bool = False) -> None:
    await conn.request()
    await conn.send(NDJSON_HEAD)
    piece = b'{"model":"m","response":"' + b"x" * 2000 + b'","done":false}\n'
    for i in range(lines):
        conn.writer.write(b"%x\r\n%s\r\n" % (len(piece), piece))
        if i % 50 == 0:
            await conn.writer.drain()
        if close_early and i == lines // 2:
            await conn.writer.drain()
            conn.writer.transport.abort()
            return
    done = b'{"model":"m","response":"","done":true,"done_reason":"stop","eval_count":4000}\n'
    await conn.send(b"%x\r\n%s\r\n0\r\n\r\n" % (len(done), done))
    await conn.closed_by_peer()


async def test_slow_reader_is_not_upstream_silence(raw: RawUpstream, make_proxy: MakeProxy) -> None:
    proxy = await make_proxy(await raw.start(_big_ndjson), server__idle_timeout_s=0.5)
    async with aiohttp.ClientSession(read_bufsize=1 << 16) as s:
        async with s.post(f"{proxy.url}/api/generate", json={"model": "m", "prompt": "p"}) as r:
            await r.content.read(1 << 16)
            await asyncio.sleep(2.0)  # four idle timeouts without reading: the upstream was never silent
            rest = await r.read()
    assert rest.endswith(b'"eval_count":4000}\n')
    (row,) = await proxy.wait_rows(1)
    assert row["success"] == 1 and row["completion_tokens"] == 4000


async def test_client_that_never_reads_is_cut_and_recorded(raw: RawUpstream, make_proxy: MakeProxy) -> None:
    proxy = await make_proxy(await raw.start(_big_ndjson), server__client_stall_timeout_s=1.0)
    host, port = proxy.host_port.split(":")
    _, writer = await asyncio.open_connection(host, int(port))
    body = b'{"model":"m","prompt":"p"}'
    writer.write(
        b"POST /api/generate HTTP/1.1\r\nHost: %s\r\nContent-Length: %d\r\n\r\n%s"
        % (proxy.host_port.encode(), len(body), body)
    )
    await writer.drain()
    start = time.monotonic()
    (row,) = await proxy.wait_rows(1, within=15)  # recorded while the client still holds its socket
    assert time.monotonic() - start < 10
    assert row["success"] == 0 and row["cancelled"] == 0
    assert error_types(proxy) == ["client_stalled"]
    await asyncio.wait_for(raw.conns[0].closed_by_peer(), 5)  # and the upstream was let go
    writer.close()


async def test_upstream_close_while_client_is_slow_is_noticed_at_once(
    raw: RawUpstream, make_proxy: MakeProxy
) -> None:
    async def handler(conn: Conn) -> None:
        await _big_ndjson(conn, close_early=True)

    proxy = await make_proxy(await raw.start(handler), server__client_stall_timeout_s=60)
    host, port = proxy.host_port.split(":")
    _, writer = await asyncio.open_connection(host, int(port))
    body = b'{"model":"m","prompt":"p"}'
    writer.write(
        b"POST /api/generate HTTP/1.1\r\nHost: %s\r\nContent-Length: %d\r\n\r\n%s"
        % (proxy.host_port.encode(), len(body), body)
    )
    await writer.drain()
    (row,) = await proxy.wait_rows(1, within=10)  # long before the 60 s stall timeout
    assert row["success"] == 0
    assert error_types(proxy) == ["upstream_closed"]
    writer.close()


# -- §2: bodies of any size are forwarded ----------------------------------------------------------
async def test_multi_megabyte_chat_body_reaches_ollama(emulator: Any, make_proxy: MakeProxy) -> None:
    proxy = await make_proxy(emulator.url)
    image = base64.b64encode(b"\x89PNG" + b"\0" * (3 << 20)).decode()  # a 4 MiB vision request
    body = {"model": "llama3.2", "messages": [{"role": "user", "content": "what is this", "images": [image]}]}
    async with aiohttp.ClientSession() as s:
        data = io.BytesIO(orjson.dumps(body))
        headers = {"Content-Type": "application/json"}
        async with s.post(f"{proxy.url}/api/chat", data=data, headers=headers) as r:
            assert r.status == 200, await r.text()
            await r.read()
    (row,) = await proxy.wait_rows(1)
    assert row["success"] == 1 and row["model_name"] == "llama3.2:latest"
    assert emulator.emu.ground_truth.entries[-1].path == "/api/chat"


async def test_inspection_copies_share_one_budget(raw: RawUpstream, make_proxy: MakeProxy) -> None:
    release = asyncio.Event()

    async def handler(conn: Conn) -> None:
        await conn.request()
        await conn.send(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}")

    budget = 1 << 20
    proxy = await make_proxy(await raw.start(handler), server__max_inspect_total_bytes=budget)
    fwd = proxy.app[FORWARDER_KEY]
    peak = 0

    async def upload() -> int:
        async def gen() -> AsyncIterator[bytes]:
            yield b'{"model":"m","prompt":"' + b"a" * (600 << 10)
            await release.wait()  # a stalled upload
            yield b'"}'

        async with aiohttp.ClientSession() as s:
            async with s.post(f"{proxy.url}/api/generate", data=gen()) as r:
                await r.read()
                return r.status

    tasks = [asyncio.ensure_future(upload()) for _ in range(3)]
    deadline = time.monotonic() + 10
    while fwd.inspect_skipped < 1 and time.monotonic() < deadline:
        peak = max(peak, fwd.inspect_held)
        await asyncio.sleep(0.01)
    peak = max(peak, fwd.inspect_held)
    assert fwd.inspect_skipped >= 1 and 0 < peak <= budget
    release.set()
    assert await asyncio.gather(*tasks) == [200, 200, 200]
    assert fwd.inspect_held == 0
    rows = await proxy.wait_rows(3)
    assert sorted(r["model_name"] or "" for r in rows).count("m:latest") >= 1


# -- aiohttp internals the forwarder relies on ---------------------------------------------------------
async def test_aiohttp_internals_the_forwarder_uses_are_there(emulator: Any, make_proxy: MakeProxy) -> None:
    """forward.py overrides StreamResponse._prepare_headers and writes chunk frames itself past
    _payload_writer; if an aiohttp upgrade changes either, this fails loudly (pyproject pins the range)."""
    import inspect as pyinspect

    assert pyinspect.iscoroutinefunction(web.StreamResponse._prepare_headers)
    proxy = await make_proxy(emulator.url)
    async with aiohttp.ClientSession() as s:
        async with s.post(f"{proxy.url}/api/generate", json={"model": "llama3.2", "prompt": "x"}) as r:
            assert r.headers["Transfer-Encoding"] == "chunked" and "Server" not in r.headers
            lines = (await r.read()).splitlines()
    assert lines and b'"done":true' in lines[-1]
    resp = web.StreamResponse()
    assert hasattr(resp, "_payload_writer") and hasattr(resp, "_headers")


# -- §3: text kept per request is bounded --------------------------------------------------------------
def test_response_text_kept_is_bounded_and_the_estimate_scaled() -> None:
    from proxy.forward.streams import make_parser
    from proxy.forward.streams.collect import MAX_TEXT_BYTES

    parser = make_parser("chat", "application/x-ndjson")
    word = "token " * 100
    line = (
        orjson.dumps({"model": "m", "message": {"role": "assistant", "content": word}, "done": False}) + b"\n"
    )
    lines = (3 * MAX_TEXT_BYTES) // len(word)
    for _ in range(lines):
        parser.feed(line)
    facts = parser.finish()
    kept, dropped = facts.text_kept_bytes, facts.text_dropped_bytes
    assert kept <= MAX_TEXT_BYTES and len(facts.response_text) <= MAX_TEXT_BYTES
    assert kept + dropped == lines * len(word)  # every byte was counted, two thirds were not kept
    assert dropped > kept


async def test_text_past_the_cap_is_counted_and_the_estimate_scaled_against_ground_truth(
    emulator: Any, make_proxy: MakeProxy, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With the cap lowered to 2 KiB, a /v1 stream without usage still gets a length and an estimate close to
    what the emulator really sent (the cap is what bounds a never-reading client's memory)."""
    from proxy.forward.streams import collect
    from proxy.forward.tokens import estimate_tokens

    monkeypatch.setattr(collect, "MAX_TEXT_BYTES", 2048)
    proxy = await make_proxy(emulator.url)
    body = {"model": "llama3.2", "stream": True, "messages": [{"role": "user", "content": "write"}]}
    async with aiohttp.ClientSession() as s:
        async with s.post(
            f"{proxy.url}/v1/chat/completions", json=body, headers={"X-Emulate": "tokens=3000"}
        ) as r:
            assert r.status == 200
            await r.read()
    (row,) = await proxy.wait_rows(1)
    (entry,) = [e for e in emulator.emu.ground_truth.entries if e.path == "/v1/chat/completions"]
    truth = entry.response_text
    assert len(truth) > 8 * 2048
    meta = orjson.loads(row["metadata"])
    assert row["token_source"] == "estimate" and meta["response_text_truncated_bytes"] > 2 * 2048
    assert row["response_length"] == len(truth)  # counted past the cap from escaped bytes (\u003c is one)
    real = estimate_tokens(truth)
    assert abs(row["completion_tokens"] - real) <= 0.15 * real  # scaled from the first 2 KiB
