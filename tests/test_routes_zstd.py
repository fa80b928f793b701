"""zstd request bodies (issue 10): forwarded byte for byte, inflated only to be inspected, within the bound.

The upstream here is a raw loopback server (auto-decompression off) that keeps exactly what it received and
answers like Ollama's ``/v1/chat/completions``: the emulator would have to inflate the body to answer, and
what matters is the bytes on the wire.
"""

from __future__ import annotations

import base64
import gzip
import json
import random
import tracemalloc
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import aiohttp
import pytest
import zstandard
from aiohttp import web

from proxy.forward.request_zstd import MAX_WINDOW_BYTES, inflate
from tests.fixtures.proxy import MakeProxy

ANSWER = {
    "id": "chatcmpl-1",
    "object": "chat.completion",
    "created": 1,
    "model": "llama3.2",
    "choices": [
        {"index": 0, "message": {"role": "assistant", "content": "Hi there"}, "finish_reason": "stop"}
    ],
    "usage": {"prompt_tokens": 11, "completion_tokens": 3, "total_tokens": 14},
}


@dataclass
class RawUpstream:
    url: str
    seen: list[tuple[dict[str, str], bytes]] = field(default_factory=list)


@pytest.fixture
async def raw_upstream() -> AsyncIterator[RawUpstream]:
    up = RawUpstream("")

    async def handle(request: web.Request) -> web.Response:
        up.seen.append((dict(request.headers), await request.read()))
        return web.Response(body=json.dumps(ANSWER).encode() + b"\n", content_type="application/json")

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handle)
    runner = web.AppRunner(app, auto_decompress=False)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    up.url = f"http://127.0.0.1:{runner.addresses[0][1]}"
    yield up
    await runner.cleanup()


async def post(url: str, body: bytes, headers: dict[str, str]) -> int:
    async with (
        aiohttp.ClientSession(auto_decompress=False) as s,
        s.post(url, data=body, headers=headers) as r,
    ):
        await r.read()
        return r.status


def chat_body(content: str) -> bytes:
    body = {
        "model": "llama3.2",
        "messages": [{"role": "user", "content": content}],
        "temperature": 0.3,
        "top_p": 0.9,
        "max_tokens": 12,
        "seed": 7,
        "stop": ["END"],
    }
    return json.dumps(body).encode()


@pytest.mark.parametrize("size", ["small", "streamed"])
async def test_zstd_chat_body_is_forwarded_untouched_and_recorded(
    raw_upstream: RawUpstream, make_proxy: MakeProxy, size: str
) -> None:
    # "streamed": incompressible text, so the compressed body passes the handler's 256 KiB deferred-parse line
    # and goes upstream in pieces.
    rng = random.Random(10)
    content = "hello" if size == "small" else base64.b64encode(rng.randbytes(400_000)).decode()
    raw = chat_body(content)
    compressed = zstandard.ZstdCompressor(level=3).compress(raw)
    assert (len(compressed) > 256 << 10) is (size == "streamed")
    proxy = await make_proxy(raw_upstream.url)
    status = await post(
        proxy.url + "/v1/chat/completions",
        compressed,
        {"Content-Encoding": "zstd", "Content-Type": "application/json"},
    )
    assert status == 200
    [(headers, seen)] = raw_upstream.seen
    assert seen == compressed  # byte for byte: never inflated on the way
    assert headers["Content-Encoding"] == "zstd"
    [row] = await proxy.wait_rows(1)
    assert row["model_name"] == "llama3.2:latest" and row["success"] == 1
    assert (row["temperature"], row["top_p"], row["max_tokens"], row["seed"]) == (0.3, 0.9, 12, 7)
    assert json.loads(row["stop"]) == ["END"]
    assert row["prompt_length"] == len(content)
    assert (row["prompt_tokens"], row["completion_tokens"], row["token_source"]) == (11, 3, "usage")
    meta = json.loads(row["metadata"])
    assert meta["content_encoding"] == "zstd"
    assert meta["bytes_inflated"] == len(raw) and meta["bytes_in"] == len(compressed)
    assert "request_parse_error" not in meta


async def test_zstd_bomb_is_forwarded_and_inspection_stops_at_the_bound(
    raw_upstream: RawUpstream, make_proxy: MakeProxy
) -> None:
    # 1 GiB of JSON whitespace after a valid object: ~32 KiB compressed.
    raw = chat_body("hello") + b" " * (1 << 30)
    cctx = zstandard.ZstdCompressor(level=3)
    bomb = b"".join(cctx.read_to_iter(_Repeat(raw)))
    assert len(bomb) < 1 << 20
    proxy = await make_proxy(raw_upstream.url, server__max_inspect_bytes=1 << 20)
    status = await post(proxy.url + "/v1/chat/completions", bomb, {"Content-Encoding": "zstd"})
    assert status == 200
    assert raw_upstream.seen[0][1] == bomb
    [row] = await proxy.wait_rows(1)
    meta = json.loads(row["metadata"])
    assert "max_inspect_bytes (1048576 bytes)" in meta["request_parse_error"]
    assert "bytes_inflated" not in meta and row["temperature"] is None
    # The row is still written, its model named by the answer.
    assert row["model_name"] == "llama3.2:latest" and row["token_source"] == "usage"


async def test_zstd_is_inflated_only_where_ollama_inflates_it(
    raw_upstream: RawUpstream, make_proxy: MakeProxy
) -> None:
    """Native /api routes read the body as JSON whatever Content-Encoding says; a /v1 body without the
    header is not inflated either. Either way the body goes through untouched and Ollama judges it."""
    compressed = zstandard.ZstdCompressor().compress(chat_body("hi"))
    proxy = await make_proxy(raw_upstream.url)
    await post(proxy.url + "/api/chat", compressed, {"Content-Encoding": "zstd"})
    await post(proxy.url + "/v1/chat/completions", compressed, {})
    assert [seen for _, seen in raw_upstream.seen] == [compressed, compressed]
    rows = await proxy.wait_rows(2)
    for row in rows:
        meta = json.loads(row["metadata"])
        assert meta["request_parse_error"].startswith("body is not JSON")
        assert "content_encoding" not in meta


async def test_a_gzip_body_is_forwarded_compressed_too(
    raw_upstream: RawUpstream, make_proxy: MakeProxy
) -> None:
    """aiohttp would inflate a gzip request body on the way in and leave its Content-Encoding header: the
    proxy's server must not decompress anything."""
    compressed = gzip.compress(chat_body("hi"))
    proxy = await make_proxy(raw_upstream.url)
    assert await post(proxy.url + "/api/chat", compressed, {"Content-Encoding": "gzip"}) == 200
    [(headers, seen)] = raw_upstream.seen
    assert seen == compressed and headers["Content-Encoding"] == "gzip"
    await proxy.wait_rows(1)


class _Repeat:
    """A file-like source of ``data`` once (lets the compressor stream 1 GiB without holding it twice)."""

    def __init__(self, data: bytes) -> None:
        self.view = memoryview(data)
        self.at = 0

    def read(self, n: int = -1) -> bytes:
        n = len(self.view) - self.at if n < 0 else n
        out = bytes(self.view[self.at : self.at + n])
        self.at += len(out)
        return out


def test_inflate_memory_stays_within_the_bound() -> None:
    bomb = zstandard.ZstdCompressor(level=19).compress(b"\0" * (1 << 30))
    limit = 4 << 20
    tracemalloc.start()
    try:
        got = inflate(bomb, limit)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert got.body is None and got.error is not None and "inflates past" in got.error
    assert peak < 2 * limit  # the output buffer, bounded; not the gigabyte the frame holds


def test_inflate_refuses_a_frame_that_asks_for_a_huge_window() -> None:
    params = zstandard.ZstdCompressionParameters.from_level(3, window_log=28, write_content_size=False)
    co = zstandard.ZstdCompressor(compression_params=params).compressobj()
    frame = co.compress(b'{"model":"x"}') + co.flush()
    assert zstandard.get_frame_parameters(frame).window_size > MAX_WINDOW_BYTES
    got = inflate(frame, 1 << 20)
    assert got.body is None and got.error is not None and "could not be decompressed" in got.error


def test_inflate_exact_bound_and_concatenated_frames() -> None:
    c = zstandard.ZstdCompressor()
    assert inflate(c.compress(b"x" * 100), 100).body == b"x" * 100
    assert inflate(c.compress(b"x" * 101), 100).body is None
    assert inflate(c.compress(b'{"a":') + c.compress(b"1}"), 100).body == b'{"a":1}'
    assert inflate(b"\x28\xb5\x2f\xfd" + b"junk", 100).error is not None
    truncated = c.compress(bytes(range(256)) * 8)[:-3]
    got = inflate(truncated, 4096)
    assert got.body is None and got.error == "zstd body ends inside a frame: not inspected"
