"""The admin token: who may see ollamon's own pages, API and metrics.

With ``admin.token`` set, every ``/ollamon/...`` path except the open ones (health, readiness, the login
form and the dashboard's static assets, which hold no data) needs the token, either as
``Authorization: Bearer TOKEN`` or as the session cookie that the login form sets (HttpOnly,
SameSite=Strict, scoped to ``/ollamon``). The cookie holds an HMAC of the token, not the token itself. Both
are compared in constant time. A refusal is 401 in Ollama's ``{"error": ...}`` shape; a browser asking for
a page (``Accept: text/html``) gets the login form with the same status. Requests to Ollama's own routes are
never looked at here: ollamon adds no authentication Ollama does not have.

Like the Host check, this wraps the server's request handler (one string comparison for a proxied request).
"""

from __future__ import annotations

import hashlib
import hmac
import html
import logging
from collections.abc import Awaitable, Callable
from urllib.parse import parse_qs

from aiohttp import web

from proxy.answers import json_error

__all__ = [
    "ADMIN_KEY",
    "COOKIE_NAME",
    "OPEN_PATHS",
    "AdminAccess",
    "admin_guard",
    "warn_if_exposed",
]

logger = logging.getLogger(__name__)

COOKIE_NAME = "ollamon_session"
# Paths under /ollamon that never need the token.
OPEN_PATHS = frozenset({"/ollamon/health", "/ollamon/ready", "/ollamon/login", "/ollamon/logout"})
OPEN_PREFIXES = ("/ollamon/assets/",)
_MAX_FORM_BYTES = 4096

ServerHandler = Callable[[web.BaseRequest], Awaitable[web.StreamResponse]]


class AdminAccess:
    """Decides whether a request carries the admin token; serves the login form and sets the cookie."""

    def __init__(self, token: str) -> None:
        self._token = token.encode()
        self._session = hmac.new(self._token, b"ollamon-session-v1", hashlib.sha256).hexdigest().encode()

    @staticmethod
    def protects(path: str) -> bool:
        """True for the paths that need the token: ollamon's own, but for the open ones."""
        if path != "/ollamon" and not path.startswith("/ollamon/"):
            return False
        return path not in OPEN_PATHS and not path.startswith(OPEN_PREFIXES)

    def allows(self, request: web.BaseRequest) -> bool:
        """The request carries the token (Bearer) or the login cookie; constant-time comparisons."""
        auth = request.headers.get("Authorization", "")
        scheme, _, value = auth.partition(" ")
        if scheme.lower() == "bearer" and value:
            if hmac.compare_digest(value.strip().encode(), self._token):
                return True
        cookie = request.cookies.get(COOKIE_NAME)
        return cookie is not None and hmac.compare_digest(cookie.encode(), self._session)

    def refuse(self, request: web.BaseRequest) -> web.Response:
        """401: the login form for a browser asking for a page, Ollama's error shape for everything else."""
        if request.method == "GET" and "text/html" in request.headers.get("Accept", ""):
            return _login_page(request.path_qs, status=401)
        resp = json_error(401, "ollamon: this endpoint needs the admin token (Authorization: Bearer ...)")
        resp.headers["WWW-Authenticate"] = 'Bearer realm="ollamon"'
        return resp

    async def login(self, request: web.BaseRequest) -> web.StreamResponse:
        """GET: the form. POST (form field ``token``): the cookie and a redirect to ``next``, or 401."""
        if request.method == "GET":
            return _login_page(request.query.get("next", "/ollamon/"), status=200)
        if request.method != "POST":
            return json_error(405, "ollamon: use GET or POST")
        body = await request.content.read(_MAX_FORM_BYTES + 1)
        if len(body) > _MAX_FORM_BYTES:
            return json_error(413, "ollamon: login form too large")
        form = parse_qs(body.decode("utf-8", "replace"))
        given = (form.get("token") or [""])[0].strip().encode()
        target = _safe_next((form.get("next") or ["/ollamon/"])[0])
        if not hmac.compare_digest(given, self._token):
            return _login_page(target, status=401, failed=True)
        resp = web.Response(status=303, headers={"Location": target, "Cache-Control": "no-store"})
        resp.set_cookie(
            COOKIE_NAME,
            self._session.decode(),
            path="/ollamon",
            httponly=True,
            samesite="Strict",
            secure=request.secure,
        )
        return resp

    @staticmethod
    async def logout(request: web.BaseRequest) -> web.StreamResponse:
        resp = web.Response(status=303, headers={"Location": "/ollamon/login"})
        resp.del_cookie(COOKIE_NAME, path="/ollamon")
        return resp


def _safe_next(target: str) -> str:
    """Only ollamon's own pages: never an open redirect to another site."""
    if target.startswith("/ollamon") and not target.startswith("//") and "\\" not in target:
        return target
    return "/ollamon/"


def _login_page(next_target: str, *, status: int, failed: bool = False) -> web.Response:
    target = html.escape(_safe_next(next_target), quote=True)
    note = '<p class="error" role="alert">That token is not right.</p>' if failed else ""
    body = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width,initial-scale=1">
<title>ollamon: sign in</title><meta name="color-scheme" content="light dark">
<link rel="stylesheet" href="/ollamon/assets/login.css"></head>
<body><main><h1>ollamon</h1><p>This dashboard needs the admin token (<code>admin.token</code>).</p>{note}
<form method="post" action="/ollamon/login"><label for="token">Admin token</label>
<input id="token" name="token" type="password" autocomplete="current-password" required autofocus>
<input type="hidden" name="next" value="{target}"><button type="submit">Sign in</button></form></main></body></html>
"""
    resp = web.Response(status=status, text=body, content_type="text/html", charset="utf-8")
    resp.headers["Content-Security-Policy"] = (
        "default-src 'none'; style-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
    )
    resp.headers["X-Content-Type-Options"] = "nosniff"
    resp.headers["Cache-Control"] = "no-store"
    return resp


ADMIN_KEY = web.AppKey("admin_access", AdminAccess)


def admin_guard(access: AdminAccess, handler: ServerHandler) -> ServerHandler:
    """``handler`` behind the admin token for ollamon's own protected paths; the login form served here."""

    async def check_admin(request: web.BaseRequest) -> web.StreamResponse:
        path = request.path
        if path.startswith("/ollamon"):
            if path == "/ollamon/login":
                return await access.login(request)
            if path == "/ollamon/logout" and request.method == "POST":
                return await access.logout(request)
            if access.protects(path) and not access.allows(request):
                return access.refuse(request)
        return await handler(request)

    return check_admin


def warn_if_exposed(listen_host: str, token: str, *, loopback: bool) -> bool:
    """Log a warning when ollamon listens beyond loopback with no admin token; True when it did."""
    if loopback or token:
        return False
    logger.warning(
        "listening on %s without admin.token: ollamon's dashboard, API and metrics are open to the network "
        "(set admin.token or OLLAMON_ADMIN_TOKEN)",
        listen_host,
    )
    return True
