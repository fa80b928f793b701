"""SQLite's SQL, run on PostgreSQL through asyncpg with SQLite's manners: one text, both backends.

Why: ollamon's reads and its backend-neutral write jobs are written once, in SQLite's dialect. This module
holds what makes them run on PostgreSQL (used by storage/postgres/sync_conn.py for the synchronous reads and by
storage/portable.py for write jobs); it imports nothing of storage/postgres/, so any storage module may use it.

* ``translate``: ``?`` outside quotes and comments becomes ``$1``, ``$2``, ...; ``CAST(x AS REAL)`` and
  ``AS INTEGER`` become ``DOUBLE PRECISION`` and ``BIGINT`` (PostgreSQL's REAL and INTEGER are 4 bytes).
* ``fetch`` / ``execute_many``: parameters coerced to the type PostgreSQL inferred for them (learnt once per
  statement), results as SQLite gives them: ``numeric`` as ``int`` when whole else ``float``, ``bool`` as 0/1,
  rows that are tuples and also answer ``row["name"]`` and ``keys()``.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from decimal import Decimal
from functools import lru_cache
from typing import Any

__all__ = ["PgRow", "execute_many", "fetch", "to_sqlite", "translate"]

_INTS = frozenset({"int2", "int4", "int8", "oid"})
_FLOATS = frozenset({"float4", "float8", "numeric"})
_TEXTS = frozenset({"text", "varchar", "bpchar", "name"})
_CASTS = re.compile(r"\bAS\s+(REAL|INTEGER)\s*\)", re.IGNORECASE)


@lru_cache(maxsize=1024)
def translate(sql: str) -> str:
    """SQLite-flavoured ``sql`` as PostgreSQL reads it (placeholders and the two casts; see the module)."""
    out: list[str] = []
    n = 0
    i, size = 0, len(sql)
    while i < size:
        ch = sql[i]
        if ch in "'\"":  # a quoted string or identifier: copied as it is ('' and "" escape themselves)
            j = i + 1
            while j < size:
                if sql[j] == ch:
                    if j + 1 < size and sql[j + 1] == ch:
                        j += 2
                        continue
                    break
                j += 1
            out.append(sql[i : j + 1])
            i = j + 1
        elif ch == "-" and sql.startswith("--", i):
            j = sql.find("\n", i)
            j = size if j < 0 else j
            out.append(sql[i:j])
            i = j
        elif ch == "?":
            n += 1
            out.append(f"${n}")
            i += 1
        else:
            j = i + 1
            while j < size and sql[j] not in "'\"?-":
                j += 1
            out.append(_CASTS.sub(_cast, sql[i:j]))
            i = j
    return "".join(out)


def _cast(m: re.Match[str]) -> str:
    return "AS DOUBLE PRECISION)" if m.group(1).upper() == "REAL" else "AS BIGINT)"


class PgRow(tuple[Any, ...]):
    """A result row: a tuple (``a, b = row``, ``row[0]``) that also answers ``row["name"]`` and ``keys()``."""

    __slots__ = ()
    _names: tuple[str, ...] = ()
    _index: dict[str, int] = {}  # per-statement subclasses set both

    def __getitem__(self, key: Any) -> Any:
        if isinstance(key, str):
            return tuple.__getitem__(self, self._index[key])
        return tuple.__getitem__(self, key)

    def keys(self) -> list[str]:
        return list(self._names)


@lru_cache(maxsize=1024)
def _row_type(names: tuple[str, ...]) -> type[PgRow]:
    return type(
        "PgRow", (PgRow,), {"__slots__": (), "_names": names, "_index": {n: i for i, n in enumerate(names)}}
    )


def to_sqlite(v: Any) -> Any:
    if isinstance(v, Decimal):
        exponent = v.as_tuple().exponent  # 'n', 'N' or 'F' for NaN and infinities
        return int(v) if isinstance(exponent, int) and exponent >= 0 else float(v)
    if isinstance(v, bool):
        return int(v)
    return v


def _coerce(value: Any, type_name: str) -> Any:
    """``value`` as asyncpg encodes a parameter PostgreSQL inferred as ``type_name`` (SQLite is untyped)."""
    if value is None:
        return None
    if type_name in _INTS:
        if isinstance(value, bool):
            return int(value)
        if isinstance(value, float) and value.is_integer():
            return int(value)
        return value
    if type_name in _FLOATS:
        return float(value) if isinstance(value, int | Decimal) else value
    if type_name in _TEXTS:
        return value if isinstance(value, str) else str(value)
    if type_name == "bool":
        return bool(value)
    return value


class _Shape:
    """What a statement takes and gives: parameter types, column names, which columns need converting."""

    __slots__ = ("convert", "names", "params", "row")

    def __init__(self, stmt: Any) -> None:
        self.params = tuple(p.name for p in stmt.get_parameters())
        attrs = stmt.get_attributes()
        self.names = tuple(a.name for a in attrs)
        self.convert = tuple(i for i, a in enumerate(attrs) if a.type.name in {"numeric", "bool"})
        self.row = _row_type(self.names)


_SHAPES: dict[str, _Shape] = {}  # by translated SQL: a statement's shape depends on the schema only


async def fetch(conn: Any, sql: str, params: Sequence[Any]) -> tuple[list[PgRow], tuple[str, ...]]:
    """Run translated ``sql`` on the asyncpg connection ``conn`` with SQLite's manners (see the module): the
    rows, converted, and the column names."""
    shape = _SHAPES.get(sql)
    if shape is None:
        if len(_SHAPES) > 2048:
            _SHAPES.clear()
        shape = _SHAPES[sql] = _Shape(await conn.prepare(sql))
    args = [_coerce(v, t) for v, t in zip(params, shape.params, strict=False)]
    records = await conn.fetch(sql, *args)
    if records and tuple(records[0].keys()) != shape.names:  # another database, another schema: learn it
        shape = _SHAPES[sql] = _Shape(await conn.prepare(sql))
    make = shape.row
    if shape.convert:
        conv = set(shape.convert)
        return [make(to_sqlite(v) if i in conv else v for i, v in enumerate(r)) for r in records], shape.names
    return [make(r) for r in records], shape.names


async def execute_many(conn: Any, sql: str, rows: Sequence[Sequence[Any]]) -> None:
    """Translated ``sql`` once per row of ``rows`` (parameters coerced as ``fetch`` does)."""
    shape = _SHAPES.get(sql)
    if shape is None:
        shape = _SHAPES[sql] = _Shape(await conn.prepare(sql))
    await conn.executemany(
        sql, [[_coerce(v, t) for v, t in zip(r, shape.params, strict=False)] for r in rows]
    )
