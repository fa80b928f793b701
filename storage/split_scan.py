"""An exact summary's per-group queries on several cores: the window cut into time slices, one per core.

SQLite runs a query without holding Python's GIL, so a second connection to the same file, in a helper
thread, reads another part of the window at the same time. Each slice runs every group's query (the same
SQL, its own ``timestamp`` bounds); the slices' rows are merged column by column: counts and sums add,
``group_concat`` texts join, minima and maxima take the extreme. Every aggregate of an exact summary's
per-group query is one of these, so the merged row is the one a single query over the whole window gives
(its float sums to the last bits: the same values added in another order).

Used only where it cannot change what is read: a file database (a helper's read-only connection sees what
the caller sees) outside an open transaction (whose uncommitted rows no other connection would see), with
more than one core. Otherwise the groups are read one after another on the caller's connection, as before.
Each helper is a thread of its own for the one summary, so concurrent summaries never wait for each other's
slices. docs/benchmarks.md, "Exact summaries on several cores".
"""

from __future__ import annotations

import os
import sqlite3
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

__all__ = ["CONCAT", "MAX", "MIN", "SUM", "group_rows", "helpers"]

SUM, CONCAT, MIN, MAX = "sum", "concat", "min", "max"
_MAX_HELPERS = 3  # at most four slices: past that a slice's fixed cost (a connection, a thread) outweighs it


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def helpers() -> int:
    """Helper threads an exact summary may use besides its own: one fewer than the cores, at most 3."""
    return max(0, min(_MAX_HELPERS, _cores() - 1))


class _Helper(threading.Thread):
    """One slice read on a thread of its own (started per summary, ~0.1 ms: never queued behind another
    summary's slices, as a shared pool would; concurrent summaries share the cores like any threads)."""

    def __init__(self, *args: Any) -> None:
        super().__init__(name="ollamon-exact-slice", daemon=True)
        self._args = args
        self.rows: list[Any] | None = None
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self.rows = _read_slice(*self._args)
        except BaseException as exc:  # handed to the caller, which raises it
            self.error = exc

    def result(self) -> list[Any]:
        """The slice's rows, once joined; the helper's error raised here, in the caller."""
        if self.error is not None:
            raise self.error
        assert self.rows is not None
        return self.rows


def _database_file(conn: sqlite3.Connection) -> str | None:
    """The file of ``conn``'s main database; None for an in-memory or temporary one."""
    for _, name, file in conn.execute("PRAGMA database_list"):
        if name == "main":
            return str(file) or None
    return None


def _read_slice(path: str, timeout_s: float, sql: str, values: Sequence[Any], params: list[Any]) -> list[Any]:
    """Every group's row of one slice, on a read-only connection of its own (helper thread)."""
    conn = sqlite3.connect(Path(path).resolve().as_uri() + "?mode=ro", uri=True, timeout=timeout_s)
    try:
        conn.execute("PRAGMA query_only=ON")
        return [conn.execute(sql, [v, *params]).fetchone() for v in values]
    finally:
        conn.close()


def _merge(rows: Sequence[Sequence[Any]], kinds: Sequence[str]) -> tuple[Any, ...]:
    out: list[Any] = []
    for j, kind in enumerate(kinds):
        vals = [r[j] for r in rows if r[j] is not None]
        if not vals:
            out.append(None)
        elif kind == SUM:
            out.append(sum(vals[1:], vals[0]))
        elif kind == CONCAT:
            out.append(",".join(vals))
        elif kind == MIN:
            out.append(min(vals))
        else:
            out.append(max(vals))
    return tuple(out)


def group_rows(
    conn: sqlite3.Connection,
    sql: str,
    values: Sequence[Any],
    since: float,
    until: float,
    params_of: Callable[[float, float], list[Any]],
    kinds: Sequence[str],
    *,
    parallel: bool = True,
) -> list[tuple[Any, ...] | None]:
    """Per value of ``values``, the row of ``sql`` (one aggregate row; its first ``?`` is the group value,
    the rest ``params_of(since, until)``) over [since, until), with ``kinds[j]`` saying how column ``j``
    adds up across slices. The caller's connection reads the first slice while helpers read the others;
    ``parallel=False`` (a window too small to gain from it) reads it all on the caller's connection."""
    parts = helpers() + 1 if parallel else 1
    path = _database_file(conn) if parts > 1 and not conn.in_transaction else None
    if path is None or until <= since:
        return [conn.execute(sql, [v, *params_of(since, until)]).fetchone() for v in values]
    step = (until - since) / parts
    cuts = [since] + [since + step * i for i in range(1, parts)] + [until]
    timeout_s = float(conn.execute("PRAGMA busy_timeout").fetchone()[0]) / 1000
    threads = [
        _Helper(path, timeout_s, sql, values, params_of(cuts[i], cuts[i + 1])) for i in range(1, parts)
    ]
    for t in threads:
        t.start()
    try:
        mine = [conn.execute(sql, [v, *params_of(cuts[0], cuts[1])]).fetchone() for v in values]
    finally:  # even when the caller's own read failed: no helper outlives the call
        for t in threads:
            t.join()
    slices = [mine, *(t.result() for t in threads)]
    return [_merge([s[k] for s in slices if s[k] is not None], kinds) for k in range(len(values))]
