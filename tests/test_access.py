"""The admin token: ollamon's own pages, API and metrics need it when it is set; Ollama's routes never do."""

from __future__ import annotations

import logging
import socket
from typing import Any

import aiohttp
import pytest

from proxy.access import COOKIE_NAME, warn_if_exposed
from tests.fixtures.proxy import MakeProxy

TOKEN = "s3cret-token-0123456789"


async def _raw(host_port: str, request: bytes) -> bytes:
    """One request over a plain socket (paths exactly as written, no client normalisation)."""
    import asyncio

    host, port = host_port.rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(request)
    await writer.drain()
    data = await reader.read(65536)
    writer.close()
    return data


async def test_token_guards_ollamon_routes_and_nothing_else(emulator: Any, make_proxy: MakeProxy) -> None:
    proxy = await make_proxy(emulator.url, admin__token=TOKEN)
    async with aiohttp.ClientSession() as s:
        for path in ("/ollamon/api/requests", "/ollamon/api/system", "/ollamon/api/alerts", "/ollamon/"):
            async with s.get(proxy.url + path) as r:
                assert r.status == 401, path
                assert "admin token" in (await r.json())["error"]
                assert r.headers["WWW-Authenticate"].startswith("Bearer")
            async with s.get(
                proxy.url + path, headers={"Authorization": "Bearer wrong-token-0123456789"}
            ) as r:
                assert r.status == 401, path
        async with s.get(
            proxy.url + "/ollamon/api/requests", headers={"Authorization": f"Bearer {TOKEN}"}
        ) as r:
            assert r.status == 200
        for path in ("/ollamon/health", "/ollamon/ready"):
            async with s.get(proxy.url + path) as r:
                assert r.status in (200, 503), path
        # Ollama's own routes pass untouched: ollamon adds no authentication to them.
        async with s.get(proxy.url + "/api/tags") as r:
            assert r.status == 200
        async with s.post(
            proxy.url + "/api/generate", json={"model": "llama3.2", "prompt": "hi", "stream": False}
        ) as r:
            assert r.status == 200


@pytest.mark.parametrize(
    "target",
    [
        b"/ollamon/%61pi/requests",
        b"//ollamon/api/requests",
        b"/ollamon//api/requests",
        b"/./ollamon/api/requests",
        b"/x/../ollamon/api/requests",
        b"/OLLAMON/api/requests",
    ],
)
async def test_path_spellings_do_not_get_past_the_token(
    emulator: Any, make_proxy: MakeProxy, target: bytes
) -> None:
    """Whatever spelling the router would resolve to an ollamon route needs the token too; the rest is
    forwarded to Ollama (which has no such route), never answered with ollamon's data."""
    proxy = await make_proxy(emulator.url, admin__token=TOKEN)
    head = await _raw(
        proxy.host_port, b"GET " + target + b" HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    )
    status = int(head.split(b" ", 2)[1])
    assert status in (401, 404, 400), head[:200]
    assert b'"recent"' not in head and b'"requests"' not in head


async def test_login_form_sets_a_strict_httponly_cookie(emulator: Any, make_proxy: MakeProxy) -> None:
    proxy = await make_proxy(emulator.url, admin__token=TOKEN)
    jar = aiohttp.CookieJar(unsafe=True)
    async with aiohttp.ClientSession(cookie_jar=jar) as s:
        async with s.get(proxy.url + "/ollamon/", headers={"Accept": "text/html"}) as r:
            assert r.status == 401
            page = await r.text()
            assert '<form method="post" action="/ollamon/login">' in page
            assert "unsafe-inline" not in r.headers["Content-Security-Policy"]
        async with s.post(
            proxy.url + "/ollamon/login", data={"token": "wrong", "next": "/ollamon/"}, allow_redirects=False
        ) as r:
            assert r.status == 401 and "not right" in await r.text()
        async with s.post(
            proxy.url + "/ollamon/login",
            data={"token": TOKEN, "next": "https://evil.example/"},
            allow_redirects=False,
        ) as r:
            assert r.status == 303
            assert r.headers["Location"] == "/ollamon/"  # never an open redirect
            cookie = r.headers["Set-Cookie"]
            assert COOKIE_NAME in cookie and "HttpOnly" in cookie and "SameSite=Strict" in cookie
            assert TOKEN not in cookie  # the cookie holds an HMAC of the token, not the token
        async with s.get(proxy.url + "/ollamon/api/requests") as r:
            assert r.status == 200
        async with s.post(proxy.url + "/ollamon/logout", allow_redirects=False) as r:
            assert r.status == 303
        async with s.get(proxy.url + "/ollamon/api/requests") as r:
            assert r.status == 401


async def test_without_a_token_ollamon_routes_are_open(emulator: Any, make_proxy: MakeProxy) -> None:
    proxy = await make_proxy(emulator.url)
    async with aiohttp.ClientSession() as s, s.get(proxy.url + "/ollamon/api/requests") as r:
        assert r.status == 200


def test_non_loopback_listen_without_token_warns(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="proxy.access"):
        assert warn_if_exposed("0.0.0.0", "", loopback=False)
        assert not warn_if_exposed("0.0.0.0", TOKEN, loopback=False)
        assert not warn_if_exposed("127.0.0.1", "", loopback=True)
    assert len(caplog.records) == 1 and "without admin.token" in caplog.records[0].getMessage()
    assert socket.gethostname()  # (the warning names the listen host, not this machine)
