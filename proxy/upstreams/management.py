"""Where non-idempotent management calls go: one named host, or every host (``upstreams.management``).

Pulling a model onto a random host would leave the others without it, and deleting it from one would leave
routing with a stale picture; so these calls are never load-balanced and never retried.
"""

from __future__ import annotations

from collections.abc import Sequence

from proxy.upstreams.host import Host
from proxy.upstreams.settings import ALL_HOSTS

__all__ = ["MANAGEMENT_ROUTES", "is_management", "management_targets"]

# (method, path or path prefix): Ollama's model-changing calls, blobs included (create needs its blobs on
# the host that creates).
MANAGEMENT_ROUTES: tuple[tuple[str, str], ...] = (
    ("POST", "/api/pull"),
    ("POST", "/api/push"),
    ("POST", "/api/create"),
    ("POST", "/api/copy"),
    ("DELETE", "/api/delete"),
    ("POST", "/api/blobs/"),
    ("HEAD", "/api/blobs/"),
)


def is_management(method: str, path: str) -> bool:
    """Whether ``method path`` changes what a host has installed (a trailing slash does not count)."""
    for m, route in MANAGEMENT_ROUTES:
        if method == m and (path.startswith(route) if route.endswith("/") else path == route):
            return True
    return False


def management_targets(hosts: Sequence[Host], management: str) -> list[Host]:
    """The hosts a management call goes to, in config order: the named one, or all of them."""
    if management == ALL_HOSTS:
        return list(hosts)
    return [h for h in hosts if h.name == management]
