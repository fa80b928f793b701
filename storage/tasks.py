"""The one way to start a background task: named, referenced, and its failure logged."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from typing import Any, TypeVar

__all__ = ["spawn", "stop"]

logger = logging.getLogger(__name__)
T = TypeVar("T")

_live: set[asyncio.Task[Any]] = set()
_RECANCEL_S = 1.0  # how long a cancelled task may take to end before it is cancelled again


def _done(task: asyncio.Task[Any]) -> None:
    _live.discard(task)
    if not task.cancelled() and task.exception() is not None:
        logger.error("background task %s failed", task.get_name(), exc_info=task.exception())


def spawn(coro: Coroutine[Any, Any, T], name: str) -> asyncio.Task[T]:
    """Start ``coro`` as a named task that is kept alive until done and whose crash is logged."""
    task = asyncio.create_task(coro, name=name)  # noqa: TID251 - this is the helper
    _live.add(task)
    task.add_done_callback(_done)
    return task


async def stop(*tasks: asyncio.Task[Any]) -> None:
    """Cancel ``tasks`` and wait until every one has ended (their failures are logged by ``spawn``).

    A cancellation can be swallowed below the task's own code: a client library that catches it in a race
    with a timeout (Python 3.11's ``asyncio.timeout`` and redis-py under load) turns it into an ordinary
    error, and a loop that survives errors then runs on, so a single ``cancel()`` and ``await`` would wait
    forever. A task still running after ``_RECANCEL_S`` is cancelled again, as often as it takes. The
    caller's own cancellation is not swallowed: it ends the wait at once."""
    for t in tasks:
        t.cancel()
    pending = {t for t in tasks if not t.done()}
    while pending:
        _, pending = await asyncio.wait(pending, timeout=_RECANCEL_S)
        for t in pending:
            logger.debug("task %s still running after its cancellation: cancelled again", t.get_name())
            t.cancel()
