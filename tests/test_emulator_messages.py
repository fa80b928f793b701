"""The emulator's ``/v1/messages`` and ``/v1/responses`` (spec §8.7; Ollama's ``anthropic`` and
``openai/responses.go`` shapes) over real loopback HTTP, checked against its own ground truth."""

from __future__ import annotations

import json
from typing import Any

import aiohttp
import pytest

MSG_BODY = {
    "model": "llama3.2",
    "max_tokens": 100,
    "messages": [{"role": "user", "content": "why is the sky blue"}],
}
RESP_BODY = {"model": "llama3.2", "input": "why is the sky blue"}


async def post(url: str, body: Any, emulate: str = "") -> tuple[int, dict[str, str], bytes]:
    headers = {"X-Emulate": emulate} if emulate else {}
    async with aiohttp.ClientSession() as s, s.post(url, json=body, headers=headers) as resp:
        return resp.status, dict(resp.headers), await resp.read()


def frames(body: bytes) -> list[tuple[str, dict[str, Any]]]:
    """``event:`` + ``data:`` frames, each checked to be exactly two lines and a blank one."""
    out = []
    assert body.endswith(b"\n\n")
    for block in body.decode().split("\n\n")[:-1]:
        name_line, data_line = block.split("\n")
        assert name_line.startswith("event: ") and data_line.startswith("data: ")
        data = json.loads(data_line[6:])
        assert data["type"] == name_line[7:]
        out.append((name_line[7:], data))
    return out


async def test_messages_stream_shape_and_ground_truth(emulator: Any) -> None:
    status, headers, body = await post(
        f"{emulator.url}/v1/messages", {**MSG_BODY, "model": "qwen3:0.6b", "stream": True}, "tokens=6"
    )
    assert status == 200 and headers["Content-Type"] == "text/event-stream"
    events = frames(body)
    kinds = [k for k, _ in events]
    assert kinds[:3] == ["message_start", "ping", "content_block_start"]
    assert kinds[-2:] == ["message_delta", "message_stop"]
    (gt,) = emulator.emu.inference_entries()
    start, delta = events[0][1], events[-2][1]
    # message_start's usage is Ollama's len/4 guess; message_delta carries the real counts
    assert start["message"]["usage"] == {
        "input_tokens": len(b"user" + b"why is the sky blue") // 4,
        "output_tokens": 0,
    }
    assert delta == {
        "type": "message_delta",
        "delta": {"stop_reason": "end_turn"},
        "usage": {"input_tokens": gt.prompt_eval_count, "output_tokens": 6},
    }
    thinking = [
        d["delta"]["thinking"] for k, d in events if k == "content_block_delta" and "thinking" in d["delta"]
    ]
    text = [d["delta"]["text"] for k, d in events if k == "content_block_delta" and "text" in d["delta"]]
    assert "".join(thinking) == gt.thinking_text and len(thinking) == 2  # a third of 6 tokens think
    assert "".join(text) == gt.response_text and len(gt.token_times) == 6 == gt.eval_count
    starts = [d["content_block"]["type"] for k, d in events if k == "content_block_start"]
    assert starts == ["thinking", "text"] and kinds.count("content_block_stop") == 2
    # Go struct order on the wire
    assert body.split(b"\n")[10].startswith(
        b'data: {"type":"content_block_delta","index":0,"delta":{"type":"thinking'
    )


async def test_messages_json_body_tools_and_max_tokens(emulator: Any) -> None:
    status, headers, body = await post(
        f"{emulator.url}/v1/messages", {**MSG_BODY, "max_tokens": 3}, "tokens=8; tool_calls=2"
    )
    assert status == 200 and headers["Content-Type"] == "application/json" and body.endswith(b"}\n")
    msg = json.loads(body)
    (gt,) = emulator.emu.inference_entries()
    assert list(msg) == ["id", "type", "role", "model", "content", "stop_reason", "usage"]
    assert msg["stop_reason"] == "tool_use" and gt.done_reason == "length"
    assert msg["usage"] == {"input_tokens": gt.prompt_eval_count, "output_tokens": 3}
    assert [b["type"] for b in msg["content"]] == ["text", "tool_use", "tool_use"]
    assert msg["content"][0]["text"] == gt.response_text


async def test_messages_validation_and_errors(emulator: Any) -> None:
    url = f"{emulator.url}/v1/messages"
    status, _, body = await post(url, {**MSG_BODY, "max_tokens": 0})
    assert status == 400 and json.loads(body)["error"] == {
        "type": "invalid_request_error",
        "message": "max_tokens is required and must be positive",
    }
    status, _, body = await post(url, {**MSG_BODY, "messages": []})
    assert status == 400 and json.loads(body)["error"]["message"] == "messages is required"
    status, _, body = await post(url, {**MSG_BODY, "model": "nope"})
    assert status == 404 and json.loads(body)["error"]["type"] == "not_found_error"
    status, headers, body = await post(url, {**MSG_BODY, "stream": True}, "error_status=503")
    assert status == 503 and headers["Content-Type"] == "application/json"
    assert json.loads(body)["error"]["type"] == "overloaded_error"
    status, _, body = await post(url, {**MSG_BODY, "stream": True}, "error_after=2; error_message=boom")
    events = frames(body)
    assert status == 200 and events[-1] == (
        "error",
        {"type": "error", "error": {"type": "api_error", "message": "boom"}},
    )
    assert [k for k, _ in events].count("content_block_delta") == 2 and "message_stop" not in body.decode()


@pytest.mark.parametrize("path,body", [("/v1/messages", MSG_BODY), ("/v1/responses", RESP_BODY)])
async def test_truncate_and_close_after(emulator: Any, path: str, body: dict[str, Any]) -> None:
    status, _, raw = await post(f"{emulator.url}{path}", {**body, "stream": True}, "truncate_after=2")
    kinds = [k for k, _ in frames(raw)]
    assert (
        status == 200
        and kinds[-1].endswith("delta")
        and len(emulator.emu.inference_entries()[-1].token_times) == 2
    )
    with pytest.raises(aiohttp.ClientPayloadError):
        await post(f"{emulator.url}{path}", {**body, "stream": True}, "close_after=2")
    gt = emulator.emu.inference_entries()[-1]
    assert gt.error_injected == "close_after=2" and gt.eval_count == 2 and gt.done_reason is None


async def test_responses_stream_shape_and_ground_truth(emulator: Any) -> None:
    status, headers, body = await post(
        f"{emulator.url}/v1/responses",
        {"model": "qwen3:0.6b", "input": [{"role": "user", "content": "hi"}], "stream": True},
        "tokens=6; tool_calls=1",
    )
    assert status == 200 and headers["Content-Type"] == "text/event-stream"
    events = frames(body)
    kinds = [k for k, _ in events]
    assert kinds[:2] == ["response.created", "response.in_progress"] and kinds[-1] == "response.completed"
    assert [d["sequence_number"] for _, d in events] == list(range(len(events)))
    for line in body.split(b"\n"):
        if line.startswith(b"data: "):  # Go map[string]any: keys sorted at every level
            data = json.loads(line[6:])
            assert list(data) == sorted(data)
    (gt,) = emulator.emu.inference_entries()
    deltas = [d["delta"] for k, d in events if k == "response.output_text.delta"]
    reasoning = [d["delta"] for k, d in events if k == "response.reasoning_summary_text.delta"]
    args = [d["delta"] for k, d in events if k == "response.function_call_arguments.delta"]
    assert "".join(deltas) == gt.response_text and "".join(reasoning) == gt.thinking_text
    assert args == ['{"city":"Paris","n":0}']
    usage = events[-1][1]["response"]["usage"]
    assert usage["input_tokens"] == gt.prompt_eval_count and usage["output_tokens"] == 6 == gt.eval_count
    assert usage["total_tokens"] == gt.prompt_eval_count + 6


async def test_responses_json_body_and_errors(emulator: Any) -> None:
    url = f"{emulator.url}/v1/responses"
    status, headers, body = await post(url, {**RESP_BODY, "max_output_tokens": 4})
    resp = json.loads(body)
    (gt,) = emulator.emu.inference_entries()
    assert status == 200 and headers["Content-Type"] == "application/json"
    assert list(resp)[:5] == ["id", "object", "created_at", "completed_at", "status"]
    assert resp["status"] == "completed" and gt.done_reason == "length"  # Ollama says completed anyway
    assert resp["output"][0]["content"][0]["text"] == gt.response_text
    assert resp["usage"]["output_tokens"] == 4 and resp["max_output_tokens"] == 4
    status, _, body = await post(url, {**RESP_BODY, "model": "nope"})
    assert status == 404 and json.loads(body)["error"]["type"] == "not_found_error"
    status, _, body = await post(url, {**RESP_BODY, "stream": True}, "error_after=1; error_message=boom")
    last = frames(body)[-1]
    assert last[0] == "response.failed" and last[1]["response"]["error"] == {
        "code": "server_error",
        "message": "boom",
    }
    status, _, body = await post(url, {**RESP_BODY, "reasoning": {"effort": "huge"}})
    assert status == 400 and "invalid reasoning value" in json.loads(body)["error"]["message"]
