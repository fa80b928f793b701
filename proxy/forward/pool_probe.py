"""Is the upstream reachable, when there are several? The host pool's own health checks answer.

``UpstreamProbe`` (one ``GET /`` to ``server.upstream``) feeds /ollamon/health, /ollamon/ready, the dashboard
and the alerts' ``upstream_down``. With ``upstreams.hosts`` that one URL may be no host at all, so the app puts
this in its place: reachable while any host is up (or not yet checked), from state the pool already keeps,
with no request of its own.
"""

from __future__ import annotations

from typing import Any

from proxy.forward.upstream_probe import UpstreamProbe
from proxy.upstreams import HostPool

__all__ = ["PoolProbe"]

# Host states (proxy/upstreams/host.py) that may take requests, or may once checked.
_SERVING = frozenset({"up", "unknown", "half_open"})


class PoolProbe(UpstreamProbe):
    """The pool's verdict in UpstreamProbe's shape: ``url``, ``reachable``, and ``hosts_up`` of ``hosts``."""

    def __init__(self, hosts: HostPool) -> None:
        super().__init__(hosts.session, hosts.hosts[0].upstream)
        self.hosts = hosts

    def cached(self) -> dict[str, Any] | None:
        return self.state()

    async def check(self) -> dict[str, Any]:
        return self.state()

    def state(self) -> dict[str, Any]:
        now = self.hosts.clock()
        up = [h for h in self.hosts.hosts if h.state(now) in _SERVING]
        result: dict[str, Any] = {
            "url": ", ".join(str(h.upstream) for h in self.hosts.hosts),
            "reachable": bool(up),
            "hosts_up": len(up),
            "hosts": len(self.hosts.hosts),
        }
        if not up:
            result["error"] = "; ".join(f"{h.name}: {h.last_error or h.state(now)}" for h in self.hosts.hosts)
        return result
