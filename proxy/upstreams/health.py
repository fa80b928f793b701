"""Active health checks: ``GET /api/version`` (alive?), ``/api/ps`` (loaded), ``/api/tags`` (installed).

Run by the pool's background task, never on the request path. Each request has its own timeout, and a body
is read only up to ``max_answer_bytes``: a host that hangs, floods or answers nonsense is marked as such and
cannot stall the checks of the others (they run concurrently).
"""

from __future__ import annotations

import json
import logging
from typing import Any

import aiohttp

from proxy.upstreams.host import Host
from proxy.upstreams.settings import PoolSettings
from proxy.upstreams.unions import AnswerError, model_names, parse_models

__all__ = ["CheckError", "check_host", "fetch_bounded"]

logger = logging.getLogger(__name__)

_HEADERS = {"User-Agent": "ollamon-health", "Accept": "application/json"}


class CheckError(Exception):
    """A health request failed (unreachable, timeout, non-200, too big, not the expected JSON)."""


async def fetch_bounded(
    session: aiohttp.ClientSession, host: Host, path: str, timeout_s: float, max_bytes: int
) -> bytes:
    """``GET path`` on ``host``: the body of a 200 answer, at most ``max_bytes``; CheckError otherwise."""
    up = host.upstream
    try:
        async with session.get(
            up.url_for(path, ""),
            headers={**_HEADERS, "Host": up.host_header},
            timeout=aiohttp.ClientTimeout(total=timeout_s),
            allow_redirects=False,
        ) as resp:
            if resp.status != 200:
                raise CheckError(f"GET {path} answered HTTP {resp.status}")
            if resp.content_length is not None and resp.content_length > max_bytes:
                raise CheckError(f"GET {path}: answer of {resp.content_length} bytes is over {max_bytes}")
            body = bytearray()
            async for chunk in resp.content.iter_chunked(1 << 16):
                body += chunk
                if len(body) > max_bytes:
                    raise CheckError(f"GET {path}: answer is over {max_bytes} bytes")
            return bytes(body)
    except (aiohttp.ClientError, TimeoutError) as exc:
        raise CheckError(f"GET {path}: {type(exc).__name__}: {exc}".rstrip(": ")) from None


def _version(body: bytes) -> str:
    try:
        data: Any = json.loads(body)
    except (ValueError, RecursionError):
        raise CheckError("GET /api/version: not JSON") from None
    if (
        not isinstance(data, dict)
        or not isinstance(version := data.get("version"), str)
        or len(version) > 100
    ):
        raise CheckError('GET /api/version: no "version" string')
    return version


async def check_host(
    session: aiohttp.ClientSession, host: Host, settings: PoolSettings, now: float, want_tags: bool
) -> None:
    """One round for one host; updates ``host`` in place and never raises (a failure is the verdict)."""
    t, cap = settings.check_timeout_s, settings.max_answer_bytes
    host.last_check_at = now
    try:
        host.version = _version(await fetch_bounded(session, host, "/api/version", t, 4096))
    except CheckError as exc:
        if host.up is not False:
            logger.warning("upstream %s is down: %s", host.name, exc)
        host.up, host.last_error = False, str(exc)
        return
    if host.up is False:
        logger.info("upstream %s is up again (version %s)", host.name, host.version)
    host.up, host.last_error = True, None
    # A host that answers /api/version but not /api/ps stays up; routing just knows less about it.
    try:
        host.loaded = model_names(parse_models(await fetch_bounded(session, host, "/api/ps", t, cap)))
    except (CheckError, AnswerError) as exc:
        host.loaded, host.last_error = frozenset(), f"/api/ps: {exc}"
    if want_tags:
        try:
            host.installed = model_names(
                parse_models(await fetch_bounded(session, host, "/api/tags", t, cap))
            )
            host.last_tags_at = now
        except (CheckError, AnswerError) as exc:
            host.last_error = f"/api/tags: {exc}"
