"""Recorded values equal the emulator's ground truth (what it really waited, what it really sent)."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import aiohttp
import pytest

from proxy.forward.tokens import estimate_tokens
from tests.fixtures.proxy import MakeProxy, ProxyHandle

MS = 1e6  # ns per ms
TOL_MS = 8.0  # timing tolerance between what the client saw and what was recorded (2 busy cores)


async def stream_lines(
    session: aiohttp.ClientSession, url: str, body: dict[str, Any], headers: dict[str, str] | None = None
) -> tuple[aiohttp.ClientResponse, list[tuple[float, bytes]], float, float]:
    """POST and collect (receive time, line); return response, lines, start and end perf_counter times."""
    start = time.perf_counter()
    lines: list[tuple[float, bytes]] = []
    async with session.post(url, json=body, headers=headers or {}) as resp:
        buf = b""
        async for chunk in resp.content.iter_any():
            now = time.perf_counter()
            buf += chunk
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                lines.append((now, line))
        end = time.perf_counter()
    return resp, lines, start, end


async def test_streamed_generate_matches_ground_truth(emulator: Any, proxy: ProxyHandle) -> None:
    body = {
        "model": "llama3.2",
        "prompt": "why is the sky blue?",
        "options": {
            "num_predict": 12,
            "temperature": 0.3,
            "top_k": 20,
            "top_p": 0.8,
            "repeat_penalty": 1.1,
            "seed": 7,
            "num_ctx": 2048,
            "stop": ["\n\n"],
            "mirostat": 1,
        },
    }
    async with aiohttp.ClientSession() as s:
        resp, lines, start, end = await stream_lines(
            s, f"{proxy.url}/api/generate", body, {"X-Emulate": "interval_ms=20", "X-User-Id": "alice"}
        )
    assert resp.status == 200
    rid = resp.headers["X-Request-Id"]
    (row,) = await proxy.wait_rows(1)
    gt = emulator.emu.entry(rid)
    assert row["request_id"] == rid
    # The name Ollama resolves, as the inventory lists it; the client's spelling stays in metadata.
    assert row["endpoint"] == "/api/generate" and row["model_name"] == "llama3.2:latest"
    assert json.loads(row["metadata"])["model_as_sent"] == "llama3.2"
    assert row["success"] == 1 and row["cancelled"] == 0 and row["stream"] == 1 and row["status_code"] == 200
    assert row["token_source"] == "ollama"
    assert row["prompt_tokens"] == gt.prompt_eval_count
    assert row["completion_tokens"] == gt.eval_count == 12
    assert row["total_tokens"] == gt.prompt_eval_count + 12
    assert row["done_reason"] == gt.done_reason == "length"
    assert row["response_length"] == len(gt.response_text)
    assert row["prompt_length"] == len("why is the sky blue?")
    # Ollama's durations, exactly as sent.
    assert row["total_duration_ms"] == pytest.approx(gt.total_ns / MS)
    assert row["load_duration_ms"] == pytest.approx(gt.load_ns / MS)
    assert row["prompt_eval_duration_ms"] == pytest.approx(gt.prompt_eval_ns / MS)
    assert row["eval_duration_ms"] == pytest.approx(gt.eval_ns / MS)
    assert row["processing_time_ms"] == pytest.approx((gt.prompt_eval_ns + gt.eval_ns) / MS)
    assert row["tokens_per_second"] == pytest.approx(12 / (gt.eval_ns / 1e9))
    # What the client saw: first content line and the end of the stream.
    content = [t for t, line in lines if json.loads(line)["response"]]
    assert row["ttft_ms"] == pytest.approx((content[0] - start) * 1000, abs=TOL_MS)
    assert row["response_time_ms"] == pytest.approx((end - start) * 1000, abs=TOL_MS)
    gaps = [b - a for a, b in zip(gt.token_times, gt.token_times[1:], strict=False)]
    assert row["itl_mean_ms"] == pytest.approx(sum(gaps) / len(gaps) * 1000, abs=3.0)
    assert row["itl_max_ms"] >= row["itl_p95_ms"] >= 15.0
    # Sampling options as sent; the rest in metadata.
    assert row["temperature"] == 0.3 and row["max_tokens"] == 12 and row["top_k"] == 20
    assert (
        row["top_p"] == 0.8 and row["repeat_penalty"] == 1.1 and row["seed"] == 7 and row["num_ctx"] == 2048
    )
    assert json.loads(row["stop"]) == ["\n\n"]
    meta = json.loads(row["metadata"])
    assert meta["request"]["options.mirostat"] == 1
    assert meta["ollama"]["eval_count"] == 12
    assert row["user_id"] == "alice" and row["client_addr"] == "127.0.0.1"
    assert row["user_agent"].startswith("Python/")
    assert row["timestamp"].endswith("Z") and len(row["timestamp"]) == 24
    assert proxy.rows("error_metrics") == []


async def test_non_streamed_chat_derives_ttft_from_durations(emulator: Any, proxy: ProxyHandle) -> None:
    body = {"model": "llama3.2", "stream": False, "messages": [{"role": "user", "content": "hello there"}]}
    async with aiohttp.ClientSession() as s:
        start = time.perf_counter()
        async with s.post(f"{proxy.url}/api/chat", json=body) as resp:
            data = await resp.json()
        end = time.perf_counter()
    (row,) = await proxy.wait_rows(1)
    gt = emulator.emu.entry(resp.headers["X-Request-Id"])
    assert row["stream"] == 0 and row["success"] == 1
    assert row["completion_tokens"] == data["eval_count"] == gt.eval_count
    assert row["response_length"] == len(data["message"]["content"])
    meta = json.loads(row["metadata"])
    expected = meta["ollamon_wait_ms"] + (gt.total_ns - gt.eval_ns + gt.eval_ns / gt.eval_count) / MS
    assert row["ttft_ms"] == pytest.approx(expected, abs=0.01)  # ollamon_wait_ms is rounded to µs in metadata
    # Bounds that hold however busy the machine: ollamon's span lies inside the client's and holds the
    # emulator's own (measured from its handler entry to its last byte).
    assert gt.total_ns / MS - 0.5 <= row["response_time_ms"] <= (end - start) * 1000 + 0.5
    assert row["itl_mean_ms"] is None


async def test_queue_time_matches_slot_wait(make_emulator: Any, make_proxy: MakeProxy) -> None:
    emulator = await make_emulator(num_parallel=1, start_loaded=True)
    proxy = await make_proxy(emulator.url)
    body = {"model": "llama3.2", "prompt": "q", "options": {"num_predict": 5}}
    async with aiohttp.ClientSession() as s:
        results = await asyncio.gather(
            *(
                stream_lines(s, f"{proxy.url}/api/generate", body, {"X-Emulate": "interval_ms=20"})
                for _ in range(3)
            )
        )
    rows = await proxy.wait_rows(3)
    waits = []
    for resp, *_ in results:
        rid = resp.headers["X-Request-Id"]
        gt = emulator.emu.entry(rid)
        (row,) = [r for r in rows if r["request_id"] == rid]
        meta = json.loads(row["metadata"])
        assert row["queue_time_ms"] == pytest.approx(meta["ollamon_wait_ms"] + gt.slot_wait_ns / MS, abs=2.0)
        waits.append(gt.slot_wait_ns / MS)
    waits.sort()
    # One runs at once: the second waits about one generation, the third about two.
    assert waits[0] < 5 and waits[1] > 60 and waits[2] > 2 * 60


async def test_openai_stream_without_usage_is_estimated(emulator: Any, proxy: ProxyHandle) -> None:
    body = {
        "model": "llama3.2",
        "stream": True,
        "max_tokens": 8,
        "messages": [{"role": "user", "content": "count to ten please"}],
    }
    async with aiohttp.ClientSession() as s:
        async with s.post(
            f"{proxy.url}/v1/chat/completions", json=body, headers={"X-Emulate": "interval_ms=20"}
        ) as resp:
            raw = await resp.read()
    assert raw.endswith(b"data: [DONE]\n\n")
    (row,) = await proxy.wait_rows(1)
    gt = emulator.emu.entry(resp.headers["X-Request-Id"])
    assert row["token_source"] == "estimate" and row["success"] == 1 and row["stream"] == 1
    assert row["max_tokens"] == 8 and row["done_reason"] == "length"
    assert row["response_length"] == len(gt.response_text)
    # The estimate is reproducible from the text actually sent and the prompt actually asked.
    assert row["completion_tokens"] == estimate_tokens(gt.response_text) > 0
    assert row["prompt_tokens"] == estimate_tokens("count to ten please")
    assert row["queue_time_ms"] is None and row["total_duration_ms"] is None
    # No durations on /v1: tokens/s comes from the proxy's clock over the content events it relayed, which
    # must match the pace the emulator really sent them at.
    sent_rate = (len(gt.token_times) - 1) / (gt.token_times[-1] - gt.token_times[0])
    assert json.loads(row["metadata"])["content_events"] == len(gt.token_times) == 8
    assert row["tokens_per_second"] == pytest.approx(sent_rate, rel=0.1)
    assert row["ttft_ms"] is not None and row["itl_mean_ms"] == pytest.approx(20.0, abs=4.0)


async def test_openai_usage_is_used_when_present(emulator: Any, proxy: ProxyHandle) -> None:
    body = {
        "model": "llama3.2",
        "stream": True,
        "stream_options": {"include_usage": True},
        "max_tokens": 6,
        "messages": [{"role": "user", "content": "hi"}],
    }
    async with aiohttp.ClientSession() as s:
        async with s.post(f"{proxy.url}/v1/chat/completions", json=body) as resp:
            await resp.read()
        async with s.post(
            f"{proxy.url}/v1/completions", json={"model": "llama3.2", "prompt": "x", "max_tokens": 4}
        ) as r2:
            await r2.read()
    rows = await proxy.wait_rows(2)
    for r, n in ((resp, 6), (r2, 4)):
        gt = emulator.emu.entry(r.headers["X-Request-Id"])
        (row,) = [x for x in rows if x["request_id"] == r.headers["X-Request-Id"]]
        assert row["token_source"] == "usage"
        assert row["completion_tokens"] == gt.eval_count == n
        assert row["prompt_tokens"] == gt.prompt_eval_count


async def test_embeddings_routes(emulator: Any, proxy: ProxyHandle) -> None:
    async with aiohttp.ClientSession() as s:
        async with s.post(
            f"{proxy.url}/api/embed", json={"model": "all-minilm", "input": ["a b", "c"]}
        ) as r1:
            d1 = await r1.json()
        async with s.post(
            f"{proxy.url}/api/embeddings", json={"model": "all-minilm", "prompt": "a b c"}
        ) as r2:
            await r2.read()
        async with s.post(f"{proxy.url}/v1/embeddings", json={"model": "all-minilm", "input": "hello"}) as r3:
            d3 = await r3.json()
    rows = {r["endpoint"]: r for r in await proxy.wait_rows(3)}
    embed = rows["/api/embed"]
    assert embed["token_source"] == "ollama" and embed["prompt_tokens"] == d1["prompt_eval_count"]
    assert embed["completion_tokens"] == 0 and embed["success"] == 1
    assert json.loads(embed["metadata"])["embeddings"] == 2
    legacy = rows["/api/embeddings"]
    assert legacy["token_source"] == "estimate" and legacy["prompt_tokens"] > 0 and legacy["success"] == 1
    v1 = rows["/v1/embeddings"]
    assert v1["token_source"] == "usage" and v1["prompt_tokens"] == d3["usage"]["prompt_tokens"]


async def test_load_and_unload_are_not_inferences(emulator: Any, proxy: ProxyHandle) -> None:
    async with aiohttp.ClientSession() as s:
        async with s.post(f"{proxy.url}/api/generate", json={"model": "llama3.2"}) as r1:
            assert (await r1.json())["done_reason"] == "load"
        async with s.post(
            f"{proxy.url}/api/chat", json={"model": "llama3.2", "messages": [], "keep_alive": 0}
        ) as r2:
            assert (await r2.json())["done_reason"] == "unload"
    rows = await proxy.wait_rows(2)
    assert [r["done_reason"] for r in rows] == ["load", "unload"]
    for r in rows:
        assert r["prompt_tokens"] is None and r["token_source"] is None and r["success"] == 1


@pytest.mark.parametrize(
    ("path", "body", "emulate", "status", "error_type", "message_part"),
    [
        (
            "/api/generate",
            {"model": "llama3.2", "prompt": "x"},
            "error_status=500",
            500,
            "upstream_status",
            "error was encountered",
        ),
        ("/api/generate", {"model": "nope", "prompt": "x"}, "", 404, "upstream_status", "not found"),
        (
            "/api/chat",
            {"model": "llama3.2", "messages": [{"role": "user", "content": "x"}]},
            "error_after=3",
            200,
            "stream_error",
            "error was encountered",
        ),
        ("/api/generate", {"model": "llama3.2", "prompt": "x"}, "close_after=2", 200, "upstream_closed", ""),
        (
            "/v1/chat/completions",
            {"model": "llama3.2", "stream": True, "messages": [{"role": "user", "content": "x"}]},
            "error_after=2",
            200,
            "truncated",
            "without a final chunk",
        ),
        (
            "/v1/chat/completions",
            {"model": "nope", "messages": [{"role": "user", "content": "x"}]},
            "",
            404,
            "upstream_status",
            "not found",
        ),
    ],
)
async def test_failures_are_recorded(
    emulator: Any,
    proxy: ProxyHandle,
    path: str,
    body: dict[str, Any],
    emulate: str,
    status: int,
    error_type: str,
    message_part: str,
) -> None:
    async with aiohttp.ClientSession() as s:
        try:
            async with s.post(
                f"{proxy.url}{path}", json=body, headers={"X-Emulate": emulate} if emulate else {}
            ) as r:
                assert r.status == status
                rid = r.headers["X-Request-Id"]
                await r.read()
        except aiohttp.ClientPayloadError:
            pass  # close_after: the proxy aborts the client connection too, so truncation shows
    (row,) = await proxy.wait_rows(1)
    (err,) = await proxy.wait_rows(1, "error_metrics")
    assert row["success"] == 0 and row["cancelled"] == 0 and row["status_code"] == status
    assert err["error_type"] == error_type and err["request_id"] == row["request_id"]
    assert message_part in row["error_message"] and err["error_message"] == row["error_message"]
    assert err["stack_trace"] is None
    assert err["severity"] == ("warning" if 400 <= status < 500 else "error")
    if status != 200:
        assert row["request_id"] == rid


async def test_malformed_request_is_forwarded_and_recorded(emulator: Any, proxy: ProxyHandle) -> None:
    async with aiohttp.ClientSession() as s:
        async with s.post(f"{proxy.url}/api/generate", data=b"{not json") as r:
            body = await r.read()
            assert r.status == 400
    assert b"invalid character" in body
    (row,) = await proxy.wait_rows(1)
    meta = json.loads(row["metadata"])
    assert row["success"] == 0 and row["status_code"] == 400 and "invalid character" in row["error_message"]
    assert "request_parse_error" in meta
    assert emulator.emu.entry(r.headers["X-Request-Id"]).status == 400


async def test_client_request_id_is_reused(emulator: Any, proxy: ProxyHandle) -> None:
    async with aiohttp.ClientSession() as s:
        async with s.post(
            f"{proxy.url}/api/generate",
            json={"model": "llama3.2", "prompt": "x", "stream": False},
            headers={"X-Request-Id": "my-trace-42"},
        ) as r:
            await r.read()
    assert r.headers["X-Request-Id"] == "my-trace-42"
    (row,) = await proxy.wait_rows(1)
    assert row["request_id"] == "my-trace-42"
    assert emulator.emu.entry("my-trace-42").status == 200


@pytest.mark.parametrize("phase", ["before_headers", "mid_stream"])
async def test_disconnect_cancels_upstream_and_is_recorded(
    emulator: Any, proxy: ProxyHandle, phase: str
) -> None:
    emulate = "prompt_eval_ms=2000" if phase == "before_headers" else "interval_ms=100; tokens=100"
    body = {"model": "llama3.2", "prompt": "long story"}
    async with aiohttp.ClientSession() as s:
        resp_cm = s.post(
            f"{proxy.url}/api/generate",
            json=body,
            headers={"X-Emulate": emulate, "X-Request-Id": f"cancel-{phase}"},
        )
        if phase == "before_headers":
            task = asyncio.ensure_future(resp_cm.__aenter__())
            await asyncio.sleep(0.3)
            task.cancel()
        else:
            resp = await resp_cm.__aenter__()
            await resp.content.readline()
            await resp.content.readline()
            resp.close()
        left = time.perf_counter()
    gt = emulator.emu.entry(f"cancel-{phase}")
    await asyncio.wait_for(emulator.emu.wait_idle(), 2)
    assert gt.finished and gt.cancelled
    assert gt.finished_at is not None and gt.finished_at - left < 1.0
    (row,) = await proxy.wait_rows(1)
    assert row["cancelled"] == 1 and row["success"] == 0 and row["error_message"] == "client disconnected"
    assert proxy.rows("error_metrics") == []


async def test_store_text_switch(emulator: Any, make_proxy: MakeProxy) -> None:
    proxy = await make_proxy(emulator.url, storage__store_text=True)
    async with aiohttp.ClientSession() as s:
        async with s.post(
            f"{proxy.url}/api/generate", json={"model": "llama3.2", "prompt": "tell me", "stream": False}
        ) as r:
            data = await r.json()
    (row,) = await proxy.wait_rows(1, "request_text")
    assert row["prompt_text"] == "tell me" and row["response_text"] == data["response"]
