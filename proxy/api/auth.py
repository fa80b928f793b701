"""Auth wiring: build the gate (keys, access, rate limits), hand it to the forwarder, keep it current.

``setup`` builds the gate at once and keeps it under ``GATE_KEY``, so other features (quotas,
proxy/api/usage.py) can ``app[GATE_KEY].add_check(fn)`` from their own ``setup``. A background context
then loads the database's keys (and again every ``auth.reload_interval_s``, on a thread, off the request
path), applies token charges from stored records, probes Redis once a second for ``/ollamon/health``
(part ``auth``), and gives the gate to the forwarder.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

from aiohttp import web

from proxy.keys import CONFIG_KEY, FORWARDER_KEY, HEALTH_PARTS_KEY, WRITER_KEY
from proxy.usage.gate import Gate
from proxy.usage.identity import KeyLimits
from proxy.usage.keys import KeyRing, parse_config_keys
from proxy.usage.limits import MemoryLimiter
from proxy.usage.limits_redis import RedisLimiter
from storage.api_keys import load_keys
from storage.errors import StorageError
from storage.tasks import spawn, stop

__all__ = ["GATE_KEY", "setup"]

logger = logging.getLogger(__name__)

GATE_KEY = web.AppKey("gate", Gate)


def setup(app: web.Application) -> None:
    """Build the gate (registered for every mode: off makes it inactive) and its background context."""
    c = app[CONFIG_KEY]
    lim = c.limits
    limiter: MemoryLimiter | RedisLimiter
    if lim.redis and c.redis.url:
        limiter = RedisLimiter(
            c.redis.url, timeout_s=lim.redis_timeout_ms / 1000.0, concurrency_ttl_s=lim.concurrency_ttl_s
        )
    else:
        limiter = MemoryLimiter()
    gate = Gate(
        mode=c.auth.mode_name,
        ring=KeyRing(parse_config_keys(c.auth.keys)),
        limiter=limiter,
        forward_key=c.auth.forward_key,
        management_admin=c.auth.management == "admin",
        team_limits=KeyLimits(lim.team_rpm, lim.team_tpm, lim.team_concurrency),
        global_limits=KeyLimits(lim.global_rpm, lim.global_tpm, lim.global_concurrency),
    )
    app[GATE_KEY] = gate
    app[HEALTH_PARTS_KEY]["auth"] = gate.health
    app.cleanup_ctx.append(_gate_ctx)


async def _reload(gate: Gate, app: web.Application) -> None:
    st = app[CONFIG_KEY].storage
    try:
        rows = await asyncio.to_thread(load_keys, st.url if st.postgres else st.db_path)
    except StorageError as exc:
        logger.warning("api keys: reload failed, keeping the previous keys: %s", exc)
        return
    gate.ring.replace_db(rows)


async def _loop(gate: Gate, app: web.Application) -> None:
    interval = app[CONFIG_KEY].auth.reload_interval_s
    probe_every = 1.0
    since_probe = probe_every
    while True:
        await asyncio.sleep(min(interval, probe_every))
        if gate.mode != "off":
            await _reload(gate, app)
        since_probe += min(interval, probe_every)
        if isinstance(gate.limiter, RedisLimiter) and since_probe >= probe_every:
            since_probe = 0.0
            await gate.limiter.probe()


async def _gate_ctx(app: web.Application) -> AsyncIterator[None]:
    gate = app[GATE_KEY]
    if gate.mode != "off":
        await _reload(gate, app)
    tasks = [spawn(_loop(gate, app), "auth-reload"), spawn(gate.run_charges(), "limits-charges")]
    app[WRITER_KEY].add_listener(gate)
    app[FORWARDER_KEY].gate = gate
    yield
    app[FORWARDER_KEY].gate = None
    await stop(*tasks)  # the probe talks to Redis: a cancel swallowed there is asked again
    if isinstance(gate.limiter, RedisLimiter):
        await gate.limiter.close()
