"""Go ``encoding/json`` look-alike: the bytes Ollama puts on the wire, and how it reads request bodies.

Encoding: compact, dict order kept (callers build dicts in Go struct order and leave ``omitempty`` fields
out), ``<`` ``>`` ``&`` U+2028 U+2029 escaped as ``\\u003c`` etc., other non-ASCII raw UTF-8, floats in Go's
shortest form (``Float32`` for float32 values such as ``/api/embed`` vectors).

Decoding: only the first JSON value of the body is read, whatever the Content-Type; an empty body is
"missing request body"; syntax and type errors are phrased like Go's so tests of error pass-through see
realistic text. Struct keys match case-insensitively, the last duplicate winning (``fold``).
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Iterable, Mapping
from decimal import Decimal
from typing import Any

__all__ = ["Float32", "GoJSONError", "decode", "dumps", "fold", "go_type_name", "require_types"]

_ESCAPES = str.maketrans(
    {"<": "\\u003c", ">": "\\u003e", "&": "\\u0026", "\u2028": "\\u2028", "\u2029": "\\u2029"}
)


class Float32(float):
    """A float that Go holds as float32: it is printed with float32's shortest round-trip digits."""

    __slots__ = ()


class GoJSONError(ValueError):
    """A body Go's decoder would reject; ``str()`` is the message Ollama would send."""


def _digits(value: float, bits: int) -> tuple[str, int]:
    """Shortest decimal digits and exponent (value = 0.d1d2... * 10**exp) that round-trip at ``bits``."""
    if bits == 32:
        target = struct.unpack("<f", struct.pack("<f", value))[0]
        text = repr(target)
        for precision in range(1, 10):
            candidate = f"{target:.{precision - 1}e}"
            if struct.unpack("<f", struct.pack("<f", float(candidate)))[0] == target:
                text = candidate
                break
    else:
        text = repr(value)
    _sign, digits, exponent = Decimal(text).as_tuple()
    assert isinstance(exponent, int)
    raw = "".join(map(str, digits)).rstrip("0") or "0"
    # Decimal: value = int(digits) * 10**exponent; normalise to 0.raw * 10**point
    point = len(digits) + exponent
    return raw, point


def _format_float(value: float, bits: int) -> str:
    if math.isnan(value) or math.isinf(value):
        raise ValueError(f"json: unsupported value: {value}")
    if value == 0:
        return "-0" if math.copysign(1.0, value) < 0 else "0"
    sign = "-" if value < 0 else ""
    absolute = abs(value)
    if bits == 32:
        absolute = struct.unpack("<f", struct.pack("<f", absolute))[0]
    raw, point = _digits(absolute, bits)
    if absolute < 1e-6 or absolute >= 1e21:
        mantissa = raw[0] + ("." + raw[1:] if len(raw) > 1 else "")
        exp = point - 1
        return f"{sign}{mantissa}e{'-' if exp < 0 else '+'}{abs(exp):02d}".replace("e-0", "e-")
    if point <= 0:
        return f"{sign}0.{'0' * -point}{raw}"
    if point >= len(raw):
        return sign + raw + "0" * (point - len(raw))
    return f"{sign}{raw[:point]}.{raw[point:]}"


def _encode(value: Any, out: list[str]) -> None:
    if value is None:
        out.append("null")
    elif value is True:
        out.append("true")
    elif value is False:
        out.append("false")
    elif isinstance(value, str):
        out.append(json.dumps(value, ensure_ascii=False).translate(_ESCAPES))
    elif isinstance(value, int):
        out.append(str(value))
    elif isinstance(value, Float32):
        out.append(_format_float(value, 32))
    elif isinstance(value, float):
        out.append(_format_float(value, 64))
    elif isinstance(value, Mapping):
        out.append("{")
        first = True
        for key, item in value.items():
            if not first:
                out.append(",")
            first = False
            out.append(json.dumps(str(key), ensure_ascii=False).translate(_ESCAPES))
            out.append(":")
            _encode(item, out)
        out.append("}")
    elif isinstance(value, Iterable):
        out.append("[")
        for index, item in enumerate(value):
            if index:
                out.append(",")
            _encode(item, out)
        out.append("]")
    else:
        raise TypeError(f"cannot encode {type(value).__name__} as JSON")


def dumps(value: Any, newline: bool = False) -> bytes:
    """Encode like Go's ``json.Marshal`` (``newline=True``: like ``json.NewEncoder(w).Encode``)."""
    out: list[str] = []
    _encode(value, out)
    if newline:
        out.append("\n")
    return "".join(out).encode("utf-8")


def _go_char(text: str, pos: int) -> str:
    char = text[pos]
    return json.dumps(char)[1:-1].replace("'", "\\'") if char in '\n\r\t"\\' else char


def decode(body: bytes) -> Any:
    """Decode the first JSON value of ``body`` as Go's ``json.Decoder.Decode`` would, or raise."""
    text = body.decode("utf-8", errors="replace")
    start = len(text) - len(text.lstrip(" \t\r\n"))
    if start == len(text):
        raise GoJSONError("missing request body")
    try:
        value, _end = json.JSONDecoder().raw_decode(text, start)
    except json.JSONDecodeError as exc:
        if exc.pos >= len(text):
            raise GoJSONError("unexpected EOF") from None
        char = _go_char(text, exc.pos)
        if exc.msg.startswith("Expecting value"):
            context = "looking for beginning of value"
        elif exc.msg.startswith("Expecting property name"):
            context = "looking for beginning of object key string"
        elif exc.msg.startswith("Expecting ':'"):
            context = "after object key"
        elif exc.msg.startswith("Expecting ','"):
            context = "after object key:value pair"
        else:
            context = "in string literal"
        raise GoJSONError(f"invalid character '{char}' {context}") from None
    return value


def go_type_name(value: Any) -> str:
    """The JSON kind as Go's UnmarshalTypeError names it."""
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    if isinstance(value, dict):
        return "object"
    return "null"


def fold(value: Any, fields: Iterable[str], struct_name: str) -> dict[str, Any]:
    """Match ``value``'s keys to ``fields`` case-insensitively (Go struct decoding); drop unknown keys."""
    if not isinstance(value, dict):
        raise GoJSONError(
            f"json: cannot unmarshal {go_type_name(value)} into Go value of type api.{struct_name}"
        )
    canonical = {name.lower(): name for name in fields}
    result: dict[str, Any] = {}
    for key, item in value.items():
        name = canonical.get(key.lower())
        if name is not None:
            result[name] = item
    return result


_GO_TYPES = {"string": "string", "bool": "bool", "object": "map[string]interface {}", "array": "[]"}


def require_types(values: Mapping[str, Any], types: Mapping[str, str], struct_name: str) -> None:
    """Raise Go's ``cannot unmarshal X into Go struct field S.f of type T`` for a mistyped field.

    ``null`` is accepted everywhere, as Go leaves the zero value in place.
    """
    for name, kind in types.items():
        item = values.get(name)
        if item is None:
            continue
        actual = go_type_name(item)
        ok = actual == kind or (kind == "number" and actual == "number")
        if kind == "int":
            ok = isinstance(item, int) and not isinstance(item, bool)
            kind_name = "int"
        else:
            kind_name = _GO_TYPES.get(kind, kind)
        if not ok:
            raise GoJSONError(
                f"json: cannot unmarshal {actual} into Go struct field {struct_name}.{name} of type {kind_name}"
            )
