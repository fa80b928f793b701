"""SQLiteStore against real files: round trips of every field, error rows, optional text, open errors."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from storage.errors import RecordRejectedError, StorageError, StoreOpenError, StoreUnavailableError
from storage.records import INFERENCE_COLUMNS, ErrorRecord, InferenceRecord
from storage.sqlite import SQLiteStore
from tests.storage_rows import fetch_errors, fetch_requests, fetch_text


def full_record(i: int = 0, **over: Any) -> InferenceRecord:
    """A record with every field set to a distinct, non-default value."""
    values: dict[str, Any] = dict(
        timestamp=f"2026-11-26T23:07:{i % 60:02d}.123Z",
        request_id=f"req-{i}",
        model_name="llama3.2:1b",
        prompt_tokens=11,
        completion_tokens=22,
        total_tokens=33,
        response_time_ms=1234.5,
        queue_time_ms=1.25,
        processing_time_ms=1200.75,
        tokens_per_second=18.5,
        prompt_length=44,
        response_length=88,
        success=False,
        error_message="upstream said no",
        model_version="sha256:abc",
        temperature=0.7,
        max_tokens=128,
        metadata={"k": [1, 2, {"x": None}], "unicode": "héllo"},
        endpoint="/api/chat",
        status_code=500,
        stream=True,
        ttft_ms=55.5,
        itl_mean_ms=20.25,
        itl_p95_ms=30.5,
        itl_max_ms=99.0,
        load_duration_ms=3.5,
        prompt_eval_duration_ms=10.5,
        eval_duration_ms=1000.25,
        total_duration_ms=1100.0,
        done_reason="stop",
        cancelled=True,
        token_source="ollama",
        client_addr="127.0.0.1",
        user_agent="pytest",
        user_id="alice",
        top_k=40,
        top_p=0.9,
        repeat_penalty=1.1,
        seed=42,
        num_ctx=4096,
        stop=["\n\n", "END"],
    )
    values.update(over)
    return InferenceRecord(**values)


def as_row(record: InferenceRecord) -> dict[str, Any]:
    return {c: getattr(record, c) for c in INFERENCE_COLUMNS}


def file_bytes(db: Path) -> bytes:
    """The database file plus its WAL: everything SQLite has written."""
    return db.read_bytes() + Path(f"{db}-wal").read_bytes()


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SQLiteStore]:
    s = SQLiteStore(tmp_path / "sub" / "dir" / "ollamon.db")
    await s.open()
    try:
        yield s
    finally:
        await s.close()


async def test_open_creates_directory_wal_and_schema(tmp_path: Path) -> None:
    path = tmp_path / "a" / "b" / "x.db"
    s = SQLiteStore(path, synchronous="FULL", busy_timeout_ms=1234)
    await s.open()
    try:
        assert path.exists()
        assert await s.health() == "ok"
        db = s._writer_conn()
        assert (await db.execute_fetchall("PRAGMA journal_mode"))[0][0] == "wal"  # type: ignore[index]
        assert (await db.execute_fetchall("PRAGMA synchronous"))[0][0] == 2  # type: ignore[index]
        assert (await db.execute_fetchall("PRAGMA busy_timeout"))[0][0] == 1234  # type: ignore[index]
    finally:
        await s.close()
    assert await s.health() == "down"


async def test_default_synchronous_is_normal(store: SQLiteStore) -> None:
    rows = await store._writer_conn().execute_fetchall("PRAGMA synchronous")
    assert next(iter(rows))[0] == 1


async def test_every_field_round_trips(store: SQLiteStore) -> None:
    full = full_record(1)
    sparse = InferenceRecord(
        timestamp="2026-11-26T23:07:39.000Z", request_id="req-sparse", endpoint="/api/generate"
    )
    await store.write_batch([full, sparse])
    rows = await fetch_requests(store)
    assert [r["request_id"] for r in rows] == ["req-sparse", "req-1"]  # newest first
    got_full = {k: v for k, v in rows[1].items() if k != "id"}
    got_sparse = {k: v for k, v in rows[0].items() if k != "id"}
    assert got_full == as_row(full)
    assert got_sparse == as_row(sparse)
    assert got_sparse["success"] is True and got_sparse["cancelled"] is False and got_sparse["stream"] is None
    assert got_sparse["metadata"] is None and got_sparse["stop"] is None
    # and the raw encoding is the documented one: 0/1 and JSON text
    raw = sqlite3.connect(store.path).execute(
        "SELECT success, cancelled, stream, metadata, stop FROM inference_metrics WHERE request_id='req-1'"
    )
    assert raw.fetchone() == (0, 1, 1, '{"k":[1,2,{"x":null}],"unicode":"héllo"}', '["\\n\\n","END"]')
    assert await fetch_requests(store, request_id="req-1") == [rows[1]]
    assert await fetch_requests(store, limit=1) == [rows[0]]


async def test_error_rows_from_records_and_standalone(store: SQLiteStore) -> None:
    err = ErrorRecord(
        timestamp="2026-11-26T23:07:38.123Z",
        request_id="req-7",
        error_type="upstream_status",
        error_message="500 from upstream",
        model_name="m",
        endpoint="/api/chat",
        user_id="bob",
        severity="warning",
    )
    standalone = ErrorRecord(
        timestamp="2026-11-26T23:07:39.000Z",
        request_id=None,
        error_type="internal",
        error_message="x",
        stack_trace="Traceback...",
    )
    await store.write_batch([full_record(7, error=err), standalone])
    assert await store.count("inference_metrics") == 1
    assert await store.count("error_metrics") == 2
    errors = await fetch_errors(store)
    assert {k: v for k, v in errors[1].items() if k != "id"} == dataclasses.asdict(err)
    assert {k: v for k, v in errors[0].items() if k != "id"} == dataclasses.asdict(standalone)
    assert await fetch_errors(store, request_id="req-7") == [errors[1]]


async def test_text_not_stored_by_default(store: SQLiteStore) -> None:
    await store.write_batch([full_record(1, prompt_text="secret prompt", response_text="secret answer")])
    assert await store.count("request_text") == 0
    assert await fetch_text(store, "req-1") is None
    raw = await asyncio.to_thread(file_bytes, store.path)
    assert b"secret prompt" not in raw


async def test_text_stored_when_switched_on(tmp_path: Path) -> None:
    s = SQLiteStore(tmp_path / "t.db", store_text=True)
    await s.open()
    try:
        await s.write_batch(
            [
                full_record(1, prompt_text="hello", response_text="world"),
                full_record(2),  # no text at all: no row
                full_record(
                    1, prompt_text="hello again", response_text=None
                ),  # same id: replaced, not a failure
            ]
        )
        assert await s.count("request_text") == 1
        assert await fetch_text(s, "req-1") == {
            "request_id": "req-1",
            "timestamp": full_record(1).timestamp,
            "prompt_text": "hello again",
            "response_text": None,
        }
        assert await s.count("inference_metrics") == 3
    finally:
        await s.close()


async def test_batch_is_one_transaction(store: SQLiteStore) -> None:
    """A rejected record rejects the whole batch: nothing of it is written."""
    bad = full_record(2, prompt_tokens=object())
    bad_error = ErrorRecord("2026-11-26T23:07:00.000Z", "req-e", "internal", ["not", "text"])  # type: ignore[arg-type]
    with pytest.raises(RecordRejectedError) as info:
        await store.write_batch([full_record(1), bad, full_record(3), bad_error])
    assert info.value.indices == (1, 3)
    assert "prompt_tokens has a object" in str(info.value) and "error_message has a list" in str(info.value)
    assert await store.count("inference_metrics") == 0 and await store.count("error_metrics") == 0


async def test_numbers_beyond_64_bits_and_unencodable_metadata_keep_the_row(store: SQLiteStore) -> None:
    """What a client or an upstream sends cannot cost a request its row: integers SQLite cannot hold become
    NULL with their text in metadata.out_of_range; metadata that is no JSON at all is replaced, not fatal."""
    huge = full_record(1, seed=10**30, top_k=2**63, num_ctx=-(2**63) - 1, prompt_tokens=2**64)
    huge.metadata = {"ollama": {"eval_count": 10**25}, "out_of_range": {"max_tokens": "99999999999999999999"}}
    weird = full_record(2, metadata={"obj": object()})
    await store.write_batch([huge, weird, full_record(3)])
    rows = {r["request_id"]: r for r in await fetch_requests(store)}
    assert len(rows) == 3
    row = rows["req-1"]
    assert (row["seed"], row["top_k"], row["num_ctx"], row["prompt_tokens"]) == (None, None, None, None)
    assert row["metadata"] == {
        "ollama": {"eval_count": str(10**25)},
        "out_of_range": {
            "max_tokens": "99999999999999999999",
            "prompt_tokens": str(2**64),
            "top_k": str(2**63),
            "seed": str(10**30),
            "num_ctx": str(-(2**63) - 1),
        },
    }
    assert row["completion_tokens"] == 22 and row["temperature"] == 0.7  # the rest as sent
    assert rows["req-2"]["metadata"] == {
        "metadata_error": "metadata cannot be stored as JSON: Type is not JSON serializable: object"
    }
    assert rows["req-3"] == {**as_row(full_record(3)), "id": rows["req-3"]["id"]}
    # The largest values that fit stay numbers.
    await store.write_batch([full_record(4, seed=2**63 - 1, top_k=-(2**63))])
    (edge,) = await fetch_requests(store, limit=1)
    assert (edge["seed"], edge["top_k"]) == (2**63 - 1, -(2**63)) and "out_of_range" not in edge["metadata"]


async def test_insert_errors_are_rejections_and_transient_errors_are_not(store: SQLiteStore) -> None:
    """An error the records cause inside the transaction (a constraint, a failing hook) is a rejection the
    writer can isolate; a lock or a full disk is an outage it retries."""
    no_id = full_record(5, request_id=None)  # NOT NULL: only the INSERT finds out
    with pytest.raises(RecordRejectedError, match="IntegrityError") as info:
        await store.write_batch([full_record(4), no_id])
    assert info.value.indices is None
    calls: list[int] = []

    async def hook(db: Any, records: Any) -> None:
        calls.append(len(records))
        if any(getattr(r, "request_id", "") == "req-boom" for r in records):
            raise KeyError("the hook cannot handle req-boom")

    store.add_hook(hook)
    with pytest.raises(RecordRejectedError, match="KeyError"):
        await store.write_batch([full_record(6), full_record(7, request_id="req-boom")])
    assert await store.count("inference_metrics") == 0
    await store.write_batch([full_record(8)])
    assert await store.count("inference_metrics") == 1 and calls == [2, 1]


async def test_locked_database_is_unavailable_not_rejected(tmp_path: Path) -> None:
    s = SQLiteStore(tmp_path / "l.db", busy_timeout_ms=50)
    await s.open()
    other = sqlite3.connect(s.path, isolation_level=None)
    try:
        other.execute("BEGIN EXCLUSIVE")
        with pytest.raises(StoreUnavailableError, match="locked"):
            await s.write_batch([full_record(1)])
        other.execute("COMMIT")
        await s.write_batch([full_record(1)])
        assert await s.count("inference_metrics") == 1
    finally:
        other.close()
        await s.close()


async def test_open_errors_name_path_and_reason(tmp_path: Path) -> None:
    not_db = tmp_path / "not-a-db.db"
    not_db.write_bytes(b"this is not sqlite, just text " * 100)
    with pytest.raises(StoreOpenError) as info:
        await SQLiteStore(not_db).open()
    assert str(not_db) in str(info.value) and "not a database" in str(info.value)
    assert isinstance(info.value, StorageError)

    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(StoreOpenError) as info:
        await SQLiteStore(blocker / "sub" / "x.db").open()  # parent "directory" is a file
    assert str(blocker / "sub" / "x.db") in str(info.value) and "cannot create directory" in str(info.value)

    with pytest.raises(StoreOpenError, match="is a directory"):
        await SQLiteStore(tmp_path).open()


async def test_unwritable_directory(tmp_path: Path) -> None:
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        if os.access(ro, os.W_OK):  # running as root: permissions do not apply; use a path that cannot exist
            target = Path("/proc/ollamon-cannot-exist/x.db")
        else:
            target = ro / "x.db"
        with pytest.raises(StoreOpenError) as info:
            await SQLiteStore(target).open()
        assert str(target) in str(info.value)
    finally:
        ro.chmod(0o700)


async def test_count_refuses_unknown_tables(store: SQLiteStore) -> None:
    with pytest.raises(ValueError, match="unknown table"):
        await store.count("sqlite_master; DROP TABLE x")


async def test_write_on_closed_store_is_unavailable(tmp_path: Path) -> None:
    s = SQLiteStore(tmp_path / "c.db")
    with pytest.raises(StoreUnavailableError):
        await s.write_batch([full_record(1)])
