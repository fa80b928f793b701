"""HostPool: the configured Ollama hosts, their health, and the choice of one per request.

(Named HostPool because ``proxy.forward.upstream_client.UpstreamPool`` already names the keep-alive
connection pool to one upstream; the wiring keeps one of those per host.)

The request path calls ``acquire``/``release`` (or ``retry.send_with_retry``): attribute arithmetic over the
hosts, no I/O, no awaiting. One background task runs the health checks every ``check_interval_s``, all hosts
concurrently; it is started and stopped with the pool (``async with HostPool(...)``, or start/stop from a
cleanup context).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Collection
from types import TracebackType
from typing import Any

import aiohttp

from proxy.upstreams.health import CheckError, check_host, fetch_bounded
from proxy.upstreams.host import Host, Outcome
from proxy.upstreams.management import management_targets
from proxy.upstreams.routing import pick
from proxy.upstreams.settings import PoolSettings, canonical_model
from proxy.upstreams.unions import (
    AnswerError,
    encode_go_json,
    merge_openai_models,
    merge_ps,
    merge_tags,
    parse_models,
)
from storage.tasks import spawn

__all__ = ["UNION_PATHS", "HostPool"]

logger = logging.getLogger(__name__)

# path -> (the answer's list key, its entries' name key, the merge)
_MERGES: dict[str, tuple[str, str, Callable[[list[list[dict[str, Any]]]], dict[str, Any]]]] = {
    "/api/tags": ("models", "name", merge_tags),
    "/api/ps": ("models", "name", merge_ps),
    "/v1/models": ("data", "id", merge_openai_models),
}
UNION_PATHS = frozenset(_MERGES)


class HostPool:
    """The hosts of ``settings`` in config order; see the module docstring."""

    def __init__(
        self,
        settings: PoolSettings,
        session: aiohttp.ClientSession,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not settings.hosts:
            raise ValueError("a pool needs at least one host")
        self.settings = settings
        self.session = session
        self.clock = clock
        self.hosts: tuple[Host, ...] = tuple(Host(spec, i) for i, spec in enumerate(settings.hosts))
        self.by_name = {h.name: h for h in self.hosts}
        self.rounds = 0  # health-check rounds completed
        self._task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self._tags_due = False  # poke() asks for /api/tags in the next round too

    @property
    def single(self) -> bool:
        """One host: the forwarder relays /api/tags and /api/ps as they are instead of merging."""
        return len(self.hosts) == 1

    # -- the request path ----------------------------------------------------------------------

    def choose(self, model: str | None, exclude: Collection[Host | str] = ()) -> Host:
        """The host for a request naming ``model`` (any spelling; None: none), without taking it."""
        return pick(self.hosts, canonical_model(model), self._excluded(exclude), self.clock())

    def acquire(self, model: str | None, exclude: Collection[Host | str] = ()) -> Host:
        """``choose`` and count the request as outstanding there; pair with ``release``."""
        now = self.clock()
        host = pick(self.hosts, canonical_model(model), self._excluded(exclude), now)
        host.begin(now)
        return host

    def release(self, host: Host, outcome: Outcome) -> None:
        """The request on ``host`` has ended; its outcome feeds the passive circuit."""
        s = self.settings
        host.end(outcome, self.clock(), s.eject_after, s.eject_cooldown_s)

    def management_targets(self) -> list[Host]:
        """Where pull, push, create, copy, delete and blob calls go (``upstreams.management``)."""
        return management_targets(self.hosts, self.settings.management)

    def _excluded(self, exclude: Collection[Host | str]) -> Collection[Host]:
        if not exclude:
            return ()
        out: list[Host] = []
        for item in exclude:
            if isinstance(item, Host):
                out.append(item)
            elif (host := self.by_name.get(item)) is not None:
                out.append(host)
        return out

    # -- health checks -------------------------------------------------------------------------

    async def check_now(self) -> None:
        """One round of checks on every host, concurrently (the background task's body; tests call it)."""
        now = self.clock()
        every = self.settings.tags_interval_s
        forced, self._tags_due = self._tags_due, False
        await asyncio.gather(
            *(
                check_host(
                    self.session,
                    h,
                    self.settings,
                    now,
                    want_tags=forced or h.last_tags_at is None or now - h.last_tags_at >= every,
                )
                for h in self.hosts
            )
        )
        self.rounds += 1

    def poke(self) -> None:
        """Run the next round now, /api/tags included (a management call changed what hosts hold)."""
        self._tags_due = True
        self._wake.set()

    async def _run(self) -> None:
        while True:
            started = self.clock()
            try:
                await self.check_now()
            except Exception:  # a bug in one round must not end the checks for good
                logger.exception("upstream health round failed")
            wait = max(0.0, self.settings.check_interval_s - (self.clock() - started))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), wait)
            self._wake.clear()

    async def start(self) -> None:
        if self._task is None:
            self._task = spawn(self._run(), name="upstream-health")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def __aenter__(self) -> HostPool:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()

    # -- union answers -------------------------------------------------------------------------

    async def union(self, path: str) -> tuple[int, bytes]:
        """``GET`` a path of ``UNION_PATHS`` (/api/tags, /api/ps, /v1/models) from every host now, merged
        (unions.py): status and body.

        Hosts that fail are left out (logged); if none answers, 502 ``{"error": ...}``. A pool of one
        should relay the host's own answer instead (``single``), byte for byte."""
        list_key, name_key, merge = _MERGES[path]
        now = self.clock()
        hosts = [h for h in self.hosts if h.available(now)] or list(self.hosts)
        results = await asyncio.gather(*(self._answer(h, path, list_key, name_key) for h in hosts))
        answers = [r for r in results if not isinstance(r, str)]
        if not answers:
            reasons = "; ".join(f"{h.name}: {r}" for h, r in zip(hosts, results, strict=True))
            return 502, encode_go_json({"error": f"no upstream answered GET {path} ({reasons})"})
        return 200, encode_go_json(merge(answers))

    async def _answer(
        self, host: Host, path: str, list_key: str, name_key: str
    ) -> list[dict[str, Any]] | str:
        s = self.settings
        try:
            body = await fetch_bounded(self.session, host, path, s.check_timeout_s, s.max_answer_bytes)
            return parse_models(body, list_key, name_key)
        except (CheckError, AnswerError) as exc:
            logger.warning("upstream %s left out of GET %s: %s", host.name, path, exc)
            return str(exc)

    # -- reading -------------------------------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        """Per-host state for /ollamon/health and the dashboard."""
        now = self.clock()
        return {
            "management": self.settings.management,
            "health_rounds": self.rounds,
            "hosts": [h.snapshot(now) for h in self.hosts],
        }
