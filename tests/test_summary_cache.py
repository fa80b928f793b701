"""``cache_reuse_ratio`` in ``/ollamon/api/summary``: the estimated prompt-cache reuse, summed from raw rows,
checked against the emulator's prefix cache (its ground truth: docs/conversations.md, "Prompt-cache reuse")."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path
from typing import Any

import aiohttp
import ollama

from storage.migrations import MIGRATIONS, apply_migrations
from storage.queries import summary
from tests.fixtures.emulator import MakeEmulator
from tests.fixtures.proxy import MakeProxy

WORDS = " ".join(f"w{i}" for i in range(300))


async def _chat(client: ollama.AsyncClient, model: str, history: list[dict[str, Any]], text: str) -> None:
    history.append({"role": "user", "content": text})
    reply = await client.chat(model=model, messages=history)
    history.append({"role": "assistant", "content": reply.message.content})


async def _summary(url: str, query: str) -> dict[str, Any]:
    async with aiohttp.ClientSession() as s, s.get(f"{url}/ollamon/api/summary?{query}") as r:
        assert r.status == 200, await r.text()
        body: dict[str, Any] = await r.json()
        return body


async def test_summary_cache_reuse_matches_rows_and_emulator(
    make_emulator: MakeEmulator, make_proxy: MakeProxy
) -> None:
    emulator = await make_emulator(prompt_rate=2000.0, prompt_eval_s=0.0, start_loaded=True)
    proxy = await make_proxy(emulator.url)
    async with ollama.AsyncClient(host=proxy.url) as client:
        for name in ("a", "b"):
            history: list[dict[str, Any]] = []
            for turn in range(3):
                await _chat(client, "llama3.2", history, f"{name} {turn} {WORDS}")
        await client.embed(model="all-minilm", input="no prompt cache here")
    rows = await proxy.wait_rows(7)
    truth = {e.request_id: e for e in emulator.emu.log}
    chats = [r for r in rows if r["model_name"] == "llama3.2:latest"]
    assert len(chats) == 6 and all(r["prompt_new_tokens"] is not None for r in chats)
    cached = sum(r["prompt_cached_tokens"] for r in chats)
    new = sum(r["prompt_new_tokens"] for r in chats)
    true_cached = sum(truth[r["request_id"]].prompt_cached_count for r in chats)
    true_total = sum(truth[r["request_id"]].prompt_eval_count for r in chats)
    assert true_cached > 0.3 * true_total  # later turns really reuse the cache

    body = await _summary(proxy.url, "window=1h&exact=true")
    assert body["exact"] is True
    models = {m["model"]: m for m in body["models"]}
    assert models["llama3.2:latest"]["cache_reuse_ratio"] == cached / (cached + new)
    assert abs(models["llama3.2:latest"]["cache_reuse_ratio"] - true_cached / true_total) < 0.1
    embed = [m for name, m in models.items() if name != "llama3.2:latest"]
    assert len(embed) == 1 and embed[0]["cache_reuse_ratio"] is None  # no estimate: null, not 0
    assert body["overall"]["cache_reuse_ratio"] == cached / (cached + new)  # the embedding adds nothing
    filtered = await _summary(proxy.url, "window=1h&exact=true&model=all-minilm")
    assert filtered["overall"]["cache_reuse_ratio"] is None

    rollup = await _summary(proxy.url, "window=1h&exact=false")
    assert rollup["exact"] is False and rollup["overall"]["cache_reuse_ratio"] is None
    assert all(m["cache_reuse_ratio"] is None for m in rollup["models"])


def test_database_before_m010_has_no_ratio(tmp_path: Path) -> None:
    db = tmp_path / "old.db"
    conn = sqlite3.connect(db)
    apply_migrations(conn, MIGRATIONS[:7])  # up to m007: no cache columns yet
    now = time.time()
    out = summary(conn, now - 60, now, exact=True)
    assert out["overall"]["cache_reuse_ratio"] is None and out["models"] == []
