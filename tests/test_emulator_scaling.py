"""The emulator's per-token work stays constant however long a response grows.

It once re-joined the whole response text on every token (quadratic): 200 long streams took tens of
seconds of emulator CPU and stalled every test that shared it. These tests pin the ground-truth shape the
fix had to keep and the cost it had to remove.
"""

from __future__ import annotations

import dataclasses
import json
import statistics
import time

import aiohttp

from proxy.emulator.groundtruth import LogEntry
from tests.fixtures.emulator import MakeEmulator

_OLD_KEYS = [
    "request_id", "method", "path", "arrived_at", "model", "status", "stream", "headers_sent_at", "load_ns",
    "slot_wait_ns", "prompt_eval_ns", "eval_ns", "total_ns", "prompt_eval_count", "eval_count", "token_times",
    "response_text", "thinking_text", "done_reason", "cancelled", "error_injected", "error_message",
    "bytes_sent", "finished_at", "finished",
]  # fmt: skip


def test_log_entry_text_grows_by_piece_and_serialises_as_before() -> None:
    entry = LogEntry(request_id="r", method="POST", path="/api/chat", arrived_at=1.0)
    assert entry.response_text == "" and entry.thinking_text == ""
    for piece in ("Hmm", " so"):
        entry.add_text(piece, thinking=True)
    for piece in ("The", " sky", " <is>"):
        entry.add_text(piece, thinking=False)
    assert entry.response_text == "The sky <is>" and entry.thinking_text == "Hmm so"
    entry.add_text(" blue", thinking=False)  # reading collapsed the pieces; appending still works
    assert entry.response_text == "The sky <is> blue"
    entry.response_text = "replaced"
    assert entry.response_text == "replaced"
    out = entry.to_json()
    # The control API (/_emulator/log) keeps its keys, their order and plain string values.
    assert list(out)[: len(_OLD_KEYS)] == _OLD_KEYS  # new keys only ever come after the old ones
    assert out["response_text"] == "replaced" and out["thinking_text"] == "Hmm so"
    assert json.loads(json.dumps(out)) == out


def test_log_entry_copies_are_independent() -> None:
    entry = LogEntry(request_id="r", method="POST", path="/api/generate", arrived_at=1.0)
    entry.add_text("a", thinking=False)
    twin = dataclasses.replace(entry, response_pieces=list(entry.response_pieces))
    twin.add_text("b", thinking=False)
    assert entry.response_text == "a" and twin.response_text == "ab"


async def _per_token_s(url: str, session: aiohttp.ClientSession, tokens: int) -> float:
    """Seconds per token of one non-streamed generate with no pacing: the engine's own per-token cost."""
    body = {"model": "llama3.2", "prompt": "scale", "stream": False}
    start = time.perf_counter()
    async with session.post(
        f"{url}/api/generate", json=body, headers={"X-Emulate": f"tokens={tokens}; interval_ms=0"}
    ) as r:
        data = await r.json()
    took = time.perf_counter() - start
    assert r.status == 200 and data["eval_count"] == tokens
    return took / tokens


async def test_time_per_token_does_not_grow_with_response_length(make_emulator: MakeEmulator) -> None:
    # With the quadratic join, a 40,000-token answer cost ~20x more per token than a 2,000-token one
    # (each token copied the ~120k characters before it). Linear work keeps the ratio near 1; the bound
    # of 4 leaves room for a busy machine, and medians of 3 damp one-off stalls.
    emulator = await make_emulator(start_loaded=True, prompt_eval_s=0.0, token_interval_s=0.0)
    async with aiohttp.ClientSession() as s:
        await _per_token_s(emulator.url, s, 100)  # warm-up: first-request costs out of the figures
        short = statistics.median([await _per_token_s(emulator.url, s, 2_000) for _ in range(3)])
        long = statistics.median([await _per_token_s(emulator.url, s, 40_000) for _ in range(3)])
    assert long < short * 4, f"per token: {short * 1e6:.1f} us at 2,000 tokens, {long * 1e6:.1f} us at 40,000"
    # The ground truth still holds the whole text, equal to what was sent.
    entry = emulator.emu.log[-1]
    assert entry.eval_count == 40_000 and len(entry.response_text.split(" ")) == 40_000
