"""``ollamon top``'s screen (``lines_of``) from real frames: a proxy in front of the emulator, real traffic.

The pty test in tests/test_cli_analytics.py drives the curses loop itself; here the text is checked line by
line against what the emulator really did.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from proxy.cli.terminal import size
from proxy.cli.top import lines_of, snapshot, unknown_models
from tests.fixtures.ports import free_port
from tests.fixtures.proxy import MakeProxy, ProxyHandle

MISTYPED = {"lama3.2": 3, "llama-3.2": 2, "mistrl": 2}  # names Ollama does not have -> 404, 7 requests
HOSTILE = "\x1b[2Jevil\u202e"  # Ollama refuses it with 400 "invalid model name": a row, escaped


def args_for(**kw: Any) -> argparse.Namespace:
    base = {"url": None, "db": None, "config": None, "window": "120s", "interval": 1.0}
    return argparse.Namespace(**{**base, **kw})


def text_of(frame: dict[str, Any], source: str) -> str:
    return "\n".join(t for t, _ in lines_of(frame, source))


def row(text: str, model: str) -> list[str]:
    """The request table's row of ``model`` (above the loaded models), split into cells."""
    table = text.split("\nLOADED ")[0]
    rows = [line for line in table.splitlines() if line.startswith(model + " ")]
    assert len(rows) == 1, (model, text)
    return rows[0].split()


async def traffic(proxy: ProxyHandle) -> None:
    """3 answered requests, 7 for mistyped names (404), 1 with a hostile name (400); all recorded."""
    async with aiohttp.ClientSession() as s:

        async def send(model: str) -> int:
            body = {"model": model, "prompt": "hi", "stream": False}
            async with s.post(f"{proxy.url}/api/generate", json=body) as r:
                await r.read()
                return r.status

        assert [await send("llama3.2") for _ in range(3)] == [200] * 3
        for name, n in MISTYPED.items():
            assert [await send(name) for _ in range(n)] == [404] * n
        assert await send(HOSTILE) == 400
    await proxy.wait_rows(11)


async def frame_when(args: argparse.Namespace, ready: Any, within: float = 20.0) -> dict[str, Any]:
    """A snapshot (taken on a thread: it uses blocking HTTP) for which ``ready(frame)`` holds."""
    deadline = time.monotonic() + within
    while True:
        frame = await asyncio.to_thread(snapshot, args)
        if ready(frame):
            return frame
        if time.monotonic() > deadline:
            raise AssertionError(f"no ready frame within {within:g} s: {frame}")
        await asyncio.sleep(0.1)


async def test_top_from_a_running_proxy(make_emulator: Any, make_proxy: MakeProxy) -> None:
    emulator = await make_emulator(num_parallel=1)
    proxy = await make_proxy(
        emulator.url, inventory__enabled=True, inventory__num_parallel=1, inventory__ps_interval_s=0.5
    )
    await traffic(proxy)
    body = {"model": "llama3.2", "prompt": "hold", "options": {"num_predict": 400}}
    first_token = asyncio.Event()
    async with aiohttp.ClientSession() as s:

        async def hold(first: bool) -> None:
            # 400 tokens 50 ms apart: 20 s, far longer than the test needs them.
            async with s.post(
                f"{proxy.url}/api/generate", json=body, headers={"X-Emulate": "interval_ms=50"}
            ) as r:
                await r.content.readline()
                if first:
                    first_token.set()
                await r.read()

        held = [asyncio.ensure_future(hold(True))]
        await asyncio.wait_for(first_token.wait(), 20)
        held.append(asyncio.ensure_future(hold(False)))  # waits for the only slot
        try:

            def ready(f: dict[str, Any]) -> bool:
                live = (f.get("live") or {}).get("llama3.2:latest") or {}
                loaded = [m for m in (f.get("models") or {}).get("models", []) if m["loaded"]]
                return live.get("in_flight") == 2 and bool(loaded)

            frame = await frame_when(args_for(url=proxy.url), ready)
            running = [e for e in emulator.emu.log if not e.finished and e.path == "/api/generate"]
            assert len(running) == 2 and sum(bool(e.token_times) for e in running) == 1  # ground truth
        finally:
            for t in held:
                t.cancel()
            await asyncio.gather(*held, return_exceptions=True)

    text = text_of(frame, proxy.url)
    lines = text.splitlines()
    assert lines[1].startswith(f"upstream {emulator.url} reachable  ") and lines[1].endswith(" ms")
    assert "in_flight 2   generating 1   waiting 1 (loading 0, queued 1)" in lines

    # The model row: 3 finished requests, 0 failed; 2 in flight now, 1 of them waiting.
    cells = row(text, "llama3.2:latest")
    assert cells[-4:] == ["0", "3", "2", "1"]

    # Mistyped names: one line, no row each.
    assert unknown_models(frame) == {f"{n}:latest": k for n, k in MISTYPED.items()}
    grouped = [line for line in lines if "unknown models" in line]
    assert grouped == [
        "3 unknown models: 7 requests (Ollama: model not found): lama3.2:latest, llama-3.2:latest, mistrl:latest"
    ]
    assert not [line for line in lines if line.startswith(("lama3.2", "llama-3.2", "mistrl"))]

    # The hostile name is a row of its own (it failed with 400, not 404), escaped: no control character.
    assert row(text, "\\x1b[2Jevil\\u202e")[-4:] == ["1", "1", "-", "-"]
    assert not re.search("[\x00-\x1f\x7f-\x9f\u202e]", text.replace("\n", ""))

    # Loaded models from the inventory, with the VRAM the emulator reports (/api/ps size_vram).
    spec = emulator.emu.catalogue["llama3.2:latest"]
    loaded = next(
        line
        for line in lines
        if line.startswith("llama3.2:latest") and "VRAM" not in line and size(spec.size) in line
    )
    assert re.search(r"in [45]m \d\ds$", loaded), loaded  # the default keep-alive: 5 minutes
    assert f"1 loaded, {size(spec.size)} VRAM" in lines


async def test_top_from_the_database_file(emulator: Any, make_proxy: MakeProxy, tmp_path: Path) -> None:
    proxy = await make_proxy(emulator.url)
    await traffic(proxy)
    dead = free_port()
    config = tmp_path / "top.yaml"
    config.write_text(f"server:\n  upstream: http://127.0.0.1:{dead}\n")
    frame = await asyncio.to_thread(snapshot, args_for(db=str(proxy.db_path), config=str(config)))
    text = text_of(frame, "database")
    lines = lines_of(frame, "database")
    upstream_text, bold = lines[1]
    assert (
        upstream_text.startswith(f"upstream http://127.0.0.1:{dead} UNREACHABLE (probed by top): ") and bold
    )
    assert "Connection refused" in upstream_text or "ConnectionRefusedError" in upstream_text
    assert "in_flight n/a: live counts need --url" in text
    assert "loaded models need --url" in text
    assert "3 unknown models: 7 requests" in text  # the same grouping from the file
    assert row(text, "llama3.2:latest")[-4:] == ["0", "3", "-", "-"]


async def test_top_shows_an_unreachable_upstream(make_proxy: MakeProxy) -> None:
    dead = free_port()
    proxy = await make_proxy(f"http://127.0.0.1:{dead}")
    frame = await asyncio.to_thread(snapshot, args_for(url=proxy.url))
    upstream_text, bold = lines_of(frame, proxy.url)[1]
    assert bold and upstream_text.startswith(
        f"upstream http://127.0.0.1:{dead} UNREACHABLE: ClientConnectorError"
    )
    text = text_of(frame, proxy.url)
    assert "in_flight 0   generating 0   waiting 0 (loading 0, queued 0)" in text
    assert "loaded models n/a: the model inventory is off (inventory.enabled)" in text


async def test_top_sends_the_admin_token(
    emulator: Any, make_proxy: MakeProxy, monkeypatch: pytest.MonkeyPatch
) -> None:
    token = "k" * 24
    proxy = await make_proxy(emulator.url, admin__token=token)
    monkeypatch.delenv("OLLAMON_ADMIN_TOKEN", raising=False)
    refused = await asyncio.to_thread(snapshot, args_for(url=proxy.url))
    assert "needs the admin token" in refused["error"]
    monkeypatch.setenv("OLLAMON_ADMIN_TOKEN", token)
    frame = await asyncio.to_thread(snapshot, args_for(url=proxy.url))
    assert "error" not in frame and frame["live"] == {} and frame["upstream"]["reachable"]
