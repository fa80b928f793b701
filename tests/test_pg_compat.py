"""SQLite's functions on PostgreSQL (migration p005_sqlite_compat): the same answers as SQLite's, edge cases too.

Why: the shared reads (storage/queries.py, storage/exact.py, storage/usage_reads.py) call ``SUM`` and ``TOTAL``
of a comparison, ``group_concat`` and ``printf('%!.17g', x)``, which PostgreSQL has only as the aggregates and
functions the migration creates, with ``array_append`` per row and a final function per group rather than SQL
transition functions (docs/benchmarks.md, "PostgreSQL queries at 1M rows"). Each expression here runs on one small table
in both databases and must answer exactly what SQLite answers: empty groups, NULLs, all-NULL groups, empty
strings, and floats that must read back exactly.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

import asyncpg  # type: ignore[import-untyped]  # no stubs or py.typed in asyncpg 0.32
import pytest

from storage.postgres.schema import apply_migrations

ROWS = [
    # g, b (a boolean as SQLite's 0/1 or NULL), s (text or NULL), x (a float or NULL)
    (1, 1, "a", 0.1),
    (1, 0, None, 1e-300),
    (1, None, "b", None),
    (2, None, None, None),
    (2, None, None, 2.5),
    (3, 0, "", 1 / 3),
    (3, 0, None, -0.0),
    (4, 1, "", 123456789.12345678),
    (4, 1, "", float("inf")),
]
EXPRESSIONS = [
    "SUM(b != 0)",
    "SUM(b = 0)",
    "TOTAL(b != 0)",
    "TOTAL(b = 0 AND g > 1)",
    "TOTAL(x)",
    "group_concat(s)",
    "group_concat(CASE WHEN x > 0 THEN printf('%!.17g', x) END)",
    "COALESCE(SUM(b != 0), 0)",
]


async def _pg_answers(url: str, sqls: list[str]) -> list[list[tuple[object, ...]]]:
    conn = await asyncpg.connect(url)
    try:
        await apply_migrations(conn)
        await conn.execute("CREATE TABLE t (g BIGINT, b SMALLINT, s TEXT, x DOUBLE PRECISION)")
        await conn.executemany("INSERT INTO t VALUES ($1, $2, $3, $4)", ROWS)
        return [[tuple(r) for r in await conn.fetch(sql)] for sql in sqls]
    finally:
        await conn.close()


def _parts(rows: list[tuple[object, ...]], floats: bool) -> list[tuple[object, ...]]:
    out = []
    for r in rows:
        last = r[-1]
        parts = None if last is None else sorted(float(p) if floats else p for p in str(last).split(","))
        out.append((*r[:-1], parts))
    return out


@pytest.mark.parametrize("expr", EXPRESSIONS)
@pytest.mark.parametrize("where", ["TRUE", "g = 99"])  # groups, and no row at all
async def test_same_answer_as_sqlite(tmp_path: Path, pg_url: str, expr: str, where: str) -> None:
    lite = sqlite3.connect(tmp_path / "t.db")
    lite.execute("CREATE TABLE t (g INTEGER, b INTEGER, s TEXT, x REAL)")
    lite.executemany("INSERT INTO t VALUES (?, ?, ?, ?)", ROWS)
    sqls = [
        f"SELECT g, {expr} FROM t WHERE {where} GROUP BY g ORDER BY g",
        f"SELECT {expr} FROM t WHERE {where}",
    ]
    answers = await _pg_answers(pg_url, sqls)
    for sql, got in zip(sqls, answers, strict=True):
        want = [tuple(r) for r in lite.execute(sql)]
        if "group_concat" in expr:  # SQLite gives no order: compare the joined parts as multisets, and
            # printf's floats as the floats they read back as (PostgreSQL prints the shortest exact form)
            want, got = _parts(want, "printf" in expr), _parts(got, "printf" in expr)
        assert got == want, sql
        for w, g in zip(want, got, strict=True):
            assert [type(v) for v in w] == [type(v) for v in g], sql  # ints stay ints, floats floats


async def test_printf_refuses_other_formats(pg_url: str) -> None:
    conn = await asyncpg.connect(pg_url)
    try:
        await apply_migrations(conn)
        assert await conn.fetchval("SELECT printf('%!.17g', 0.1::double precision)") == "0.1"
        with pytest.raises(asyncpg.RaiseError, match=r"only %!\.17g"):
            await conn.fetchval("SELECT printf($1, 0.1::double precision)", "%d")
    finally:
        await conn.close()


async def test_group_concat_exact_floats(pg_url: str) -> None:
    """printf('%!.17g') through group_concat reads back every float exactly (storage/exact.py relies on it)."""
    values = [0.1, 1 / 3, 2.0**-40, 1e15 + 0.5, 5e-324, 1.7976931348623157e308]
    conn = await asyncpg.connect(pg_url)
    try:
        await apply_migrations(conn)
        text = await conn.fetchval(
            "SELECT group_concat(printf('%!.17g', v)) FROM unnest($1::double precision[]) AS u (v)", values
        )
    finally:
        await conn.close()
    assert sorted(float(p) for p in text.split(",")) == sorted(values)
