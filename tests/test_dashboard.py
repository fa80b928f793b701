"""The dashboard's page and assets: served from the installed packages, strict headers, token required."""

from __future__ import annotations

from importlib import resources
from typing import Any

import aiohttp

from proxy.dashboard.routes import ASSETS
from tests.fixtures.proxy import MakeProxy

TOKEN = "t0ken-for-the-dashboard-tests"


async def test_page_is_served_with_a_strict_policy(emulator: Any, make_proxy: MakeProxy) -> None:
    proxy = await make_proxy(emulator.url)
    async with aiohttp.ClientSession() as s:
        async with s.get(f"{proxy.url}/ollamon/") as resp:
            assert resp.status == 200
            assert resp.content_type == "text/html"
            body = await resp.text()
            csp = resp.headers["Content-Security-Policy"]
            assert resp.headers["X-Content-Type-Options"] == "nosniff"
            assert resp.headers["Cache-Control"] == "no-store"
        async with s.get(f"{proxy.url}/ollamon", allow_redirects=False) as resp:
            assert resp.status == 308 and resp.headers["Location"] == "/ollamon/"
    directives = dict(d.strip().split(" ", 1) for d in csp.split(";"))
    assert directives["script-src"] == "'self'" and directives["style-src"] == "'self'"
    assert directives["default-src"] == "'none'" and directives["frame-ancestors"] == "'none'"
    assert "unsafe" not in csp
    # Nothing inline for the policy to refuse: no inline script or style, no handler attributes, no CDN.
    assert "<script>" not in body and "<style" not in body and " style=" not in body
    assert " onclick=" not in body and " onload=" not in body and "onerror" not in body
    assert "http://" not in body and "https://" not in body


async def test_assets_come_from_the_packages(emulator: Any, make_proxy: MakeProxy) -> None:
    proxy = await make_proxy(emulator.url)
    async with aiohttp.ClientSession() as s:
        for name, (package, path, ctype) in ASSETS.items():
            async with s.get(f"{proxy.url}/ollamon/assets/{name}") as resp:
                assert resp.status == 200, name
                assert resp.headers["Content-Type"] == ctype
                assert resp.headers["X-Content-Type-Options"] == "nosniff"
                assert await resp.read() == resources.files(package).joinpath(path).read_bytes()
                etag = resp.headers["ETag"]
                assert "no-cache" in resp.headers["Cache-Control"]
            async with s.get(f"{proxy.url}/ollamon/assets/{name}", headers={"If-None-Match": etag}) as resp:
                assert resp.status == 304
        # uPlot is the wheel's own copy, with its MIT notice.
        async with s.get(f"{proxy.url}/ollamon/assets/uPlot.iife.js") as resp:
            assert "(MIT Licensed)" in (await resp.text())[:300]
        for bad in ("nope.js", "..%2F__init__.py", "%2e%2e%2fstatic%2findex.html", "static/dashboard.js"):
            async with s.get(f"{proxy.url}/ollamon/assets/{bad}") as resp:
                assert resp.status == 404, bad
                assert "error" in await resp.json()
        async with s.get(f"{proxy.url}/ollamon/assets/../../etc/passwd") as resp:
            assert resp.status == 404


async def test_token_guards_page_and_stream(emulator: Any, make_proxy: MakeProxy) -> None:
    proxy = await make_proxy(emulator.url, admin__token=TOKEN, dashboard__live_interval_s=0.1)
    bearer = {"Authorization": f"Bearer {TOKEN}"}
    async with aiohttp.ClientSession() as s:
        for path in ("/ollamon/", "/ollamon/api/live"):
            async with s.get(f"{proxy.url}{path}") as resp:
                assert resp.status == 401, path
                assert "admin token" in (await resp.json())["error"]
            async with s.get(
                f"{proxy.url}{path}", headers={"Authorization": "Bearer wrong-token-wrong"}
            ) as resp:
                assert resp.status == 401, path
        async with s.get(f"{proxy.url}/ollamon/", headers={"Accept": "text/html"}) as resp:
            assert resp.status == 401 and "ollamon: sign in" in await resp.text()  # the login form
        async with s.get(f"{proxy.url}/ollamon/", headers=bearer) as resp:
            assert resp.status == 200 and "dashboard.js" in await resp.text()
        async with s.get(f"{proxy.url}/ollamon/api/live", headers=bearer) as resp:
            assert resp.status == 200
            assert resp.content_type == "text/event-stream"
            first = await resp.content.readuntil(b"\n\n")
            assert first.startswith(b"retry: ")
            frame = await resp.content.readuntil(b"\n\n")
            assert frame.startswith(b"data: {")
        # Assets hold no data: open, so the login form can have its style.
        async with s.get(f"{proxy.url}/ollamon/assets/login.css") as resp:
            assert resp.status == 200


async def test_disabled_dashboard_is_not_served(emulator: Any, make_proxy: MakeProxy) -> None:
    proxy = await make_proxy(emulator.url, dashboard__enabled=False)
    async with aiohttp.ClientSession() as s:
        for path in ("/ollamon/", "/ollamon/api/live", "/ollamon/assets/dashboard.js"):
            async with s.get(f"{proxy.url}{path}") as resp:
                assert resp.status == 404, path


def test_page_code_never_parses_data_as_html() -> None:
    """A cheap guard next to the browser's XSS test: the page's code has no HTML sink at all."""
    code = resources.files("proxy.dashboard").joinpath("static/dashboard.js").read_text()
    body = code.split("\n", 3)[3]  # past the header comment, which names innerHTML to forbid it
    for sink in (".innerHTML", ".outerHTML", "insertAdjacentHTML", "document.write", "eval(", "new Function"):
        assert sink not in body, sink
    assert "textContent" in body
