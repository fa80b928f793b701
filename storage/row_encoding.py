"""Records into the parameter tuples ``sqlite3`` binds: the write path's per-record work, kept exact and cheap.

Why a module of its own: this runs for every record in every batch, so it has a fast path. A record whose
fields are all plain (None, str, float, bool, an int that fits 64 bits) and whose JSON columns encode as
they are is turned into its tuple by one ``attrgetter`` and a type check done in C; anything else (an
integer past 64 bits, metadata orjson refuses, a value of another type) takes the careful path, field by
field, which repairs or rejects it. Both paths store the same values: the fast one is only taken when the
careful one would change nothing (a bool binds as 0/1 either way).

Inference rows are laid out in ``INFERENCE_ORDER`` (the JSON columns last), which the INSERT names.
"""

from __future__ import annotations

import logging
import operator
from collections.abc import Callable, Sequence
from typing import Any

import orjson

from storage.records import ERROR_COLUMNS, INFERENCE_COLUMNS, ErrorRecord, InferenceRecord

__all__ = [
    "ERROR_ORDER",
    "INFERENCE_ORDER",
    "JSON_COLUMNS",
    "error_row",
    "fit_inference",
    "inference_row",
    "json_text",
    "scalar",
]

logger = logging.getLogger(__name__)

JSON_COLUMNS = frozenset({"metadata", "stop"})
_INT64 = (-(2**63), 2**63 - 1)
_PLAIN_INFERENCE = tuple(c for c in INFERENCE_COLUMNS if c not in JSON_COLUMNS)
_JSON_INFERENCE = tuple(c for c in INFERENCE_COLUMNS if c in JSON_COLUMNS)
INFERENCE_ORDER: tuple[str, ...] = (*_PLAIN_INFERENCE, *_JSON_INFERENCE)
ERROR_ORDER: tuple[str, ...] = ERROR_COLUMNS
# Exact types sqlite3 binds as they are (subclasses take the careful path).
_PLAIN_TYPES = frozenset({type(None), str, float, bool})
_PLAIN_OR_INT = _PLAIN_TYPES | {int}
_get_plain: Callable[[Any], tuple[Any, ...]] = operator.attrgetter(*_PLAIN_INFERENCE)
_get_json: Callable[[Any], tuple[Any, ...]] = operator.attrgetter(*_JSON_INFERENCE)
_get_error: Callable[[Any], tuple[Any, ...]] = operator.attrgetter(*ERROR_ORDER)


def _fits(value: Any) -> bool:
    return not isinstance(value, int) or isinstance(value, bool) or _INT64[0] <= value <= _INT64[1]


def _big_ints_as_text(value: Any) -> Any:
    """``value`` with every integer beyond what orjson encodes (64 bits) turned into its decimal text."""
    if isinstance(value, int) and not isinstance(value, bool) and not -(2**63) <= value < 2**64:
        return str(value)
    if isinstance(value, dict):
        return {k: _big_ints_as_text(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_big_ints_as_text(v) for v in value]
    return value


def json_text(column: str, value: Any) -> str:
    """``value`` as JSON text; integers beyond 64 bits as their decimal text; TypeError naming ``column``."""
    try:
        return orjson.dumps(value).decode()
    except TypeError as first:
        try:
            return orjson.dumps(_big_ints_as_text(value)).decode()
        except (TypeError, RecursionError):
            raise TypeError(f"{column} cannot be stored as JSON: {first}") from first


def scalar(column: str, value: Any) -> Any:
    """Turn one field into something sqlite3 binds exactly; raise TypeError/OverflowError if it cannot."""
    if value is None:
        return None
    if column in JSON_COLUMNS:
        return json_text(column, value)
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, int):
        if not _fits(value):
            raise OverflowError(f"{column}={value} does not fit a 64-bit integer")
        return value
    if isinstance(value, float | str):
        return value
    raise TypeError(f"{column} has a {type(value).__name__}, expected a number, a string or None")


def fit_inference(rec: InferenceRecord) -> None:
    """Keep the row whatever its numbers and metadata: an integer beyond 64 bits (``"seed": 10**30``)
    becomes NULL with its text in ``metadata.out_of_range``, and metadata that cannot be JSON at all is
    replaced by ``{"metadata_error": why}``. In place, so the hot view gets the row as stored."""
    moved = {c: str(getattr(rec, c)) for c in INFERENCE_COLUMNS if not _fits(getattr(rec, c))}
    for c in moved:
        setattr(rec, c, None)
    if moved:
        meta = dict(rec.metadata) if isinstance(rec.metadata, dict) else {}
        earlier = meta.get("out_of_range")
        meta["out_of_range"] = {**earlier, **moved} if isinstance(earlier, dict) else moved
        rec.metadata = meta
    if rec.metadata is not None:
        try:
            json_text("metadata", rec.metadata)
        except TypeError as exc:
            logger.warning("request %s: metadata dropped, it cannot be stored: %s", rec.request_id, exc)
            rec.metadata = {"metadata_error": str(exc)[:500]}


def _careful(record: InferenceRecord | ErrorRecord, columns: Sequence[str]) -> tuple[Any, ...]:
    return tuple(scalar(c, getattr(record, c)) for c in columns)


def _plain(values: tuple[Any, ...]) -> bool:
    """Whether every value binds as it is: plain types, and any int within 64 bits."""
    types = set(map(type, values))
    if types <= _PLAIN_TYPES:
        return True
    if not types <= _PLAIN_OR_INT:
        return False
    ints = [v for v in values if type(v) is int]
    return _INT64[0] <= min(ints) and max(ints) <= _INT64[1]


def _fast_inference(rec: InferenceRecord) -> tuple[Any, ...] | None:
    """The row when nothing needs repairing, else None (and ``rec`` untouched)."""
    plain = _get_plain(rec)
    if not _plain(plain):
        return None
    encoded: list[str | None] = []
    for value in _get_json(rec):
        if value is None:
            encoded.append(None)
            continue
        try:
            encoded.append(orjson.dumps(value).decode())
        except TypeError:  # a big int, a key orjson refuses: the careful path decides
            return None
    return (*plain, *encoded)


def inference_row(rec: InferenceRecord) -> tuple[Any, ...]:
    """``rec`` as an ``INFERENCE_ORDER`` tuple, repaired in place first when it must be (``fit_inference``);
    raises TypeError/OverflowError for a value that cannot be stored at all."""
    row = _fast_inference(rec)
    if row is not None:
        return row
    fit_inference(rec)
    return _careful(rec, INFERENCE_ORDER)


def error_row(rec: ErrorRecord) -> tuple[Any, ...]:
    """``rec`` as an ``ERROR_ORDER`` tuple; raises TypeError/OverflowError for a value that cannot be stored."""
    row = _get_error(rec)
    return row if _plain(row) else _careful(rec, ERROR_ORDER)
