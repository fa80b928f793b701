"""Is the upstream reachable? One cheap, cached ``GET /`` shared by health, readiness and the alerts."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import aiohttp

from proxy.upstream_url import Upstream
from storage.tasks import spawn

__all__ = ["UpstreamProbe"]


class UpstreamProbe:
    """``GET /`` against the upstream, at most one in flight and cached for a couple of seconds."""

    def __init__(self, session: aiohttp.ClientSession, upstream: Upstream, ttl_s: float = 2.0) -> None:
        self.session = session
        self.upstream = upstream
        self.ttl_s = ttl_s
        self._lock = asyncio.Lock()
        self._at = 0.0
        self._result: dict[str, Any] = {}

    def cached(self) -> dict[str, Any] | None:
        """The last verdict without waiting (None before the first); starts a refresh when it is stale."""
        if time.monotonic() - self._at >= self.ttl_s and not self._lock.locked():
            spawn(self.check(), name="upstream-probe")
        return self._result or None

    async def check(self) -> dict[str, Any]:
        async with self._lock:
            if time.monotonic() - self._at < self.ttl_s and self._result:
                return self._result
            start = time.perf_counter()
            result: dict[str, Any] = {"url": str(self.upstream)}
            try:
                async with self.session.get(
                    self.upstream.url_for("/", ""),
                    headers={"Host": self.upstream.host_header},
                    timeout=aiohttp.ClientTimeout(total=2.0),
                ) as resp:
                    await resp.read()
                    result["reachable"] = resp.status < 500
                    result["status_code"] = resp.status
            except (aiohttp.ClientError, TimeoutError) as exc:
                result["reachable"] = False
                result["error"] = f"{type(exc).__name__}: {exc}"
            result["latency_ms"] = round((time.perf_counter() - start) * 1000.0, 2)
            self._result, self._at = result, time.monotonic()
            return result
