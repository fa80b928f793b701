"""Migrations from an empty database and from every earlier state, asserting the exact schema."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from storage.migrations import MIGRATIONS, applied_migrations, apply_migrations, m001_initial
from storage.records import ERROR_COLUMNS, INFERENCE_COLUMNS

EXPECTED_INFERENCE = ("id", *INFERENCE_COLUMNS)
EXPECTED_ERROR = ("id", *ERROR_COLUMNS)
EXPECTED_TEXT = ("request_id", "timestamp", "prompt_text", "response_text")


def columns(conn: sqlite3.Connection, table: str) -> tuple[str, ...]:
    return tuple(row[1] for row in conn.execute(f"PRAGMA table_info({table})"))


def column_types(conn: sqlite3.Connection, table: str) -> dict[str, str]:
    return {row[1]: row[2] for row in conn.execute(f"PRAGMA table_info({table})")}


def indexed_columns(conn: sqlite3.Connection, table: str) -> set[str]:
    out: set[str] = set()
    for idx in conn.execute(f"PRAGMA index_list({table})"):
        out.update(row[2] for row in conn.execute(f"PRAGMA index_info({idx[1]})"))
    return out


def assert_latest_schema(conn: sqlite3.Connection) -> None:
    assert columns(conn, "inference_metrics") == EXPECTED_INFERENCE
    assert columns(conn, "error_metrics") == EXPECTED_ERROR
    assert columns(conn, "request_text") == EXPECTED_TEXT
    assert {"timestamp", "model_name", "request_id", "conversation_id"} <= indexed_columns(
        conn, "inference_metrics"
    )
    assert {"timestamp", "request_id", "upstream"} <= indexed_columns(conn, "error_metrics")
    assert "upstream" in indexed_columns(conn, "inference_metrics")
    assert applied_migrations(conn) == [m.__name__ for m in MIGRATIONS]


def test_from_empty_database(tmp_path: Path) -> None:
    conn = sqlite3.connect(tmp_path / "m.db")
    assert apply_migrations(conn) == [m.__name__ for m in MIGRATIONS]
    assert_latest_schema(conn)
    types = column_types(conn, "inference_metrics")
    assert types["timestamp"] == "TEXT"
    assert types["success"] == types["cancelled"] == types["stream"] == "INTEGER"
    assert types["prompt_tokens"] == "INTEGER"
    assert types["ttft_ms"] == types["response_time_ms"] == "REAL"
    assert types["metadata"] == types["stop"] == "TEXT"
    assert types["cloud"] == "INTEGER"


def test_from_m001_only_database(tmp_path: Path) -> None:
    path = tmp_path / "m.db"
    conn = sqlite3.connect(path)
    assert apply_migrations(conn, [m001_initial]) == ["m001_initial"]
    later = ("energy_j", "gpu_memory_peak_mb", "cloud", "audio_seconds")  # m002 two, m006 and m007 one each
    later += ("conversation_id", "turn", "prompt_cached_tokens", "prompt_new_tokens")  # m010
    later += ("thinking_tokens", "tool_call_tokens")  # m010
    later += ("cost_usd", "cloud_equiv_usd", "energy_cost_usd")  # m009
    later += ("api_key_id", "team")  # m008
    later += ("upstream",)  # m013
    later += ("instance",)  # m014
    assert columns(conn, "inference_metrics") == tuple(c for c in EXPECTED_INFERENCE if c not in later)
    conn.execute(
        "INSERT INTO inference_metrics (timestamp, request_id, success, endpoint, cancelled) VALUES ('t', 'r', 1, '/api/chat', 0)"
    )
    conn.commit()
    conn.close()
    conn = sqlite3.connect(path)
    assert apply_migrations(conn) == [m.__name__ for m in MIGRATIONS[1:]]
    assert_latest_schema(conn)
    assert conn.execute("SELECT request_id FROM inference_metrics").fetchall() == [("r",)]


def test_second_run_applies_nothing(tmp_path: Path) -> None:
    conn = sqlite3.connect(tmp_path / "m.db")
    apply_migrations(conn)
    assert apply_migrations(conn) == []
    assert_latest_schema(conn)


def test_failing_migration_rolls_back_and_is_not_recorded(tmp_path: Path) -> None:
    conn = sqlite3.connect(tmp_path / "m.db")

    def m999_broken(c: sqlite3.Connection) -> None:
        """Creates a table, then fails: neither may survive."""
        c.execute("CREATE TABLE half_done (x INTEGER)")
        raise RuntimeError("boom")

    try:
        apply_migrations(conn, [*MIGRATIONS, m999_broken])
    except RuntimeError as exc:
        assert str(exc) == "boom"
    else:
        raise AssertionError("the broken migration did not raise")
    tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    assert "half_done" not in tables
    assert "m999_broken" not in applied_migrations(conn)
    assert_latest_schema(conn)  # the good ones before it were committed


def test_migrations_have_unique_names_and_reasons() -> None:
    names = [m.__name__ for m in MIGRATIONS]
    assert len(names) == len(set(names))
    assert names == sorted(names)
    for m in MIGRATIONS:
        assert m.__name__.startswith("m") and m.__name__[1:4].isdigit()
        assert m.__doc__ and m.__doc__.strip(), f"{m.__name__} needs a one-line reason"


def test_m006_flags_the_cloud_rows_already_recorded(tmp_path: Path) -> None:
    """From the m005 schema: old rows of cloud models get cloud = 1, the rest 0; new rows default to 0."""
    conn = sqlite3.connect(tmp_path / "m.db")
    before = [m for m in MIGRATIONS if m.__name__ < "m006"]
    apply_migrations(conn, before)
    assert "cloud" not in columns(conn, "inference_metrics")
    names = [("a", "gpt-oss:20b-cloud"), ("b", "glm-4.6:cloud"), ("c", "llama3.2:latest"), ("d", None)]
    conn.executemany(
        "INSERT INTO inference_metrics (timestamp, request_id, model_name, success, endpoint, cancelled)"
        " VALUES ('t', ?, ?, 1, '/api/chat', 0)",
        names,
    )
    conn.commit()
    assert apply_migrations(conn) == [m.__name__ for m in MIGRATIONS if m.__name__ >= "m006"]
    assert_latest_schema(conn)
    got = dict(conn.execute("SELECT request_id, cloud FROM inference_metrics"))
    assert got == {"a": 1, "b": 1, "c": 0, "d": 0}
    conn.execute(
        "INSERT INTO inference_metrics (timestamp, request_id, success, endpoint, cancelled)"
        " VALUES ('t', 'e', 1, '/api/chat', 0)"
    )
    assert conn.execute("SELECT cloud FROM inference_metrics WHERE request_id = 'e'").fetchone() == (0,)
