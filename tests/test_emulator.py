"""The emulator over real HTTP: native streams, timing ground truth, scheduling, failure injection."""

from __future__ import annotations

import asyncio
import json
import re
import time
from typing import Any

import aiohttp
import pytest

from tests.fixtures.emulator import MakeEmulator, RunningEmulator

GEN = "/api/generate"
CHAT = "/api/chat"
CREATED = re.compile(rb'"created_at":"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d{1,9})?Z"')
FINAL_KEYS = [
    "model", "created_at", "response", "done", "done_reason", "context", "total_duration", "load_duration",
    "prompt_eval_count", "prompt_eval_duration", "eval_count", "eval_duration",
]  # fmt: skip
MS = 1_000_000


async def chunks(response: aiohttp.ClientResponse) -> list[bytes]:
    """The body as the HTTP chunks that carried it (each must hold exactly one line)."""
    out: list[bytes] = []
    buffer = b""
    async for data, end_of_chunk in response.content.iter_chunks():
        buffer += data
        if end_of_chunk:
            out.append(buffer)
            buffer = b""
    if buffer:
        out.append(buffer)
    return out


async def post(
    emu: RunningEmulator, path: str, body: Any, emulate: str = "", request_id: str = ""
) -> tuple[int, dict[str, str], bytes]:
    headers = {"X-Emulate": emulate} if emulate else {}
    if request_id:
        headers["X-Request-Id"] = request_id
    async with aiohttp.ClientSession() as session:
        async with session.post(emu.url + path, json=body, headers=headers) as response:
            return response.status, dict(response.headers), await response.read()


async def test_streamed_generate_lines_are_exact_and_one_chunk_each(emulator: RunningEmulator) -> None:
    body = {"model": "llama3.2", "prompt": "Why is the sky blue?", "options": {"num_predict": 4}}
    async with aiohttp.ClientSession() as session:
        async with session.post(emulator.url + GEN, json=body, headers={"X-Request-Id": "r1"}) as response:
            assert response.headers["Content-Type"] == "application/x-ndjson"
            assert response.headers["Transfer-Encoding"] == "chunked"
            assert "Server" not in response.headers and "Content-Length" not in response.headers
            parts = await chunks(response)
    assert len(parts) == 5 and all(part.endswith(b"\n") and part.count(b"\n") == 1 for part in parts)
    entry = emulator.emu.entry("r1")
    first = CREATED.sub(b'"created_at":"T"', parts[0])
    word = json.dumps(entry.response_text.split(" ")[0]).replace("<", "\\u003c").replace(">", "\\u003e")
    word = word.replace("&", "\\u0026")
    assert first == b'{"model":"llama3.2","created_at":"T","response":' + word.encode() + b',"done":false}\n'
    final = json.loads(parts[-1])
    assert list(final) == FINAL_KEYS
    assert final["done_reason"] == "length" and final["eval_count"] == 4 == entry.eval_count
    text = "".join(json.loads(line)["response"] for line in parts)
    assert text == entry.response_text and entry.done_reason == "length"
    for key, truth in [
        ("total_duration", entry.total_ns),
        ("load_duration", entry.load_ns),
        ("prompt_eval_duration", entry.prompt_eval_ns),
        ("eval_duration", entry.eval_ns),
        ("prompt_eval_count", entry.prompt_eval_count),
    ]:
        assert final[key] == truth, key
    assert len(final["context"]) == final["prompt_eval_count"] + 4
    assert entry.bytes_sent == sum(map(len, parts)) and len(entry.token_times) == 4


async def test_non_stream_body_and_raw_generate(emulator: RunningEmulator) -> None:
    body = {"model": "llama3.2", "prompt": "Why is the sky blue?", "stream": False}
    status, headers, data = await post(emulator, GEN, body)
    assert status == 200 and headers["Content-Type"] == "application/json; charset=utf-8"
    assert not data.endswith(b"\n") and headers["Content-Length"] == str(len(data))
    value = json.loads(data)
    assert value["done"] is True and value["done_reason"] == "stop" and value["eval_count"] == 8
    _, _, streamed = await post(emulator, GEN, {**body, "stream": True})
    assert "".join(json.loads(line)["response"] for line in streamed.splitlines()) == value["response"]
    _, _, raw = await post(emulator, GEN, {**body, "raw": True})
    assert "context" not in json.loads(raw)


async def test_chat_stream_thinking_and_final_shape(emulator: RunningEmulator) -> None:
    body = {"model": "qwen3:0.6b", "messages": [{"role": "user", "content": "hi there"}]}
    status, _, data = await post(emulator, CHAT, body, request_id="c1")
    lines = [json.loads(line) for line in data.splitlines()]
    assert status == 200 and lines[0]["message"]["content"] == "" and lines[0]["message"]["thinking"]
    final = lines[-1]
    assert list(final) == [
        "model", "created_at", "message", "done", "done_reason", "total_duration", "load_duration",
        "prompt_eval_count", "prompt_eval_duration", "eval_count", "eval_duration",
    ]  # fmt: skip
    entry = emulator.emu.entry("c1")
    assert "".join(line["message"].get("thinking", "") for line in lines) == entry.thinking_text
    assert "".join(line["message"]["content"] for line in lines) == entry.response_text
    assert final["eval_count"] == 8 and entry.thinking_text and entry.response_text


async def test_headers_wait_for_the_first_line(make_emulator: MakeEmulator) -> None:
    emu = await make_emulator(load_s=0.15, prompt_eval_s=0.1)
    async with aiohttp.ClientSession() as session:
        started = time.monotonic()
        async with session.post(emu.url + GEN, json={"model": "llama3.2", "prompt": "x"}) as response:
            to_headers = time.monotonic() - started
            await response.read()
    entry = emu.emu.log[-1]
    assert entry.headers_sent_at is not None
    assert 0.24 <= to_headers < 1.0  # load + prompt eval passed before any header byte
    assert entry.headers_sent_at - entry.arrived_at == pytest.approx(to_headers, abs=0.1)
    assert entry.token_times[0] - entry.headers_sent_at < 0.01


async def test_slot_waits_show_only_in_total(make_emulator: MakeEmulator) -> None:
    emu = await make_emulator(start_loaded=True, token_interval_s=0.02, default_tokens=5)
    bodies = [{"model": "llama3.2", "prompt": f"p{i}", "stream": False} for i in range(3)]
    results = await asyncio.gather(*(post(emu, GEN, b, request_id=f"s{i}") for i, b in enumerate(bodies)))
    await emu.emu.wait_idle()
    waits = []
    for index, (status, _, data) in enumerate(results):
        wire, entry = json.loads(data), emu.emu.entry(f"s{index}")
        assert status == 200 and wire["total_duration"] == entry.total_ns
        assert entry.slot_wait_ns is not None
        residue = wire["total_duration"] - wire["load_duration"] - wire["prompt_eval_duration"]
        residue -= wire["eval_duration"]
        assert residue == pytest.approx(entry.slot_wait_ns, abs=5 * MS)
        assert wire["load_duration"] < 5 * MS  # the slot wait is not in load_duration
        waits.append(entry.slot_wait_ns)
    waits.sort()
    # each request holds the slot for prompt eval + 4 intervals (~82 ms)
    assert waits[0] < 5 * MS and 80 * MS < waits[1] < 200 * MS and 160 * MS < waits[2] < 400 * MS


async def test_parallel_slots_run_together(make_emulator: MakeEmulator) -> None:
    emu = await make_emulator(start_loaded=True, token_interval_s=0.02, default_tokens=5, num_parallel=3)
    bodies = [{"model": "llama3.2", "prompt": f"p{i}", "stream": False} for i in range(3)]
    await asyncio.gather(*(post(emu, GEN, b) for b in bodies))
    assert max(e.slot_wait_ns or 0 for e in emu.emu.log) < 5 * MS


async def test_cold_load_then_warm_and_ps(make_emulator: MakeEmulator) -> None:
    emu = await make_emulator(load_s=0.1)
    async with aiohttp.ClientSession() as session:
        async with session.get(emu.url + "/api/ps") as response:
            assert await response.json() == {"models": []}
        cold = json.loads((await post(emu, GEN, {"model": "llama3.2", "prompt": "a", "stream": False}))[2])
        warm = json.loads((await post(emu, GEN, {"model": "llama3.2", "prompt": "a", "stream": False}))[2])
        assert cold["load_duration"] >= 100 * MS and warm["load_duration"] < 20 * MS
        async with session.get(emu.url + "/api/ps") as response:
            models = (await response.json())["models"]
    assert [m["name"] for m in models] == ["llama3.2:latest"]
    assert models[0]["size_vram"] > 0 and models[0]["context_length"] == 131072 and models[0]["expires_at"]


async def test_loads_are_serialised_across_models(make_emulator: MakeEmulator) -> None:
    emu = await make_emulator(load_s=0.1)
    await asyncio.gather(
        post(emu, GEN, {"model": "llama3.2", "prompt": "a"}, request_id="m1"),
        post(emu, GEN, {"model": "qwen3:0.6b", "prompt": "a"}, request_id="m2"),
    )
    loads = sorted([emu.emu.entry("m1").load_ns or 0, emu.emu.entry("m2").load_ns or 0])
    assert loads[0] >= 100 * MS and loads[1] >= 200 * MS and loads[1] - loads[0] >= 80 * MS


async def test_load_and_unload_objects(emulator: RunningEmulator) -> None:
    status, headers, data = await post(emulator, GEN, {"model": "llama3.2"})
    value = json.loads(data)
    assert status == 200 and headers["Content-Type"] == "application/json; charset=utf-8"
    assert list(value) == ["model", "created_at", "response", "done", "done_reason"]
    assert value["done_reason"] == "load" and emulator.emu.scheduler.is_loaded("llama3.2:latest")
    _, _, data = await post(emulator, CHAT, {"model": "llama3.2", "messages": [], "keep_alive": 0})
    value = json.loads(data)
    assert value["done_reason"] == "unload" and value["message"] == {"role": "assistant", "content": ""}
    assert not emulator.emu.scheduler.is_loaded("llama3.2:latest")
    await post(emulator, GEN, {"model": "llama3.2", "prompt": "x", "keep_alive": 0})
    assert not emulator.emu.scheduler.is_loaded("llama3.2:latest")  # unloaded right after the request


async def test_mid_stream_error_line(emulator: RunningEmulator) -> None:
    status, _, data = await post(emulator, GEN, {"model": "llama3.2", "prompt": "x"}, emulate="error_after=3")
    lines = data.splitlines(keepends=True)
    assert status == 200 and len(lines) == 4
    assert lines[-1] == b'{"error":"an error was encountered while running the model"}\n'
    assert all(json.loads(line)["done"] is False for line in lines[:3])
    entry = emulator.emu.log[-1]
    assert entry.error_injected == "error_after=3" and entry.done_reason is None and entry.eval_count == 3
    status, _, data = await post(
        emulator, GEN, {"model": "llama3.2", "prompt": "x", "stream": False}, emulate="error_after=3"
    )
    assert status == 500 and json.loads(data) == {"error": "an error was encountered while running the model"}


async def test_error_status_before_first_byte(emulator: RunningEmulator) -> None:
    status, headers, data = await post(
        emulator, CHAT, {"model": "llama3.2", "messages": [{"role": "user", "content": "x"}]},
        emulate="error_status=503; error_message=busy now",
    )  # fmt: skip
    assert status == 503 and data == b'{"error":"busy now"}' and headers["Content-Type"] == "application/json"
    status, _, data = await post(emulator, GEN, {"model": "llama3.2", "prompt": "x"}, emulate="bad")
    assert status == 400 and b"X-Emulate" in data


async def test_close_after_aborts_the_connection(emulator: RunningEmulator) -> None:
    async with aiohttp.ClientSession() as session:
        headers = {"X-Emulate": "close_after=2"}
        async with session.post(
            emulator.url + GEN, json={"model": "llama3.2", "prompt": "x"}, headers=headers
        ) as r:
            assert r.status == 200
            with pytest.raises(aiohttp.ClientPayloadError):
                await r.read()
    await emulator.emu.wait_idle()
    entry = emulator.emu.log[-1]
    assert entry.eval_count == 2 and entry.done_reason is None and entry.error_injected == "close_after=2"


async def test_stall_shows_in_load_duration(emulator: RunningEmulator) -> None:
    _, _, data = await post(
        emulator, GEN, {"model": "llama3.2", "prompt": "x", "stream": False}, emulate="stall_ms=80"
    )
    assert json.loads(data)["load_duration"] >= 80 * MS


async def test_knob_overrides_tokens_and_pacing(emulator: RunningEmulator) -> None:
    _, _, data = await post(
        emulator,
        GEN,
        {"model": "llama3.2", "prompt": "x", "stream": False},
        emulate="tokens=3;interval_ms=30",
    )
    value = json.loads(data)
    assert value["eval_count"] == 3 and value["done_reason"] == "stop"
    assert 55 * MS <= value["eval_duration"] < 200 * MS


async def test_disconnect_cancels_and_frees_the_slot(make_emulator: MakeEmulator) -> None:
    emu = await make_emulator(start_loaded=True, token_interval_s=0.01, default_tokens=500)
    async with aiohttp.ClientSession() as session:
        response = await session.post(emu.url + GEN, json={"model": "llama3.2", "prompt": "x"})
        await response.content.readline()
        response.close()
    await asyncio.wait_for(emu.emu.wait_idle(), 2)
    entry = emu.emu.log[-1]
    assert entry.cancelled and entry.status == 200 and (entry.eval_count or 0) < 100
    await post(
        emu, GEN, {"model": "llama3.2", "prompt": "y", "stream": False}, emulate="tokens=1", request_id="n"
    )
    assert (emu.emu.entry("n").slot_wait_ns or 0) < 5 * MS


@pytest.mark.parametrize(
    ("path", "body", "status", "message"),
    [
        (GEN, {"model": ""}, 404, "model '' not found"),
        (CHAT, {"model": ""}, 400, "model is required"),
        (GEN, {"model": "nope", "prompt": "x"}, 404, "model 'nope' not found"),
        (GEN, {"model": "bad name", "prompt": "x"}, 400, "invalid model name"),
        (GEN, {"model": "all-minilm", "prompt": "x"}, 400, '"all-minilm" does not support generate'),
        (GEN, {"model": "llama3.2", "prompt": "x", "think": True}, 400, '"llama3.2" does not support thinking'),
        (GEN, {"model": "llama3.2", "prompt": 3}, 400,
         "json: cannot unmarshal number into Go struct field GenerateRequest.prompt of type string"),
        (GEN, {"model": "llama3.2", "raw": True, "system": "s", "prompt": "x"}, 400,
         "raw mode does not support template, system, or context"),
        (GEN, {"model": "llama3.2", "prompt": "x", "keep_alive": True}, 400, "Unsupported type: 'bool'"),
    ],
)  # fmt: skip
async def test_validation_errors(
    emulator: RunningEmulator, path: str, body: Any, status: int, message: str
) -> None:
    got_status, headers, data = await post(emulator, path, body)
    assert (got_status, json.loads(data)) == (status, {"error": message})
    assert headers["Content-Type"] == "application/json; charset=utf-8"


async def test_body_is_json_whatever_the_content_type(emulator: RunningEmulator) -> None:
    async with aiohttp.ClientSession() as session:
        payload = b'{"MODEL":"llama3.2","Prompt":"x","stream":false}'
        headers = {"Content-Type": "application/x-www-form-urlencoded"}
        async with session.post(emulator.url + GEN, data=payload, headers=headers) as response:
            assert response.status == 200 and (await response.json())["done"] is True
        async with session.post(emulator.url + GEN, data=b"") as response:
            assert response.status == 400 and await response.read() == b'{"error":"missing request body"}'


async def test_max_queue_gives_503(make_emulator: MakeEmulator) -> None:
    emu = await make_emulator(max_queue=1, load_s=0.1)
    results = await asyncio.gather(
        post(emu, GEN, {"model": "llama3.2", "prompt": "a", "stream": False}),
        post(emu, GEN, {"model": "qwen3:0.6b", "prompt": "a", "stream": False}),
    )
    statuses = sorted(status for status, _, _ in results)
    busy = [data for status, _, data in results if status == 503]
    assert statuses == [200, 503]
    assert busy == [b'{"error":"server busy, please try again.  maximum pending requests exceeded"}']


async def test_config_wide_knobs_apply_and_headers_override(make_emulator: MakeEmulator) -> None:
    emu = await make_emulator(emulate="tokens=2")
    body = {"model": "llama3.2", "prompt": "x", "stream": False}
    assert json.loads((await post(emu, GEN, body))[2])["eval_count"] == 2
    assert json.loads((await post(emu, GEN, body, emulate="tokens=5"))[2])["eval_count"] == 5
