"""Append-only schema migrations for the SQLite store.

Each migration is a small function ``mNNN_what(conn)`` whose docstring's first line says why it exists.
They are applied in list order, each in its own transaction, and recorded by name in ``_migrations``, so a
database at any earlier state catches up and a finished one is left alone. Never edit or reorder one that
has shipped: add ``m002_...`` below instead (simonw/llm ``llm/migrations.py`` works the same way).

m001 spells its columns out rather than deriving them from ``storage.records``: a shipped migration must
keep producing the same schema even after the dataclasses grow (tests check the two agree).
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable, Sequence

from storage.records import iso_utc

__all__ = ["MIGRATIONS", "Migration", "applied_migrations", "apply_migrations", "migration"]

Migration = Callable[[sqlite3.Connection], None]

MIGRATIONS: list[Migration] = []


def migration(fn: Migration) -> Migration:
    """Register ``fn`` as the next migration (decorator); order of definition is order of application."""
    MIGRATIONS.append(fn)
    return fn


@migration
def m001_initial(conn: sqlite3.Connection) -> None:
    """Initial schema: one row per inference, one per error, and optional prompt/response text."""
    conn.execute(
        """
        CREATE TABLE inference_metrics (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            timestamp TEXT NOT NULL,
            request_id TEXT NOT NULL,
            model_name TEXT,
            prompt_tokens INTEGER,
            completion_tokens INTEGER,
            total_tokens INTEGER,
            response_time_ms REAL,
            queue_time_ms REAL,
            processing_time_ms REAL,
            tokens_per_second REAL,
            prompt_length INTEGER,
            response_length INTEGER,
            success INTEGER NOT NULL,
            error_message TEXT,
            model_version TEXT,
            temperature REAL,
            max_tokens INTEGER,
            metadata TEXT,
            endpoint TEXT NOT NULL,
            status_code INTEGER,
            stream INTEGER,
            ttft_ms REAL,
            itl_mean_ms REAL,
            itl_p95_ms REAL,
            itl_max_ms REAL,
            load_duration_ms REAL,
            prompt_eval_duration_ms REAL,
            eval_duration_ms REAL,
            total_duration_ms REAL,
            done_reason TEXT,
            cancelled INTEGER NOT NULL,
            token_source TEXT,
            client_addr TEXT,
            user_agent TEXT,
            user_id TEXT,
            top_k INTEGER,
            top_p REAL,
            repeat_penalty REAL,
            seed INTEGER,
            num_ctx INTEGER,
            stop TEXT
        )
        """
    )
    conn.execute("CREATE INDEX idx_inference_metrics_timestamp ON inference_metrics (timestamp)")
    conn.execute("CREATE INDEX idx_inference_metrics_model_name ON inference_metrics (model_name)")
    conn.execute("CREATE INDEX idx_inference_metrics_request_id ON inference_metrics (request_id)")
    conn.execute(
        """
        CREATE TABLE error_metrics (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            timestamp TEXT NOT NULL,
            request_id TEXT,
            error_type TEXT NOT NULL,
            error_message TEXT NOT NULL,
            stack_trace TEXT,
            model_name TEXT,
            endpoint TEXT,
            user_id TEXT,
            severity TEXT NOT NULL
        )
        """
    )
    conn.execute("CREATE INDEX idx_error_metrics_timestamp ON error_metrics (timestamp)")
    conn.execute("CREATE INDEX idx_error_metrics_request_id ON error_metrics (request_id)")
    conn.execute(
        """
        CREATE TABLE request_text (
            request_id TEXT PRIMARY KEY,
            timestamp TEXT NOT NULL,
            prompt_text TEXT,
            response_text TEXT
        )
        """
    )


def _ensure_table(conn: sqlite3.Connection) -> None:
    conn.execute("CREATE TABLE IF NOT EXISTS _migrations (name TEXT PRIMARY KEY, applied_at TEXT NOT NULL)")


def applied_migrations(conn: sqlite3.Connection) -> list[str]:
    """Names already recorded in ``_migrations``, in the order they were applied."""
    _ensure_table(conn)
    return [row[0] for row in conn.execute("SELECT name FROM _migrations ORDER BY rowid")]


def apply_migrations(conn: sqlite3.Connection, migrations: Sequence[Migration] = MIGRATIONS) -> list[str]:
    """Apply every migration of ``migrations`` not yet recorded; return the names newly applied.

    Each runs in its own transaction together with its ``_migrations`` row, so a crash mid-way leaves the
    database at the previous migration, never half-migrated. ``migrations`` defaults to all of them; tests
    pass a prefix to build an older schema.
    """
    if conn.in_transaction:
        raise RuntimeError("apply_migrations needs a connection with no open transaction")
    saved_isolation = conn.isolation_level
    conn.isolation_level = None  # we issue BEGIN/COMMIT ourselves, DDL included
    try:
        done = set(applied_migrations(conn))
        newly: list[str] = []
        for fn in migrations:
            name = fn.__name__
            if name in done:
                continue
            conn.execute("BEGIN IMMEDIATE")
            try:
                fn(conn)
                conn.execute(
                    "INSERT INTO _migrations (name, applied_at) VALUES (?, ?)",
                    (name, iso_utc(time.time())),
                )
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")
            newly.append(name)
        return newly
    finally:
        conn.isolation_level = saved_isolation
