"""Reading a model action's input and Ollama's answer to it, for proxy/api/model_actions.py.

Both are hostile until checked: the body is capped, must be a JSON object with known fields and a
printable model name; a keep-alive must be what Ollama's Go side accepts; Ollama's answer is read up to
``MAX_ANSWER`` bytes and its error text cut short.
"""

from __future__ import annotations

import math
import re
from typing import Any

import aiohttp
import orjson
from aiohttp import web

from proxy.answers import json_response

__all__ = ["MAX_BODY", "ActionError", "error_text", "keep_alive_value", "read_body", "read_capped"]

MAX_NAME = 350
MAX_BODY = 16 * 1024
MAX_ANSWER = 1 << 20
_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028\u2029\u202a-\u202e\u2066-\u2069]")
_DURATION = re.compile(r"(?:(?:\d+(?:\.\d*)?|\.\d+)(?:ns|us|µs|μs|ms|s|m|h))+")
_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|μs|ms|s|m|h)")
_UNIT_S = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "μs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
_MAX_KEEP_S = (2**63 - 1) / 1e9  # Go's time.Duration: about 292 years


class ActionError(Exception):
    """An action refused or failed: answered as ``{"error": message, **extra}`` with ``status``."""

    def __init__(self, status: int, message: str, **extra: Any) -> None:
        super().__init__(message)
        self.status, self.message, self.extra = status, message, extra

    def response(self) -> web.Response:
        return json_response({"error": self.message, **self.extra}, self.status)


def keep_alive_value(value: Any) -> int | float | str:
    """``value`` if Ollama takes it as a keep-alive: a Go duration string, seconds >= 0, or -1 (forever)."""
    if isinstance(value, bool) or value is None:
        raise ActionError(400, 'keep_alive must be a duration like "30m", a number of seconds, or -1')
    if isinstance(value, int | float):
        if not math.isfinite(value) or (value < 0 and value != -1) or value > _MAX_KEEP_S:
            raise ActionError(400, f"keep_alive {value!r}: seconds must be >= 0 (or -1 for forever)")
        return value
    if isinstance(value, str):
        if value == "0":
            return value
        if _DURATION.fullmatch(value) is None:
            raise ActionError(400, f'keep_alive {value[:40]!r} is not a duration like "30m", "1h" or "90s"')
        if sum(float(n) * _UNIT_S[u] for n, u in _PART.findall(value)) > _MAX_KEEP_S:
            raise ActionError(400, f"keep_alive {value[:40]!r} is longer than Go's longest duration")
        return value
    raise ActionError(400, 'keep_alive must be a duration like "30m", a number of seconds, or -1')


async def read_body(request: web.Request, allowed: tuple[str, ...]) -> tuple[str, dict[str, Any]]:
    """The validated JSON body: the model name and the other fields."""
    if request.content_type != "application/json":
        raise ActionError(415, "model actions need Content-Type: application/json")
    if (request.content_length or 0) > MAX_BODY:
        raise ActionError(413, f"the body is larger than {MAX_BODY} bytes")
    raw = await request.read()  # a chunked body is cut off at client_max_size (1 MiB) by aiohttp
    if len(raw) > MAX_BODY:
        raise ActionError(413, f"the body is larger than {MAX_BODY} bytes")
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise ActionError(400, f"the body is not JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ActionError(400, "the body must be a JSON object")
    unknown = sorted(k for k in data if k not in allowed)
    if unknown:
        raise ActionError(400, f"unknown field {unknown[0][:40]!r}; expected {', '.join(allowed)}")
    model = data.get("model")
    if not isinstance(model, str) or not model.strip():
        raise ActionError(400, "model is required (a non-empty string)")
    if len(model) > MAX_NAME:
        raise ActionError(400, f"model name is longer than {MAX_NAME} characters")
    if _UNSAFE.search(model):
        raise ActionError(400, "model name contains control characters")
    return model, data


async def read_capped(resp: aiohttp.ClientResponse) -> bytes:
    chunks, size = [], 0
    async for chunk in resp.content.iter_any():
        size += len(chunk)
        if size > MAX_ANSWER:
            raise ActionError(502, f"Ollama's answer is larger than {MAX_ANSWER} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def error_text(raw: bytes, status: int) -> str:
    """Ollama's ``{"error": ...}`` text, else the start of the body, else ``HTTP <status>``."""
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError:
        data = None
    if isinstance(data, dict) and isinstance(data.get("error"), str):
        return str(data["error"])[:1000]
    text = raw[:300].decode("utf-8", "replace").strip()
    return text or f"HTTP {status}"
