"""The timed core of one inference: schedule, wait for a slot, evaluate the prompt, stream tokens.

Route modules decide *what* the bytes look like (a ``Renderer``); this module decides *when* they are sent
and measures it, with Ollama's checkpoints (spec §3.3, §10):

* ``load_duration`` = handler entry -> model scheduled (includes ``stall_ms``, queueing and loading);
* the parallel-slot wait comes next and shows only in ``total_duration``;
* ``prompt_eval_duration`` = slot acquired -> first token produced;
* ``eval_duration`` = first token produced -> last token produced;
* ``total_duration`` = handler entry -> just before the final line is built.

Headers go out with the first line, never earlier, and every line is its own ``write`` (one chunk, flushed).
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import Protocol

from aiohttp import web

from .config import DEFAULT_ERROR_MESSAGE, Knobs
from .groundtruth import LogEntry
from .scheduler import ModelRuntime, QueueFullError
from .state import Emulator
from .textgen import message_part, now_rfc3339, token_text

__all__ = [
    "BUSY_MESSAGE",
    "Outcome",
    "Plan",
    "Renderer",
    "Token",
    "run_inference",
    "scheduled",
    "send_body",
]

logger = logging.getLogger(__name__)

BUSY_MESSAGE = "server busy, please try again.  maximum pending requests exceeded"


@dataclass(frozen=True, slots=True)
class Token:
    """One generated token; ``thinking`` tokens go to the thinking/reasoning field."""

    index: int
    text: str
    thinking: bool


@dataclass(slots=True)
class Outcome:
    """Everything a final line or a non-streamed body reports."""

    created_at: str
    text: str
    thinking: str
    done_reason: str
    total_ns: int
    load_ns: int
    prompt_eval_count: int
    prompt_eval_ns: int
    eval_count: int
    eval_ns: int


@dataclass(slots=True)
class Plan:
    """What a parsed request asks the model to do."""

    model: str  # the installed (normalised) name
    stream: bool
    prompt_eval_count: int
    tokens: int
    done_reason: str
    seed: int
    keep_alive_s: float
    knobs: Knobs
    think_tokens: int = 0
    extra: dict[str, object] = field(default_factory=dict)
    # The prompt as (fingerprint, tokens) parts summing to ``prompt_eval_count``, for the prefix cache
    # (config ``prompt_rate``); empty: the route keeps no cache.
    prompt_parts: tuple[tuple[str, int], ...] = ()


class Renderer(Protocol):
    """How one route turns tokens and outcomes into bytes."""

    stream_content_type: str

    def token(self, token: Token) -> list[bytes]: ...

    def final(self, outcome: Outcome) -> list[bytes]: ...

    def mid_error(self, message: str) -> list[bytes]: ...

    def single(self, outcome: Outcome) -> tuple[bytes, str]: ...

    def error(self, status: int, message: str, in_stream: bool) -> web.Response: ...


def _now_ns() -> int:
    return time.monotonic_ns()


def send_body(status: int, body: bytes, content_type: str) -> web.Response:
    """A complete body; the app middleware sends it (chunked above Go's 2 KB buffer) and times it."""
    return web.Response(status=status, body=body, headers={"Content-Type": content_type})


def _mark_error(entry: LogEntry, response: web.Response, message: str) -> web.Response:
    entry.status = response.status
    entry.error_message = message
    return response


class scheduled:
    """``async with scheduled(...)``: schedule the model, hold a reference, and release it on exit."""

    def __init__(self, emu: Emulator, model: str, keep_alive_s: float, force_load_s: float | None) -> None:
        self._emu, self._model, self._keep_alive_s, self._force = emu, model, keep_alive_s, force_load_s

    async def __aenter__(self) -> None:
        await self._emu.scheduler.schedule(self._model, self._keep_alive_s, self._force)

    async def __aexit__(self, *exc: object) -> None:
        self._emu.scheduler.release(self._model, self._keep_alive_s)


async def _sleep_until(deadline_ns: int) -> None:
    delay = (deadline_ns - _now_ns()) / 1e9
    if delay > 0:
        await asyncio.sleep(delay)


async def run_inference(
    request: web.Request,
    emu: Emulator,
    entry: LogEntry,
    plan: Plan,
    renderer: Renderer,
    start_ns: int,
) -> web.StreamResponse:
    """Run ``plan`` with real waits, writing through ``renderer``; fills ``entry`` with the ground truth."""
    knobs = plan.knobs
    entry.stream, entry.error_injected = plan.stream, knobs.injected
    entry.prompt_eval_count = plan.prompt_eval_count
    if knobs.stall_s:
        await asyncio.sleep(knobs.stall_s)
    message = knobs.error_message or DEFAULT_ERROR_MESSAGE
    if knobs.error_status is not None:
        return _mark_error(entry, renderer.error(knobs.error_status, message, plan.stream), message)
    try:
        async with scheduled(emu, plan.model, plan.keep_alive_s, knobs.load_s):
            loaded_ns = _now_ns()
            entry.load_ns = loaded_ns - start_ns
            runtime = emu.scheduler.runtime(plan.model)
            async with runtime.slots:
                slot_ns = _now_ns()
                entry.slot_wait_ns = slot_ns - loaded_ns
                prompt_eval_s, interval_s = config_interval(emu, knobs)
                rate = emu.config.prompt_rate if plan.prompt_parts else 0.0
                if rate > 0:
                    cached = _cached_tokens(runtime, plan)
                    entry.prompt_cached_count = cached
                    prompt_eval_s += (plan.prompt_eval_count - cached) / rate
                response = await _generate(
                    request, entry, plan, renderer, start_ns, slot_ns, (prompt_eval_s, interval_s)
                )
                if rate > 0 and entry.done_reason is not None:
                    _remember(runtime, plan, entry.response_text)
                return response
    except QueueFullError:
        return _mark_error(entry, renderer.error(503, BUSY_MESSAGE, False), BUSY_MESSAGE)


def _match(cached: tuple[tuple[str, int], ...], parts: tuple[tuple[str, int], ...]) -> int:
    """Tokens of the leading parts ``parts`` shares with ``cached``."""
    tokens = 0
    for a, b in zip(cached, parts, strict=False):
        if a != b:
            break
        tokens += b[1]
    return tokens


def _cached_tokens(runtime: ModelRuntime, plan: Plan) -> int:
    """Prompt tokens the best-matching slot already holds; at least one token is always evaluated."""
    best = max((_match(c, plan.prompt_parts) for c in runtime.prefix_cache), default=0)
    return max(0, min(best, plan.prompt_eval_count - 1))


def _remember(runtime: ModelRuntime, plan: Plan, answer: str) -> None:
    """The slot now holds this prompt and its answer; the least recently used slot's prompt goes."""
    held = (*plan.prompt_parts, message_part("assistant", answer))
    cache = runtime.prefix_cache
    scores = [_match(c, plan.prompt_parts) for c in cache]
    if scores and max(scores) > 0:
        del cache[scores.index(max(scores))]
    cache.append(held)
    del cache[: max(0, len(cache) - runtime.num_parallel)]


def config_interval(emu: Emulator, knobs: Knobs) -> tuple[float, float]:
    """(prompt eval seconds, token interval seconds) for this request."""
    prompt_eval = knobs.prompt_eval_s if knobs.prompt_eval_s is not None else emu.config.prompt_eval_s
    interval = knobs.interval_s if knobs.interval_s is not None else emu.config.token_interval_s
    return prompt_eval, interval


async def _generate(
    request: web.Request,
    entry: LogEntry,
    plan: Plan,
    renderer: Renderer,
    start_ns: int,
    slot_ns: int,
    timing: tuple[float, float],
) -> web.StreamResponse:
    prompt_eval_s, interval_s = timing
    knobs = plan.knobs
    await asyncio.sleep(prompt_eval_s)
    first_ns = last_ns = _now_ns()
    entry.prompt_eval_ns = first_ns - slot_ns
    response: web.StreamResponse | None = None
    message = knobs.error_message or DEFAULT_ERROR_MESSAGE
    script = plan.extra.get("script")  # a scripted answer (proxy/emulator/guard.py), else generated text
    for index in range(plan.tokens):
        if index:
            await _sleep_until(first_ns + round(index * interval_s * 1e9))
            last_ns = _now_ns()
        is_thinking = index < plan.think_tokens
        piece = (
            str(script[index])
            if isinstance(script, list)
            else token_text(plan.seed + (1 if is_thinking else 0), index)
        )
        token = Token(index=index, text=piece, thinking=is_thinking)
        entry.eval_count = index + 1
        entry.eval_ns = last_ns - first_ns
        if plan.stream:
            if response is None:
                response = await _open_stream(request, entry, renderer)
            await _write(response, entry, renderer.token(token))
            entry.token_times.append(time.monotonic())
        entry.add_text(piece, is_thinking)  # after the write, as before: a cancelled write adds nothing
        if knobs.close_after is not None and index + 1 >= knobs.close_after:
            return _abort(request, entry, response)
        if knobs.error_after is not None and index + 1 >= knobs.error_after:
            return await _fail(request, entry, renderer, response, message)
        if knobs.truncate_after is not None and index + 1 >= knobs.truncate_after:
            return await _truncate(request, entry, renderer, response)
    if knobs.close_after is not None:
        return _abort(request, entry, response)
    if knobs.error_after is not None:
        return await _fail(request, entry, renderer, response, message)
    if knobs.truncate_after is not None:
        return await _truncate(request, entry, renderer, response)
    end_ns = _now_ns()
    outcome = Outcome(
        created_at=now_rfc3339(),
        text=entry.response_text,
        thinking=entry.thinking_text,
        done_reason=plan.done_reason,
        total_ns=end_ns - start_ns,
        load_ns=entry.load_ns or 0,
        prompt_eval_count=plan.prompt_eval_count,
        prompt_eval_ns=first_ns - slot_ns,
        eval_count=plan.tokens,
        eval_ns=last_ns - first_ns if plan.tokens else 0,
    )
    entry.eval_count, entry.eval_ns, entry.total_ns = outcome.eval_count, outcome.eval_ns, outcome.total_ns
    entry.done_reason = outcome.done_reason
    if not plan.stream:
        body, content_type = renderer.single(outcome)
        return send_body(200, body, content_type)
    if response is None:
        response = await _open_stream(request, entry, renderer)
    await _write(response, entry, renderer.final(outcome))
    await response.write_eof()
    return response


async def _open_stream(request: web.Request, entry: LogEntry, renderer: Renderer) -> web.StreamResponse:
    response = web.StreamResponse(status=200, headers={"Content-Type": renderer.stream_content_type})
    response.enable_chunked_encoding()
    await response.prepare(request)
    entry.headers_sent_at = time.monotonic()
    entry.status = 200
    return response


async def _write(response: web.StreamResponse, entry: LogEntry, pieces: list[bytes]) -> None:
    for piece in pieces:
        await response.write(piece)
        entry.bytes_sent += len(piece)


def _abort(request: web.Request, entry: LogEntry, response: web.StreamResponse | None) -> web.StreamResponse:
    """``close_after``: drop the TCP connection mid-stream, with no done line and no error."""
    entry.error_message = "connection closed by X-Emulate close_after"
    if request.transport is not None:
        request.transport.abort()
    # aiohttp needs a response object; the connection is gone, so nothing of it reaches the wire
    return response if response is not None else web.Response(status=200)


async def _truncate(
    request: web.Request, entry: LogEntry, renderer: Renderer, response: web.StreamResponse | None
) -> web.StreamResponse:
    """``truncate_after``: end the stream cleanly with no final line or terminal event (and no error)."""
    entry.error_message = "stream ended by X-Emulate truncate_after"
    if not entry.stream:
        return _abort(request, entry, response)  # a body cannot end early; a cut is the nearest thing
    if response is None:
        response = await _open_stream(request, entry, renderer)
    await response.write_eof()
    return response


async def _fail(
    request: web.Request,
    entry: LogEntry,
    renderer: Renderer,
    response: web.StreamResponse | None,
    message: str,
) -> web.StreamResponse:
    """``error_after``: a mid-stream error line (200), or a 500 when nothing was sent yet."""
    entry.error_message = message
    if response is None:
        return _mark_error(entry, renderer.error(500, message, entry.stream is True), message)
    await _write(response, entry, renderer.mid_error(message))
    await response.write_eof()
    return response
