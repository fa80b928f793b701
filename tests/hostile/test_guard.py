"""The server's own defences (proxy/guard.py): the Host check against DNS rebinding, the header-read deadline,
the connection cap, quiet logs for malformed requests, and the aiohttp internals all that stands on."""

from __future__ import annotations

import asyncio
import inspect
import logging
import signal
import socket
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.base_protocol import BaseProtocol
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_runner import BaseRunner

from proxy.config import load_config
from proxy.errors import ConfigError
from proxy.guard import GUARD_STATS_KEY, GuardedAppRunner, GuardedServer, GuardStats, guard_stats
from tests.fixtures.proxy import MakeProxy, ProxyHandle
from tests.fixtures.serve import serve_subprocess
from tests.polling import until

pytestmark = pytest.mark.timeout(60)


async def raw_exchange(proxy: ProxyHandle, request: bytes, within: float = 10.0) -> bytes:
    """Send ``request`` on a fresh connection and read until the server closes it."""
    host, port = proxy.host_port.split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(request)
        await writer.drain()
        return await asyncio.wait_for(reader.read(), within)
    finally:
        writer.close()


def status_of(raw: bytes) -> int:
    return int(raw.split(b" ", 2)[1])


# ------------------------------------------------------------------------------------------------- Host check


async def test_foreign_host_is_refused_everywhere_and_never_reaches_upstream(
    emulator: Any, proxy: ProxyHandle
) -> None:
    seen = len(emulator.emu.log)
    evil = {"Host": "evil.example.com"}
    async with aiohttp.ClientSession() as s:
        for method, path in [
            ("POST", "/api/generate"),
            ("GET", "/api/tags"),
            ("GET", "/ollamon/health"),
            ("GET", "/ollamon/api/requests"),
        ]:
            async with s.request(
                method, f"{proxy.url}{path}", json={"model": "llama3.2", "prompt": "x"}, headers=evil
            ) as r:
                assert r.status == 403, path
                assert r.headers["Content-Type"].startswith("application/json")
                body = await r.json()
                assert set(body) == {"error"} and "evil.example.com" in body["error"]
        # An absolute-form target naming a foreign host is refused too (Go, hence Ollama, takes Host from it).
        raw = await raw_exchange(
            proxy,
            b"GET http://evil.example.com/api/tags HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n",
        )
        assert status_of(raw) == 403
        assert len(emulator.emu.log) == seen, "a refused request reached the upstream"
        # Nothing is recorded for refused requests: the next real one is the first row.
        async with s.post(
            f"{proxy.url}/api/generate", json={"model": "llama3.2", "prompt": "ok", "stream": False}
        ) as r:
            assert r.status == 200
    rows = await proxy.wait_rows(1)
    await asyncio.sleep(0.5)  # a writer flush interval and more: any record of the refused ones would be here
    assert len(proxy.rows()) == len(rows) == 1 and rows[0]["success"] == 1
    assert proxy.rows("error_metrics") == []
    assert guard_stats(proxy.app)["refused_hosts"] == 5


async def test_local_and_allowed_hosts_pass_others_do_not(emulator: Any, make_proxy: MakeProxy) -> None:
    proxy = await make_proxy(emulator.url, server__allowed_hosts=["*.example.com", "ollama.test"])
    port = proxy.host_port.split(":")[1]
    passes = [
        f"127.0.0.1:{port}",
        "127.0.0.1",
        "127.9.8.7:80",
        f"localhost:{port}",
        "LocalHost",
        "localhost.",
        f"[::1]:{port}",
        "[::ffff:127.0.0.1]:80",
        socket.gethostname(),
        f"{socket.gethostname()}:{port}",
        "gpu-box.local",
        "x.localhost:8080",
        "10.1.2.3",
        "192.168.0.9:11434",
        "0.0.0.0:11434",
        "a.example.com",
        "a.b.example.com:443",
        "ollama.test",
        "",
    ]
    refused = [
        "evil.example.com.attacker.net",
        "example.com",  # a wildcard names subdomains, not the domain itself
        "ollama.test.evil",
        "localhost.evil.com",
        "127.0.0.1.nip.io",
        "8.8.8.8",
        "[2001:db8::1]:80",
        "localhost:abc",
        "[::1",
        "evil.com@127.0.0.1",
    ]
    async with aiohttp.ClientSession() as s:
        for host in passes + refused:
            async with s.get(f"{proxy.url}/api/version", headers={"Host": host}) as r:
                assert r.status == (200 if host in passes else 403), host
    # HTTP/1.0 without any Host header (Ollama allows an empty Host).
    raw = await raw_exchange(proxy, b"GET /api/version HTTP/1.0\r\n\r\n")
    assert status_of(raw) == 200, raw
    assert guard_stats(proxy.app)["refused_hosts"] == len(refused)


async def test_hostile_host_allowed_by_config_still_cannot_redirect(
    emulator: Any, make_proxy: MakeProxy
) -> None:
    proxy = await make_proxy(emulator.url, server__allowed_hosts=["evil.example"])
    raw = await raw_exchange(
        proxy,
        b"GET http://evil.example:9/api/version HTTP/1.1\r\nHost: evil.example:9\r\n"
        b"X-Forwarded-Host: evil.example\r\nConnection: close\r\n\r\n",
    )
    # The emulator refuses foreign Host headers with an empty 403, so a 200 proves the Host was rewritten.
    assert status_of(raw) == 200, raw
    assert b'"version"' in raw and emulator.emu.log[-1].path == "/api/version"


@pytest.mark.parametrize(
    ("listen", "allowed", "evil_status", "named_status"),
    [
        ("0.0.0.0:0", [], 200, 200),  # Ollama with OLLAMA_HOST=0.0.0.0 accepts any Host
        ("[::]:0", [], 200, 200),
        ("0.0.0.0:0", ["ollama.example.com"], 403, 200),  # ... unless allowed_hosts says which
        ("127.0.0.1:0", ["*"], 200, 200),  # "*" turns the check off
        ("localhost:0", [], 403, 403),
        ("127.0.0.1:0", ["ollama.example.com"], 403, 200),
    ],
)
async def test_check_depends_on_listen_address(
    emulator: Any,
    make_proxy: MakeProxy,
    listen: str,
    allowed: list[str],
    evil_status: int,
    named_status: int,
) -> None:
    proxy = await make_proxy(emulator.url, server__listen=listen, server__allowed_hosts=allowed)
    async with aiohttp.ClientSession() as s:
        async with s.get(f"{proxy.url}/api/version", headers={"Host": "evil.example.com"}) as r:
            assert r.status == evil_status
        async with s.get(f"{proxy.url}/api/version", headers={"Host": "localhost"}) as r:
            assert r.status == 200
        async with s.get(f"{proxy.url}/api/version", headers={"Host": "ollama.example.com"}) as r:
            assert r.status == named_status


@pytest.mark.parametrize("entry", ["http://x.com", "x.com:443", "x.com/api", "a.*.com", "*", "", "a b"])
def test_allowed_hosts_entries_are_validated(entry: str) -> None:
    overrides = {("server", "allowed_hosts"): [entry]}
    if entry == "*":
        assert load_config(None, env={}, overrides=overrides).server.allowed_hosts == ("*",)
        return
    with pytest.raises(ConfigError, match=r"server\.allowed_hosts"):
        load_config(None, env={}, overrides=overrides)


# ------------------------------------------------------------------------ malformed requests: 400, one quiet line


@pytest.mark.parametrize(
    "request_bytes",
    [
        b"GET /api/version HTTP/1.1\r\n\r\n",  # HTTP/1.1 without Host: aiohttp's parser answers 400
        b"GET /api/version HTTP/1.1\r\nHost: localhost\r\nHo st: x\r\n\r\n",
        b"GET /api/version HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
    ],
)
async def test_malformed_request_is_400_with_one_debug_line(
    emulator: Any, proxy: ProxyHandle, caplog: pytest.LogCaptureFixture, request_bytes: bytes
) -> None:
    seen = len(emulator.emu.log)
    caplog.set_level(logging.DEBUG)
    raw = await raw_exchange(proxy, request_bytes)
    assert status_of(raw) == 400
    assert len(emulator.emu.log) == seen
    mine = [r for r in caplog.records if r.name.startswith(("aiohttp", "proxy"))]
    assert len(mine) == 1, [(r.name, r.levelname, r.getMessage()) for r in mine]
    (record,) = mine
    assert record.levelno == logging.DEBUG and record.exc_info is None
    assert "\n" not in record.getMessage() and "bad request from 127.0.0.1" in record.getMessage()


async def test_internal_errors_still_log_their_traceback(caplog: pytest.LogCaptureFixture) -> None:
    async def boom(request: web.Request) -> web.Response:
        raise RuntimeError("a real bug")

    app = web.Application()
    app.router.add_get("/", boom)
    runner = GuardedAppRunner(
        app, header_timeout_s=5, max_connections=10, stats=GuardStats(), access_log=None
    )
    await runner.setup()
    try:
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        port = runner.addresses[0][1]
        async with aiohttp.ClientSession() as s, s.get(f"http://127.0.0.1:{port}/") as r:
            assert r.status == 500
    finally:
        await runner.cleanup()
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors and errors[0].exc_info is not None and "a real bug" in str(errors[0].exc_info[1])


# ------------------------------------------------------------------------------------------ header deadline


async def test_silent_and_dripping_connections_are_closed_at_the_deadline(
    emulator: Any, make_proxy: MakeProxy
) -> None:
    proxy = await make_proxy(emulator.url, server__header_timeout_s=1.0)
    host, port = proxy.host_port.split(":")
    seen = len(emulator.emu.log)

    async def silent() -> float:
        start = time.monotonic()
        reader, writer = await asyncio.open_connection(host, int(port))
        try:
            assert await asyncio.wait_for(reader.read(), 20) == b""
        finally:
            writer.close()
        return time.monotonic() - start

    async def drip(after_a_request: bool) -> tuple[float, int]:
        reader, writer = await asyncio.open_connection(host, int(port))
        if after_a_request:  # keep-alive: the clock starts at the next request's first byte
            writer.write(b"GET /api/version HTTP/1.1\r\nHost: localhost\r\n\r\n")
            await asyncio.wait_for(reader.readuntil(b"}"), 5)
            await asyncio.sleep(1.5)  # idle longer than the deadline: that alone must not close it
        start = time.monotonic()
        sent = 0

        async def dripping() -> None:
            nonlocal sent
            writer.write(b"GET /api/version HTTP/1.1\r\nHost: localhost\r\nX-Slow: ")
            with pytest.raises(ConnectionError):  # the server closes on it; a write then fails
                for _ in range(100):  # 20 s of drip if nothing closes it
                    await asyncio.sleep(0.2)
                    writer.write(b"a")
                    await writer.drain()
                    sent += 1

        task = asyncio.ensure_future(dripping())
        try:
            assert await asyncio.wait_for(reader.read(), 20) == b""
            took = time.monotonic() - start
            await asyncio.wait_for(task, 5)
        finally:
            task.cancel()
            writer.close()
        return took, sent

    silent_s, *drips = await asyncio.gather(silent(), drip(False), drip(True))
    # Not before the deadline, and long before aiohttp's own keep-alive timeout (an hour) would.
    assert 0.95 <= silent_s < 3.0, silent_s
    for drip_s, drip_bytes in drips:
        assert 0.95 <= drip_s < 3.0, drip_s
        assert drip_bytes >= 3, "the drip must have been going on when the deadline struck"
    assert guard_stats(proxy.app)["header_timeouts"] == 3
    assert len(emulator.emu.log) == seen + 1


async def test_deadline_spares_streams_slow_bodies_and_idle_keepalive(
    emulator: Any, make_proxy: MakeProxy
) -> None:
    proxy = await make_proxy(emulator.url, server__header_timeout_s=0.5)
    async with aiohttp.ClientSession() as s:
        # A response streaming for ~1.5 s, three times the deadline.
        start = time.monotonic()
        async with s.post(
            f"{proxy.url}/api/generate",
            json={"model": "llama3.2", "prompt": "x"},
            headers={"X-Emulate": "tokens=25; interval_ms=60"},
        ) as r:
            lines = (await r.read()).splitlines()
        assert time.monotonic() - start > 1.0 and b'"done":true' in lines[-1]

        # A request body trickling in for ~1.5 s after its headers.
        async def body() -> AsyncIterator[bytes]:
            for _ in range(5):
                await asyncio.sleep(0.3)
                yield b"x" * 100

        async with s.post(f"{proxy.url}/api/blobs/sha256:{'0' * 64}", data=body()) as r:
            assert r.status in (201, 400), await r.text()  # the emulator answers; the digest is wrong
    # A keep-alive connection idle for 3x the deadline between two requests is still usable.
    host, port = proxy.host_port.split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        for _ in range(2):
            writer.write(b"GET /api/version HTTP/1.1\r\nHost: localhost\r\n\r\n")
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            length = int(
                next(h for h in head.split(b"\r\n") if h.lower().startswith(b"content-length")).split(b":")[1]
            )
            await reader.readexactly(length)
            assert status_of(head) == 200
            await asyncio.sleep(1.5)
    finally:
        writer.close()
    assert guard_stats(proxy.app)["header_timeouts"] == 0


# ------------------------------------------------------------------------------------------- connection cap


async def test_connections_over_the_cap_get_503_and_cost_no_handler(
    emulator: Any, make_proxy: MakeProxy
) -> None:
    proxy = await make_proxy(emulator.url, server__max_connections=3)
    host, port = proxy.host_port.split(":")
    stats = proxy.app[GUARD_STATS_KEY]
    server = proxy.runner.server
    assert isinstance(server, GuardedServer)

    async def until(cond: Any) -> None:
        for _ in range(200):
            if cond():
                return
            await asyncio.sleep(0.025)
        raise AssertionError("condition not reached")

    held = []
    for i in range(3):
        held.append(await asyncio.open_connection(host, int(port)))
        await until(lambda i=i: stats.open_connections == i + 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    raw = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    assert raw.startswith(b"HTTP/1.1 503 ") and b'{"error":' in raw and b"max_connections" in raw
    assert stats.refused_connections == 1 and len(server.connections) == 3  # no handler for the refused one
    # The held ones are served.
    r0, w0 = held[0]
    w0.write(b"GET /api/version HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
    assert status_of(await asyncio.wait_for(r0.read(), 5)) == 200
    w0.close()
    await until(lambda: stats.open_connections == 2)
    # A slot is free again: a new connection is served.
    async with aiohttp.ClientSession() as s, s.get(f"{proxy.url}/api/version") as r:
        assert r.status == 200
    for _, w in held[1:]:
        w.close()
    await until(lambda: stats.open_connections == 0)
    assert stats.refused_connections == 1


# ------------------------------------------------------------------------------------ aiohttp internals pinned


def test_aiohttp_internals_pinned() -> None:
    """proxy/guard.py subclasses aiohttp's server and protocol and reads their private state. If an aiohttp
    upgrade changes any of this, this test says which part; fix guard.py before relaxing it."""
    # RequestHandler state read by the header deadline, the shutdown and the quiet error log.
    for name in (
        "_waiter",
        "_messages",
        "_request_in_progress",
        "_force_close",
        "_close",
        "_task_handler",
        "logger",
    ):
        assert name in RequestHandler.__slots__, name
    assert "_loop" in BaseProtocol.__slots__  # the handler's loop, for its deadline timer
    for name in ("data_received", "connection_made", "connection_lost", "force_close", "handle_error"):
        assert callable(getattr(RequestHandler, name)), name
    assert list(inspect.signature(RequestHandler.handle_error).parameters) == [
        "self",
        "request",
        "status",
        "exc",
        "message",
    ]
    # handle_error logs through self.logger (swapped for a silent one on client errors).
    assert "self.log_exception(" in inspect.getsource(RequestHandler.handle_error)
    assert "self.logger.exception" in inspect.getsource(RequestHandler.log_exception)
    # Server: the protocol factory passes its **kwargs to RequestHandler; the runner calls pre_shutdown,
    # the app's shutdown hooks, then server.shutdown(shutdown_timeout), which we replace.
    assert "RequestHandler(self, loop=self._loop, **self._kwargs)" in inspect.getsource(web.Server.__call__)
    assert "self._connections" in inspect.getsource(web.Server.__init__)
    assert "self._manager.connection_lost(self, exc)" in inspect.getsource(RequestHandler.connection_lost)
    cleanup = inspect.getsource(BaseRunner.cleanup)
    order = [
        cleanup.index("self._server.pre_shutdown()"),
        cleanup.index("await self.shutdown()"),
        cleanup.index("await self._server.shutdown(self._shutdown_timeout)"),
    ]
    assert order == sorted(order)
    assert "return self._app._make_handler(" in inspect.getsource(web.AppRunner._make_server)
    # The parser's message queue only fills when a request's headers are complete.
    assert "self._messages.append((msg, payload))" in inspect.getsource(RequestHandler.data_received)


async def test_runner_builds_a_guarded_server_with_the_apps_handler_args() -> None:
    config = load_config(None, env={}, overrides={("server", "max_connections"): 7})
    from proxy.app import create_app, make_runner

    app = create_app(config)
    runner = make_runner(app, config)
    await runner.setup()
    try:
        server = runner.server
        assert isinstance(server, GuardedServer) and server.max_connections == 7
        assert server.handler_cancellation is True
        handler = server()
        assert isinstance(handler, RequestHandler)
        assert handler.max_field_size == 65536 and handler.access_logger is None
        server.connection_lost(handler)  # undo the count of the handler made above, never connected
    finally:
        await runner.cleanup()


async def test_under_uvloop_in_ollamon_serve(emulator: Any, tmp_path: Path) -> None:
    """``ollamon serve`` runs on uvloop, whose transports are not asyncio's classes: the guards hold there too."""
    proc, url = await serve_subprocess(
        tmp_path,
        emulator.url,
        config="server:\n  header_timeout_s: 2\n  max_connections: 2\n",
        stderr=asyncio.subprocess.DEVNULL,
    )
    host, port = url.removeprefix("http://").split(":")

    async def hold() -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """A silent connection the server kept (the startup poll's may still hold a slot for a moment)."""
        for _ in range(100):
            r, w = await asyncio.open_connection(host, int(port))
            try:
                await asyncio.wait_for(r.read(1), 0.1)
            except TimeoutError:
                return r, w
            w.close()
            await asyncio.sleep(0.05)
        raise AssertionError("no connection was kept")

    try:
        start = time.monotonic()
        held = [await hold() for _ in range(2)]
        reader, writer = await asyncio.open_connection(host, int(port))
        raw = await asyncio.wait_for(reader.read(), 5)
        writer.close()
        assert raw.startswith(b"HTTP/1.1 503 "), raw
        for r, w in held:  # silent: closed at the header deadline
            assert await asyncio.wait_for(r.read(), 10) == b""
            w.close()
        assert 2.0 <= time.monotonic() - start < 8.0
        async with aiohttp.ClientSession() as s:
            async with s.get(f"{url}/api/version", headers={"Host": "evil.example.com"}) as resp:
                assert resp.status == 403
            async with s.get(f"{url}/api/version") as resp:
                assert resp.status == 200
    finally:
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 20) == 0


async def test_idle_keepalive_connection_is_closed_after_keepalive_timeout(
    emulator: Any, make_proxy: MakeProxy
) -> None:
    """An idle kept-alive connection holds a slot of max_connections only for server.keepalive_timeout_s."""
    proxy = await make_proxy(emulator.url, server__keepalive_timeout_s=0.5, server__header_timeout_s=30)
    host, port = proxy.host_port.split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(b"GET /api/version HTTP/1.1\r\nHost: localhost\r\n\r\n")
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert status_of(head) == 200
        start = time.monotonic()
        rest = await asyncio.wait_for(reader.read(), 10)  # the body, then EOF when ollamon closes
        assert rest and time.monotonic() - start >= 0.4
    finally:
        writer.close()
    await until(lambda: guard_stats(proxy.app)["open_connections"] == 0, 5, "connection released")
