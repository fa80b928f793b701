"""Management calls sent to several hosts (``upstreams.management: all``), and the one answer the client gets.

The rule (docs/upstreams.md, "Management calls"):

* every target host gets the same request, concurrently; none is retried;
* **the client's status is the first target's** (config order) when every host succeeded; otherwise the first
  failing host's status and body, its error prefixed with the host's name (``{"error": "gpu-b: ..."}``);
* a streamed call (pull, push, create: NDJSON progress) shows the first target's progress lines as they come;
  its final line is held until every host is done, then it is either that host's ``{"status":"success"}`` or
  ``{"error": "<host>: <message>"}`` naming the first host that failed, as Ollama itself ends a failed pull.

``fan_out`` reads whole answers (bounded); ``combined`` and ``final_line`` are pure, for the forwarder to apply
the rule to a stream it relays itself. After a management call the caller pokes the pool
(``HostPool.poke()``) so that routing sees the new models at once.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import aiohttp

from proxy.upstreams.host import Host
from proxy.upstreams.unions import encode_go_json

__all__ = ["HostAnswer", "combined", "fan_out", "final_line"]


@dataclass(frozen=True, slots=True)
class HostAnswer:
    """One host's answer to a management call: status (None: no answer at all), body, or the failure."""

    host: Host
    status: int | None
    body: bytes = b""
    failure: str | None = None

    @property
    def error(self) -> str | None:
        """Why this host's call failed, or None: no answer, a status >= 400, or a final ``{"error": ...}`` line."""
        if self.status is None:
            return self.failure or "no answer"
        last = _last_object(self.body)
        if isinstance(last, dict) and isinstance(last.get("error"), str):
            return str(last["error"])
        if self.status >= 400:
            return f"HTTP {self.status}"
        return None


def _last_object(body: bytes) -> Any:
    lines = body.strip().splitlines()
    if not lines:
        return None
    try:
        return json.loads(lines[-1])
    except (ValueError, RecursionError):
        return None


async def fan_out(
    session: aiohttp.ClientSession,
    hosts: Sequence[Host],
    method: str,
    path: str,
    body: bytes,
    headers: Mapping[str, str],
    *,
    max_bytes: int = 8 << 20,
    idle_timeout_s: float = 600.0,
) -> list[HostAnswer]:
    """Send ``method path`` with ``body`` to every host concurrently; their answers in the same order."""
    return list(
        await asyncio.gather(
            *(_one(session, h, method, path, body, headers, max_bytes, idle_timeout_s) for h in hosts)
        )
    )


async def _one(
    session: aiohttp.ClientSession,
    host: Host,
    method: str,
    path: str,
    body: bytes,
    headers: Mapping[str, str],
    max_bytes: int,
    idle_timeout_s: float,
) -> HostAnswer:
    up = host.upstream
    try:
        async with session.request(
            method,
            up.url_for(path, ""),
            data=body,
            headers={**headers, "Host": up.host_header},
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=idle_timeout_s, sock_read=idle_timeout_s),
            allow_redirects=False,
        ) as resp:
            got = bytearray()
            async for chunk in resp.content.iter_chunked(1 << 16):
                got += chunk
                if len(got) > max_bytes:  # keep the tail: the final line is what matters
                    del got[: len(got) - max_bytes]
            return HostAnswer(host, resp.status, bytes(got))
    except (aiohttp.ClientError, TimeoutError) as exc:
        return HostAnswer(host, None, failure=f"{type(exc).__name__}: {exc}".rstrip(": "))


def combined(answers: Sequence[HostAnswer]) -> tuple[int, bytes]:
    """The client's status and body for a non-streamed fan-out (see the module docstring)."""
    for a in answers:
        if a.error is not None:
            status = a.status if a.status is not None and a.status >= 400 else 502
            return status, encode_go_json({"error": f"{a.host.name}: {a.error}"})
    return (answers[0].status or 200), answers[0].body


def final_line(lead_final: bytes, others: Sequence[HostAnswer]) -> bytes:
    """The last NDJSON line of a relayed progress stream: the lead host's own, unless another host failed."""
    for a in others:
        if a.error is not None:
            return encode_go_json({"error": f"{a.host.name}: {a.error}"}) + b"\n"
    return lead_final
