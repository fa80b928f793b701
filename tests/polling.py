"""Waiting for a condition in tests: poll with a deadline, fail with a message (never a bare sleep)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

__all__ = ["until"]


async def until(predicate: Callable[[], Any], within: float = 10.0, what: str = "condition") -> None:
    """Return once ``predicate()`` is true; raise AssertionError after ``within`` seconds."""
    deadline = time.monotonic() + within
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not met within {within:g} s")
        await asyncio.sleep(0.01)
