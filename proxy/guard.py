"""The server's own defences: which Hosts it answers to, how long a client may take to send its headers, how
many connections it holds, and a shutdown whose grace is the configured one.

- ``host_guard``: the request handler's wrapper refusing foreign ``Host`` headers with 403 (DNS rebinding), on
  Ollama's rules; the runner installs it when the app holds a ``HOST_GUARD_KEY``.
- ``GuardedAppRunner`` -> ``GuardedServer`` -> ``GuardedRequestHandler``: aiohttp's runner, server and protocol
  with a header-read deadline, a connection cap, quiet logging of malformed requests, and a shutdown that
  cuts what still runs at ``grace`` (aiohttp's own waits ``grace`` twice, and forever when it is 0).

They lean on aiohttp 3.14 internals, each pinned by tests/hostile/test_guard.py::test_aiohttp_internals_pinned.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import asdict, dataclass
from typing import Any, cast

import psutil
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.web_protocol import RequestHandler

from proxy.access import ADMIN_KEY, admin_guard
from proxy.answers import json_error

__all__ = [
    "GUARD_STATS_KEY",
    "HOST_GUARD_KEY",
    "GuardStats",
    "GuardedAppRunner",
    "GuardedRequestHandler",
    "GuardedServer",
    "HostGuard",
    "guard_stats",
    "host_check_active",
    "host_guard",
    "is_loopback_listen",
]

logger = logging.getLogger(__name__)

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


@dataclass
class GuardStats:
    """Counts of what the guards turned away; nothing else about those requests is kept."""

    refused_hosts: int = 0
    refused_connections: int = 0
    header_timeouts: int = 0
    open_connections: int = 0


GUARD_STATS_KEY = web.AppKey("guard_stats", GuardStats)


def guard_stats(app: web.Application) -> dict[str, int]:
    """The guards' counters, for /ollamon/health."""
    return asdict(app[GUARD_STATS_KEY])


# ---------------------------------------------------------------------------------------------------- Host check

# Ollama's allowedHostsMiddleware (server/routes.go): names and IPs a loopback-bound server answers to.
_LOCAL_SUFFIXES = (".localhost", ".local", ".internal")
_PRIVATE = tuple(
    ipaddress.ip_network(n) for n in ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "fc00::/7")
)
_CACHE_SIZE = 256


def _ip(text: str) -> IPAddress | None:
    try:
        ip = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def is_loopback_listen(host: str) -> bool:
    """Whether ``server.listen``'s host is loopback: 127.0.0.0/8, ::1 or localhost."""
    host = host.strip("[]").lower()
    ip = _ip(host)
    return ip.is_loopback if ip is not None else host == "localhost"


def host_check_active(listen_host: str, allowed_hosts: Iterable[str]) -> bool:
    """Ollama checks Host only when bound to loopback; ollamon also when ``allowed_hosts`` is set, never with ``*``."""
    allowed = [a.strip() for a in allowed_hosts]
    return "*" not in allowed and (bool(allowed) or is_loopback_listen(listen_host))


def _host_part(value: str) -> str | None:
    """The host of a Host header value (port dropped, lower case, no trailing dot); None if malformed."""
    v = value.strip().lower()
    if v.startswith("["):
        end = v.find("]")
        rest = v[end + 1 :]
        if end < 0 or (rest and not (rest[0] == ":" and rest[1:].isdigit())):
            return None
        return v[1:end]
    if v.count(":") > 1:  # a bare IPv6 literal: Go's SplitHostPort fails and Ollama uses it whole
        return v
    name, sep, port = v.rpartition(":")
    if sep:
        if port and not port.isdigit():
            return None
        v = name
    return v[:-1] if v.endswith(".") else v


def _local_ips() -> frozenset[IPAddress]:
    out: set[IPAddress] = set()
    try:
        for addrs in psutil.net_if_addrs().values():
            for a in addrs:
                if a.family in (socket.AF_INET, socket.AF_INET6) and (ip := _ip(a.address.split("%")[0])):
                    out.add(ip)
    except OSError:
        pass
    return frozenset(out)


class HostGuard:
    """Decides whether a Host header value is one this server answers to; decisions cached per value."""

    def __init__(
        self,
        allowed_hosts: Iterable[str] = (),
        *,
        hostname: str | None = None,
        local_ips: frozenset[IPAddress] | None = None,
        stats: GuardStats | None = None,
    ) -> None:
        names = {"localhost", (hostname if hostname is not None else socket.gethostname()).lower()}
        suffixes = list(_LOCAL_SUFFIXES)
        for entry in allowed_hosts:
            e = entry.strip().lower().rstrip(".")
            if e.startswith("*."):
                suffixes.append(e[1:])
            else:
                names.add(e.strip("[]"))
        self._names = frozenset(names)
        self._suffixes = tuple(suffixes)
        self._local_ips = _local_ips() if local_ips is None else local_ips
        self._cache: dict[str, bool] = {}
        self.stats = stats if stats is not None else GuardStats()
        self._warned = False

    def allows(self, value: str) -> bool:
        ok = self._cache.get(value)
        if ok is None:
            ok = self._decide(value)
            if len(self._cache) >= _CACHE_SIZE:  # bounded: a client inventing Hosts only churns it
                del self._cache[next(iter(self._cache))]
            self._cache[value] = ok
        return ok

    def _decide(self, value: str) -> bool:
        host = _host_part(value)
        if host is None:
            return False
        if not host:  # HTTP/1.0 without Host, or an empty one: Ollama allows it (no browser sends it)
            return True
        ip = _ip(host)
        if ip is not None:
            return (
                ip.is_loopback
                or ip.is_unspecified
                or any(ip in net for net in _PRIVATE)
                or ip in self._local_ips
                or host in self._names
            )
        return host in self._names or host.endswith(self._suffixes)

    def refuse(self, host: str) -> web.Response:
        self.stats.refused_hosts += 1
        if not self._warned:  # once: a misconfiguration shows up in the log, a flood does not
            self._warned = True
            logger.warning(
                "refusing requests for Host %.100r (DNS-rebinding guard); "
                "if this server is reached under that name, add it to server.allowed_hosts",
                host,
            )
        return json_error(
            403,
            f"ollamon: host {host[:100]!r} is not allowed; add it to server.allowed_hosts if it names this server",
        )


HOST_GUARD_KEY = web.AppKey("host_guard", HostGuard)
# What aiohttp's Server calls for each request (Application._handle).
ServerHandler = Callable[[web.BaseRequest], Awaitable[web.StreamResponse]]


def host_guard(guard: HostGuard, handler: ServerHandler) -> ServerHandler:
    """``handler`` behind the Host check: 403 ``{"error": ...}`` unless the Host (and an absolute-form
    target's host) is allowed.

    A wrapper around the server's request handler rather than an aiohttp middleware: the middleware machinery
    cost ~0.1 ms a request here (measured side by side), which queues up under bursts of concurrent requests.
    """

    async def check_host(request: web.BaseRequest) -> web.StreamResponse:
        host = request.headers.get("Host", "")
        if not guard.allows(host):
            return guard.refuse(host)
        if not request.raw_path.startswith("/") and request.raw_path != "*":
            # Absolute-form ``GET http://name/ HTTP/1.1``: Go takes the Host from the target, so Ollama checks it.
            target = request.url.raw_authority
            if not guard.allows(target):
                return guard.refuse(target)
        return await handler(request)

    return check_host


# ------------------------------------------------------------------------- connections: deadline, cap, shutdown

_BUSY_BODY = b'{"error":"ollamon: server busy, too many connections (server.max_connections)"}'
_BUSY = (
    b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json; charset=utf-8\r\n"
    b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(_BUSY_BODY), _BUSY_BODY)
)
_CUT_WAIT_S = 5.0  # after the grace: how long cancelled handlers get to unwind (and hand over their records)
_SILENT = logging.Logger("ollamon.silent")
_SILENT.disabled = True


class _Busy(asyncio.Protocol):
    """Answers an over-cap connection with 503 and closes it: no parser, no task, no request handler."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        writer = cast(asyncio.WriteTransport, transport)  # uvloop's transports do not subclass asyncio's
        writer.write(_BUSY)
        writer.close()


class GuardedRequestHandler(RequestHandler):
    """aiohttp's protocol plus a deadline for a request's headers and one quiet log line per malformed request.

    The clock runs from connection open for the first request and from the first byte of each later one; an
    idle keep-alive connection (no bytes yet) is left to aiohttp's ``keepalive_timeout``.
    """

    __slots__ = ("_header_deadline", "_header_timeout_s", "_stats")

    def __init__(
        self, manager: web.Server, *, header_timeout_s: float, stats: GuardStats, **kwargs: Any
    ) -> None:
        super().__init__(manager, **kwargs)
        self._header_timeout_s = header_timeout_s
        self._header_deadline: asyncio.TimerHandle | None = None
        self._stats = stats

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self._arm()

    def data_received(self, data: bytes) -> None:
        idle = self._waiter is not None and not self._messages  # between requests, awaiting the next one
        super().data_received(data)
        if self._messages:  # a request's headers are complete (or failed to parse: a 400 follows)
            self._disarm()
        elif idle and self._header_deadline is None and not (self._close or self._force_close):
            self._arm()

    def connection_lost(self, exc: BaseException | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _arm(self) -> None:
        self._header_deadline = self._loop.call_later(self._header_timeout_s, self._header_timeout)

    def _disarm(self) -> None:
        if self._header_deadline is not None:
            self._header_deadline.cancel()
            self._header_deadline = None

    def _header_timeout(self) -> None:
        self._header_deadline = None
        if self._messages or self._request_in_progress or self._force_close:
            return
        self._stats.header_timeouts += 1
        logger.debug(
            "closing a connection from %s: no complete request headers in %g s",
            self.peername,
            self._header_timeout_s,
        )
        self.force_close()

    def handle_error(
        self,
        request: Any,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        if status >= 500 or not isinstance(exc, HttpProcessingError):
            return super().handle_error(request, status, exc, message)
        # The client's malformed request: one line at debug, not aiohttp's traceback at error.
        logger.debug("bad request from %s: %s", request.remote, str(exc).replace("\n", " "))
        own, self.logger = self.logger, _SILENT
        try:
            return super().handle_error(request, status, exc, message)
        finally:
            self.logger = own


class GuardedServer(web.Server):
    """aiohttp's server (the protocol factory) with a connection cap and a shutdown that keeps to its grace."""

    def __init__(
        self,
        handler: Any,
        *,
        header_timeout_s: float,
        max_connections: int,
        stats: GuardStats,
        **kwargs: Any,
    ) -> None:
        super().__init__(handler, **kwargs)
        self.header_timeout_s = header_timeout_s
        self.max_connections = max_connections
        self.stats = stats
        self._busy_logged_at = -1e9

    def __call__(self) -> asyncio.Protocol:  # type: ignore[override]  # a _Busy is no RequestHandler
        # Counted here, not in connection_made: one accept burst may create many protocols before any connects.
        if self.stats.open_connections >= self.max_connections:
            self.stats.refused_connections += 1
            if time.monotonic() - self._busy_logged_at > 60.0:
                self._busy_logged_at = time.monotonic()
                logger.warning("refusing connections: %d open (server.max_connections)", self.max_connections)
            return _Busy()
        self.stats.open_connections += 1
        return GuardedRequestHandler(
            self, loop=self._loop, header_timeout_s=self.header_timeout_s, stats=self.stats, **self._kwargs
        )

    def connection_lost(self, handler: RequestHandler, exc: BaseException | None = None) -> None:
        self.stats.open_connections -= 1  # aiohttp calls this once per handler
        super().connection_lost(handler, exc)

    async def shutdown(self, timeout: float | None = None) -> None:  # noqa: ASYNC109 - aiohttp's signature
        """Let running requests finish for ``timeout`` seconds (None: no limit), then cut what still runs.

        ``pre_shutdown`` has already closed idle connections and told busy ones to close after their request.
        """
        busy = [t for c in self._connections if (t := c._task_handler) is not None and not t.done()]
        if busy and (timeout is None or timeout > 0):
            await asyncio.wait(busy, timeout=timeout)
        cut: list[asyncio.Task[None]] = []
        for conn in list(self._connections):
            task = conn._task_handler
            if task is not None and not task.done():
                task.cancel()  # cancels the request handler it awaits, as a client disconnect would
                cut.append(task)
            conn.force_close()
        if cut:
            logger.warning(
                "shutdown: cut %d connection(s) still busy after the %g s grace", len(cut), timeout
            )
            await asyncio.wait(cut, timeout=_CUT_WAIT_S)
        self._connections.clear()


class GuardedAppRunner(web.AppRunner):
    """``web.AppRunner`` serving through a ``GuardedServer``."""

    __slots__ = ("_header_timeout_s", "_max_connections", "_stats")

    def __init__(
        self,
        app: web.Application,
        *,
        header_timeout_s: float,
        max_connections: int,
        stats: GuardStats,
        **kwargs: Any,
    ) -> None:
        super().__init__(app, **kwargs)
        self._header_timeout_s = header_timeout_s
        self._max_connections = max_connections
        self._stats = stats

    async def _make_server(self) -> web.Server:
        base = await super()._make_server()  # runs the app's startup, builds aiohttp's own Server
        handler = base.request_handler
        access = self.app.get(ADMIN_KEY)
        if access is not None:
            handler = admin_guard(access, handler)
        guard = self.app.get(HOST_GUARD_KEY)
        if guard is not None:
            handler = host_guard(guard, handler)
        return GuardedServer(
            handler,
            request_factory=base.request_factory,
            handler_cancellation=base.handler_cancellation,
            header_timeout_s=self._header_timeout_s,
            max_connections=self._max_connections,
            stats=self._stats,
            **base._kwargs,
        )
