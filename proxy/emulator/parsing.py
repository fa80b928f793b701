"""Request-side rules shared by the native and ``/v1`` routes: bodies, names, keep_alive, think, limits.

Every check raises ``ApiError(status, message)`` with the status and text Ollama uses (spec §9), so a route
only has to choose the error *shape* (native ``{"error":...}`` or the OpenAI envelope).
"""

from __future__ import annotations

import re
from typing import Any

from aiohttp import web

from .config import Knobs, KnobsError, ModelSpec, parse_knobs
from .gojson import GoJSONError, decode, fold, require_types
from .scheduler import FOREVER_S
from .state import Emulator, valid_name

__all__ = [
    "ApiError",
    "knobs_for",
    "lookup_model",
    "parse_keep_alive",
    "parse_think",
    "read_body",
    "token_budget",
    "tool_name",
]

_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "μs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|μs|ms|s|m|h)")
_THINK_LEVELS = ("high", "medium", "low", "max")


class ApiError(Exception):
    """A request Ollama would refuse: ``status`` and the exact ``message``."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


async def read_body(
    request: web.Request, fields: tuple[str, ...], types: dict[str, str], struct_name: str
) -> dict[str, Any]:
    """Decode the body as JSON whatever its Content-Type; match ``fields`` case-insensitively; type-check."""
    raw = await request.read()
    try:
        values = fold(decode(raw), fields, struct_name)
        require_types(values, types, struct_name)
    except GoJSONError as exc:
        raise ApiError(400, str(exc)) from None
    return values


def knobs_for(emu: Emulator, request: web.Request) -> Knobs:
    """Config-wide ``emulate`` defaults overlaid with this request's ``X-Emulate`` header."""
    try:
        base = parse_knobs(emu.config.emulate)
        header = request.headers.get("X-Emulate")
        return base.merged(parse_knobs(header)) if header else base
    except KnobsError as exc:
        raise ApiError(400, str(exc)) from None


def lookup_model(emu: Emulator, name: Any, empty_status: int) -> ModelSpec:
    """Resolve a request's model: ``""`` gives ``empty_status`` (404 or 400, per route), unknown 404."""
    if not isinstance(name, str) or name == "":
        if empty_status == 404:
            raise ApiError(404, "model '' not found")
        raise ApiError(400, "model is required")
    if not valid_name(name):
        raise ApiError(400, "invalid model name")
    spec = emu.resolve(name)
    if spec is None:
        raise ApiError(404, f"model '{name}' not found")
    return spec


def _parse_go_duration(text: str) -> float:
    body = text.strip()
    sign = -1.0 if body.startswith("-") else 1.0
    body = body.lstrip("+-")
    if body == "0":
        return 0.0
    position, total = 0, 0.0
    while position < len(body):
        match = _DURATION_PART.match(body, position)
        if match is None:
            raise ApiError(400, f'time: invalid duration "{text}"')
        total += float(match.group(1)) * _UNITS[match.group(2)]
        position = match.end()
    if not body:
        raise ApiError(400, f'time: invalid duration "{text}"')
    return sign * total


def parse_keep_alive(value: Any, default_s: float) -> float:
    """``keep_alive`` as seconds: a number of seconds or a Go duration string; negative means forever."""
    if value is None:
        return default_s
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        go_type = {bool: "bool", dict: "map[string]interface {}", list: "[]interface {}"}.get(
            type(value), "?"
        )
        raise ApiError(400, f"Unsupported type: '{go_type}'")
    seconds = float(value) if not isinstance(value, str) else _parse_go_duration(value)
    return -1.0 if seconds < 0 else min(seconds, FOREVER_S)


def parse_think(value: Any, spec: ModelSpec, requested: str) -> bool:
    """Whether thinking runs: absent means on for thinking models; on for others is a 400."""
    if value is None:
        return "thinking" in spec.capabilities
    if isinstance(value, str):
        if value not in _THINK_LEVELS:
            raise ApiError(
                400, f'invalid think value: "{value}" (must be "high", "medium", "low", true, or false)'
            )
        enabled = True
    elif isinstance(value, bool):
        enabled = value
    else:
        raise ApiError(400, f"invalid think value: {value}")
    if enabled and "thinking" not in spec.capabilities:
        raise ApiError(400, f'"{requested}" does not support thinking')
    return enabled


def token_budget(limit: Any, natural: int | None, default_tokens: int) -> tuple[int, str]:
    """Tokens to emit and the ``done_reason``: ``num_predict``/``max_tokens`` caps them (``length``)."""
    wanted = natural if natural is not None else default_tokens
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 0:
        return wanted, "stop"
    if natural is None:
        return limit, "length"
    return (limit, "length") if limit <= natural else (natural, "stop")


def options_of(values: dict[str, Any]) -> dict[str, Any]:
    options = values.get("options")
    return options if isinstance(options, dict) else {}


def capability_error(spec: ModelSpec, requested: str, what: str) -> ApiError:
    """``"bert" does not support generate`` style errors."""
    return ApiError(400, f'"{requested}" does not support {what}')


def tools_error(spec: ModelSpec) -> ApiError:
    full = spec.name if "/" in spec.name else f"registry.ollama.ai/library/{spec.name}"
    return ApiError(400, f"{full} does not support tools")


def tool_name(tools: Any) -> str:
    """The name of the first tool a /v1/messages or /v1/responses request offers (the emulator calls that one)."""
    if isinstance(tools, list) and tools and isinstance(tools[0], dict):
        name = tools[0].get("name")
        if isinstance(name, str) and name:
            return name
    return "get_weather"
