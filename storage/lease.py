"""Leases: which instance of a fleet does a once-per-fleet job (alert evaluation, retention) right now.

Several ollamon instances may share one database. Some work must run on one of them only: announcing an
alert once, not once per instance; dropping old partitions once. A ``Lease`` says whether this instance
holds the right to do it now; a ``LeaseKeeper`` takes and renews a named lease through a ``LeaseBackend``
(storage/postgres/lease.py: a row in PostgreSQL) in a background task, and ``AlwaysHeld`` is the lease of
an instance that is alone (SQLite), which costs nothing.

Why a keeper decides "held" from its own monotonic clock: the backend's grant is valid for ``ttl_s`` from
the moment the database ran the statement, which is after we sent it, so "held until send time + ttl_s"
ends no later than the grant. A holder that hangs (a stalled loop, a lost network) therefore stops
believing it holds the lease before anyone else may take it, and never acts on a lease it lost.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from storage import tasks
from storage.tasks import spawn

__all__ = ["AlwaysHeld", "Grant", "Lease", "LeaseBackend", "LeaseKeeper", "instance_id"]

logger = logging.getLogger(__name__)


def instance_id(name: str | None = None) -> str:
    """A holder name no other process will have: ``name`` (the instance's, default the host name), then
    this process's id and a random part (a restarted instance is a new holder)."""
    return f"{name or socket.gethostname()}/{os.getpid()}/{uuid.uuid4().hex[:8]}"


@dataclass(frozen=True)
class Grant:
    """The backend's answer to one attempt: ``held`` by us or not, and who holds it (None: nobody)."""

    held: bool
    holder: str | None
    epoch: int  # increments with every new holder (a fencing token); 0 when the lease never existed


class LeaseBackend(Protocol):
    """Where leases live; each call is one atomic statement and may raise on a database failure."""

    async def acquire(self, name: str, holder: str, ttl_s: float) -> Grant:
        """Take or renew ``name`` for ``holder`` for ``ttl_s`` if it is free, expired or already ours."""
        ...

    async def release(self, name: str, holder: str) -> None:
        """Give ``name`` up now if ``holder`` holds it."""
        ...

    async def close(self) -> None: ...


class Lease(Protocol):
    """What a job asks of its lease."""

    name: str
    shared: bool  # False for AlwaysHeld: nobody else can hold it, so there is nobody else to read from

    @property
    def held(self) -> bool:
        """True while this instance may do the job."""
        ...

    @property
    def epoch(self) -> int:
        """Changes whenever this instance's tenure starts anew (after a gap, someone else may have held it)."""
        ...

    @property
    def started(self) -> bool:
        """Between ``start()`` and ``stop()``."""
        ...

    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    def snapshot(self) -> dict[str, Any]:
        """For health: whether we hold it, who does, since when."""
        ...


class AlwaysHeld:
    """The lease of an instance with nobody to share with (SQLite): always held, nothing to renew."""

    shared = False

    def __init__(self, name: str, holder: str | None = None) -> None:
        self.name = name
        self.holder = holder or instance_id()

    @property
    def held(self) -> bool:
        return True

    @property
    def epoch(self) -> int:
        return 1

    @property
    def started(self) -> bool:
        return True

    async def start(self) -> None:
        """Nothing to take."""

    async def stop(self) -> None:
        """Nothing to give back."""

    def snapshot(self) -> dict[str, Any]:
        return {"name": self.name, "shared": False, "held": True, "holder": self.holder, "epoch": 1}


class LeaseKeeper:
    """Takes and renews lease ``name`` every ``renew_s`` through ``backend``; ``stop()`` releases it.

    ``ttl_s`` bounds how long the fleet is without a holder when the holder dies or hangs: the lease is
    free ``ttl_s`` after its last renewal, and a contender tries every ``renew_s``, so another instance
    holds it at most ``ttl_s + renew_s`` (plus one statement's time) after the holder stopped renewing.
    ``on_change(held)`` runs (in the keeper's task) whenever this instance gains or loses the lease.
    """

    shared = True

    def __init__(
        self,
        backend: LeaseBackend,
        name: str,
        *,
        ttl_s: float,
        renew_s: float | None = None,
        holder: str | None = None,
        on_change: Callable[[bool], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if ttl_s <= 0:
            raise ValueError(f"lease {name}: ttl_s must be positive, got {ttl_s}")
        self.backend = backend
        self.name = name
        self.ttl_s = ttl_s
        self.renew_s = renew_s if renew_s is not None else ttl_s / 3.0
        if not 0 < self.renew_s < ttl_s:
            raise ValueError(
                f"lease {name}: renew_s must be above 0 and below ttl_s ({ttl_s}), got {renew_s}"
            )
        self.holder = holder or instance_id()
        self.on_change = on_change
        self.clock = clock
        self._until = 0.0  # monotonic: we hold the lease until then (0: not held)
        self._epoch = 0
        self._tenure = 0  # our own count of tenures: epoch for Lease.epoch, immune to backend resets
        self.current_holder: str | None = None
        self.backend_epoch = 0
        self.acquired = 0  # how many times this instance took the lease
        self.errors = 0
        self.last_error: str | None = None
        self._was_held = False
        self._task: asyncio.Task[None] | None = None

    # -- state -----------------------------------------------------------------------------------

    @property
    def held(self) -> bool:
        return self.clock() < self._until

    @property
    def epoch(self) -> int:
        return self._tenure

    @property
    def started(self) -> bool:
        return self._task is not None

    def snapshot(self) -> dict[str, Any]:
        held = self.held
        # Ours lapsed before a renewal came back: who holds it now is unknown until the next answer.
        other = None if self.current_holder == self.holder else self.current_holder
        return {
            "name": self.name,
            "shared": True,
            "held": held,
            "holder": self.holder if held else other,
            "me": self.holder,
            "epoch": self.backend_epoch,
            "ttl_s": self.ttl_s,
            "renew_s": self.renew_s,
            "acquired": self.acquired,
            "errors": self.errors,
            "last_error": self.last_error,
        }

    # -- lifecycle -------------------------------------------------------------------------------

    async def start(self) -> None:
        """One attempt now (so the caller knows at once whether it holds the lease), then keep trying."""
        if self._task is not None:
            return
        await self.attempt()
        self._task = spawn(self._loop(), name=f"lease-{self.name}")

    async def stop(self) -> None:
        """Stop renewing and release the lease if we hold it, so another instance takes it at once."""
        task, self._task = self._task, None
        if task is not None:
            await tasks.stop(task)  # its backend may be Redis: a cancel swallowed there is asked again
        if self._until > 0.0:
            self._until = 0.0
            try:
                await asyncio.wait_for(self.backend.release(self.name, self.holder), timeout=self.ttl_s)
            except Exception as exc:  # it expires by itself within ttl_s
                logger.warning(
                    "lease %s: release failed (%s); it expires within %.1f s", self.name, exc, self.ttl_s
                )
            self._notify()
        await self.backend.close()

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.renew_s)
            await self.attempt()

    async def attempt(self) -> bool:
        """Take or renew the lease once; True when we hold it afterwards. Never raises for a database error."""
        sent = self.clock()
        try:
            # Bounded: a grant that arrives after it expired is worth nothing.
            grant = await asyncio.wait_for(
                self.backend.acquire(self.name, self.holder, self.ttl_s), timeout=self.ttl_s
            )
        except Exception as exc:
            self.errors += 1
            self.last_error = f"{type(exc).__name__}: {exc}"
            if self.held:
                logger.warning("lease %s: renewal failed (%s); held for at most %.1f s more", self.name,
                               self.last_error, self._until - self.clock())  # fmt: skip
            self._notify()
            return self.held
        self.current_holder, self.backend_epoch = grant.holder, grant.epoch
        if grant.held:
            # A new tenure when the backend says so (epoch) or when ours lapsed meanwhile (we stopped acting).
            if not self.held or grant.epoch != self._epoch:
                self._tenure += 1
                self.acquired += 1
                logger.info("lease %s: taken by %s (epoch %d)", self.name, self.holder, grant.epoch)
            self._epoch = grant.epoch
            self._until = sent + self.ttl_s
        else:
            self._until = 0.0
        self._notify()
        return self.held

    def _notify(self) -> None:
        held = self.held
        if held == self._was_held:
            return
        self._was_held = held
        if not held:
            # current_holder is the last grant seen: ours until another instance's renewal is read
            other = self.current_holder if self.current_holder != self.holder else None
            logger.info("lease %s: no longer held by %s (%s)", self.name, self.holder,
                        f"now held by {other}" if other else "free or not yet taken")  # fmt: skip
        if self.on_change is not None:
            self.on_change(held)
