"""The emulator's ``/v1`` routes over real HTTP: SSE frame order, usage, errors, embeddings, models."""

from __future__ import annotations

import base64
import json
import math
import re
import struct
from typing import Any

import aiohttp

from tests.fixtures.emulator import RunningEmulator

CHAT = "/v1/chat/completions"
MESSAGES = [{"role": "user", "content": "hello"}]


async def post(
    emu: RunningEmulator, path: str, body: Any, emulate: str = ""
) -> tuple[int, dict[str, str], bytes]:
    headers = {"X-Emulate": emulate} if emulate else {}
    async with aiohttp.ClientSession() as session:
        async with session.post(emu.url + path, json=body, headers=headers) as response:
            return response.status, dict(response.headers), await response.read()


def events(data: bytes) -> list[str]:
    assert data.endswith(b"\n\n")
    return [frame.removeprefix(b"data: ").decode() for frame in data.split(b"\n\n")[:-1]]


async def test_chat_stream_with_usage_frame_order(emulator: RunningEmulator) -> None:
    body = {
        "model": "llama3.2",
        "messages": MESSAGES,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    status, headers, data = await post(emulator, CHAT, body, emulate="tokens=2")
    assert status == 200 and headers["Content-Type"] == "text/event-stream" and "Cache-Control" not in headers
    frames = events(data)
    assert len(frames) == 5 and frames[-1] == "[DONE]"
    first, second, finish, usage = (json.loads(f) for f in frames[:4])
    assert re.fullmatch(r"chatcmpl-\d{1,3}", first["id"]) and first["system_fingerprint"] == "fp_ollama"
    assert list(first) == ["id", "object", "created", "model", "system_fingerprint", "choices"]
    assert first["object"] == "chat.completion.chunk" and first["model"] == "llama3.2"
    assert (
        first["choices"][0]["delta"]["role"] == "assistant" and first["choices"][0]["finish_reason"] is None
    )
    assert list(second["choices"][0]["delta"]) == ["content"]
    assert finish["choices"] == [{"index": 0, "delta": {}, "finish_reason": "stop"}]
    assert '"delta":{}' in frames[2] and '"choices":[]' in frames[3]
    entry = emulator.emu.log[-1]
    assert usage["usage"] == {
        "prompt_tokens": entry.prompt_eval_count,
        "completion_tokens": 2,
        "total_tokens": (entry.prompt_eval_count or 0) + 2,
    }
    text = first["choices"][0]["delta"]["content"] + second["choices"][0]["delta"]["content"]
    assert text == entry.response_text and len({json.loads(f)["id"] for f in frames[:4]}) == 1


async def test_chat_stream_without_usage_and_length(emulator: RunningEmulator) -> None:
    body = {"model": "llama3.2", "messages": MESSAGES, "stream": True, "max_tokens": 3}
    _, _, data = await post(emulator, CHAT, body)
    frames = events(data)
    assert len(frames) == 5 and frames[-1] == "[DONE]" and "usage" not in data.decode()
    assert json.loads(frames[-2])["choices"][0]["finish_reason"] == "length"


async def test_chat_reasoning_deltas(emulator: RunningEmulator) -> None:
    body = {"model": "qwen3:0.6b", "messages": MESSAGES, "stream": True}
    _, _, data = await post(emulator, CHAT, body, emulate="tokens=6")
    deltas = [json.loads(f)["choices"][0]["delta"] for f in events(data)[:-2]]
    assert deltas[0]["role"] == "assistant" and deltas[0]["content"] == "" and deltas[0]["reasoning"]
    assert list(deltas[1]) == ["reasoning"] and list(deltas[-1]) == ["content"]
    _, _, data = await post(emulator, CHAT, {**body, "stream": False, "reasoning_effort": "none"})
    assert "reasoning" not in json.loads(data)["choices"][0]["message"]


async def test_chat_non_stream(emulator: RunningEmulator) -> None:
    status, headers, data = await post(emulator, CHAT, {"model": "llama3.2", "messages": MESSAGES})
    assert status == 200 and headers["Content-Type"] == "application/json" and data.endswith(b"}\n")
    value = json.loads(data)
    assert list(value) == ["id", "object", "created", "model", "system_fingerprint", "choices", "usage"]
    assert value["object"] == "chat.completion" and value["choices"][0]["finish_reason"] == "stop"
    assert value["choices"][0]["message"]["content"] == emulator.emu.log[-1].response_text
    assert value["usage"]["completion_tokens"] == 8


async def test_chat_mid_stream_error_loses_done(emulator: RunningEmulator) -> None:
    body = {"model": "llama3.2", "messages": MESSAGES, "stream": True}
    status, _, data = await post(emulator, CHAT, body, emulate="error_after=2")
    frames = events(data)
    assert status == 200 and "[DONE]" not in frames and len(frames) == 3
    assert json.loads(frames[-1])["choices"][0] == {
        "index": 0,
        "delta": {"content": ""},
        "finish_reason": None,
    }


async def test_v1_errors_use_the_openai_envelope(emulator: RunningEmulator) -> None:
    status, headers, data = await post(emulator, CHAT, {"model": "nope", "messages": MESSAGES})
    assert status == 404 and headers["Content-Type"] == "application/json"
    assert data == (
        b'{"error":{"message":"model \'nope\' not found","type":"not_found_error","param":null,"code":null}}\n'
    )
    status, _, data = await post(emulator, CHAT, {"model": "llama3.2", "messages": []})
    assert status == 400 and json.loads(data)["error"]["message"] == "[] is too short - 'messages'"
    status, _, data = await post(
        emulator, CHAT, {"model": "llama3.2", "messages": MESSAGES}, "error_status=500"
    )
    assert status == 500 and json.loads(data)["error"]["type"] == "api_error"


async def test_completions_stream_with_usage(emulator: RunningEmulator) -> None:
    body = {"model": "llama3.2", "prompt": "say", "stream": True, "stream_options": {"include_usage": True}}
    _, _, data = await post(emulator, "/v1/completions", body, emulate="tokens=2")
    frames = events(data)
    assert frames[-1] == "[DONE]" and len(frames) == 5
    chunks = [json.loads(f) for f in frames[:-1]]
    assert list(chunks[0]) == ["id", "object", "created", "choices", "model", "system_fingerprint", "usage"]
    assert all(
        c["usage"] == {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0} for c in chunks[:3]
    )
    assert chunks[2]["choices"] == [{"text": "", "index": 0, "finish_reason": "stop"}]
    assert chunks[3]["choices"] == [] and chunks[3]["usage"]["completion_tokens"] == 2
    assert re.fullmatch(r"cmpl-\d{1,3}", chunks[0]["id"])


async def test_completions_non_stream(emulator: RunningEmulator) -> None:
    _, _, data = await post(
        emulator, "/v1/completions", {"model": "llama3.2", "prompt": "say", "max_tokens": 2}
    )
    value = json.loads(data)
    assert value["object"] == "text_completion" and value["choices"][0]["finish_reason"] == "length"
    assert value["usage"]["completion_tokens"] == 2 and value["choices"][0]["text"]


async def test_v1_embeddings(emulator: RunningEmulator) -> None:
    body = {"model": "all-minilm", "input": ["a b", "c"]}
    status, _, data = await post(emulator, "/v1/embeddings", body)
    value = json.loads(data)
    assert status == 200 and value["object"] == "list" and [d["index"] for d in value["data"]] == [0, 1]
    assert value["usage"] == {"prompt_tokens": 7, "total_tokens": 7}
    vector = value["data"][0]["embedding"]
    assert len(vector) == 384 and math.isclose(sum(x * x for x in vector), 1.0, rel_tol=1e-5)
    _, _, data = await post(emulator, "/v1/embeddings", {**body, "encoding_format": "base64"})
    raw = base64.b64decode(json.loads(data)["data"][0]["embedding"])
    assert struct.unpack("<384f", raw)[0] == struct.unpack("<f", struct.pack("<f", vector[0]))[0]
    status, _, data = await post(emulator, "/v1/embeddings", {"model": "all-minilm", "input": []})
    assert status == 400 and json.loads(data)["error"]["message"] == "invalid input"


async def test_v1_models(emulator: RunningEmulator) -> None:
    async with aiohttp.ClientSession() as session:
        async with session.get(emulator.url + "/v1/models") as response:
            listing = await response.json()
        async with session.get(emulator.url + "/v1/models/llama3.2") as response:
            one = await response.json()
        async with session.get(emulator.url + "/v1/models/missing") as response:
            assert response.status == 404 and (await response.json())["error"]["type"] == "not_found_error"
    assert [m["id"] for m in listing["data"]] == ["llama3.2:latest", "qwen3:0.6b", "all-minilm:latest"]
    assert one == {"id": "llama3.2", "object": "model", "created": one["created"], "owned_by": "library"}


async def test_v1_models_empty_is_null(emulator: RunningEmulator) -> None:
    emulator.emu.installed.clear()
    async with aiohttp.ClientSession() as session:
        async with session.get(emulator.url + "/v1/models") as response:
            assert await response.read() == b'{"object":"list","data":null}\n'
