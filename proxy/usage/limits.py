"""Rate limits: requests and tokens per minute (sliding window) and concurrent streams, per scope.

A scope is one key (``key:<id>``), one team (``team:<name>``) or everything (``global``). The window is the
usual two-bucket approximation of a sliding minute: ``used = previous * (1 - elapsed/60) + current``; a
request is admitted when ``used + 1 <= limit`` for requests and for tokens (tokens are charged after the
response, from the record, so the check uses what earlier requests were already charged). The same
arithmetic runs here (per instance) and in Redis's Lua script (shared, proxy/usage/limits_redis.py).
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass

from proxy.usage.identity import KeyLimits

__all__ = ["WINDOW_S", "Admitted", "MemoryLimiter", "Over", "Scope", "retry_after_s"]

WINDOW_S = 60
_ids = itertools.count()

Scope = tuple[str, KeyLimits]


@dataclass(frozen=True, slots=True)
class Over:
    """A limit a request ran into: which scope and kind, the limit, and when to try again."""

    scope: str
    kind: str  # rpm | tpm | concurrency
    limit: int
    retry_after_s: float
    backend: str


@dataclass(slots=True)
class Admitted:
    """An admitted request's hold on concurrency slots; ``release`` it when the request ends."""

    member: str
    scopes: tuple[str, ...]  # the scopes whose concurrency slot this request holds
    backend: str


def retry_after_s(prev: float, cur: float, limit: int, frac: float) -> float:
    """Seconds until ``prev * (1 - f) + cur + 1 <= limit`` holds again (new requests charging nothing)."""
    if cur + 1 > limit:
        return (1 - frac) * WINDOW_S + max(0.0, 1 - (limit - 1) / cur) * WINDOW_S
    return max(0.0, 1 - (limit - cur - 1) / prev - frac) * WINDOW_S if prev > 0 else 0.0


class _Window:
    __slots__ = ("bucket", "cur", "prev")

    def __init__(self) -> None:
        self.bucket = 0
        self.cur = 0.0
        self.prev = 0.0

    def roll(self, bucket: int) -> None:
        if bucket != self.bucket:
            self.prev = self.cur if bucket == self.bucket + 1 else 0.0
            self.cur = 0.0
            self.bucket = bucket


class MemoryLimiter:
    """The per-instance limiter: exact for one process, nothing shared with other instances."""

    backend = "memory"

    def __init__(self, clock: object = time.time) -> None:
        self._clock = clock
        self._req: dict[str, _Window] = {}
        self._tok: dict[str, _Window] = {}
        self._conc: dict[str, set[str]] = {}

    def _now(self) -> tuple[int, float]:
        now: float = self._clock()  # type: ignore[operator]
        bucket = math.floor(now / WINDOW_S)
        return bucket, (now - bucket * WINDOW_S) / WINDOW_S

    def _window(self, table: dict[str, _Window], scope: str, bucket: int) -> _Window:
        w = table.get(scope)
        if w is None:
            w = table[scope] = _Window()
            w.bucket = bucket
        w.roll(bucket)
        return w

    def acquire(self, scopes: Sequence[Scope]) -> Admitted | Over:
        """Check every scope, then (all passing) count the request and take the concurrency slots."""
        bucket, frac = self._now()
        for name, lim in scopes:
            for kind, limit, table in (("rpm", lim.rpm, self._req), ("tpm", lim.tpm, self._tok)):
                if limit > 0:
                    w = self._window(table, name, bucket)
                    if w.prev * (1 - frac) + w.cur + 1 > limit:
                        return Over(
                            name, kind, limit, retry_after_s(w.prev, w.cur, limit, frac), self.backend
                        )
            if lim.concurrency > 0 and len(self._conc.get(name, ())) >= lim.concurrency:
                return Over(name, "concurrency", lim.concurrency, 1.0, self.backend)
        member = f"m{next(_ids)}"
        held = []
        for name, lim in scopes:
            if lim.rpm > 0:
                self._window(self._req, name, bucket).cur += 1
            if lim.concurrency > 0:
                self._conc.setdefault(name, set()).add(member)
                held.append(name)
        return Admitted(member, tuple(held), self.backend)

    def release(self, adm: Admitted) -> None:
        for name in adm.scopes:
            members = self._conc.get(name)
            if members is not None:
                members.discard(adm.member)
                if not members:
                    del self._conc[name]

    def charge(self, scopes: Sequence[str], tokens: int) -> None:
        """Add ``tokens`` (prompt + completion of a finished request) to each scope's token window."""
        bucket, _ = self._now()
        for name in scopes:
            self._window(self._tok, name, bucket).cur += tokens

    def held(self, scope: str) -> int:
        """Concurrency slots ``scope`` holds now (tests, health)."""
        return len(self._conc.get(scope, ()))
