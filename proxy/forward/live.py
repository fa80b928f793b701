"""Requests in flight now, per model: what Ollama itself does not expose (it has no queue endpoint).

The forwarder keeps the ``Capture`` of every instrumented request in flight in a set (an add and a discard on
the request path, nothing else). ``live_by_model`` reads that set when a view asks (the dashboard's 1 Hz
snapshot, a Prometheus scrape): it learns each request's model from the body already held for inspection,
once per request, off the request path (a JSON body's ``model``, or a multipart form's ``model`` field).

Definitions (docs/metrics.md, "Live requests"):
- ``in_flight``: instrumented requests between handler entry and the last byte to the client;
- ``waiting``: those of them with no content delta yet (no first token: queued in Ollama, loading the
  model or processing the prompt; a non-streamed answer waits until its body arrives);
- ``loading``: waiting requests for a model the inventory says is not loaded now;
- ``queued``: waiting requests beyond the model's free parallel slots, when ``inventory.num_parallel``
  (Ollama's ``OLLAMA_NUM_PARALLEL``) is known: ``max(0, waiting_not_loading - (num_parallel - generating))``.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass

import orjson

from proxy.forward.capture import Capture
from proxy.forward.multipart import MultipartError, boundary_of, parse_form
from storage.model_names import canonical_model_name

__all__ = ["UNKNOWN_MODEL", "ModelLive", "live_by_model", "live_model"]

UNKNOWN_MODEL = "(unknown)"
_PARSE_LIMIT = 1 << 20  # bodies up to 1 MiB are parsed whole; bigger ones are scanned at their start
_MODEL_FIELD = re.compile(rb'"model"\s*:\s*"((?:[^"\\]|\\.){1,400})"')


@dataclass(slots=True)
class ModelLive:
    in_flight: int = 0
    generating: int = 0
    waiting: int = 0
    loading: int = 0
    queued: int = 0

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


def live_model(cap: Capture) -> str:
    """The canonical model a live request names, learned once (cached on the capture)."""
    if cap.live_model is not None:
        return cap.live_model
    name: str | None = None
    facts = cap.body_facts
    if facts is not None:
        name = facts.model
    elif cap.body is not None:
        if cap.content_encoding:
            pass  # a compressed body is inflated only when the record is built
        elif (cap.content_type or "").lower().startswith("multipart/"):
            name = _model_from_form(cap.body, cap.content_type)
        else:
            name = _model_from_body(cap.body)
    elif cap.t_headers is None:
        return UNKNOWN_MODEL  # a streamed body may still be arriving: ask again next time
    model = canonical_model_name(name) if name else None
    cap.live_model = model or UNKNOWN_MODEL
    return cap.live_model


def _model_from_form(body: bytes, content_type: str | None) -> str | None:
    """The ``model`` field of a multipart form (/v1/audio/transcriptions), with the same bounded reader."""
    try:
        return parse_form(body, boundary_of(content_type)).fields.get("model")
    except MultipartError:
        return None


def _model_from_body(body: bytes) -> str | None:
    if len(body) <= _PARSE_LIMIT:
        try:
            data = orjson.loads(body)
        except orjson.JSONDecodeError:
            return None
        model = data.get("model") if isinstance(data, dict) else None
        return model if isinstance(model, str) else None
    m = _MODEL_FIELD.search(body, 0, 65536)
    if m is None:
        return None
    try:
        value = orjson.loads(b'"' + m.group(1) + b'"')
    except orjson.JSONDecodeError:
        return None
    return value if isinstance(value, str) else None


def live_by_model(
    captures: Iterable[Capture],
    *,
    loaded: Callable[[str], bool | None] | None = None,
    num_parallel: int = 0,
) -> dict[str, ModelLive]:
    """Counts per model of the requests in ``captures`` (a snapshot copy of the forwarder's live set).

    ``loaded(model)`` says whether the inventory has the model loaded now (None: unknown).
    """
    out: dict[str, ModelLive] = {}
    waiting_warm: dict[str, int] = {}
    for cap in list(captures):
        model = live_model(cap)
        m = out.get(model)
        if m is None:
            m = out[model] = ModelLive()
        m.in_flight += 1
        if cap.content_times:
            m.generating += 1
            continue
        m.waiting += 1
        if loaded is not None and model != UNKNOWN_MODEL and loaded(model) is False:
            m.loading += 1
        else:
            waiting_warm[model] = waiting_warm.get(model, 0) + 1
    if num_parallel > 0:
        for model, n in waiting_warm.items():
            m = out[model]
            m.queued = max(0, n - max(0, num_parallel - m.generating))
    return out
