"""A record's token counts: Ollama's own, a ``usage`` object's, or an estimate, calibrated when it can be.

Runs in ``Capture.build`` on the writer's worker thread. docs/metrics.md (*Token counts*, *Calibrated
estimates*) defines the three sources; ``proxy/forward/calibration.py`` the calibration, which learns here
from every record that has exact counts and is applied here to the ones that do not.
"""

from __future__ import annotations

from typing import Any

from proxy.forward.calibration import Calibration
from proxy.forward.request_json import RequestFacts
from proxy.forward.streams import StreamFacts
from proxy.forward.tokens import encoding_name, estimate_tokens
from storage.records import InferenceRecord

__all__ = ["apply_tokens"]

_LOAD_REASONS = ("load", "unload")
# Samples whose template holds more than the text (images, tool schemas, a raw or continued prompt) would
# teach the calibration the wrong overhead.
_NOT_LEARNED = ("images", "tools", "raw", "context")


def apply_tokens(
    rec: InferenceRecord,
    req: RequestFacts | None,
    facts: StreamFacts | None,
    meta: dict[str, Any],
    calibration: Calibration | None = None,
) -> None:
    """Fill ``prompt_tokens``, ``completion_tokens``, ``total_tokens`` and ``token_source``."""
    if facts is not None and rec.done_reason in _LOAD_REASONS:
        return
    # Ollama's counters are authoritative only on a finished answer (a done line or a whole JSON body).
    if facts is not None and facts.prompt_eval_count is not None and facts.complete:
        rec.prompt_tokens = facts.prompt_eval_count
        rec.completion_tokens = facts.eval_count or 0
        rec.token_source = "ollama"
    elif facts is not None and facts.usage_prompt_tokens is not None:
        rec.prompt_tokens = facts.usage_prompt_tokens
        rec.completion_tokens = facts.usage_completion_tokens or 0
        rec.token_source = "usage"
    else:
        _estimate(rec, req, facts, meta, calibration)
        if rec.token_source is None:
            return
    if calibration is not None and rec.token_source != "estimate":
        _learn(calibration, rec, req, facts)
    rec.total_tokens = (rec.prompt_tokens or 0) + (rec.completion_tokens or 0)


def _estimate(
    rec: InferenceRecord,
    req: RequestFacts | None,
    facts: StreamFacts | None,
    meta: dict[str, Any],
    calibration: Calibration | None,
) -> None:
    prompt = req.prompt_text if req is not None else ""
    seen = (facts.response_text + facts.thinking_text) if facts is not None else ""
    if not prompt and not seen:
        return
    rec.prompt_tokens = estimate_tokens(prompt) if prompt else 0
    rec.completion_tokens = estimate_tokens(seen) if seen else 0
    if facts is not None and facts.text_dropped_bytes and facts.text_kept_bytes:
        # Only the first MAX_TEXT_BYTES were kept: scale the estimate by the bytes really sent.
        ratio = (facts.text_kept_bytes + facts.text_dropped_bytes) / facts.text_kept_bytes
        rec.completion_tokens = round(rec.completion_tokens * ratio)
        meta["estimate_scaled_from_bytes"] = facts.text_kept_bytes
    rec.token_source = "estimate"
    meta["estimate_encoding"] = encoding_name()
    if calibration is None:
        return
    applied: dict[str, Any] = {}
    fit = calibration.prompt_fit(rec.model_name) if req is not None and req.turns > 0 else None
    if fit is not None and req is not None:
        applied["prompt_uncalibrated"] = rec.prompt_tokens
        applied["prompt_samples"] = fit.samples
        rec.prompt_tokens = fit.apply(rec.prompt_tokens, req.turns)
    done = calibration.completion_ratio(rec.model_name) if rec.completion_tokens else None
    if done is not None:
        applied["completion_uncalibrated"] = rec.completion_tokens
        applied["completion_samples"] = done[1]
        rec.completion_tokens = round(rec.completion_tokens * done[0])
    if applied:
        meta["estimate_calibration"] = applied


def _learn(
    calibration: Calibration, rec: InferenceRecord, req: RequestFacts | None, facts: StreamFacts | None
) -> None:
    """One sample from a record with exact counts, when it is a clean one and the model wants it."""
    if req is None or req.turns <= 0 or not req.prompt_text or rec.prompt_tokens is None:
        return
    if any(key in req.extra for key in _NOT_LEARNED) or not calibration.wants(
        rec.model_name, req.prompt_chars
    ):
        return
    completion = None
    if facts is not None and not facts.text_dropped_bytes and rec.completion_tokens:
        seen = facts.response_text + facts.thinking_text
        if seen:
            completion = (estimate_tokens(seen), rec.completion_tokens)
    assert rec.model_name is not None  # wants() refuses a missing name
    calibration.observe(
        rec.model_name,
        estimate=estimate_tokens(req.prompt_text),
        turns=req.turns,
        exact=rec.prompt_tokens,
        completion=completion,
    )
