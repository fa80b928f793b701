"""Generated inference rows for the analytics tests: random but reproducible, written the real way."""

from __future__ import annotations

import random
from collections.abc import Sequence
from pathlib import Path

from storage.records import ErrorRecord, InferenceRecord, iso_utc
from storage.rollups import RollupHook
from storage.sqlite import SQLiteStore

# Canonical names, as the recorder stores them (storage/model_names.py): filters accept either spelling.
MODELS = ("llama3.2:latest", "qwen2.5:7b", "mistral:latest")
ENDPOINTS = ("/api/chat", "/api/generate", "/v1/chat/completions")


def make_record(
    rng: random.Random, ts: float, i: int, *, models: Sequence[str | None] = MODELS
) -> InferenceRecord:
    """One plausible record at ``ts``: ~80% successes, some failures, cancellations and model loads."""
    roll = rng.random()
    success = roll < 0.8
    cancelled = 0.8 <= roll < 0.87
    load = roll > 0.97
    rt = rng.lognormvariate(6.5, 0.8)
    rec = InferenceRecord(
        timestamp=iso_utc(ts),
        request_id=f"r{i:07d}",
        model_name=rng.choice(models),
        endpoint=rng.choice(ENDPOINTS),
        success=success and not load,
        cancelled=cancelled,
        status_code=200 if success else 500,
        response_time_ms=rt,
        ttft_ms=rt * rng.uniform(0.05, 0.5) if rng.random() < 0.95 else None,
        queue_time_ms=rng.expovariate(1 / 30.0) if rng.random() < 0.8 else None,
        itl_mean_ms=rng.choice([0.0, rng.uniform(5, 60)]) if rng.random() < 0.9 else None,
        tokens_per_second=rng.uniform(5, 120) if rng.random() < 0.9 else None,
        prompt_tokens=rng.randint(1, 2000),
        completion_tokens=rng.randint(0, 800),
        user_id=rng.choice(["alice", "bob", None]),
        energy_j=rng.uniform(1, 500) if rng.random() < 0.5 else None,
        done_reason="load" if load else rng.choice(["stop", "length", None]),
    )
    if not success and not cancelled and not load:
        rec.error_message = "boom"
        rec.error = ErrorRecord(
            timestamp=rec.timestamp,
            request_id=rec.request_id,
            error_type=rng.choice(["upstream_status", "stream_error"]),
            error_message=f"boom {i % 3}",
            model_name=rec.model_name,
            endpoint=rec.endpoint,
        )
    return rec


def records_between(
    rng: random.Random, start: float, end: float, n: int, first_id: int = 0
) -> list[InferenceRecord]:
    times = sorted(rng.uniform(start, end) for _ in range(n))
    return [make_record(rng, t, first_id + i) for i, t in enumerate(times)]


async def open_store(path: Path) -> SQLiteStore:
    store = SQLiteStore(path)
    await store.open()
    store.add_hook(RollupHook())
    return store


async def write(store: SQLiteStore, records: Sequence[InferenceRecord], batch: int = 500) -> None:
    for i in range(0, len(records), batch):
        await store.write_batch(records[i : i + batch])
