"""The one way to start a background task: named, referenced, and its failure logged."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from typing import Any, TypeVar

__all__ = ["spawn"]

logger = logging.getLogger(__name__)
T = TypeVar("T")

_live: set[asyncio.Task[Any]] = set()


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
