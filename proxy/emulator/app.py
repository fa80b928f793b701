"""The emulator's aiohttp application: routes, gin-like 404/405/redirects, the Host check, ground truth.

One middleware wraps every request: it opens the ground-truth entry, applies Ollama's Host check (§12),
turns router misses into gin's plain-text 404/405 and trailing-slash redirects, sends complete bodies
itself (so it can time them, chunking bodies over 2 KB as Go does) and marks disconnects as cancelled.
Run the app with ``handler_cancellation=True`` so a client disconnect cancels its handler.
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import logging
import socket
import time
from collections.abc import Awaitable, Callable

from aiohttp import web

from . import anthropic, audio, embed, gojson, management, native, openai, responses
from .config import EmulatorConfig
from .groundtruth import ENTRY_KEY, START_KEY, GroundTruthLog, LogEntry
from .state import EMULATOR_KEY, Emulator

__all__ = ["create_app"]

logger = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
CHUNK_THRESHOLD = 2048  # Go's net/http buffers this much before it switches to chunked encoding
CONTROL_PREFIX = "/_emulator/"
_PRIVATE = [ipaddress.ip_network(n) for n in ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "fc00::/7")]


@functools.cache
def _local_addresses() -> frozenset[str]:
    """Addresses of this machine's hostname (Go also accepts any local interface address)."""
    try:
        infos = socket.getaddrinfo(socket.gethostname(), None)
    except OSError:
        return frozenset()
    return frozenset(str(info[4][0]) for info in infos)


def host_allowed(host_header: str) -> bool:
    """Ollama's ``allowedHostsMiddleware`` for a loopback bind: local names and local/private IPs only."""
    host = host_header.strip()
    if host.startswith("["):
        host = host[1:].split("]", 1)[0]
    elif host.count(":") == 1:
        host = host.split(":", 1)[0]
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        address = None
    if address is not None:
        return (
            address.is_loopback
            or address.is_unspecified
            or any(address in net for net in _PRIVATE if net.version == address.version)
            or str(address) in _local_addresses()
        )
    host = host.lower()
    if host in ("", "localhost") or host == socket.gethostname().lower():
        return True
    return host.endswith((".localhost", ".local", ".internal"))


def _plain(status: int, text: str) -> web.Response:
    return web.Response(status=status, body=text.encode(), headers={"Content-Type": "text/plain"})


async def _routing_error(request: web.Request, exc: web.HTTPException) -> web.Response:
    """gin's answers: trailing-slash redirect, ``405 method not allowed`` with Allow, ``404 page not found``."""
    if isinstance(exc, web.HTTPMethodNotAllowed):
        response = _plain(405, "405 method not allowed")
        response.headers["Allow"] = ", ".join(sorted(exc.allowed_methods))
        return response
    path = request.path
    if len(path) > 1 and path.endswith("/"):
        target = path.rstrip("/") or "/"
        match = await request.app.router.resolve(request.clone(rel_url=target))
        if match.http_exception is None or isinstance(match.http_exception, web.HTTPMethodNotAllowed):
            location = target + (f"?{request.query_string}" if request.query_string else "")
            if request.method in ("GET", "HEAD"):
                body = f'<a href="{location}">Moved Permanently</a>.\n\n'.encode()
                headers = {"Location": location, "Content-Type": "text/html; charset=utf-8"}
                return web.Response(status=301, body=body, headers=headers)
            return web.Response(status=307, headers={"Location": location})
    return _plain(404, "404 page not found")


def _body_length(response: web.StreamResponse) -> int:
    if isinstance(response, web.Response) and isinstance(response.body, (bytes, bytearray)):
        return len(response.body)
    return 0


@web.middleware
async def emulator_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Ground truth, Host check and routing errors around every (non-control) request."""
    if request.path.startswith(CONTROL_PREFIX):
        return await handler(request)
    emu = request.app[EMULATOR_KEY]
    start_ns = time.monotonic_ns()
    entry = LogEntry(
        request_id=request.headers.get("X-Request-Id") or GroundTruthLog.new_id(),
        method=request.method,
        path=request.path,
        arrived_at=start_ns / 1e9,
    )
    request[ENTRY_KEY], request[START_KEY] = entry, start_ns
    emu.ground_truth.begin(entry)
    try:
        exc = request.match_info.http_exception
        if emu.config.host_check and not host_allowed(request.headers.get("Host", "")):
            response: web.StreamResponse = web.Response(status=403)
        elif exc is not None:
            response = await _routing_error(request, exc)
        else:
            response = await handler(request)
        if not response.prepared:
            length = _body_length(response)
            if length > CHUNK_THRESHOLD and request.method != "HEAD":
                response.enable_chunked_encoding()
            await response.prepare(request)
            entry.headers_sent_at, entry.status = time.monotonic(), response.status
            await response.write_eof()
            entry.bytes_sent += 0 if request.method == "HEAD" else length
        elif entry.status is None:
            entry.status = response.status
        return response
    except asyncio.CancelledError:
        entry.cancelled = True
        if entry.status is None:
            entry.status = 499
        logger.info("request %s %s cancelled by client disconnect", entry.request_id, entry.path)
        raise
    except ConnectionResetError:
        entry.cancelled = True
        if entry.status is None:
            entry.status = 499
        logger.info("request %s %s: client went away mid-write", entry.request_id, entry.path)
        return web.Response(status=499)
    finally:
        emu.ground_truth.end(entry, time.monotonic())


async def _strip_server_header(request: web.Request, response: web.StreamResponse) -> None:
    """Ollama sends no ``Server`` header; aiohttp adds one before this signal fires."""
    response.headers.popall("Server", None)


async def control_log(request: web.Request) -> web.Response:
    """``GET /_emulator/log``: the ground-truth entries as a JSON list."""
    emu = request.app[EMULATOR_KEY]
    body = gojson.dumps([entry.to_json() for entry in emu.log])
    return web.Response(body=body, headers={"Content-Type": "application/json"})


async def control_reset(request: web.Request) -> web.Response:
    """``POST /_emulator/reset``: clear the log; ``{"unload": false}`` keeps models loaded."""
    emu = request.app[EMULATOR_KEY]
    raw = await request.read()
    unload = True
    if raw.strip():
        try:
            value = gojson.decode(raw)
        except gojson.GoJSONError as exc:
            return native.error_response(400, str(exc))
        if isinstance(value, dict) and value.get("unload") is False:
            unload = False
    emu.reset(unload=unload)
    return web.Response(status=204)


def create_app(config: EmulatorConfig | None = None) -> web.Application:
    """Build an emulator app; its ``Emulator`` is at ``app[EMULATOR_KEY]``."""
    app = web.Application(middlewares=[emulator_middleware], client_max_size=64 * 1024 * 1024)
    app[EMULATOR_KEY] = Emulator(config or EmulatorConfig())
    app.on_response_prepare.append(_strip_server_header)
    router = app.router
    router.add_get("/", management.root)
    router.add_get("/api/version", management.version)
    router.add_get("/api/tags", management.tags)
    router.add_get("/api/ps", management.ps, allow_head=False)
    router.add_post("/api/show", management.show)
    router.add_post("/api/pull", management.pull)
    router.add_post("/api/push", management.push)
    router.add_post("/api/create", management.create)
    router.add_post("/api/copy", management.copy)
    router.add_delete("/api/delete", management.delete)
    router.add_head("/api/blobs/{digest}", management.blob_head)
    router.add_post("/api/blobs/{digest}", management.blob_upload)
    router.add_post("/api/generate", native.generate)
    router.add_post("/api/chat", native.chat)
    router.add_post("/api/embed", embed.embed)
    router.add_post("/api/embeddings", embed.embeddings)
    router.add_post("/v1/chat/completions", openai.chat_completions)
    router.add_post("/v1/completions", openai.completions)
    router.add_post("/v1/embeddings", openai.embeddings)
    router.add_post("/v1/messages", anthropic.messages)
    router.add_post("/v1/responses", responses.responses)
    router.add_post("/v1/audio/transcriptions", audio.transcriptions)
    router.add_get("/v1/models", openai.list_models, allow_head=False)
    router.add_get("/v1/models/{model:.+}", openai.retrieve_model, allow_head=False)
    router.add_get("/_emulator/log", control_log, allow_head=False)
    router.add_post("/_emulator/reset", control_reset)
    return app
