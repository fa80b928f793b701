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


@migration
def m002_resources(conn: sqlite3.Connection) -> None:
    """Resource sampling and the model inventory: system/GPU samples, model state and events, energy."""
    conn.execute(
        """
        CREATE TABLE system_metrics (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            timestamp TEXT NOT NULL,
            cpu_percent REAL,
            memory_percent REAL,
            memory_used_gb REAL,
            memory_total_gb REAL,
            swap_percent REAL,
            disk_percent REAL,
            disk_free_gb REAL,
            net_sent_bytes_per_s REAL,
            net_recv_bytes_per_s REAL,
            load_1m REAL,
            load_5m REAL,
            load_15m REAL,
            process_rss_mb REAL,
            process_cpu_percent REAL,
            swap_used_gb REAL,
            disk_total_gb REAL,
            disk_path TEXT,
            net_sent_bytes INTEGER,
            net_recv_bytes INTEGER,
            cpu_count INTEGER,
            gpu_count INTEGER,
            extra TEXT
        )
        """
    )
    conn.execute("CREATE INDEX idx_system_metrics_timestamp ON system_metrics (timestamp)")
    conn.execute(
        """
        CREATE TABLE gpu_metrics (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            timestamp TEXT NOT NULL,
            gpu_index INTEGER NOT NULL,
            name TEXT,
            uuid TEXT,
            temperature_c REAL,
            utilization_percent REAL,
            memory_utilization_percent REAL,
            memory_used_mb REAL,
            memory_total_mb REAL,
            memory_percent REAL,
            power_w REAL,
            power_limit_w REAL,
            sm_clock_mhz REAL,
            throttle_reasons TEXT,
            processes TEXT,
            throttle_reasons_mask INTEGER
        )
        """
    )
    conn.execute("CREATE INDEX idx_gpu_metrics_timestamp ON gpu_metrics (timestamp)")
    conn.execute(
        """
        CREATE TABLE model_info (
            model_name TEXT PRIMARY KEY,
            updated_at TEXT NOT NULL,
            model_version TEXT,
            family TEXT,
            families TEXT,
            format TEXT,
            parameter_size TEXT,
            parameter_count INTEGER,
            quantization_level TEXT,
            context_length INTEGER,
            embedding_length INTEGER,
            capabilities TEXT,
            template_hash TEXT,
            size_bytes INTEGER,
            modified_at TEXT,
            installed INTEGER NOT NULL,
            loaded INTEGER NOT NULL,
            size_vram_bytes INTEGER,
            loaded_at TEXT,
            expires_at TEXT,
            first_seen TEXT
        )
        """
    )
    conn.execute(
        """
        CREATE TABLE model_events (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            timestamp TEXT NOT NULL,
            model_name TEXT NOT NULL,
            event TEXT NOT NULL,
            model_version TEXT,
            previous_version TEXT,
            source TEXT,
            request_id TEXT,
            detail TEXT
        )
        """
    )
    conn.execute("CREATE INDEX idx_model_events_timestamp ON model_events (timestamp)")
    conn.execute("CREATE INDEX idx_model_events_model_name ON model_events (model_name)")
    conn.execute("ALTER TABLE inference_metrics ADD COLUMN energy_j REAL")
    conn.execute("ALTER TABLE inference_metrics ADD COLUMN gpu_memory_peak_mb REAL")


@migration
def m003_rollups(conn: sqlite3.Connection) -> None:
    """Per-minute and per-hour rollups (backfilled from existing rows) and retention bookkeeping."""
    metric_columns = "".join(
        f"{m}_n INTEGER NOT NULL DEFAULT 0, {m}_sum REAL NOT NULL DEFAULT 0, {m}_hist BLOB, "
        for m in ("response_time_ms", "ttft_ms", "queue_time_ms", "itl_mean_ms", "tokens_per_second")
    )
    for table in ("rollup_minute", "rollup_hour"):
        conn.execute(
            f"""
            CREATE TABLE {table} (
                id INTEGER PRIMARY KEY,
                level INTEGER NOT NULL,
                bucket INTEGER NOT NULL,
                model_name TEXT NOT NULL,
                endpoint TEXT NOT NULL,
                requests INTEGER NOT NULL DEFAULT 0,
                success INTEGER NOT NULL DEFAULT 0,
                failed INTEGER NOT NULL DEFAULT 0,
                cancelled INTEGER NOT NULL DEFAULT 0,
                prompt_tokens INTEGER NOT NULL DEFAULT 0,
                completion_tokens INTEGER NOT NULL DEFAULT 0,
                energy_j_n INTEGER NOT NULL DEFAULT 0,
                energy_j_sum REAL NOT NULL DEFAULT 0,
                {metric_columns}
                UNIQUE (level, bucket, model_name, endpoint)
            )
            """
        )
    conn.execute("CREATE INDEX idx_request_text_timestamp ON request_text (timestamp)")
    conn.execute(
        """
        CREATE TABLE retention_runs (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            started_at TEXT NOT NULL,
            finished_at TEXT NOT NULL,
            dry_run INTEGER NOT NULL,
            deleted TEXT NOT NULL,
            freed_bytes INTEGER,
            max_statement_ms REAL,
            error TEXT
        )
        """
    )
    from storage.rollups import backfill

    backfill(conn)


@migration
def m004_alerts(conn: sqlite3.Connection) -> None:
    """Alerts: one row per alert (a rule firing for one label set) and its state transitions."""
    conn.execute(
        """
        CREATE TABLE alerts (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            rule TEXT NOT NULL,
            fingerprint TEXT NOT NULL,
            labels TEXT NOT NULL,
            severity TEXT NOT NULL,
            state TEXT NOT NULL,
            value REAL,
            threshold REAL,
            message TEXT NOT NULL,
            started_at TEXT NOT NULL,
            fired_at TEXT,
            resolved_at TEXT,
            last_notified_at TEXT,
            announced_at TEXT,
            notification_count INTEGER NOT NULL DEFAULT 0,
            last_delivered_at TEXT,
            delivery_failures INTEGER NOT NULL DEFAULT 0,
            last_error TEXT
        )
        """
    )
    conn.execute("CREATE INDEX idx_alerts_state ON alerts (state)")
    conn.execute("CREATE INDEX idx_alerts_rule ON alerts (rule, fingerprint)")
    conn.execute(
        """
        CREATE TABLE alert_transitions (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            alert_id INTEGER NOT NULL REFERENCES alerts (id),
            at TEXT NOT NULL,
            from_state TEXT NOT NULL,
            to_state TEXT NOT NULL,
            value REAL
        )
        """
    )
    conn.execute("CREATE INDEX idx_alert_transitions_alert_id ON alert_transitions (alert_id)")


@migration
def m005_canonical_model_names(conn: sqlite3.Connection) -> None:
    """model_name holds the name Ollama resolves (llama3.2 -> llama3.2:latest); older rows kept the client's."""
    from storage.histogram import merge_blobs
    from storage.model_names import canonical_model_name
    from storage.rollups import ROLLUP_COLUMNS, TABLES, upsert_sql

    conn.create_function("ollamon_canonical_model", 1, canonical_model_name, deterministic=True)
    conn.create_function("ollamon_hist_merge", 2, merge_blobs, deterministic=True)
    changed = "model_name IS NOT NULL AND model_name != ollamon_canonical_model(model_name)"
    # The client's spelling moves to metadata.model_as_sent, as the recorder now writes it.
    conn.execute(
        f"""
        UPDATE inference_metrics SET
            metadata = CASE WHEN metadata IS NULL OR json_valid(metadata)
                THEN json_set(COALESCE(metadata, '{{}}'), '$.model_as_sent', model_name) ELSE metadata END,
            model_name = ollamon_canonical_model(model_name)
        WHERE {changed}
        """
    )
    conn.execute(f"UPDATE error_metrics SET model_name = ollamon_canonical_model(model_name) WHERE {changed}")
    # Rollup rows of two spellings of one model merge into one row (same level, bucket and endpoint).
    cols = ", ".join(ROLLUP_COLUMNS)
    model_at = ROLLUP_COLUMNS.index("model_name")
    for table in TABLES:
        rows = conn.execute(f"SELECT id, {cols} FROM {table} WHERE {changed}").fetchall()
        conn.executemany(f"DELETE FROM {table} WHERE id = ?", [(r[0],) for r in rows])
        merged = []
        for r in rows:
            values = list(r[1:])
            values[model_at] = canonical_model_name(values[model_at])
            merged.append(tuple(values))
        conn.executemany(upsert_sql(table), merged)


@migration
def m006_cloud(conn: sqlite3.Connection) -> None:
    """inference_metrics.cloud: the row's model has an explicit cloud source (Ollama proxied it to ollama.com)."""
    from storage.model_names import is_cloud_model

    conn.execute("ALTER TABLE inference_metrics ADD COLUMN cloud INTEGER NOT NULL DEFAULT 0")
    conn.create_function("ollamon_is_cloud_model", 1, is_cloud_model, deterministic=True)
    # Older rows name their model already: flag the cloud ones so summaries need no special case.
    conn.execute("UPDATE inference_metrics SET cloud = 1 WHERE ollamon_is_cloud_model(model_name)")


@migration
def m007_audio_seconds(conn: sqlite3.Connection) -> None:
    """inference_metrics.audio_seconds: the playing time of a transcription's WAV upload (NULL otherwise)."""
    conn.execute("ALTER TABLE inference_metrics ADD COLUMN audio_seconds REAL")


@migration
def m008_api_keys(conn: sqlite3.Connection) -> None:
    """API keys (hashes only) and the caller's key and team on every record (issue 13)."""
    conn.execute(
        """
        CREATE TABLE IF NOT EXISTS api_keys (
            id TEXT PRIMARY KEY,
            hash TEXT NOT NULL UNIQUE,
            prefix TEXT NOT NULL,
            name TEXT NOT NULL,
            owner TEXT,
            team TEXT,
            models TEXT NOT NULL DEFAULT '[]',
            rpm INTEGER NOT NULL DEFAULT 0,
            tpm INTEGER NOT NULL DEFAULT 0,
            concurrency INTEGER NOT NULL DEFAULT 0,
            admin INTEGER NOT NULL DEFAULT 0,
            expires_at TEXT,
            revoked_at TEXT,
            created_at TEXT NOT NULL
        )
        """
    )
    for table in ("inference_metrics", "error_metrics"):
        conn.execute(f"ALTER TABLE {table} ADD COLUMN api_key_id TEXT")
        conn.execute(f"ALTER TABLE {table} ADD COLUMN team TEXT")


@migration
def m009_usage_cost(conn: sqlite3.Connection) -> None:
    """What each request was charged (cost, hosted-API equivalent, energy cost) and ``usage_hour``, the
    hourly usage per key, team, model and user that outlives raw rows (issue 13; docs/usage.md)."""
    for column in ("cost_usd", "cloud_equiv_usd", "energy_cost_usd"):
        conn.execute(f"ALTER TABLE inference_metrics ADD COLUMN {column} REAL")
    from storage.usage_rollup import backfill_usage, create_usage_table

    create_usage_table(conn)
    backfill_usage(conn)


@migration
def m010_conversations(conn: sqlite3.Connection) -> None:
    """Conversation id, turn, prompt-cache reuse estimates and token types on every record (issue 14;
    docs/conversations.md defines them)."""
    for column, kind in (
        ("conversation_id", "TEXT"),
        ("turn", "INTEGER"),
        ("prompt_cached_tokens", "INTEGER"),
        ("prompt_new_tokens", "INTEGER"),
        ("thinking_tokens", "INTEGER"),
        ("tool_call_tokens", "INTEGER"),
    ):
        conn.execute(f"ALTER TABLE inference_metrics ADD COLUMN {column} {kind}")
    conn.execute(
        "CREATE INDEX IF NOT EXISTS idx_inference_conversation ON inference_metrics(conversation_id, timestamp)"
        " WHERE conversation_id IS NOT NULL"
    )


@migration
def m011_content_analysis(conn: sqlite3.Connection) -> None:
    """The content_analysis table: PII kinds and counts, language, safety verdicts per request (issue 14)."""
    from storage.content import create_content_table

    create_content_table(conn)


@migration
def m012_rollup_day(conn: sqlite3.Connection) -> None:
    """Daily and recent 5-minute rollups, compacted by maintenance (storage/rollup_day.py; issue 15)."""
    from storage.rollup_day import create_table

    create_table(conn, "rollup_day")
    create_table(conn, "rollup_5m")


@migration
def m013_upstream(conn: sqlite3.Connection) -> None:
    """The Ollama host that answered, on every record, for per-upstream figures (issue 16; docs/upstreams.md)."""
    for table in ("inference_metrics", "error_metrics"):
        conn.execute(f"ALTER TABLE {table} ADD COLUMN upstream TEXT")
        conn.execute(f"CREATE INDEX IF NOT EXISTS idx_{table}_upstream ON {table}(upstream, timestamp)")


@migration
def m014_instance(conn: sqlite3.Connection) -> None:
    """The ollamon instance that wrote each record, for several instances on one database (issue 16)."""
    for table in ("inference_metrics", "error_metrics"):
        conn.execute(f"ALTER TABLE {table} ADD COLUMN instance TEXT")
        conn.execute(f"CREATE INDEX IF NOT EXISTS idx_{table}_instance ON {table}(instance, timestamp)")


@migration
def m015_model_time_index(conn: sqlite3.Connection) -> None:
    """The model index gets the time as its second column: an exact summary then reads each model's rows of
    its window in index order, one query per model, instead of sorting every row of the window by model (the
    ``TEMP B-TREE FOR GROUP BY``: half of that scan, docs/benchmarks.md). Reads by model alone use it as they
    used the old one; the old one goes, so a write still maintains one model index (issue 15)."""
    conn.execute(
        "CREATE INDEX IF NOT EXISTS idx_inference_metrics_model_time ON inference_metrics(model_name, timestamp)"
    )
    conn.execute("DROP INDEX IF EXISTS idx_inference_metrics_model_name")


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
            # Another process may have applied it between our read and the write lock (two stores opening
            # one new file at once): look again under the lock.
            if conn.execute("SELECT 1 FROM _migrations WHERE name = ?", (name,)).fetchone() is not None:
                conn.execute("COMMIT")
                continue
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
