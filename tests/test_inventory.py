"""The model inventory against the emulator (and small misbehaving servers): new models, new versions,
loads and unloads, and polite polling when Ollama is down or slow."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import sqlite3
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from proxy.emulator.config import ModelSpec
from proxy.resources.inventory import Inventory, model_key
from proxy.upstream_url import Upstream
from storage.resources import register_resources
from storage.sqlite import SQLiteStore
from storage.writer import Writer
from tests.fixtures.ports import free_port
from tests.polling import until

MakeInventory = Callable[..., Awaitable[Inventory]]


@pytest.fixture
async def make_inventory(tmp_path: Path) -> AsyncIterator[MakeInventory]:
    """``await make_inventory(url, **Inventory kwargs)``: a started inventory writing to a real SQLite file."""
    store = SQLiteStore(tmp_path / "inv.db")
    await store.open()
    register_resources(store)
    writer = Writer(store, flush_interval_s=0.02)
    await writer.start()
    session = aiohttp.ClientSession()
    started: list[Inventory] = []

    async def make(url: str, **kwargs: Any) -> Inventory:
        inv = Inventory(session=session, upstream=Upstream.parse(url), writer=writer, **kwargs)
        await inv.start(initial_timeout_s=2.0)
        started.append(inv)
        return inv

    make.db = store.path  # type: ignore[attr-defined]
    yield make
    for inv in started:
        await inv.stop()
    await session.close()
    await writer.stop()
    await store.close()


def rows(db: Path, sql: str) -> list[dict[str, Any]]:
    con = sqlite3.connect(db)
    con.row_factory = sqlite3.Row
    try:
        return [dict(r) for r in con.execute(sql)]
    finally:
        con.close()


def test_model_key_normalises_like_ollama() -> None:
    assert model_key("Llama3.2") == "llama3.2:latest"
    assert model_key("registry.ollama.ai/library/qwen3:0.6b") == "qwen3:0.6b"
    assert model_key("me/custom") == "me/custom:latest"


async def test_models_are_recorded_and_a_new_digest_is_a_new_version(
    emulator: Any, make_inventory: MakeInventory
) -> None:
    inv = await make_inventory(emulator.url, tags_interval_s=0.2, ps_interval_s=60.0)
    db: Path = make_inventory.db  # type: ignore[attr-defined]
    assert sorted(inv.models) == ["all-minilm:latest", "llama3.2:latest", "qwen3:0.6b"]
    await until(lambda: len(rows(db, "SELECT * FROM model_info")) == 3)
    llama = rows(db, "SELECT * FROM model_info WHERE model_name = 'llama3.2:latest'")[0]
    spec = emulator.emu.resolve("llama3.2")
    assert llama["model_version"] == spec.digest and llama["family"] == "llama"
    assert llama["parameter_size"] == "3.2B" and llama["quantization_level"] == "Q4_K_M"
    assert llama["context_length"] == 131072 and llama["parameter_count"] == spec.size * 2
    assert llama["capabilities"] == '["completion","tools"]' and len(llama["template_hash"]) == 64
    assert llama["installed"] == 1 and llama["loaded"] == 0 and llama["first_seen"] is not None
    old_digest = spec.digest

    emulator.emu.install("llama3.2", dataclasses.replace(spec, digest="f" * 64, quantization_level="Q8_0"))
    await until(lambda: inv.models["llama3.2:latest"].model_version == "f" * 64)
    await until(lambda: rows(db, "SELECT * FROM model_events WHERE event = 'version'"))
    (ev,) = rows(db, "SELECT * FROM model_events WHERE event = 'version'")
    assert ev["model_name"] == "llama3.2:latest" and ev["model_version"] == "f" * 64
    assert ev["previous_version"] == old_digest and ev["source"] == "tags"
    await until(lambda: rows(db, "SELECT quantization_level FROM model_info WHERE model_name = 'llama3.2:latest'")[0]["quantization_level"] == "Q8_0")  # fmt: skip
    after = rows(db, "SELECT * FROM model_info WHERE model_name = 'llama3.2:latest'")[0]
    assert after["model_version"] == "f" * 64 and after["first_seen"] == llama["first_seen"]
    seen = rows(db, "SELECT model_name FROM model_events WHERE event = 'seen' ORDER BY model_name")
    assert [r["model_name"] for r in seen] == ["all-minilm:latest", "llama3.2:latest", "qwen3:0.6b"]


async def test_traffic_naming_an_unknown_model_triggers_one_refresh(
    emulator: Any, make_inventory: MakeInventory
) -> None:
    inv = await make_inventory(emulator.url, tags_interval_s=300.0, ps_interval_s=300.0, min_gap_s=0.05)
    db: Path = make_inventory.db  # type: ignore[attr-defined]
    emulator.emu.install("newbie:1b", ModelSpec(name="newbie:1b", digest="e" * 64, family="gemma3"))
    before = inv.requests
    # The writer thread asks, many times, as records of the new model and of one Ollama lacks go by.
    for _ in range(50):
        assert await asyncio.to_thread(inv.observe, "Newbie:1b", None, "r1", time.time()) in (None, "e" * 64)
        await asyncio.to_thread(inv.observe, "ghost:7b", None, "r2", time.time())
    await until(lambda: "newbie:1b" in inv.models)
    assert await asyncio.to_thread(inv.observe, "newbie:1b", None, "r3", time.time()) == "e" * 64
    await until(lambda: rows(db, "SELECT * FROM model_info WHERE model_name = 'newbie:1b'"))
    await asyncio.sleep(0.3)
    for _ in range(20):  # a name Ollama does not have is not asked about again before the regular poll
        await asyncio.to_thread(inv.observe, "ghost:7b", None, "r4", time.time())
        await asyncio.sleep(0.01)
    await asyncio.sleep(0.2)
    # tags + show(newbie) for the first refresh; at most one more tags round from nudges already queued.
    assert inv.requests - before <= 3, inv.requests - before
    assert "ghost:7b" not in inv.models


async def test_api_ps_reflects_load_and_unload(emulator: Any, make_inventory: MakeInventory) -> None:
    inv = await make_inventory(emulator.url, tags_interval_s=300.0, ps_interval_s=0.1)
    db: Path = make_inventory.db  # type: ignore[attr-defined]
    assert not inv.models["llama3.2:latest"].loaded
    async with aiohttp.ClientSession() as s:
        async with s.post(f"{emulator.url}/api/generate", json={"model": "llama3.2"}) as r:
            assert r.status == 200  # an empty prompt loads the model
        await until(lambda: inv.models["llama3.2:latest"].loaded)
        info = inv.models["llama3.2:latest"]
        assert info.size_vram_bytes == emulator.emu.resolve("llama3.2").size and info.expires_at
        assert info.loaded_at is not None
        async with s.post(f"{emulator.url}/api/generate", json={"model": "llama3.2", "keep_alive": 0}) as r:
            assert r.status == 200  # keep_alive 0 unloads it
        await until(lambda: not inv.models["llama3.2:latest"].loaded)
    await until(lambda: len(rows(db, "SELECT * FROM model_events WHERE event IN ('load', 'unload')")) == 2)
    events = rows(
        db, "SELECT event, source, model_name FROM model_events WHERE event IN ('load', 'unload') ORDER BY id"
    )
    assert events == [
        {"event": "load", "source": "ps", "model_name": "llama3.2:latest"},
        {"event": "unload", "source": "ps", "model_name": "llama3.2:latest"},
    ]
    await until(lambda: rows(db, "SELECT loaded FROM model_info WHERE model_name = 'llama3.2:latest'")[0]["loaded"] == 0)  # fmt: skip


class FlakyOllama:
    """A tiny server for /api/tags and /api/ps that is down (503) or slow on demand, counting hits."""

    def __init__(self) -> None:
        self.down = True
        self.delay_s = 0.0
        self.hits = 0
        self.in_flight = 0
        self.max_in_flight = 0

    async def handle(self, request: web.Request) -> web.Response:
        self.hits += 1
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            await asyncio.sleep(self.delay_s)
            if self.down:
                return web.json_response({"error": "overloaded"}, status=503)
            return web.json_response({"models": []})
        finally:
            self.in_flight -= 1


@pytest.fixture
async def flaky() -> AsyncIterator[tuple[FlakyOllama, str]]:
    server = FlakyOllama()
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", server.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    yield server, f"http://127.0.0.1:{runner.addresses[0][1]}"
    await runner.cleanup()


async def test_ollama_down_backs_off_without_an_error_storm(
    flaky: tuple[FlakyOllama, str], make_inventory: MakeInventory, caplog: pytest.LogCaptureFixture
) -> None:
    server, url = flaky
    with caplog.at_level(logging.DEBUG, logger="proxy.resources.inventory"):
        inv = await make_inventory(
            url, ps_interval_s=0.05, tags_interval_s=0.05, min_gap_s=0.01,
            backoff_initial_s=0.1, backoff_max_s=0.4,
        )  # fmt: skip
        t0 = time.monotonic()
        while time.monotonic() - t0 < 1.5:  # heavy traffic naming unknown models all along
            for i in range(20):
                await asyncio.to_thread(inv.observe, f"m{i}", None, "r", time.time())
            await asyncio.sleep(0.01)
        down_hits = server.hits
        server.down = False
        await until(lambda: inv.reachable is True, within=3.0)
    # Attempts at 0, 0.1, 0.3, 0.7, 1.1, 1.5 s (one request each: the round stops at the first failure).
    assert 4 <= down_hits <= 8, down_hits
    assert inv.failures == down_hits
    logs = [r for r in caplog.records if r.name == "proxy.resources.inventory" and r.levelno >= logging.INFO]
    assert [r.levelno for r in logs] == [logging.WARNING, logging.INFO], [r.getMessage() for r in logs]
    assert "HTTP 503" in logs[0].getMessage() and "answers again" in logs[1].getMessage()


async def test_unreachable_ollama_is_one_warning(
    make_inventory: MakeInventory, caplog: pytest.LogCaptureFixture
) -> None:
    port = free_port()  # a port nobody listens on
    with caplog.at_level(logging.WARNING, logger="proxy.resources.inventory"):
        inv = await make_inventory(
            f"http://127.0.0.1:{port}", ps_interval_s=0.05, backoff_initial_s=0.05, backoff_max_s=0.2
        )
        await asyncio.sleep(1.0)
    assert inv.reachable is False and 3 <= inv.requests <= 9
    warnings = [r for r in caplog.records if r.name == "proxy.resources.inventory"]
    assert len(warnings) == 1 and "cannot poll Ollama" in warnings[0].getMessage()


async def test_one_poll_in_flight_even_when_ollama_is_slow(
    flaky: tuple[FlakyOllama, str], make_inventory: MakeInventory
) -> None:
    server, url = flaky
    server.down, server.delay_s = False, 0.1
    inv = await make_inventory(url, ps_interval_s=0.01, tags_interval_s=0.01, min_gap_s=0.01)
    for _ in range(30):
        for i in range(10):
            await asyncio.to_thread(inv.observe, f"x{i}", None, "r", time.time())
        await asyncio.sleep(0.02)
    assert server.max_in_flight == 1
    assert inv.reachable is True and server.hits <= 2 + 0.9 / 0.1 * 2  # back to back at most, never parallel
