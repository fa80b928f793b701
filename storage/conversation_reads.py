"""Conversation queries over ``inference_metrics`` (docs/conversations.md defines every figure).

Functions of a connection, called through ``Reads._call`` (its connection and error handling) by the API and the CLI. Estimates stay estimates:
``cache_reuse_ratio`` is built from ``prompt_cached_tokens`` / ``prompt_new_tokens``, which are estimated
(docs/conversations.md, "Prompt-cache reuse").
"""

from __future__ import annotations

import sqlite3
from typing import Any

from storage.records import iso_utc

__all__ = ["MAX_TURNS", "cache_reuse_by_model", "conversation", "list_conversations"]

MAX_TURNS = 1000  # rows one conversation view returns at most (the oldest first)

_TURN_COLUMNS = (
    "request_id",
    "timestamp",
    "turn",
    "model_name",
    "model_version",
    "endpoint",
    "status_code",
    "success",
    "done_reason",
    "prompt_tokens",
    "completion_tokens",
    "token_source",
    "prompt_cached_tokens",
    "prompt_new_tokens",
    "thinking_tokens",
    "tool_call_tokens",
    "ttft_ms",
    "response_time_ms",
    "prompt_eval_duration_ms",
    "tokens_per_second",
)


def _dicts(cur: sqlite3.Cursor) -> list[dict[str, Any]]:
    names = [d[0] for d in cur.description]
    return [dict(zip(names, row, strict=True)) for row in cur.fetchall()]


def _ratio(cached: Any, new: Any) -> float | None:
    total = (cached or 0) + (new or 0)
    return None if total == 0 else (cached or 0) / total


def list_conversations(
    conn: sqlite3.Connection, since: float, until: float, model: str | None, limit: int
) -> list[dict[str, Any]]:
    """Conversations with a request in [since, until), most recently active first; ``model`` keeps those
    with a request to that model. Figures cover the conversation's requests inside the window."""
    where = ["conversation_id IS NOT NULL", "timestamp >= ?", "timestamp < ?"]
    params: list[Any] = [iso_utc(since), iso_utc(until)]
    if model is not None:
        where.append(
            "conversation_id IN (SELECT conversation_id FROM inference_metrics"
            " WHERE model_name = ? AND timestamp >= ? AND timestamp < ? AND conversation_id IS NOT NULL)"
        )
        params += [model, iso_utc(since), iso_utc(until)]
    cur = conn.execute(
        f"""
        SELECT conversation_id, MIN(timestamp) AS first_at, MAX(timestamp) AS last_at,
               COUNT(*) AS request_count, MAX(turn) AS turns, COUNT(DISTINCT model_name) AS model_count,
               MAX(model_name) AS model_name, SUM(success = 0) AS errors,
               SUM(prompt_tokens) AS prompt_tokens, SUM(completion_tokens) AS completion_tokens,
               SUM(prompt_cached_tokens) AS prompt_cached_tokens, SUM(prompt_new_tokens) AS prompt_new_tokens,
               AVG(response_time_ms) AS response_time_ms_mean, AVG(ttft_ms) AS ttft_ms_mean
        FROM inference_metrics WHERE {" AND ".join(where)}
        GROUP BY conversation_id ORDER BY last_at DESC, conversation_id LIMIT ?
        """,
        [*params, limit],
    )
    rows = _dicts(cur)
    for row in rows:
        row["cache_reuse_ratio"] = _ratio(row["prompt_cached_tokens"], row["prompt_new_tokens"])
    return rows


def cache_reuse_by_model(conn: sqlite3.Connection, since: float, until: float) -> dict[str, dict[str, Any]]:
    """Per model over [since, until): estimated cached and new prompt tokens and their ratio, over the
    requests that carry an estimate."""
    cur = conn.execute(
        """
        SELECT model_name, COUNT(*) AS requests, SUM(prompt_cached_tokens) AS prompt_cached_tokens,
               SUM(prompt_new_tokens) AS prompt_new_tokens
        FROM inference_metrics
        WHERE timestamp >= ? AND timestamp < ? AND prompt_new_tokens IS NOT NULL AND model_name IS NOT NULL
        GROUP BY model_name ORDER BY model_name NULLS FIRST
        """,
        (iso_utc(since), iso_utc(until)),
    )
    out: dict[str, dict[str, Any]] = {}
    for row in _dicts(cur):
        model = row.pop("model_name")
        row["cache_reuse_ratio"] = _ratio(row["prompt_cached_tokens"], row["prompt_new_tokens"])
        out[model] = row
    return out


def conversation(conn: sqlite3.Connection, conversation_id: str) -> dict[str, Any] | None:
    """Every request of one conversation in order (at most ``MAX_TURNS``, the oldest), None when unknown."""
    cur = conn.execute(
        f"SELECT {', '.join(_TURN_COLUMNS)} FROM inference_metrics WHERE conversation_id = ?"
        " ORDER BY timestamp, id LIMIT ?",
        (conversation_id, MAX_TURNS + 1),
    )
    turns = _dicts(cur)
    if not turns:
        return None
    truncated = len(turns) > MAX_TURNS
    turns = turns[:MAX_TURNS]
    for t in turns:
        t["success"] = bool(t["success"])
        t["cache_reuse_ratio"] = _ratio(t["prompt_cached_tokens"], t["prompt_new_tokens"])
    cached = sum(t["prompt_cached_tokens"] or 0 for t in turns)
    new = sum(t["prompt_new_tokens"] or 0 for t in turns)
    return {
        "conversation_id": conversation_id,
        "request_count": len(turns),
        "truncated": truncated,
        "turns": max((t["turn"] or 0 for t in turns), default=0) or None,
        "models": sorted({t["model_name"] for t in turns if t["model_name"]}),
        "prompt_tokens": sum(t["prompt_tokens"] or 0 for t in turns),
        "completion_tokens": sum(t["completion_tokens"] or 0 for t in turns),
        "prompt_cached_tokens": cached,
        "prompt_new_tokens": new,
        "cache_reuse_ratio": _ratio(cached, new),
        "requests": turns,
    }
