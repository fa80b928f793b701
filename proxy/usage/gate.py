"""The gate: the one check on the request path for identity, access and rate limits.

``identify`` (synchronous, a dict lookup) turns the request's ``Authorization: Bearer`` key into a
``Caller`` or a 401/403 ``Refusal``; ``admit`` (after the body is read, so the model is known) checks the
key's model globs, the extra checks registered with ``add_check`` (quotas), and the rate limits, and
returns a hold on concurrency slots to ``release`` when the request ends. Rate limits apply to inference
requests (the instrumented routes). Tokens are charged off the path, from stored records (``offer``).
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable, Sequence
from typing import Any

import orjson

from proxy.usage.identity import Caller, KeyLimits, Refusal
from proxy.usage.keys import KEY_PATTERN, KeyRing, model_allowed
from proxy.usage.limits import Admitted, MemoryLimiter, Over, Scope
from proxy.usage.limits_redis import RedisLimiter
from storage.tasks import spawn

__all__ = ["ANONYMOUS", "MANAGEMENT_PATHS", "Check", "Gate", "model_of"]

logger = logging.getLogger(__name__)

ANONYMOUS = Caller()
NO_LIMITS = KeyLimits()
Check = Callable[[Caller, "str | None"], "Refusal | None"]
MANAGEMENT_PATHS = frozenset({"/api/pull", "/api/push", "/api/create", "/api/copy", "/api/delete"})
_BLOBS = "/api/blobs/"


def is_management(path: str) -> bool:
    return path in MANAGEMENT_PATHS or path.startswith(_BLOBS)


def model_of(body: bytes | None) -> str | None:
    """The ``model`` (else ``name``) string of a JSON object body; None when there is none."""
    if not body:
        return None
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(doc, dict):
        return None
    value = doc.get("model", doc.get("name"))
    return value if isinstance(value, str) else None


def _bearer(value: str | None) -> str | None:
    if value is None:
        return None
    scheme, _, token = value.strip().partition(" ")
    if scheme.lower() != "bearer":
        return None
    token = token.strip()
    return token or None


def _limited(lim: KeyLimits) -> bool:
    return lim.rpm > 0 or lim.tpm > 0 or lim.concurrency > 0


class Gate:
    """Identity, access and rate limits for the forwarder (built by proxy/api/auth.py)."""

    def __init__(
        self,
        *,
        mode: str,
        ring: KeyRing,
        limiter: MemoryLimiter | RedisLimiter,
        forward_key: bool = False,
        management_admin: bool = False,
        team_limits: KeyLimits = NO_LIMITS,
        global_limits: KeyLimits = NO_LIMITS,
    ) -> None:
        self.mode = mode
        self.ring = ring
        self.limiter = limiter
        self.forward_key = forward_key
        self.management_admin = management_admin
        self.team_limits = team_limits
        self.global_limits = global_limits
        self.checks: list[Check] = []
        self.refused: dict[str, int] = {}  # error_type -> count, for /ollamon/health
        self._charges: asyncio.Queue[tuple[tuple[str, ...], int]] = asyncio.Queue(maxsize=10_000)

    @property
    def active(self) -> bool:
        """Whether the forwarder must call the gate at all (auth on, a global limit, or a check)."""
        return self.mode != "off" or _limited(self.global_limits) or bool(self.checks)

    @property
    def strips_key(self) -> bool:
        """Whether ``Authorization`` is removed before forwarding (auth on and ``forward_key`` off)."""
        return self.mode != "off" and not self.forward_key

    def add_check(self, fn: Check) -> None:
        """Register ``fn(caller, model) -> Refusal | None``: synchronous, in memory, run on each admit."""
        self.checks.append(fn)

    def _refuse(self, status: int, message: str, error_type: str, **kw: Any) -> Refusal:
        self.refused[error_type] = self.refused.get(error_type, 0) + 1
        return Refusal(status, message, error_type, **kw)

    def identify(self, authorization: str | None) -> Caller | Refusal:
        """The caller behind the ``Authorization`` header, or why it may not pass (401/403)."""
        if self.mode == "off":
            return ANONYMOUS
        token = _bearer(authorization)
        caller = ANONYMOUS
        if token is not None and (self.mode == "required" or KEY_PATTERN.fullmatch(token)):
            entry = self.ring.lookup(token)
            if entry is None:
                return self._refuse(401, "ollamon: unknown API key", "unauthorized")
            why = entry.refusal_reason(time.time())
            if why is not None:
                return self._refuse(401, f"ollamon: API key {entry.caller.name!r} is {why}", "unauthorized")
            caller = entry.caller
        elif self.mode == "required":
            return self._refuse(
                401, "ollamon: an API key is required (Authorization: Bearer olm_...)", "unauthorized"
            )
        return caller

    def needs_model(self, caller: Caller) -> bool:
        return bool(caller.models) or bool(self.checks)

    def _scopes(self, caller: Caller) -> list[Scope]:
        scopes: list[Scope] = []
        if caller.key_id is not None and _limited(caller.limits):
            scopes.append((f"key:{caller.key_id}", caller.limits))
        if caller.team and _limited(self.team_limits):
            scopes.append((f"team:{caller.team}", self.team_limits))
        if _limited(self.global_limits):
            scopes.append(("global", self.global_limits))
        return scopes

    async def admit(
        self, caller: Caller, model: str | None, *, path: str, inference: bool, has_body: bool
    ) -> Admitted | Refusal | None:
        """Management routes, models, extra checks and rate limits; an ``Admitted`` to release, None
        (nothing held) or a ``Refusal``."""
        if self.management_admin and not caller.admin and is_management(path):
            return self._refuse(403, f"ollamon: {path} needs an admin API key", "forbidden")
        if caller.models and has_body:
            if model is None:
                return self._refuse(
                    403,
                    "ollamon: this API key is limited to some models; the request names none",
                    "forbidden",
                )
            if not model_allowed(model, caller.models):
                return self._refuse(403, f"ollamon: this API key may not use model {model!r}", "forbidden")
        for check in self.checks:
            refusal = check(caller, model)
            if refusal is not None:
                self.refused[refusal.error_type] = self.refused.get(refusal.error_type, 0) + 1
                return refusal
        if not inference:
            return None
        scopes = self._scopes(caller)
        if not scopes:
            return None
        if isinstance(self.limiter, RedisLimiter):
            result = await self.limiter.acquire(scopes)
        else:
            result = self.limiter.acquire(scopes)
        if isinstance(result, Over):
            return self._over(result)
        return result

    def _over(self, over: Over) -> Refusal:
        retry = max(1, math.ceil(over.retry_after_s))
        headers = (
            ("Retry-After", str(retry)),
            ("X-RateLimit-Limit", str(over.limit)),
            ("X-RateLimit-Remaining", "0"),
            ("X-RateLimit-Reset", str(retry)),
        )
        scope = over.scope.split(":", 1)[0]  # key | team | global: the id is not echoed
        message = f"ollamon: rate limit exceeded ({over.kind} {over.limit} per {scope}); retry in {retry} s"
        if over.kind == "concurrency":
            message = f"ollamon: too many concurrent requests ({over.limit} per {scope}); retry in {retry} s"
        return self._refuse(429, message, "rate_limited", retry_after_s=float(retry), headers=headers)

    def release_soon(self, adm: object) -> None:
        """Give back an admitted request's concurrency slots (from the handler's ``finally``: no await)."""
        if not isinstance(adm, Admitted) or not adm.scopes:
            return
        if isinstance(self.limiter, RedisLimiter) and adm.backend == "redis":
            spawn(self.limiter.release(adm), "limits-release")
        elif isinstance(self.limiter, RedisLimiter):
            self.limiter.memory.release(adm)
        else:
            self.limiter.release(adm)

    # -- off the request path ---------------------------------------------------------------------

    def offer(self, records: Sequence[Any]) -> None:
        """Writer listener: queue each stored inference's tokens for the tpm windows it counts in."""
        if self.mode == "off" and self.global_limits.tpm <= 0 and self.team_limits.tpm <= 0:
            return  # no key, so nothing but a global or team tokens limit could be charged
        for rec in records:
            tokens = (getattr(rec, "prompt_tokens", None) or 0) + (
                getattr(rec, "completion_tokens", None) or 0
            )
            if tokens <= 0:
                continue
            scopes = []
            key_id = getattr(rec, "api_key_id", None)
            if key_id is not None:
                caller = self.ring.by_id(key_id)
                if caller is not None and caller.limits.tpm > 0:
                    scopes.append(f"key:{key_id}")
            team = getattr(rec, "team", None)
            if team and self.team_limits.tpm > 0:
                scopes.append(f"team:{team}")
            if self.global_limits.tpm > 0:
                scopes.append("global")
            if scopes:
                try:
                    self._charges.put_nowait((tuple(scopes), int(tokens)))
                except asyncio.QueueFull:
                    logger.warning("rate limits: token charge queue full; a charge was dropped")

    async def run_charges(self) -> None:
        """Apply queued token charges (a background task)."""
        while True:
            scopes, tokens = await self._charges.get()
            if isinstance(self.limiter, RedisLimiter):
                await self.limiter.charge(scopes, tokens)
            else:
                self.limiter.charge(scopes, tokens)

    def health(self) -> dict[str, Any]:
        lim = self.limiter
        out: dict[str, Any] = {
            "mode": self.mode,
            "keys": len(self.ring),
            "limits_backend": lim.backend,
            "limits_shared": lim.backend == "redis",
            "refused": dict(self.refused),
        }
        if isinstance(lim, RedisLimiter):
            out["redis_error"] = lim.down_reason
            out["fallbacks"] = lim.fallbacks
            out["limits_instances"] = lim.peers
        return out
