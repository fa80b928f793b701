"""The emulator's ground truth: what each request really waited for and really sent.

Integration tests compare what the proxy recorded with these entries, so every duration here is the value
the emulator put on the wire (or would have, for cancelled requests), measured with ``time.monotonic_ns``.
Entries are appended when a request arrives and filled in as it runs; ``finished`` flips last.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

__all__ = ["ENTRY_KEY", "START_KEY", "GroundTruthLog", "LogEntry", "request_context"]

_ids = itertools.count(1)


@dataclass(slots=True)
class LogEntry:
    """One request as the emulator saw it. Times are ``time.monotonic()`` seconds; durations nanoseconds.

    ``status`` is the HTTP status sent, or 499 when the client left before any byte (Ollama's own code for
    that case, which nobody receives). ``bytes_sent`` counts body bytes the emulator wrote (no headers, no
    chunk framing). ``response_text`` holds the generated content, ``thinking_text`` the thinking part;
    the engine grows them a token at a time with ``add_text`` (constant work per token: the pieces are
    joined only when read, so a long stream costs linear time, not quadratic).
    """

    request_id: str
    method: str
    path: str
    arrived_at: float
    model: str | None = None
    status: int | None = None
    stream: bool | None = None
    headers_sent_at: float | None = None
    load_ns: int | None = None
    slot_wait_ns: int | None = None
    prompt_eval_ns: int | None = None
    eval_ns: int | None = None
    total_ns: int | None = None
    prompt_eval_count: int | None = None
    eval_count: int | None = None
    token_times: list[float] = field(default_factory=list)
    response_pieces: list[str] = field(default_factory=list, repr=False)
    thinking_pieces: list[str] = field(default_factory=list, repr=False)
    done_reason: str | None = None
    cancelled: bool = False
    error_injected: str | None = None
    error_message: str | None = None
    bytes_sent: int = 0
    finished_at: float | None = None
    finished: bool = False
    # Added after the control API's original keys, which keep their order.
    prompt_cached_count: int | None = None  # prompt tokens taken from the prefix cache (``prompt_rate`` on)

    @property
    def response_text(self) -> str:
        return _joined(self.response_pieces)

    @response_text.setter
    def response_text(self, value: str) -> None:
        self.response_pieces[:] = [value] if value else []

    @property
    def thinking_text(self) -> str:
        return _joined(self.thinking_pieces)

    @thinking_text.setter
    def thinking_text(self, value: str) -> None:
        self.thinking_pieces[:] = [value] if value else []

    def add_text(self, piece: str, thinking: bool) -> None:
        """Append one token's text to the response (or thinking) text: O(1), whatever the length so far."""
        (self.thinking_pieces if thinking else self.response_pieces).append(piece)

    def to_json(self) -> dict[str, Any]:
        """The entry as the control API shows it: ``response_text``/``thinking_text`` in place of pieces."""
        out = dataclasses.asdict(self)
        return {
            _JSON_NAMES.get(key, key): _joined(value) if key in _JSON_NAMES else value
            for key, value in out.items()
        }


_JSON_NAMES = {"response_pieces": "response_text", "thinking_pieces": "thinking_text"}


def _joined(pieces: list[str]) -> str:
    """The pieces as one string; they are collapsed in place, so reading again costs nothing more."""
    if len(pieces) > 1:
        pieces[:] = ["".join(pieces)]
    return pieces[0] if pieces else ""


class GroundTruthLog:
    """A bounded list of entries plus an in-flight counter that ``wait_idle`` can await."""

    def __init__(self, size: int) -> None:
        self._entries: deque[LogEntry] = deque(maxlen=size)
        self._in_flight = 0
        self._idle = asyncio.Event()
        self._idle.set()

    @staticmethod
    def new_id() -> str:
        return f"emu-{next(_ids)}"

    def begin(self, entry: LogEntry) -> None:
        self._entries.append(entry)
        self._in_flight += 1
        self._idle.clear()

    def end(self, entry: LogEntry, finished_at: float) -> None:
        entry.finished_at = finished_at
        entry.finished = True
        self._in_flight -= 1
        if self._in_flight == 0:
            self._idle.set()

    @property
    def entries(self) -> list[LogEntry]:
        return list(self._entries)

    @property
    def in_flight(self) -> int:
        return self._in_flight

    def clear(self) -> None:
        self._entries.clear()

    async def wait_idle(self) -> None:
        await self._idle.wait()


ENTRY_KEY = web.RequestKey("emulator_entry", LogEntry)
START_KEY = web.RequestKey("emulator_start_ns", int)


def request_context(request: web.Request) -> tuple[LogEntry, int]:
    """The ground-truth entry and handler-entry time (monotonic ns) the app middleware put on the request."""
    return request[ENTRY_KEY], request[START_KEY]
