"""Requests in flight per model (proxy/forward/live.py), against what the emulator is really doing."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp

from proxy.app import FORWARDER_KEY
from proxy.forward.capture import Capture
from proxy.forward.live import UNKNOWN_MODEL, ModelLive, live_by_model
from proxy.forward.streams.facts import INSTRUMENTED
from tests.fixtures.proxy import MakeProxy
from tests.polling import until


async def test_in_flight_waiting_queued_and_loading(make_emulator: Any, make_proxy: MakeProxy) -> None:
    # One parallel slot per model in the emulator (as OLLAMA_NUM_PARALLEL=1), told to ollamon.
    emulator = await make_emulator(num_parallel=1, token_interval_s=0.05)
    proxy = await make_proxy(emulator.url, inventory__num_parallel=1)
    forwarder = proxy.app[FORWARDER_KEY]
    body = {"model": "llama3.2", "prompt": "hi", "options": {"num_predict": 400}}
    async with aiohttp.ClientSession() as s:

        async def one(model: str, knobs: str) -> None:
            async with s.post(
                f"{proxy.url}/api/generate", json={**body, "model": model}, headers={"X-Emulate": knobs}
            ) as r:
                await r.read()

        tasks = [asyncio.ensure_future(one("llama3.2", "interval_ms=50"))]
        # The first request generates; the next two wait for its slot (queued in the emulator).
        await until(lambda: any(c.content_times for c in forwarder.live), within=10)
        tasks += [asyncio.ensure_future(one("Llama3.2", "interval_ms=50")) for _ in range(2)]
        await until(lambda: len(forwarder.live) == 3, within=10)
        live = live_by_model(forwarder.live, num_parallel=1)
        assert set(live) == {"llama3.2:latest"}  # spellings resolve to Ollama's canonical name
        m = live["llama3.2:latest"]
        assert (m.in_flight, m.generating, m.waiting, m.queued) == (3, 1, 2, 2)
        # A model the inventory says is not loaded: its waiting requests are loading, not queued.
        not_loaded = live_by_model(forwarder.live, loaded=lambda model: False, num_parallel=1)
        assert not_loaded["llama3.2:latest"].loading == 2
        assert not_loaded["llama3.2:latest"].queued == 0
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    await until(lambda: not forwarder.live, within=10)
    assert live_by_model(forwarder.live) == {}


def _capture(body: bytes | None) -> Capture:
    cap = Capture(
        endpoint="/api/generate",
        flavor=INSTRUMENTED["/api/generate"],
        request_id="r",
        arrival=0.0,
        arrival_wall=0.0,
        client_addr=None,
        user_agent=None,
        user_id=None,
        store_text=False,
    )
    cap.body = body
    return cap


def test_model_is_learned_once_and_not_before_the_body_is_there() -> None:
    streaming = _capture(None)  # a streamed body still arriving: unknown for now, asked again later
    assert live_by_model([streaming]) == {UNKNOWN_MODEL: ModelLive(in_flight=1, waiting=1)}
    streaming.body = b'{"model": "Qwen3:8B", "prompt": "x"}'
    assert set(live_by_model([streaming])) == {"qwen3:8b"}
    nameless = _capture(b'{"prompt": "no model"}')
    broken = _capture(b"{not json")
    hostile = _capture(b'{"model": "<img src=x onerror=alert(1)>"}')
    big = _capture(b'{"model": "llama3.2", "prompt": "' + b"x" * (2 << 20) + b'"}')
    form = _capture(
        b'--b0\r\nContent-Disposition: form-data; name="model"\r\n\r\nWhisper\r\n'
        b'--b0\r\nContent-Disposition: form-data; name="file"; filename="a.wav"\r\n\r\nRIFF\r\n--b0--\r\n'
    )
    form.content_type = "multipart/form-data; boundary=b0"
    assert set(live_by_model([form])) == {"whisper:latest"}
    live = live_by_model([nameless, broken, hostile, big])
    assert live[UNKNOWN_MODEL].in_flight == 2
    assert live["<img src=x onerror=alert(1)>"].in_flight == 1  # kept as data; views escape it
    assert live["llama3.2:latest"].in_flight == 1  # a body past 1 MiB is scanned at its start
