"""``GET /ollamon/api/live``: one snapshot per tick, serialised once, fanned out to every open page (SSE).

One task (``LiveHub.run``) computes a frame every ``dashboard.live_interval_s`` while at least one page is
connected, on a drift-free schedule, serialises it once with orjson and offers the same bytes to every
client. Each client holds **one** pending frame: a newer frame replaces a stale one that was not sent yet
(the client's ``skipped`` count grows), so a page that stops reading costs one frame plus what the socket
buffers, never a growing queue. A write that cannot complete within ``WRITE_TIMEOUT_S`` (a page that stopped
reading long ago) ends that stream. At most ``dashboard.max_live_clients`` streams are open; one more gets
503. The stream starts with ``retry:`` (the browser's EventSource reconnects after that many ms) and sends a
comment line as a heartbeat when no frame went out for ``HEARTBEAT_S``. Shutdown ends every stream at once
(``on_shutdown``), so open pages never hold up the server's grace period.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from collections.abc import AsyncIterator
from typing import Any

import orjson
from aiohttp import web

from proxy.answers import json_error
from proxy.dashboard.figures import LiveFigures
from proxy.dashboard.snapshot import StatusCache, build_frame
from proxy.keys import CONFIG_KEY, HEALTH_PARTS_KEY, WRITER_KEY
from storage.tasks import spawn

__all__ = ["HUB_KEY", "LiveClient", "LiveHub", "live_stream", "setup_live"]

logger = logging.getLogger(__name__)

RETRY_MS = 2000
HEARTBEAT_S = 15.0
WRITE_TIMEOUT_S = 30.0


class LiveClient:
    """One open stream: at most one frame waiting to be written."""

    __slots__ = ("pending", "sent", "skipped", "wake")

    def __init__(self) -> None:
        self.pending: bytes | None = None
        self.wake = asyncio.Event()
        self.sent = 0
        self.skipped = 0

    def offer(self, frame: bytes) -> None:
        if self.pending is not None:
            self.skipped += 1
        self.pending = frame
        self.wake.set()


class LiveHub:
    """The clients, the figures and the one task that makes frames."""

    def __init__(self, app: web.Application, interval_s: float, max_clients: int) -> None:
        self.app = app
        self.interval_s = interval_s
        self.max_clients = max_clients
        self.figures = LiveFigures()
        self.status = StatusCache(app)
        self.clients: set[LiveClient] = set()
        self.closing = False
        self.frames = 0
        self.last_frame: bytes | None = None
        self._seq = 0
        self._has_clients = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def stats(self) -> dict[str, Any]:
        """For /ollamon/health: open streams, frames made, and frames a slow page skipped (open streams)."""
        return {
            "live_clients": len(self.clients),
            "frames": self.frames,
            "frames_skipped": sum(c.skipped for c in self.clients),
            "frame_bytes": len(self.last_frame) if self.last_frame is not None else None,
        }

    def add(self) -> LiveClient | None:
        """A new client, or None when ``max_clients`` are open (or the server is stopping)."""
        if self.closing or len(self.clients) >= self.max_clients:
            return None
        client = LiveClient()
        self.clients.add(client)
        self._has_clients.set()
        return client

    def remove(self, client: LiveClient) -> None:
        self.clients.discard(client)
        if not self.clients:
            self._has_clients.clear()

    def make_frame(self) -> bytes:
        """Compute and serialise one frame (also used by tests and the bench)."""
        self.status.refresh_if_due()
        frame = build_frame(self.app, self.figures, self.status, self._seq)
        self._seq = frame["seq"]
        self.frames += 1
        return b"data: " + orjson.dumps(frame) + b"\n\n"

    async def run(self) -> None:
        """Frames while anyone listens: tick ``k`` of a run is due at ``start + k * interval``."""
        loop = asyncio.get_running_loop()
        while not self.closing:
            await self._has_clients.wait()
            if self.closing:
                return
            start, tick = loop.time(), 0
            while self.clients and not self.closing:
                try:
                    frame = self.make_frame()
                except Exception:
                    logger.exception("dashboard: a live frame could not be made")
                    frame = None
                if frame is not None:
                    self.last_frame = frame
                    for client in self.clients:
                        client.offer(frame)
                tick = max(tick + 1, math.ceil((loop.time() - start) / self.interval_s))
                await asyncio.sleep(max(0.0, start + tick * self.interval_s - loop.time()))

    async def start(self) -> None:
        self.app[WRITER_KEY].add_listener(self.figures)
        self._task = spawn(self.run(), name="dashboard-live")

    def close(self) -> None:
        """End every stream now (on_shutdown) and let the frame task finish."""
        self.closing = True
        self._has_clients.set()
        for client in self.clients:
            client.wake.set()

    async def stop(self) -> None:
        self.close()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self.status.stop()


HUB_KEY = web.AppKey("dashboard_live_hub", LiveHub)


async def live_stream(request: web.Request) -> web.StreamResponse:
    """The SSE stream of one page."""
    hub = request.app[HUB_KEY]
    client = hub.add()
    if client is None:
        if hub.closing:
            return json_error(503, "ollamon is shutting down")
        return json_error(
            503, f"too many live dashboard streams open ({hub.max_clients}; dashboard.max_live_clients)"
        )
    resp = web.StreamResponse(
        headers={
            "Content-Type": "text/event-stream; charset=utf-8",
            "Cache-Control": "no-store",
            "X-Accel-Buffering": "no",
            "X-Content-Type-Options": "nosniff",
        }
    )
    try:
        await resp.prepare(request)
        await resp.write(f"retry: {RETRY_MS}\n: ollamon live\n\n".encode())
        if hub.last_frame is not None and len(hub.clients) > 1:
            client.offer(hub.last_frame)  # frames are flowing: show the newest at once
        while not hub.closing:
            try:
                await asyncio.wait_for(client.wake.wait(), HEARTBEAT_S)
            except TimeoutError:
                await asyncio.wait_for(resp.write(b": heartbeat\n\n"), WRITE_TIMEOUT_S)
                continue
            client.wake.clear()
            frame, client.pending = client.pending, None
            if frame is None or hub.closing:
                continue
            await asyncio.wait_for(resp.write(frame), WRITE_TIMEOUT_S)
            client.sent += 1
        return resp
    except TimeoutError:
        # The page stopped reading WRITE_TIMEOUT_S ago: drop its connection (a clean end would wait again).
        if request.transport is not None:
            request.transport.abort()
        return resp
    except ConnectionError:
        return resp  # the page went away
    finally:
        hub.remove(client)


async def _hub_ctx(app: web.Application) -> AsyncIterator[None]:
    d = app[CONFIG_KEY].dashboard
    hub = LiveHub(app, interval_s=d.live_interval_s, max_clients=d.max_live_clients)
    app[HUB_KEY] = hub
    app[HEALTH_PARTS_KEY]["dashboard"] = hub.stats
    await hub.start()
    yield
    await hub.stop()


async def _on_shutdown(app: web.Application) -> None:
    hub = app.get(HUB_KEY)
    if hub is not None:
        hub.close()


def setup_live(app: web.Application) -> None:
    """The hub's lifecycle (after the writer's context) and the route."""
    app.cleanup_ctx.append(_hub_ctx)
    app.on_shutdown.append(_on_shutdown)
    app.router.add_get("/ollamon/api/live", live_stream)
