"""``/v1/messages`` and ``/v1/responses`` through ollamon with the official ``anthropic`` and ``openai`` SDKs.

Each call is answered unchanged (the SDK parses it as it would from Ollama) and leaves one
``inference_metrics`` row whose token counts are the emulator's ground truth (``token_source = usage``),
whose TTFT matches the first content event the client saw, and whose errors and truncations are
recorded as failures.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from typing import Any

import anthropic
import openai
import pytest

from tests.fixtures.proxy import ProxyHandle

TOL_MS = 25.0  # client-seen vs recorded times: loopback + SDK parsing on a busy 2-core box
SLOW = "interval_ms=15"
PROMPT = "why is the sky blue?"


@pytest.fixture
async def claude(proxy: ProxyHandle) -> AsyncIterator[anthropic.AsyncAnthropic]:
    async with anthropic.AsyncAnthropic(base_url=proxy.url, api_key="unused", max_retries=0) as client:
        yield client


@pytest.fixture
async def oai(proxy: ProxyHandle) -> AsyncIterator[openai.AsyncOpenAI]:
    async with openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="unused", max_retries=0) as client:
        yield client


def headers(rid: str, emulate: str = "") -> dict[str, str]:
    out = {"X-Request-Id": rid}
    if emulate:
        out["X-Emulate"] = emulate
    return out


async def row_of(proxy: ProxyHandle, rid: str, n: int) -> dict[str, Any]:
    (row,) = [r for r in await proxy.wait_rows(n) if r["request_id"] == rid]
    return row


async def warm_messages(client: anthropic.AsyncAnthropic) -> None:
    """One untimed stream first: the SDK builds its event models lazily, tens of ms on the first event."""
    async with client.messages.stream(
        model="llama3.2:latest", max_tokens=100, messages=[{"role": "user", "content": "warm"}]
    ) as stream:
        await stream.get_final_message()


async def warm_responses(client: openai.AsyncOpenAI) -> None:
    async for _ in await client.responses.create(model="llama3.2:latest", input="warm", stream=True):
        pass


def check_usage_row(row: dict[str, Any], gt: Any, endpoint: str) -> None:
    assert row["endpoint"] == endpoint and row["request_id"] == gt.request_id
    assert row["success"] == 1 and row["status_code"] == 200 and row["cancelled"] == 0
    assert row["token_source"] == "usage"
    assert row["prompt_tokens"] == gt.prompt_eval_count and row["completion_tokens"] == gt.eval_count
    assert row["total_tokens"] == gt.prompt_eval_count + gt.eval_count
    assert row["response_length"] == len(gt.response_text)
    assert row["error_message"] is None


async def test_messages_create(emulator: Any, proxy: ProxyHandle, claude: anthropic.AsyncAnthropic) -> None:
    client = claude
    msg = await client.messages.create(
        model="qwen3:0.6b",
        max_tokens=5,
        # sampling fields go as extra_body: recent SDKs dropped them from the signature; the API has them
        extra_body={"temperature": 0.2, "top_p": 0.9, "top_k": 40},
        stop_sequences=["\n\n"],
        system="Be brief.",
        messages=[{"role": "user", "content": PROMPT}],
        extra_headers=headers("msg-create"),
    )
    (row,) = await proxy.wait_rows(1)
    gt = emulator.emu.entry("msg-create")
    assert msg.usage.input_tokens == gt.prompt_eval_count and msg.usage.output_tokens == gt.eval_count == 5
    assert msg.stop_reason == "max_tokens" and msg.content[-1].text == gt.response_text  # type: ignore[union-attr]
    check_usage_row(row, gt, "/v1/messages")
    assert row["stream"] == 0 and row["done_reason"] == "max_tokens"
    assert row["temperature"] == 0.2 and row["top_p"] == 0.9 and row["top_k"] == 40 and row["max_tokens"] == 5
    assert json.loads(row["stop"]) == ["\n\n"]
    assert row["prompt_length"] == len("Be brief.\n" + PROMPT)
    meta = json.loads(row["metadata"])
    assert meta["framing"] == "json" and meta["thinking_length"] == len(gt.thinking_text) > 0


async def test_messages_stream(emulator: Any, proxy: ProxyHandle, claude: anthropic.AsyncAnthropic) -> None:
    client = claude
    await warm_messages(client)
    start = time.perf_counter()
    first: float | None = None
    async with client.messages.stream(
        model="llama3.2:latest",
        max_tokens=100,
        messages=[{"role": "user", "content": PROMPT}],
        extra_headers=headers("msg-stream", f"tokens=6; {SLOW}"),
    ) as stream:
        async for event in stream:
            if first is None and event.type == "content_block_delta":
                first = time.perf_counter()
        final = await stream.get_final_message()
    end = time.perf_counter()
    row = await row_of(proxy, "msg-stream", 2)
    gt = emulator.emu.entry("msg-stream")
    assert final.usage.output_tokens == gt.eval_count == 6 and final.stop_reason == "end_turn"
    assert "".join(b.text for b in final.content if b.type == "text") == gt.response_text
    check_usage_row(row, gt, "/v1/messages")
    assert row["stream"] == 1 and row["done_reason"] == "end_turn"
    assert first is not None
    client_ttft = (first - start) * 1000
    assert -1.0 <= client_ttft - row["ttft_ms"] <= TOL_MS
    assert row["response_time_ms"] <= (end - start) * 1000 + 1.0
    gaps = [b - a for a, b in zip(gt.token_times, gt.token_times[1:], strict=False)]
    assert row["itl_mean_ms"] == pytest.approx(sum(gaps) / len(gaps) * 1000, abs=5.0)
    meta = json.loads(row["metadata"])
    assert meta["framing"] == "sse" and meta["content_events"] == 6


async def test_messages_tool_use_stream(
    emulator: Any, proxy: ProxyHandle, claude: anthropic.AsyncAnthropic
) -> None:
    tools = [{"name": "get_weather", "description": "w", "input_schema": {"type": "object"}}]
    async with claude.messages.stream(
        model="llama3.2:latest",
        max_tokens=100,
        tools=tools,  # type: ignore[arg-type]
        messages=[{"role": "user", "content": "weather?"}],
        extra_headers=headers("msg-tool", "tokens=2; tool_calls=1"),
    ) as stream:
        final = await stream.get_final_message()
    (row,) = await proxy.wait_rows(1)
    gt = emulator.emu.entry("msg-tool")
    assert [b.type for b in final.content] == ["text", "tool_use"]
    assert final.content[1].input == {"city": "Paris", "n": 0}  # type: ignore[union-attr]
    check_usage_row(row, gt, "/v1/messages")
    assert row["done_reason"] == "tool_use"
    meta = json.loads(row["metadata"])
    assert meta["tool_calls"] == 1 and meta["content_events"] == 3 and meta["request"]["tools"] == 1


async def test_messages_errors(emulator: Any, proxy: ProxyHandle, claude: anthropic.AsyncAnthropic) -> None:
    client = claude
    with pytest.raises(anthropic.NotFoundError) as info:
        await client.messages.create(
            model="nope",
            max_tokens=5,
            messages=[{"role": "user", "content": "x"}],
            extra_headers=headers("m404"),
        )
    assert info.value.body["error"]["type"] == "not_found_error"  # type: ignore[index]
    with pytest.raises(anthropic.APIStatusError):  # a mid-stream error event: the SDK raises it
        async with client.messages.stream(
            model="llama3.2:latest",
            max_tokens=100,
            messages=[{"role": "user", "content": "x"}],
            extra_headers=headers("m-mid", "error_after=2; error_message=GPU fell over"),
        ) as stream:
            async for _ in stream:
                pass
    rows = {r["request_id"]: r for r in await proxy.wait_rows(2)}
    errs = {e["request_id"]: e for e in await proxy.wait_rows(2, "error_metrics")}
    assert rows["m404"]["status_code"] == 404 and rows["m404"]["success"] == 0
    assert (
        errs["m404"]["error_type"] == "upstream_status"
        and "model 'nope' not found" in errs["m404"]["error_message"]
    )
    mid = rows["m-mid"]
    assert mid["status_code"] == 200 and mid["success"] == 0 and mid["error_message"] == "GPU fell over"
    assert errs["m-mid"]["error_type"] == "stream_error"
    gt = emulator.emu.entry("m-mid")
    assert mid["response_length"] == len(gt.response_text) and mid["token_source"] == "estimate"


async def test_messages_truncated_stream(
    emulator: Any, proxy: ProxyHandle, claude: anthropic.AsyncAnthropic
) -> None:
    async with claude.messages.stream(
        model="llama3.2:latest",
        max_tokens=100,
        messages=[{"role": "user", "content": PROMPT}],
        extra_headers=headers("m-cut", "truncate_after=3"),
    ) as stream:
        texts = [t async for t in stream.text_stream]
    (row,) = await proxy.wait_rows(1)
    (err,) = await proxy.wait_rows(1, "error_metrics")
    gt = emulator.emu.entry("m-cut")
    assert "".join(texts) == gt.response_text and gt.eval_count == 3
    assert row["success"] == 0 and row["status_code"] == 200 and err["error_type"] == "truncated"
    assert row["token_source"] == "estimate"  # message_start's input_tokens is Ollama's guess, not usage
    assert row["response_length"] == len(gt.response_text)


async def test_responses_create(emulator: Any, proxy: ProxyHandle, oai: openai.AsyncOpenAI) -> None:
    resp = await oai.responses.create(
        model="qwen3:0.6b",
        input=[{"role": "user", "content": PROMPT}],
        instructions="Be brief.",
        temperature=0.3,
        top_p=0.8,
        max_output_tokens=7,
        extra_headers=headers("r-create"),
    )
    (row,) = await proxy.wait_rows(1)
    gt = emulator.emu.entry("r-create")
    assert resp.usage is not None and resp.usage.output_tokens == gt.eval_count == 7
    assert resp.output_text == gt.response_text and resp.status == "completed"
    check_usage_row(row, gt, "/v1/responses")
    assert row["stream"] == 0 and row["done_reason"] == "completed"
    assert row["temperature"] == 0.3 and row["top_p"] == 0.8 and row["max_tokens"] == 7
    assert row["prompt_length"] == len("Be brief.\n" + PROMPT)


async def test_responses_create_streamed(emulator: Any, proxy: ProxyHandle, oai: openai.AsyncOpenAI) -> None:
    await warm_responses(oai)
    start = time.perf_counter()
    first: float | None = None
    text = []
    stream = await oai.responses.create(
        model="llama3.2:latest",
        input=PROMPT,
        stream=True,
        extra_headers=headers("r-stream", f"tokens=6; {SLOW}"),
    )
    completed = None
    async for event in stream:
        if event.type == "response.output_text.delta":
            first = first or time.perf_counter()
            text.append(event.delta)
        elif event.type == "response.completed":
            completed = event.response
    row = await row_of(proxy, "r-stream", 2)
    gt = emulator.emu.entry("r-stream")
    assert "".join(text) == gt.response_text and completed is not None and completed.usage is not None
    assert completed.usage.input_tokens == gt.prompt_eval_count
    check_usage_row(row, gt, "/v1/responses")
    assert row["stream"] == 1 and row["done_reason"] == "completed"
    assert first is not None
    assert -1.0 <= (first - start) * 1000 - row["ttft_ms"] <= TOL_MS
    assert json.loads(row["metadata"])["content_events"] == 6


async def test_responses_errors(emulator: Any, proxy: ProxyHandle, oai: openai.AsyncOpenAI) -> None:
    client = oai
    with pytest.raises(openai.NotFoundError):
        await client.responses.create(model="nope", input="x", extra_headers=headers("r404"))
    failed = None
    stream = await client.responses.create(
        model="llama3.2:latest",
        input="x",
        stream=True,
        extra_headers=headers("r-mid", "error_after=2; error_message=GPU fell over"),
    )
    async for event in stream:
        if event.type == "response.failed":
            failed = event.response
    assert failed is not None and failed.error is not None and failed.error.message == "GPU fell over"
    rows = {r["request_id"]: r for r in await proxy.wait_rows(2)}
    errs = {e["request_id"]: e for e in await proxy.wait_rows(2, "error_metrics")}
    assert rows["r404"]["status_code"] == 404 and errs["r404"]["error_type"] == "upstream_status"
    assert rows["r-mid"]["success"] == 0 and rows["r-mid"]["error_message"] == "GPU fell over"
    assert rows["r-mid"]["done_reason"] == "failed" and errs["r-mid"]["error_type"] == "stream_error"


async def test_responses_truncated_stream(emulator: Any, proxy: ProxyHandle, oai: openai.AsyncOpenAI) -> None:
    stream = await oai.responses.create(
        model="llama3.2:latest", input=PROMPT, stream=True, extra_headers=headers("r-cut", "truncate_after=3")
    )
    kinds = [event.type async for event in stream]
    (row,) = await proxy.wait_rows(1)
    (err,) = await proxy.wait_rows(1, "error_metrics")
    gt = emulator.emu.entry("r-cut")
    assert "response.completed" not in kinds and kinds.count("response.output_text.delta") == 3
    assert row["success"] == 0 and err["error_type"] == "truncated" and row["token_source"] == "estimate"
    assert row["response_length"] == len(gt.response_text)
