"""Helpers for the dashboard tests: a real SSE reader over aiohttp, and traffic through the proxy."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from typing import Any

import aiohttp


class SseReader:
    """Reads ``GET /ollamon/api/live`` as a browser would: events split on blank lines, ``data:`` joined."""

    def __init__(self, resp: aiohttp.ClientResponse) -> None:
        self.resp = resp
        self.frames: list[dict[str, Any]] = []
        self.fields: list[tuple[str, str]] = []  # every (field, value) line seen, comments as ("", text)
        self._buf = b""

    def close(self) -> None:
        self.resp.close()

    async def next_frame(self, within: float = 10.0) -> dict[str, Any]:
        deadline = time.monotonic() + within
        while True:
            while b"\n\n" in self._buf:
                event, self._buf = self._buf.split(b"\n\n", 1)
                data = []
                for line in event.decode().split("\n"):
                    name, _, value = line.partition(":")
                    value = value[1:] if value.startswith(" ") else value
                    self.fields.append((name, value))
                    if name == "data":
                        data.append(value)
                if data:
                    frame: dict[str, Any] = json.loads("\n".join(data))
                    self.frames.append(frame)
                    return frame
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no live frame within {within} s")
            chunk = await asyncio.wait_for(self.resp.content.readany(), left)
            if not chunk:
                raise EOFError("the live stream ended")
            self._buf += chunk

    async def frame_where(
        self, predicate: Callable[[dict[str, Any]], Any], within: float = 15.0, what: str = "frame"
    ) -> dict[str, Any]:
        """The first frame from now on for which ``predicate`` holds."""
        deadline = time.monotonic() + within
        last: dict[str, Any] | None = None
        while time.monotonic() < deadline:
            last = await self.next_frame(max(0.1, deadline - time.monotonic()))
            if predicate(last):
                return last
        raise AssertionError(f"{what} not seen within {within} s; last frame: {last}")


async def generate(
    session: aiohttp.ClientSession,
    base: str,
    model: str = "llama3.2",
    emulate: str | None = None,
    stream: bool = False,
    request_id: str | None = None,
) -> int:
    """One /api/generate through ``base``, read to the end; its status."""
    headers = {"X-Emulate": emulate} if emulate else {}
    if request_id:
        headers["X-Request-Id"] = request_id
    async with session.post(
        f"{base}/api/generate", json={"model": model, "prompt": "hi", "stream": stream}, headers=headers
    ) as resp:
        await resp.read()
        return resp.status
