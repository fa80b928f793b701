"""Transparent means transparent: the client gets Ollama's status, headers and bytes, unbuffered."""

from __future__ import annotations

import asyncio
import re
import statistics
import time
from typing import Any

import aiohttp
import pytest

from tests.fixtures.proxy import MakeProxy, ProxyHandle

# Fields whose values differ between two calls because they are clocks, random ids or load state.
_VOLATILE = re.compile(
    rb'"(created_at|modified_at|expires_at)":"[^"]*"'
    rb'|"(total_duration|load_duration|prompt_eval_duration|eval_duration|created)":\d+'
    rb"|chatcmpl-\d+|cmpl-\d+"
)
# Server is compared so that a header added by the proxy itself would show.
_HEADERS_COMPARED = ("Content-Type", "Content-Length", "Allow", "Location", "Transfer-Encoding", "Server")

CHAT = {"model": "llama3.2", "messages": [{"role": "user", "content": "hi <b>&</b>"}]}
CASES: list[tuple[str, str, Any]] = [
    ("GET", "/", None),
    ("HEAD", "/", None),
    ("GET", "/api/version", None),
    ("GET", "/api/tags", None),
    ("HEAD", "/api/tags", None),
    ("GET", "/api/tags/", None),
    ("POST", "/api/show", {"model": "llama3.2"}),
    ("POST", "/api/show", {"model": "missing"}),
    ("GET", "/api/chat", None),
    ("GET", "/no/such/route", None),
    ("POST", "/api/generate", b""),
    ("POST", "/api/generate", b"{bad json"),
    ("POST", "/api/generate", {"model": "", "prompt": "x"}),
    ("POST", "/api/chat", {"model": "", "messages": []}),
    ("POST", "/api/generate", {"model": "llama3.2", "prompt": "why?", "stream": False}),
    ("POST", "/api/generate", {"model": "llama3.2", "prompt": "why?", "options": {"num_predict": 5}}),
    ("POST", "/api/chat", {**CHAT, "stream": False}),
    ("POST", "/api/chat", CHAT),
    ("POST", "/api/embed", {"model": "all-minilm", "input": ["one", "two"]}),
    ("POST", "/api/embeddings", {"model": "all-minilm", "prompt": "one"}),
    ("POST", "/v1/chat/completions", CHAT),
    ("POST", "/v1/chat/completions", {**CHAT, "stream": True}),
    ("POST", "/v1/chat/completions", {**CHAT, "stream": True, "stream_options": {"include_usage": True}}),
    ("POST", "/v1/completions", {"model": "llama3.2", "prompt": "x", "stream": True}),
    ("POST", "/v1/embeddings", {"model": "all-minilm", "input": "x"}),
    ("GET", "/v1/models", None),
    ("GET", "/v1/models/llama3.2", None),
    ("POST", "/api/pull", {"model": "llama3.2"}),
    ("POST", "/api/pull", {"model": "llama3.2", "stream": False}),
    ("DELETE", "/api/delete", {"model": "missing"}),
    ("POST", "/api/copy", {"source": "missing", "destination": "x"}),
    ("HEAD", "/api/blobs/sha256:" + "0" * 64, None),
    ("GET", "/api/ps", None),
]


async def fetch(
    session: aiohttp.ClientSession, method: str, url: str, body: Any
) -> tuple[int, dict[str, str], bytes]:
    kwargs: dict[str, Any] = {"allow_redirects": False}
    if isinstance(body, bytes):
        kwargs["data"] = body
    elif body is not None:
        kwargs["json"] = body
    async with session.request(method, url, **kwargs) as resp:
        raw = await resp.read()
        headers = {h: resp.headers[h] for h in _HEADERS_COMPARED if h in resp.headers}
        return resp.status, headers, raw


@pytest.mark.parametrize(
    ("method", "path", "body"), CASES, ids=[f"{m} {p} {i}" for i, (m, p, _) in enumerate(CASES)]
)
async def test_byte_identical_direct_vs_proxied(
    emulator: Any, proxy: ProxyHandle, method: str, path: str, body: Any
) -> None:
    async with aiohttp.ClientSession(auto_decompress=False) as s:
        d_status, d_headers, d_body = await fetch(s, method, f"{emulator.url}{path}", body)
        p_status, p_headers, p_body = await fetch(s, method, f"{proxy.url}{path}", body)
    assert p_status == d_status
    if "Location" in d_headers:
        assert p_headers.pop("Location") == d_headers.pop("Location")
    # Content-Length follows the body, whose clock fields differ in digits between two calls.
    if "Content-Length" in d_headers and method != "HEAD":
        assert int(p_headers.pop("Content-Length")) == len(p_body)
        assert int(d_headers.pop("Content-Length")) == len(d_body)
    assert p_headers == d_headers
    assert _VOLATILE.sub(b"~", p_body) == _VOLATILE.sub(b"~", d_body)
    if method != "HEAD" and d_status < 300:
        assert len(p_body) > 0


async def test_every_response_has_a_request_id(emulator: Any, proxy: ProxyHandle) -> None:
    async with aiohttp.ClientSession() as s:
        for method, path in (("GET", "/api/tags"), ("GET", "/nope"), ("POST", "/api/generate")):
            async with s.request(method, f"{proxy.url}{path}") as r:
                await r.read()
                assert re.fullmatch(r"[0-9a-f]{32}", r.headers["X-Request-Id"])


async def test_stream_lines_arrive_as_sent(emulator: Any, proxy: ProxyHandle) -> None:
    """Tokens 50 ms apart: each line reaches the client within a few ms of the emulator sending it."""
    body = {"model": "llama3.2", "prompt": "pace me", "options": {"num_predict": 10}}
    received: list[float] = []
    async with aiohttp.ClientSession() as s:
        async with s.post(
            f"{proxy.url}/api/generate", json=body, headers={"X-Emulate": "interval_ms=50"}
        ) as r:
            buf = b""
            async for chunk in r.content.iter_any():
                now = time.monotonic()
                buf += chunk
                while b"\n" in buf:
                    line, buf = buf.split(b"\n", 1)
                    if b'"done":false' in line:
                        received.append(now)
    gt = emulator.emu.entry(r.headers["X-Request-Id"])
    assert len(received) == len(gt.token_times) == 10
    delays = [(got - sent) * 1000 for got, sent in zip(received, gt.token_times, strict=True)]
    assert statistics.median(delays) < 3.0, delays
    assert max(delays) < 15.0, delays


async def test_absolute_form_and_hostile_host_cannot_redirect(emulator: Any, make_proxy: MakeProxy) -> None:
    # Allowed by config (else the Host check refuses it, tests/hostile/test_guard.py), still no redirect.
    proxy = await make_proxy(emulator.url, server__allowed_hosts=["evil.example"])
    host, port = proxy.host_port.split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(
        b"GET http://evil.example:9/api/version HTTP/1.1\r\nHost: evil.example:9\r\n"
        b"X-Forwarded-Host: evil.example\r\nConnection: close\r\n\r\n"
    )
    await writer.drain()
    raw = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    head, _, body = raw.partition(b"\r\n\r\n")
    # The emulator refuses foreign Host headers with an empty 403, so a 200 proves the Host was rewritten.
    assert head.startswith(b"HTTP/1.1 200"), raw
    assert b'"version"' in body
    assert emulator.emu.log[-1].path == "/api/version"


async def test_query_string_is_preserved(emulator: Any, proxy: ProxyHandle) -> None:
    async with aiohttp.ClientSession() as s:
        async with s.get(f"{proxy.url}/api/tags?ts=123&x=%2F") as r:
            assert r.status == 200
    assert emulator.emu.log[-1].path == "/api/tags"


async def test_ollamon_prefix_is_never_forwarded(emulator: Any, proxy: ProxyHandle) -> None:
    async with aiohttp.ClientSession() as s:
        async with s.get(f"{proxy.url}/ollamon/nope") as r:
            assert r.status == 404
            assert "error" in await r.json()
        async with s.get(f"{proxy.url}/ollamon/health") as r:
            health = await r.json()
    assert not [e.path for e in emulator.emu.log if e.path.startswith("/ollamon")]
    assert health["status"] == "ok" and health["db"] == "ok" and health["redis"] == "disabled"
    assert health["upstream"]["reachable"] is True and health["queue_depth"] == 0


async def test_official_ollama_client_through_proxy(
    emulator: Any, proxy: ProxyHandle, monkeypatch: pytest.MonkeyPatch
) -> None:
    import ollama

    monkeypatch.setenv("OLLAMA_HOST", proxy.host_port)
    async with ollama.AsyncClient() as client:  # configured only by OLLAMA_HOST
        r = await client.generate(model="llama3.2", prompt="hi", options={"num_predict": 3})
        assert r.done and r.eval_count == 3
        parts = [p async for p in await client.generate(model="llama3.2", prompt="hi", stream=True)]
        assert parts[-1].done
        c = await client.chat(model="llama3.2", messages=[{"role": "user", "content": "hello"}])
        assert c.message.content
        chunks = [
            p
            async for p in await client.chat(
                model="llama3.2", messages=[{"role": "user", "content": "x"}], stream=True
            )
        ]
        assert chunks[-1].done and "".join(p.message.content or "" for p in chunks)
        e = await client.embed(model="all-minilm", input=["a", "b"])
        assert len(e.embeddings) == 2
        assert any(m.model == "llama3.2:latest" for m in (await client.list()).models)
        assert (await client.ps()).models is not None
        assert (await client.show("llama3.2")).modelfile is not None
        assert (await client.pull("llama3.2")).status == "success"
        statuses = [p.status async for p in await client.pull("llama3.2", stream=True)]
        assert statuses[-1] == "success"
        with pytest.raises(ollama.ResponseError) as err:
            await client.chat(model="missing", messages=[{"role": "user", "content": "x"}])
        assert err.value.status_code == 404
    rows = await proxy.wait_rows(6)
    assert {r["endpoint"] for r in rows} == {"/api/generate", "/api/chat", "/api/embed"}
