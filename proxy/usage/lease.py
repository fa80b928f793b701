"""Leased permits: take Redis off the request path for shared request and token rate limits.

Each instance leases a small batch of permits per (scope, kind) from Redis in one atomic Lua script (the
same sliding-window arithmetic as proxy/usage/limits_redis.py, on Redis's clock): the script counts the
batch into the current minute's counter at once, so a leased permit is already "used" for every other
instance. Requests are then admitted from the local lease with no I/O; a background refill starts when a
lease falls below its low-water mark (half its batch), so a request awaits Redis only when a lease is
empty (the caller then takes the per-request path, with its bounded timeout and in-memory fallback).

Batch size (per scope and kind): starts at 1 and doubles each time a lease is used up, halves when one
expires unused, capped at ``max(1, floor(limit x 2 % / instances))``, where instances is the number of
instances that leased in the last minute (a sorted set in Redis). A lease belongs to one window minute and
expires at its end; unused permits stay counted there (under-admission, never over) and are given back
on shutdown. Worst case: the instances together hold back at most about 2 % of the limit unused.

Request permits (``r``) are spent one per admitted request. Token permits (``t``) gate admission (a
request needs at least one leased token, as the shared check needs ``used + 1 <= tpm``) and are spent by
the token charges after the response; tokens beyond the lease are charged to Redis directly.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from proxy.usage.limits import WINDOW_S, Scope
from storage.tasks import spawn

__all__ = ["SHARE", "Leases"]

SHARE = 0.02  # of the limit, split among the instances: the most one instance may hold at once
_BACKOFF_S = 0.5  # after Redis granted nothing (the limit is reached) before leasing again

_LEASE = """
local W = tonumber(ARGV[1])
local share = tonumber(ARGV[2])
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local cur = math.floor(now / W)
local frac = (now - cur * W) / W
redis.call('ZADD', KEYS[1], now, ARGV[3])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - W)
redis.call('EXPIRE', KEYS[1], 2 * W)
local n = math.max(1, redis.call('ZCARD', KEYS[1]))
local out = {cur, tostring((1 - frac) * W)}
for i = 2, #KEYS do
  local j = 4 + 2 * (i - 2)
  local limit, want = tonumber(ARGV[j]), tonumber(ARGV[j + 1])
  local k = KEYS[i] .. ':' .. cur
  local c = tonumber(redis.call('GET', k) or '0')
  local p = tonumber(redis.call('GET', KEYS[i] .. ':' .. (cur - 1)) or '0')
  local cap = math.max(1, math.floor(limit * share / n))
  local grant = math.max(0, math.min(want, cap, math.floor(limit - p * (1 - frac) - c)))
  if grant > 0 then
    redis.call('INCRBY', k, grant)
    redis.call('EXPIRE', k, 2 * W + 5)
  end
  out[#out + 1] = grant
  out[#out + 1] = cap
end
return out
"""

_RETURN = """
local W = tonumber(ARGV[1])
local cur = math.floor(tonumber(redis.call('TIME')[1]) / W)
for i = 1, #KEYS do
  if tonumber(ARGV[2 * i]) == cur then
    local k = KEYS[i] .. ':' .. cur
    local back = math.min(tonumber(ARGV[2 * i + 1]), tonumber(redis.call('GET', k) or '0'))
    if back > 0 then redis.call('DECRBY', k, back) end
  end
end
return 1
"""


@dataclass(slots=True)
class Lease:
    """One (scope, kind)'s local permits: ``left`` of them until ``until`` (monotonic), from ``bucket``."""

    limit: int = 0
    left: int = 0
    bucket: int = -1
    until: float = 0.0
    want: int = 1
    cap: int = 1
    pending: bool = False
    next_try: float = 0.0

    def valid(self, now: float) -> bool:
        return self.left >= 1 and now < self.until

    def low(self, now: float) -> bool:
        return not self.valid(now) or self.left < max(1, self.want // 2)


class Leases:
    """The leases of one instance; ``take`` and ``spend`` never await (refills run as background tasks)."""

    def __init__(
        self,
        client: Any,
        prefix: str,
        instance: str,
        *,
        timeout_s: float,
        usable: Callable[[], bool],
        failed: Callable[[BaseException], None],
        ok: Callable[[], None],
    ) -> None:
        self._lease = client.register_script(_LEASE)
        self._return = client.register_script(_RETURN)
        self._prefix = prefix
        self._instance = instance
        self._timeout_s = timeout_s
        self._usable, self._failed, self._ok = usable, failed, ok
        self.table: dict[tuple[str, str], Lease] = {}
        self.served = 0  # requests admitted from a local lease (tests, bench)

    def _get(self, scope: str, kind: str, limit: int) -> Lease:
        ls = self.table.get((scope, kind))
        if ls is None:
            ls = self.table[(scope, kind)] = Lease()
        if ls.limit != limit:  # a changed limit: start over rather than keep a batch sized for the old one
            ls.limit, ls.want, ls.cap = limit, 1, 1
        return ls

    def take(self, scopes: Sequence[Scope]) -> bool:
        """Admit from the local leases (one request permit from each rpm lease) when every rpm and tpm
        limit of ``scopes`` has a valid lease; start refills of the ones running low either way."""
        now = time.monotonic()
        needed = [
            (name, kind, self._get(name, kind, limit))
            for name, lim in scopes
            for kind, limit in (("r", lim.rpm), ("t", lim.tpm))
            if limit > 0
        ]
        served = bool(needed) and all(ls.valid(now) for _, _, ls in needed)
        if served:
            for _, kind, ls in needed:
                if kind == "r":
                    ls.left -= 1
            self.served += 1
        self._refill([(n, k, ls) for n, k, ls in needed], now)
        return served

    def spend(self, scope: str, tokens: int) -> int:
        """Spend ``tokens`` from ``scope``'s token lease; returns the part it did not cover (for Redis)."""
        ls = self.table.get((scope, "t"))
        now = time.monotonic()
        if ls is None or not ls.valid(now):
            return tokens
        covered = min(ls.left, tokens)
        ls.left -= covered
        self._refill([(scope, "t", ls)], now)
        return tokens - covered

    def _refill(self, leases: list[tuple[str, str, Lease]], now: float) -> None:
        due = [
            (n, k, ls)
            for n, k, ls in leases
            if not ls.pending and now >= ls.next_try and ls.low(now) and self._usable()
        ]
        if not due:
            return
        for _, _, ls in due:
            ls.pending = True
            if ls.left > 0 and now >= ls.until:
                ls.want = max(1, ls.want // 2)  # the last lease expired unused: this scope is quiet here
            elif ls.bucket >= 0:
                ls.want = min(ls.cap, ls.want * 2)
        spawn(self._fetch(due), "limits-lease")

    async def _fetch(self, due: list[tuple[str, str, Lease]]) -> None:
        keys = [f"{self._prefix}instances"] + [f"{self._prefix}{n}:{k}" for n, k, _ in due]
        args: list[Any] = [WINDOW_S, SHARE, self._instance]
        for _, _, ls in due:
            args += [ls.limit, ls.want]
        sent = time.monotonic()
        try:
            async with asyncio.timeout(self._timeout_s):
                out = await self._lease(keys=keys, args=args)
        except Exception as exc:
            self._failed(exc)
            return
        finally:
            for _, _, ls in due:
                ls.pending = False
        self._ok()
        bucket = int(out[0])
        rest = float(out[1].decode() if isinstance(out[1], bytes) else out[1])
        for i, (_, _, ls) in enumerate(due):
            grant, cap = int(out[2 + 2 * i]), int(out[3 + 2 * i])
            ls.cap = cap
            ls.want = min(ls.want, cap)
            if grant <= 0:
                ls.next_try = time.monotonic() + _BACKOFF_S
            if ls.bucket == bucket and time.monotonic() < ls.until:
                ls.left += grant
            else:  # a new minute: what is left of the old lease belongs to the old window
                ls.left, ls.bucket = grant, bucket
            # ``sent`` is before Redis read its clock: the lease ends no later than the window does.
            ls.until = sent + rest

    async def give_back(self) -> None:
        """Return unused permits of the current minute to Redis (shutdown; best effort)."""
        now = time.monotonic()
        live = [(n, k, ls) for (n, k), ls in self.table.items() if ls.valid(now)]
        if not live or not self._usable():
            return
        args: list[Any] = [WINDOW_S]
        for _, _, ls in live:
            args += [ls.bucket, ls.left]
        try:
            async with asyncio.timeout(max(self._timeout_s, 0.5)):
                await self._return(keys=[f"{self._prefix}{n}:{k}" for n, k, _ in live], args=args)
        except Exception:  # the permits then expire with their window
            return
        for _, _, ls in live:
            ls.left = 0
