"""Records to rows PostgreSQL binds: the values as they are (the fast path), or every value checked.

Why two paths: SQLite stores whatever it is given (a string in an INTEGER column stays a string); PostgreSQL
refuses what does not fit its column. Checking ~57 values a record in Python cost most of a batch's time, so
``fast_row`` only encodes the JSON columns and lets asyncpg's binary encoders (in C) and the server judge; when
they refuse a value, the store redoes the batch once with ``row_of``, which converts what it can and raises
for the record that cannot fit, so it is named by index. What SQLite keeps that PostgreSQL cannot hold is kept
differently, never dropped: NUL in text becomes U+FFFD (PostgreSQL text cannot hold NUL; JSON text escapes it
and stays unchanged), a number in a text column becomes its decimal text, a whole float in an integer column
the integer, and an integer beyond 64 bits NULL with its text in ``metadata.out_of_range`` (as SQLite's store
does, ``fit_inference``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from operator import attrgetter
from typing import Any

import orjson

from storage.postgres.schema import column_types
from storage.row_encoding import fit_inference, json_text

__all__ = ["JSON_COLUMNS", "converters", "fast_row", "fit_inference", "row_of"]

JSON_COLUMNS = frozenset(
    {"metadata", "stop", "extra", "processes", "families", "capabilities", "detail", "prompt_pii",
     "response_pii", "categories"}
)  # fmt: skip
_INT64 = (-(2**63), 2**63 - 1)
Convert = Callable[[Any], Any]
_TYPES = column_types()


def _text(column: str) -> Convert:
    def convert(v: Any) -> Any:
        if v is None:
            return None
        if type(v) is not str:
            if isinstance(v, bool) or not isinstance(v, int | float | str):
                raise TypeError(f"{column} has a {type(v).__name__}, expected a string")
            v = str(v)
        return v.replace("\x00", "\ufffd") if "\x00" in v else v

    return convert


def _json(column: str) -> Convert:
    def convert(v: Any) -> Any:
        if v is None:
            return None
        return json_text(column, v)  # JSON escapes NUL as \u0000: plain text, as in SQLite

    return convert


def _bigint(column: str) -> Convert:
    def convert(v: Any) -> Any:
        if v is None or (type(v) is int and _INT64[0] <= v <= _INT64[1]):
            return v
        if isinstance(v, bool):
            return int(v)
        if isinstance(v, float) and v.is_integer() and _INT64[0] <= v <= _INT64[1]:
            return int(v)
        if isinstance(v, int):
            raise OverflowError(f"{column}={v} does not fit a 64-bit integer")
        raise TypeError(f"{column} has a {type(v).__name__} ({v!r}), expected an integer")

    return convert


def _flag(column: str) -> Convert:
    def convert(v: Any) -> Any:
        if v is None:
            return None
        if isinstance(v, bool | int) and v in (0, 1):
            return int(v)
        raise TypeError(f"{column} has {v!r}, expected true or false")

    return convert


def _double(column: str) -> Convert:
    def convert(v: Any) -> Any:
        if v is None or type(v) is float:
            return v
        if isinstance(v, int | float):
            return float(v)
        raise TypeError(f"{column} has a {type(v).__name__} ({v!r}), expected a number")

    return convert


def _bytea(column: str) -> Convert:
    def convert(v: Any) -> Any:
        if v is None or isinstance(v, bytes):
            return v
        raise TypeError(f"{column} has a {type(v).__name__}, expected bytes")

    return convert


_BY_TYPE: dict[str, Callable[[str], Convert]] = {
    "TEXT": _text,
    "BIGINT": _bigint,
    "SMALLINT": _flag,
    "DOUBLE PRECISION": _double,
    "BYTEA": _bytea,
}


def converters(table: str, columns: Sequence[str]) -> list[Convert]:
    """One converter per column of ``table``, in ``columns`` order."""
    types = _TYPES[table]
    return [_json(c) if c in JSON_COLUMNS else _BY_TYPE[types[c]](c) for c in columns]


def row_of(obj: Any, columns: Sequence[str], convert: Sequence[Convert]) -> tuple[Any, ...]:
    """The row of ``obj``'s attributes named ``columns``; raises TypeError / OverflowError when one cannot fit."""
    return tuple(f(getattr(obj, c)) for c, f in zip(columns, convert, strict=True))


def fast_row(columns: Sequence[str]) -> Callable[[Any], tuple[Any, ...]]:
    """The optimistic conversion: the values as they are, JSON columns encoded. Why: checking ~57 values a
    record in Python cost most of a batch's time, and asyncpg's binary encoders check types in C anyway; a
    value they refuse (or text holding NUL, which the server refuses) makes the store redo the batch once
    with ``row_of``, which converts or names the record."""
    getter = attrgetter(*columns)
    json_at = [i for i, c in enumerate(columns) if c in JSON_COLUMNS]
    dumps = orjson.dumps

    def fast(obj: Any) -> tuple[Any, ...]:
        values = getter(obj)
        if not json_at:
            return values if isinstance(values, tuple) else (values,)
        out = list(values)
        for i in json_at:
            if out[i] is not None:
                out[i] = dumps(out[i]).decode()
        return tuple(out)

    return fast
