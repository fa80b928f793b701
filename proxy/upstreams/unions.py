"""``/api/tags`` and ``/api/ps`` across hosts: each host's answer read as hostile input, then one answer in
Ollama's exact shape (``{"models":[...]}``, Go's JSON encoding).

* **Parsing** (``parse_models``): the body must be a JSON object whose ``models`` is a list; entries that
  are not objects with a string ``name`` (at most 350 characters) are dropped; at most ``MAX_ENTRIES`` are
  kept. Size is bounded by whoever reads the body (health.py cuts it at ``max_answer_bytes``). Each kept
  entry is passed on as the host wrote it: a client gets Ollama's fields, nothing of ollamon's.
* **/api/tags** (``merge_tags``): one entry per model, deduplicated by canonical name; the **first host in
  config order** that lists it wins (its digest, size, modified_at). Order: the first host's list as it
  sent it, then each further host's new models in its order.
* **/api/ps** (``merge_ps``): **every loaded copy**, one entry per host that holds the model (each copy
  uses that host's memory, and ``ollama ps`` sums them); hosts in config order, each in its own order.
* **/v1/models** (``merge_openai_models``): as /api/tags, by ``id``, in the OpenAI list shape; no models at
  all gives ``"data":null`` as Ollama does (a nil Go slice).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

from proxy.upstreams.settings import canonical_model

__all__ = [
    "MAX_ENTRIES",
    "AnswerError",
    "encode_go_json",
    "merge_openai_models",
    "merge_ps",
    "merge_tags",
    "model_names",
    "parse_models",
]

MAX_ENTRIES = 10_000  # per host: far more models than any host holds, far fewer than memory allows
_MAX_NAME = 350
_GO_ESCAPES = str.maketrans(
    {"<": "\\u003c", ">": "\\u003e", "&": "\\u0026", "\u2028": "\\u2028", "\u2029": "\\u2029"}
)


class AnswerError(ValueError):
    """A host's answer is not a usable ``{"models": [...]}``; ``str()`` says why."""


def parse_models(body: bytes, list_key: str = "models", name_key: str = "name") -> list[dict[str, Any]]:
    """The usable entries of a ``/api/tags`` or ``/api/ps`` body (``/v1/models``: ``data`` and ``id``);
    AnswerError if it is unusable as a whole."""
    try:
        data = json.loads(body, parse_constant=_no_constant)
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
        raise AnswerError(f"not JSON: {type(exc).__name__}") from None
    if not isinstance(data, dict):
        raise AnswerError(f"expected a JSON object, got {type(data).__name__}")
    entries = data.get(list_key)
    if entries is None and list_key == "data" and list_key in data:
        entries = []  # Ollama's /v1/models with no models: "data":null
    if not isinstance(entries, list):
        raise AnswerError(f"no {list_key} list")
    out: list[dict[str, Any]] = []
    for entry in entries:
        if len(out) >= MAX_ENTRIES:
            break
        if (
            isinstance(entry, dict)
            and isinstance(name := entry.get(name_key), str)
            and 0 < len(name) <= _MAX_NAME
        ):
            out.append(entry)
    return out


def _no_constant(token: str) -> Any:
    raise ValueError(f"{token} is not JSON")


def model_names(entries: Iterable[dict[str, Any]]) -> frozenset[str]:
    """Canonical names of parsed entries (what routing compares)."""
    return frozenset(n for e in entries if (n := canonical_model(e["name"])) is not None)


def _first_wins(answers: Iterable[list[dict[str, Any]]], name_key: str) -> list[dict[str, Any]]:
    seen: set[str] = set()
    out: list[dict[str, Any]] = []
    for entries in answers:
        for entry in entries:
            key = canonical_model(entry[name_key]) or entry[name_key]
            if key not in seen:
                seen.add(key)
                out.append(entry)
    return out


def merge_tags(answers: Iterable[list[dict[str, Any]]]) -> dict[str, Any]:
    """Union of parsed ``/api/tags`` answers, given in config order; the first host listing a model wins."""
    return {"models": _first_wins(answers, "name")}


def merge_openai_models(answers: Iterable[list[dict[str, Any]]]) -> dict[str, Any]:
    """Union of parsed ``/v1/models`` answers (by ``id``), in config order; the first host wins."""
    return {"object": "list", "data": _first_wins(answers, "id") or None}


def merge_ps(answers: Iterable[list[dict[str, Any]]]) -> dict[str, Any]:
    """Every loaded copy from parsed ``/api/ps`` answers, given in config order."""
    return {"models": [entry for entries in answers for entry in entries]}


def encode_go_json(value: Any) -> bytes:
    """Compact JSON as Go's encoding/json writes it (``<``, ``>``, ``&`` escaped, other text raw UTF-8)."""
    text = json.dumps(value, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    # A lone surrogate (from a "\\ud800" escape) stays an escape rather than becoming invalid UTF-8.
    return text.translate(_GO_ESCAPES).encode("utf-8", "backslashreplace")
