"""Rate limits shared by every instance through Redis: leased permits, else one atomic Lua script per request.

The script runs the same sliding-window arithmetic as proxy/usage/limits.py on Redis's own clock
(``TIME``), so instances with skewed clocks still share one window. Concurrency is a sorted set of
request members scored by start time; members older than ``concurrency_ttl_s`` are dropped, so a crashed
instance's slots come back by themselves. Every call is bounded by ``timeout_s``; on a timeout or error
the limiter falls back to its in-memory twin (per instance) for ``retry_s`` and then tries Redis again:
a slow Redis never fails a request. The fallback divides every limit by the number of instances seen in
the last minute (each PINGs a heartbeat into ``ollamon:rl:instances`` every second, off the request path), so
N instances falling back together still admit about one limit in all, not N. Keys: ``ollamon:rl:<scope>:r:<minute>``, ``...:t:<minute>``,
``...:c`` (docs/usage.md).

With ``lease`` on (the default), requests whose scopes have only rpm/tpm limits are admitted from permits
leased in small batches (proxy/usage/lease.py), so Redis is off their path while a lease lasts; a scope
with a concurrency limit keeps the per-request script (a slot must be taken and released in Redis).
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Sequence
from typing import Any

from proxy.usage.identity import KeyLimits
from proxy.usage.lease import Leases
from proxy.usage.limits import WINDOW_S, Admitted, MemoryLimiter, Over, Scope
from storage.redis_view import close_redis_client
from storage.tasks import spawn

__all__ = ["RedisLimiter", "share_of"]

logger = logging.getLogger(__name__)

_PREFIX = "ollamon:rl:"

_ACQUIRE = """
local W = tonumber(ARGV[3])
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local cur = math.floor(now / W)
local frac = (now - cur * W) / W
local member = ARGV[1]
local ttl = tonumber(ARGV[2])
local function counts(base, kind)
  local c = tonumber(redis.call('GET', base .. ':' .. kind .. ':' .. cur) or '0')
  local p = tonumber(redis.call('GET', base .. ':' .. kind .. ':' .. (cur - 1)) or '0')
  return p, c
end
local function retry(p, c, limit)
  if c + 1 > limit then
    return (1 - frac) * W + math.max(0, 1 - (limit - 1) / c) * W
  end
  if p <= 0 then return 0 end
  return math.max(0, 1 - (limit - c - 1) / p - frac) * W
end
for i = 1, #KEYS do
  local base = KEYS[i]
  local rpm = tonumber(ARGV[1 + 3 * i])
  local tpm = tonumber(ARGV[2 + 3 * i])
  local conc = tonumber(ARGV[3 + 3 * i])
  if rpm > 0 then
    local p, c = counts(base, 'r')
    if p * (1 - frac) + c + 1 > rpm then return {0, i, 'rpm', rpm, tostring(retry(p, c, rpm))} end
  end
  if tpm > 0 then
    local p, c = counts(base, 't')
    if p * (1 - frac) + c + 1 > tpm then return {0, i, 'tpm', tpm, tostring(retry(p, c, tpm))} end
  end
  if conc > 0 then
    redis.call('ZREMRANGEBYSCORE', base .. ':c', '-inf', now - ttl)
    if redis.call('ZCARD', base .. ':c') >= conc then return {0, i, 'concurrency', conc, '1'} end
  end
end
for i = 1, #KEYS do
  local base = KEYS[i]
  if tonumber(ARGV[1 + 3 * i]) > 0 then
    local k = base .. ':r:' .. cur
    redis.call('INCR', k)
    redis.call('EXPIRE', k, 2 * W + 5)
  end
  if tonumber(ARGV[3 + 3 * i]) > 0 then
    redis.call('ZADD', base .. ':c', now, member)
    redis.call('EXPIRE', base .. ':c', ttl)
  end
end
return {1}
"""

_CHARGE = """
local W = tonumber(ARGV[1])
local t = redis.call('TIME')
local cur = math.floor(tonumber(t[1]) / W)
for i = 1, #KEYS do
  local k = KEYS[i] .. ':t:' .. cur
  redis.call('INCRBY', k, ARGV[1 + i])
  redis.call('EXPIRE', k, 2 * W + 5)
end
return 1
"""


_HEARTBEAT = """
local W = tonumber(ARGV[1])
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
redis.call('ZADD', KEYS[1], now, ARGV[2])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - W)
redis.call('EXPIRE', KEYS[1], 2 * W)
return redis.call('ZCARD', KEYS[1])
"""


def share_of(scopes: Sequence[Scope], peers: int) -> list[Scope]:
    """``scopes`` with every limit divided among ``peers`` instances (at least 1 where a limit is set)."""
    if peers <= 1:
        return list(scopes)

    def part(limit: int) -> int:
        return max(1, limit // peers) if limit > 0 else 0

    return [(n, KeyLimits(part(lim.rpm), part(lim.tpm), part(lim.concurrency))) for n, lim in scopes]


class RedisLimiter:
    """Shared limits in Redis, with a ``MemoryLimiter`` to fall back on while Redis is down or slow."""

    def __init__(
        self,
        url: str,
        *,
        timeout_s: float,
        concurrency_ttl_s: float,
        retry_s: float = 1.0,
        lease: bool = True,
    ) -> None:
        # Imported here: redis-py (and the OpenTelemetry SDK it pulls in) costs ~9 MiB of RSS that a
        # deployment without Redis (the shipped config) should not hold.
        import redis.asyncio as aioredis
        from redis.asyncio.retry import Retry
        from redis.backoff import NoBackoff

        # A blocking pool: under a burst, a call waits for a free connection (within the same bounded
        # timeout) instead of failing with MaxConnectionsError and sending the request to the fallback.
        pool = aioredis.BlockingConnectionPool.from_url(
            url,
            max_connections=100,
            timeout=timeout_s,
            socket_timeout=timeout_s,
            socket_connect_timeout=timeout_s,
            # One immediate retry: after a Redis restart a pooled connection fails once, then reconnects.
            # asyncio.timeout below still bounds the whole call.
            retry=Retry(NoBackoff(), 1),
        )
        self.client: Any = aioredis.Redis.from_pool(pool)
        self.timeout_s = timeout_s
        self.ttl_s = concurrency_ttl_s
        self.retry_s = retry_s
        self.memory = MemoryLimiter()
        self._acquire = self.client.register_script(_ACQUIRE)
        self._charge = self.client.register_script(_CHARGE)
        self._heartbeat = self.client.register_script(_HEARTBEAT)
        self.peers = 1  # instances seen in the last minute (the heartbeat's count; kept while Redis is away)
        self._member = f"{uuid.uuid4().hex[:12]}:"
        self._n = 0
        self.down_until = 0.0
        self.down_reason: str | None = None
        self.fallbacks = 0  # requests decided in memory because Redis failed or was marked down
        self.lease = lease  # admit rpm/tpm-only requests from leased permits (proxy/usage/lease.py)
        self.leases = Leases(
            self.client,
            _PREFIX,
            self._member,
            timeout_s=timeout_s,
            usable=self._usable,
            failed=self._failed,
            ok=self._ok,
        )

    @property
    def backend(self) -> str:
        return "memory" if self.down_reason is not None else "redis"

    def _failed(self, exc: BaseException) -> None:
        reason = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        if self.down_reason is None:
            logger.warning("rate limits: Redis failed (%s); limiting per instance until it answers", reason)
        self.down_reason = reason
        self.down_until = time.monotonic() + self.retry_s

    def _ok(self) -> None:
        if self.down_reason is not None:
            logger.warning("rate limits: Redis answers again; limits are shared again")
        self.down_reason = None

    def _usable(self) -> bool:
        return self.down_reason is None or time.monotonic() >= self.down_until

    async def acquire(self, scopes: Sequence[Scope]) -> Admitted | Over:
        if self.lease and not any(lim.concurrency > 0 for _, lim in scopes) and self.leases.take(scopes):
            return Admitted("", (), "redis")  # no slot held: nothing to release
        if not self._usable():
            self.fallbacks += 1
            return self.memory.acquire(share_of(scopes, self.peers))
        self._n += 1
        member = f"{self._member}{self._n}"
        args: list[Any] = [member, int(self.ttl_s), WINDOW_S]
        for _, lim in scopes:
            args += [lim.rpm, lim.tpm, lim.concurrency]
        held = tuple(name for name, lim in scopes if lim.concurrency > 0)
        try:
            async with asyncio.timeout(self.timeout_s):
                out = await self._acquire(keys=[_PREFIX + name for name, _ in scopes], args=args)
        except asyncio.CancelledError:
            self._forget(member, held)  # the script may have run: do not hold a slot until the TTL
            raise
        except Exception as exc:
            self._failed(exc)
            self._forget(member, held)
            self.fallbacks += 1
            return self.memory.acquire(share_of(scopes, self.peers))
        self._ok()
        if int(out[0]) == 1:
            return Admitted(member, held, "redis")
        i, kind = int(out[1]) - 1, out[2].decode() if isinstance(out[2], bytes) else str(out[2])
        retry = float(out[4].decode() if isinstance(out[4], bytes) else out[4])
        return Over(scopes[i][0], kind, int(out[3]), retry, "redis")

    def _forget(self, member: str, held: tuple[str, ...]) -> None:
        """Remove ``member`` from the concurrency sets in the background (best effort; the TTL backs it)."""
        if held:
            spawn(self.release(Admitted(member, held, "redis")), "limits-forget")

    async def release(self, adm: Admitted) -> None:
        if adm.backend == "memory":
            self.memory.release(adm)
            return
        if not adm.scopes:
            return
        try:
            async with asyncio.timeout(self.timeout_s):
                pipe = self.client.pipeline(transaction=False)
                for name in adm.scopes:
                    pipe.zrem(f"{_PREFIX}{name}:c", adm.member)
                await pipe.execute()
        except Exception as exc:  # the member expires after concurrency_ttl_s
            self._failed(exc)

    async def charge(self, scopes: Sequence[str], tokens: int) -> None:
        self.memory.charge(scopes, tokens)  # the fallback keeps a recent picture too
        # Tokens a lease covers were counted in Redis when it was leased; only the rest is charged there.
        owed = [(s, self.leases.spend(s, tokens) if self.lease else tokens) for s in scopes]
        owed = [(s, n) for s, n in owed if n > 0]
        if not owed or not self._usable():
            return
        try:
            async with asyncio.timeout(self.timeout_s):
                await self._charge(
                    keys=[_PREFIX + s for s, _ in owed], args=[WINDOW_S, *(n for _, n in owed)]
                )
        except Exception as exc:
            self._failed(exc)
        else:
            self._ok()

    async def probe(self) -> None:
        """One heartbeat (the health loop, off the request path): notice Redis going away or coming back,
        and count the instances sharing the limits (for the fallback's share)."""
        try:
            async with asyncio.timeout(max(self.timeout_s, 0.5)):
                n = await self._heartbeat(keys=[f"{_PREFIX}instances"], args=[WINDOW_S, self._member])
        except Exception as exc:
            self._failed(exc)
        else:
            self.peers = max(1, int(n))
            self._ok()

    async def close(self) -> None:
        await self.leases.give_back()
        await close_redis_client(self.client, "shared usage limits")
