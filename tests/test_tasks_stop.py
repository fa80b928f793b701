"""``storage.tasks.stop``: a background loop whose cancellation a client library swallowed still ends at
shutdown (the hang seen in tests/hostile/test_faults_redis.py on a busy machine: the auth gate's Redis probe
turned a cancel into an error and the loop ran on), and the caller's own cancellation is never swallowed."""

from __future__ import annotations

import asyncio

import pytest

import storage.tasks as tasks
from storage.tasks import spawn, stop


async def _loop_that_swallows(swallow: list[int], seen: list[str]) -> None:
    """A loop that survives errors, over a call that turns its next ``swallow[0]`` cancellations into errors."""
    while True:
        try:
            try:
                await asyncio.sleep(0.01)
            except asyncio.CancelledError as exc:
                if swallow[0] > 0:
                    swallow[0] -= 1
                    seen.append("swallowed")
                    raise ConnectionError("cancelled while waiting for a reply") from exc
                raise
        except ConnectionError:
            continue


async def test_a_swallowed_cancellation_is_asked_again(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tasks, "_RECANCEL_S", 0.05)
    seen: list[str] = []
    t = spawn(_loop_that_swallows([2], seen), "swallower")
    plain = spawn(asyncio.sleep(3600), "plain")
    await asyncio.sleep(0.02)
    await asyncio.wait_for(stop(t, plain), 10)
    assert t.done() and plain.done() and t.cancelled() and plain.cancelled()
    assert seen == ["swallowed", "swallowed"]  # one cancel would have left it running for ever
    await stop()  # nothing to stop: returns at once


async def test_the_callers_cancellation_ends_the_wait(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tasks, "_RECANCEL_S", 0.05)
    seen: list[str] = []
    budget = [10**9]
    t = spawn(_loop_that_swallows(budget, seen), "stubborn")  # swallows every cancellation for now
    waiter = asyncio.ensure_future(stop(t))
    await asyncio.sleep(0.3)
    assert not waiter.done() and len(seen) >= 2  # cancelled again and again while the caller waits
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    before = len(seen)
    await asyncio.sleep(0.2)
    assert len(seen) == before and not t.done()  # once the caller gave up, nobody cancels it any more
    budget[0] = 0
    await asyncio.wait_for(stop(t), 10)
    assert t.cancelled()
