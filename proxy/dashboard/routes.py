"""The page and its assets: ``GET /ollamon/`` and ``GET /ollamon/assets/{name}``, from the installed packages.

Nothing comes from a CDN (machines running Ollama are often offline): the page's own files are this
package's data (``proxy/dashboard/static``) and the charting library is uPlot, as shipped inside the
``uplot-python`` wheel (``uplot/static``). Only the names in ``ASSETS`` are served, so no path from a request
ever reaches the file system. Files are read once, at startup.

The page is served with a strict Content-Security-Policy: scripts and styles only from ollamon itself, no
inline script or style, no eval, no framing; the page's code only talks to its own origin.
"""

from __future__ import annotations

import hashlib
import importlib.util
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from aiohttp import web

from proxy.answers import json_error

__all__ = ["ASSETS", "CSP", "Asset", "load_assets", "setup_routes"]

CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
    "form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)
_SECURITY_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
}

# name in the URL -> (package, file inside it, content type)
ASSETS: dict[str, tuple[str, str, str]] = {
    "dashboard.js": ("proxy.dashboard", "static/dashboard.js", "text/javascript; charset=utf-8"),
    "dashboard.css": ("proxy.dashboard", "static/dashboard.css", "text/css; charset=utf-8"),
    "login.css": ("proxy.dashboard", "static/login.css", "text/css; charset=utf-8"),
    "favicon.svg": ("proxy.dashboard", "static/favicon.svg", "image/svg+xml"),
    "uPlot.iife.js": ("uplot", "static/uPlot.iife.js", "text/javascript; charset=utf-8"),
    "uPlot.min.css": ("uplot", "static/uPlot.min.css", "text/css; charset=utf-8"),
}
_PAGE = ("proxy.dashboard", "static/index.html")


@dataclass(frozen=True, slots=True)
class Asset:
    body: bytes
    content_type: str
    etag: str


def _read(package: str, name: str) -> bytes:
    # find_spec locates the package without running its __init__: uplot-python's imports numpy and
    # webbrowser (~10 MiB of RSS held for good) to offer plotting that ollamon never calls.
    spec = importlib.util.find_spec(package)
    if spec is None:
        raise ModuleNotFoundError(f"package {package!r} is not installed", name=package)
    if not spec.submodule_search_locations:
        return resources.files(package).joinpath(name).read_bytes()
    return (Path(next(iter(spec.submodule_search_locations))) / name).read_bytes()


def load_assets() -> dict[str, Asset]:
    """Every asset's bytes (raises FileNotFoundError / ModuleNotFoundError when the install is broken)."""
    out = {}
    for url_name, (package, name, ctype) in ASSETS.items():
        body = _read(package, name)
        out[url_name] = Asset(body, ctype, '"' + hashlib.sha256(body).hexdigest()[:32] + '"')
    return out


ASSETS_KEY = web.AppKey("dashboard_assets", dict[str, Asset])
PAGE_KEY = web.AppKey("dashboard_page", bytes)


async def page(request: web.Request) -> web.Response:
    """The dashboard (one static HTML file: the data comes from the API and the live stream)."""
    resp = web.Response(body=request.app[PAGE_KEY], content_type="text/html", charset="utf-8")
    resp.headers.update(_SECURITY_HEADERS)
    resp.headers["Content-Security-Policy"] = CSP
    resp.headers["Cache-Control"] = "no-store"
    return resp


async def redirect_to_page(request: web.Request) -> web.Response:
    raise web.HTTPPermanentRedirect("/ollamon/")


async def asset(request: web.Request) -> web.Response:
    """One file of the allow-list; revalidated with its ETag (the files change only with an upgrade)."""
    item = request.app[ASSETS_KEY].get(request.match_info["name"])
    if item is None:
        return json_error(404, f"ollamon: no asset named {request.match_info['name']!r}")
    headers = {**_SECURITY_HEADERS, "ETag": item.etag, "Cache-Control": "no-cache"}
    if request.headers.get("If-None-Match") == item.etag:
        return web.Response(status=304, headers=headers)
    return web.Response(body=item.body, headers={**headers, "Content-Type": item.content_type})


def setup_routes(app: web.Application) -> None:
    app[ASSETS_KEY] = load_assets()
    app[PAGE_KEY] = _read(*_PAGE)
    app.router.add_get("/ollamon", redirect_to_page)
    app.router.add_get("/ollamon/", page)
    app.router.add_get("/ollamon/assets/{name}", asset)
