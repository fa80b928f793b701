"""Helpers for the alerts tests: a real webhook receiver on loopback, and request helpers."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from aiohttp import web


@dataclass
class Received:
    at: float  # time.monotonic() when the request arrived
    headers: dict[str, str]
    body: bytes

    @property
    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class Receiver:
    """A webhook receiver; ``status`` and ``delay_s`` decide how it answers (changeable mid-test)."""

    url: str = ""
    status: int = 200
    delay_s: float = 0.0
    hits: list[Received] = field(default_factory=list)  # every attempt, answered or not

    def events(self, event: str | None = None) -> list[dict[str, Any]]:
        """Bodies of the attempts that were answered 2xx... all attempts, filtered by event."""
        out = [h.json for h in self.hits]
        return [b for b in out if event is None or b.get("event") == event]

    async def wait_for(self, n: int, event: str | None = None, within: float = 10.0) -> list[dict[str, Any]]:
        deadline = time.monotonic() + within
        while True:
            got = self.events(event)
            if len(got) >= n:
                return got
            if time.monotonic() > deadline:
                raise AssertionError(f"expected {n} {event or ''} notification(s), got {len(got)}: {got}")
            await asyncio.sleep(0.02)


@asynccontextmanager
async def webhook_receiver(status: int = 200, delay_s: float = 0.0) -> AsyncIterator[Receiver]:
    receiver = Receiver(status=status, delay_s=delay_s)

    async def handle(request: web.Request) -> web.Response:
        body = await request.read()
        receiver.hits.append(Received(time.monotonic(), dict(request.headers), body))
        if receiver.delay_s:
            await asyncio.sleep(receiver.delay_s)
        return web.Response(status=receiver.status, text="ok" if receiver.status < 300 else "nope")

    app = web.Application()
    app.router.add_post("/hook", handle)
    runner = web.AppRunner(app, handler_cancellation=True)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    receiver.url = f"http://127.0.0.1:{port}/hook"
    try:
        yield receiver
    finally:
        await runner.cleanup()


async def generate(
    session: aiohttp.ClientSession, base: str, model: str = "llama3.2", emulate: str | None = None
) -> tuple[int, float]:
    """One non-streamed /api/generate through ``base``; (status, seconds taken)."""
    headers = {"X-Emulate": emulate} if emulate else {}
    start = time.perf_counter()
    async with session.post(
        f"{base}/api/generate", json={"model": model, "prompt": "hi", "stream": False}, headers=headers
    ) as resp:
        await resp.read()
        return resp.status, time.perf_counter() - start


async def get_json(session: aiohttp.ClientSession, url: str) -> tuple[int, Any]:
    async with session.get(url) as resp:
        return resp.status, await resp.json()
