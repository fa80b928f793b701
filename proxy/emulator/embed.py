"""``/api/embed`` (normalised float32, metrics) and ``/api/embeddings`` (legacy float64, no metrics).

``run_embedding`` is the timed core, shared with ``/v1/embeddings``: schedule, one slot (embedding models
run with ``num_parallel=1``), a real ``prompt_eval`` wait, done. No tokens are generated.
"""

from __future__ import annotations

import asyncio
import math
import time
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from . import gojson
from .config import DEFAULT_ERROR_MESSAGE, Knobs, ModelSpec
from .engine import BUSY_MESSAGE, scheduled
from .gojson import Float32
from .groundtruth import LogEntry, request_context
from .native import JSON_CT, error_response
from .parsing import ApiError, knobs_for, lookup_model, parse_keep_alive, read_body
from .scheduler import QueueFullError
from .state import EMULATOR_KEY, Emulator
from .textgen import count_words, embedding, legacy_embedding

__all__ = ["EmbedResult", "embed", "embeddings", "run_embedding"]


@dataclass(frozen=True, slots=True)
class EmbedResult:
    """Durations as reported, plus the prompt token count."""

    load_ns: int
    total_ns: int
    prompt_eval_count: int


def embed_tokens(inputs: list[str]) -> int:
    """Words plus two special tokens per input (CLS/SEP)."""
    return sum(count_words(text) + 2 for text in inputs)


async def run_embedding(
    emu: Emulator,
    entry: LogEntry,
    spec: ModelSpec,
    inputs: list[str],
    keep_alive_s: float,
    knobs: Knobs,
    start_ns: int,
) -> EmbedResult:
    """Wait like a real embedding call and fill the ground truth; raise ``ApiError`` for injected failures."""
    entry.stream, entry.error_injected = False, knobs.injected
    count = embed_tokens(inputs)
    entry.prompt_eval_count = count
    if knobs.stall_s:
        await asyncio.sleep(knobs.stall_s)
    if knobs.error_status is not None:
        raise ApiError(knobs.error_status, knobs.error_message or DEFAULT_ERROR_MESSAGE)
    try:
        async with scheduled(emu, spec.name, keep_alive_s, knobs.load_s):
            loaded_ns = time.monotonic_ns()
            entry.load_ns = loaded_ns - start_ns
            async with emu.scheduler.runtime(spec.name).slots:
                slot_ns = time.monotonic_ns()
                entry.slot_wait_ns = slot_ns - loaded_ns
                delay = knobs.prompt_eval_s if knobs.prompt_eval_s is not None else emu.config.prompt_eval_s
                await asyncio.sleep(delay)
                done_ns = time.monotonic_ns()
    except QueueFullError:
        raise ApiError(503, BUSY_MESSAGE) from None
    entry.prompt_eval_ns = done_ns - slot_ns
    entry.eval_count, entry.eval_ns = 0, 0
    entry.total_ns = done_ns - start_ns
    entry.done_reason = "stop"
    return EmbedResult(load_ns=entry.load_ns, total_ns=entry.total_ns, prompt_eval_count=count)


def vectors(spec: ModelSpec, inputs: list[str], dimensions: int | None) -> list[list[float]]:
    """Unit vectors, truncated to ``dimensions`` and re-normalised when asked."""
    out = []
    for text in inputs:
        vector = embedding(text, spec.embedding_length)
        if dimensions:
            vector = vector[:dimensions]
            norm = math.sqrt(sum(x * x for x in vector)) or 1.0
            vector = [Float32(x / norm) for x in vector]
        out.append(vector)
    return out


async def _load_only(
    emu: Emulator, entry: LogEntry, spec: ModelSpec, keep_alive_s: float, start_ns: int
) -> None:
    async with scheduled(emu, spec.name, keep_alive_s, None):
        entry.load_ns = time.monotonic_ns() - start_ns
    entry.done_reason = "load"


def _json(body: dict[str, Any]) -> web.Response:
    return web.Response(status=200, body=gojson.dumps(body), headers={"Content-Type": JSON_CT})


async def embed(request: web.Request) -> web.StreamResponse:
    """``POST /api/embed``."""
    emu = request.app[EMULATOR_KEY]
    entry, start_ns = request_context(request)
    try:
        values = await read_body(
            request,
            ("model", "input", "truncate", "dimensions", "options", "keep_alive"),
            {"model": "string", "truncate": "bool", "dimensions": "int", "options": "object"},
            "EmbedRequest",
        )
        requested = values.get("model") or ""
        entry.model = requested or None
        spec = lookup_model(emu, requested, empty_status=404)
        raw = values.get("input")
        if raw is None or raw == "":
            inputs: list[str] = []
        elif isinstance(raw, str):
            inputs = [raw]
        elif isinstance(raw, list) and all(isinstance(item, str) for item in raw):
            inputs = list(raw)
        else:
            raise ApiError(400, "invalid input type")
        keep_alive_s = parse_keep_alive(values.get("keep_alive"), emu.config.keep_alive_s)
        knobs = knobs_for(emu, request)
        if not inputs:
            await _load_only(emu, entry, spec, keep_alive_s, start_ns)
            return _json({"model": requested, "embeddings": []})
        result = await run_embedding(emu, entry, spec, inputs, keep_alive_s, knobs, start_ns)
    except ApiError as exc:
        entry.error_message = exc.message
        return error_response(exc.status, exc.message)
    body: dict[str, Any] = {
        "model": requested,
        "embeddings": vectors(spec, inputs, values.get("dimensions")),
        "total_duration": result.total_ns,
        "load_duration": result.load_ns,
        "prompt_eval_count": result.prompt_eval_count,
    }
    return _json(body)


async def embeddings(request: web.Request) -> web.StreamResponse:
    """``POST /api/embeddings`` (legacy): ``{"embedding": [...]}``, no metrics on the wire."""
    emu = request.app[EMULATOR_KEY]
    entry, start_ns = request_context(request)
    try:
        values = await read_body(
            request,
            ("model", "prompt", "options", "keep_alive"),
            {"model": "string", "prompt": "string", "options": "object"},
            "EmbeddingRequest",
        )
        requested = values.get("model") or ""
        entry.model = requested or None
        spec = lookup_model(emu, requested, empty_status=400)
        keep_alive_s = parse_keep_alive(values.get("keep_alive"), emu.config.keep_alive_s)
        knobs = knobs_for(emu, request)
        prompt = values.get("prompt") or ""
        if not prompt:
            await _load_only(emu, entry, spec, keep_alive_s, start_ns)
            return _json({"embedding": []})
        await run_embedding(emu, entry, spec, [prompt], keep_alive_s, knobs, start_ns)
    except ApiError as exc:
        entry.error_message = exc.message
        return error_response(exc.status, exc.message)
    return _json({"embedding": legacy_embedding(prompt, spec.embedding_length)})
