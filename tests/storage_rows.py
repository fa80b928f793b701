"""Read back what a store wrote, for tests: rows as dicts, newest first, decoded like the records they came from."""

from __future__ import annotations

import asyncio
import sqlite3
from typing import Any

from storage.sqlite import SQLiteStore, _decode_inference

__all__ = ["fetch_errors", "fetch_requests", "fetch_text"]


def _rows(store: SQLiteStore, sql: str, params: list[Any]) -> list[dict[str, Any]]:
    con = sqlite3.connect(f"file:{store.path}?mode=ro", uri=True, timeout=5.0)
    con.row_factory = sqlite3.Row
    try:
        return [dict(r) for r in con.execute(sql, params)]
    finally:
        con.close()


async def _select(store: SQLiteStore, table: str, limit: int, request_id: str | None) -> list[dict[str, Any]]:
    where, params = ("WHERE request_id = ?", [request_id]) if request_id is not None else ("", [])
    sql = f"SELECT * FROM {table} {where} ORDER BY id DESC LIMIT ?"
    return await asyncio.to_thread(_rows, store, sql, [*params, int(limit)])


async def fetch_requests(
    store: SQLiteStore, limit: int = 100, request_id: str | None = None
) -> list[dict[str, Any]]:
    return [_decode_inference(r) for r in await _select(store, "inference_metrics", limit, request_id)]


async def fetch_errors(
    store: SQLiteStore, limit: int = 100, request_id: str | None = None
) -> list[dict[str, Any]]:
    return await _select(store, "error_metrics", limit, request_id)


async def fetch_text(store: SQLiteStore, request_id: str) -> dict[str, Any] | None:
    rows = await asyncio.to_thread(
        _rows, store, "SELECT * FROM request_text WHERE request_id = ?", [request_id]
    )
    return rows[0] if rows else None
