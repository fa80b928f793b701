"""JSON answers for ollamon's own endpoints (``/ollamon/...``), errors in Ollama's ``{"error": ...}`` shape."""

from __future__ import annotations

from typing import Any

import orjson
from aiohttp import web

__all__ = ["BadParameter", "json_error", "json_response"]


class BadParameter(ValueError):
    """A query parameter is unusable; the API answers 400 naming it."""

    def __init__(self, name: str, reason: str) -> None:
        self.name = name
        self.reason = reason
        super().__init__(f"bad parameter {name!r}: {reason}")


def json_response(data: Any, status: int = 200) -> web.Response:
    return web.Response(
        status=status,
        body=orjson.dumps(data, option=orjson.OPT_INDENT_2 | orjson.OPT_NON_STR_KEYS),
        content_type="application/json",
    )


def json_error(status: int, message: str) -> web.Response:
    return json_response({"error": message}, status)
