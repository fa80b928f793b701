"""Management routes, routing quirks, the Host check, blobs, control routes, the official client, the CLI."""

from __future__ import annotations

import asyncio
import hashlib
import json
import math
import os
import signal
import sys
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import ollama
import pytest

from tests.fixtures.emulator import RunningEmulator
from tests.fixtures.ports import free_port

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


async def request(
    emu: RunningEmulator, method: str, path: str, body: Any = None, **kwargs: Any
) -> tuple[int, dict[str, str], bytes]:
    async with aiohttp.ClientSession() as session:
        async with session.request(
            method, emu.url + path, json=body, allow_redirects=False, **kwargs
        ) as response:
            return response.status, dict(response.headers), await response.read()


async def test_root_version_and_routing_texts(emulator: RunningEmulator) -> None:
    assert (await request(emulator, "GET", "/"))[::2] == (200, b"Ollama is running")
    status, headers, data = await request(emulator, "HEAD", "/")
    assert status == 200 and data == b"" and headers["Content-Type"] == "text/plain; charset=utf-8"
    assert json.loads((await request(emulator, "GET", "/api/version"))[2]) == {"version": "0.12.6"}
    status, headers, data = await request(emulator, "GET", "/api/nothing")
    assert (status, data, headers["Content-Type"]) == (404, b"404 page not found", "text/plain")
    status, headers, data = await request(emulator, "GET", "/api/chat")
    assert (status, data, headers["Allow"]) == (405, b"405 method not allowed", "POST")
    status, headers, _ = await request(emulator, "GET", "/api/tags/?x=1")
    assert (status, headers["Location"]) == (301, "/api/tags?x=1")
    status, headers, _ = await request(emulator, "POST", "/api/generate/")
    assert (status, headers["Location"]) == (307, "/api/generate")


@pytest.mark.parametrize(
    ("host", "allowed"),
    [("example.com", False), ("ollama.example.com:11434", False), ("8.8.8.8", False), ("localhost:11434", True),
     ("my.box.local", True), ("svc.internal", True), ("10.1.2.3:80", True), ("[::1]:11434", True), ("", True)],
)  # fmt: skip
async def test_host_check(emulator: RunningEmulator, host: str, allowed: bool) -> None:
    status, _, data = await request(emulator, "GET", "/api/tags", headers={"Host": host})
    assert (status == 200) is allowed
    if not allowed:
        assert status == 403 and data == b""


async def test_host_check_can_be_disabled(make_emulator: Any) -> None:
    emu = await make_emulator(host_check=False)
    assert (await request(emu, "GET", "/api/tags", headers={"Host": "example.com"}))[0] == 200


async def test_show_copy_delete(emulator: RunningEmulator) -> None:
    status, _, data = await request(emulator, "POST", "/api/show", {"model": "qwen3:0.6b"})
    shown = json.loads(data)
    assert status == 200 and shown["capabilities"] == ["completion", "tools", "thinking"]
    assert shown["model_info"]["qwen3.context_length"] == 40960 and shown["details"]["family"] == "qwen3"
    status, _, data = await request(emulator, "POST", "/api/show", {"model": "nope"})
    assert (status, json.loads(data)) == (404, {"error": "model 'nope:latest' not found"})
    status, headers, data = await request(
        emulator, "POST", "/api/copy", {"source": "llama3.2", "destination": "b"}
    )
    assert (status, data) == (200, b"") and "Content-Type" not in headers
    status, _, data = await request(emulator, "POST", "/api/copy", {"source": "zz", "destination": "b"})
    assert (status, json.loads(data)) == (404, {"error": 'model "zz" not found'})
    assert (await request(emulator, "DELETE", "/api/delete", {"model": "b"}))[::2] == (200, b"")
    status, _, data = await request(emulator, "DELETE", "/api/delete", {"model": "b"})
    assert (status, json.loads(data)) == (404, {"error": "model 'b' not found"})


async def test_pull_push_create_progress(emulator: RunningEmulator) -> None:
    status, headers, data = await request(emulator, "POST", "/api/pull", {"model": "llama3.2"})
    lines = [json.loads(line) for line in data.splitlines()]
    assert status == 200 and headers["Content-Type"] == "application/x-ndjson"
    assert lines[0] == {"status": "pulling manifest"} and lines[-1] == {"status": "success"}
    assert any("completed" in line for line in lines)
    status, headers, data = await request(
        emulator, "POST", "/api/pull", {"model": "llama3.2", "stream": False}
    )
    assert (status, data, headers["Content-Type"]) == (200, b'{"status":"success"}', "application/json")
    _, _, data = await request(emulator, "POST", "/api/pull", {"model": "unknown-model"})
    assert json.loads(data.splitlines()[-1]) == {"error": "pull model manifest: file does not exist"}
    _, _, data = await request(emulator, "POST", "/api/push", {"model": "llama3.2"})
    assert json.loads(data.splitlines()[-1]) == {"status": "success"}
    _, _, data = await request(emulator, "POST", "/api/create", {"model": "mine", "from": "llama3.2"})
    assert json.loads(data.splitlines()[-1]) == {"status": "success"} and emulator.emu.resolve("mine")


async def _body(payload: bytes) -> AsyncIterator[bytes]:
    for start in range(0, len(payload), 1000):
        yield payload[start : start + 1000]


async def test_blobs(emulator: RunningEmulator) -> None:
    payload = os.urandom(10_000)
    digest = "sha256:" + hashlib.sha256(payload).hexdigest()
    assert (await request(emulator, "HEAD", f"/api/blobs/{digest}"))[0] == 404
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{emulator.url}/api/blobs/{digest}", data=_body(payload)) as response:
            assert response.status == 201 and await response.read() == b""
        async with session.post(f"{emulator.url}/api/blobs/{digest}", data=payload) as response:
            assert response.status == 200
    assert (await request(emulator, "HEAD", f"/api/blobs/{digest}"))[0] == 200
    wrong = "sha256:" + "0" * 64
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{emulator.url}/api/blobs/{wrong}", data=payload) as response:
            assert response.status == 400
            assert await response.json() == {"error": f'digest mismatch, expected "{wrong}", got "{digest}"'}
    assert (await request(emulator, "HEAD", "/api/blobs/sha256:xyz"))[0] == 400
    _, _, data = await request(
        emulator, "POST", "/api/create", {"model": "fromfile", "files": {"m.gguf": digest}}
    )
    assert json.loads(data.splitlines()[-1]) == {"status": "success"}


async def test_embed_routes(emulator: RunningEmulator) -> None:
    status, headers, data = await request(
        emulator, "POST", "/api/embed", {"model": "all-minilm", "input": ["a b", "c"]}
    )
    value = json.loads(data)
    assert headers["Transfer-Encoding"] == "chunked" and "Content-Length" not in headers  # > 2 KB, as Go
    assert status == 200 and list(value) == ["model", "embeddings", "total_duration", "load_duration",
                                              "prompt_eval_count"]  # fmt: skip
    assert value["prompt_eval_count"] == 7 and len(value["embeddings"]) == 2
    assert math.isclose(sum(x * x for x in value["embeddings"][0]), 1.0, rel_tol=1e-5)
    entry = emulator.emu.log[-1]
    assert (value["total_duration"], value["load_duration"]) == (entry.total_ns, entry.load_ns)
    _, _, data = await request(
        emulator, "POST", "/api/embed", {"model": "all-minilm", "input": "x", "dimensions": 8}
    )
    assert len(json.loads(data)["embeddings"][0]) == 8
    _, _, data = await request(emulator, "POST", "/api/embed", {"model": "all-minilm"})
    assert json.loads(data) == {"model": "all-minilm", "embeddings": []}
    _, _, data = await request(emulator, "POST", "/api/embeddings", {"model": "all-minilm", "prompt": "x"})
    assert list(json.loads(data)) == ["embedding"] and len(json.loads(data)["embedding"]) == 384
    status, _, data = await request(emulator, "POST", "/api/embeddings", {"model": ""})
    assert (status, json.loads(data)) == (400, {"error": "model is required"})
    status, _, data = await request(emulator, "POST", "/api/embed", {"model": "all-minilm", "input": 3})
    assert (status, json.loads(data)) == (400, {"error": "invalid input type"})


async def test_control_routes(emulator: RunningEmulator) -> None:
    await request(
        emulator, "POST", "/api/generate", {"model": "llama3.2", "prompt": "x"}, headers={"X-Request-Id": "q"}
    )
    status, _, data = await request(emulator, "GET", "/_emulator/log")
    entries = json.loads(data)
    assert status == 200 and entries[-1]["request_id"] == "q" and entries[-1]["eval_count"] == 8
    assert emulator.emu.scheduler.is_loaded("llama3.2:latest")
    assert (await request(emulator, "POST", "/_emulator/reset"))[0] == 204
    assert emulator.emu.log == [] and not emulator.emu.scheduler.is_loaded("llama3.2:latest")


async def test_official_client(emulator: RunningEmulator) -> None:
    async with ollama.AsyncClient(host=emulator.url) as client:
        reply = await client.chat(model="llama3.2", messages=[{"role": "user", "content": "hi"}])
        assert reply.message.content == emulator.emu.log[-1].response_text and reply.done_reason == "stop"
        parts = [part async for part in await client.generate(model="llama3.2", prompt="hi", stream=True)]
        assert parts[-1].done and parts[-1].eval_count == 8
        assert "".join(p.response for p in parts) == emulator.emu.log[-1].response_text
        chat_parts = [
            p
            async for p in await client.chat(
                model="qwen3:0.6b", messages=[{"role": "user", "content": "x"}], stream=True
            )
        ]
        assert chat_parts[-1].done and any(p.message.thinking for p in chat_parts)
        embedded = await client.embed(model="all-minilm", input=["a", "b"])
        assert len(embedded.embeddings) == 2 and embedded.prompt_eval_count == 6
        names = [m.model for m in (await client.list()).models]
        assert names == ["llama3.2:latest", "qwen3:0.6b", "all-minilm:latest"]
        assert {m.model for m in (await client.ps()).models} == {
            "llama3.2:latest",
            "qwen3:0.6b",
            "all-minilm:latest",
        }
        shown = await client.show("llama3.2")
        assert shown.capabilities == ["completion", "tools"]
        assert (await client.pull("llama3.2")).status == "success"
        statuses = [p.status async for p in await client.pull("llama3.2", stream=True)]
        assert statuses[0] == "pulling manifest" and statuses[-1] == "success"
        with pytest.raises(ollama.ResponseError) as info:
            await client.generate(model="nope", prompt="x")
        assert info.value.status_code == 404 and info.value.error == "model 'nope' not found"
    failing = ollama.AsyncClient(host=emulator.url, headers={"X-Emulate": "error_after=2;error_message=boom"})
    async with failing:
        with pytest.raises(ollama.ResponseError, match="boom"):
            async for _part in await failing.generate(model="llama3.2", prompt="x", stream=True):
                pass


async def test_cli_serves_until_sigint() -> None:
    port = free_port()
    code = (
        "import argparse, sys; from proxy.emulator import cli; p = argparse.ArgumentParser(); "
        "cli.add_arguments(p); sys.exit(cli.run(p.parse_args(sys.argv[1:])))"
    )
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-c", code, "--listen", f"127.0.0.1:{port}", "--tokens", "3", "--load-ms", "0",
        "--models", "llama3.2,tiny", stdout=asyncio.subprocess.PIPE,
        cwd=REPO_ROOT,
    )  # fmt: skip
    try:
        assert process.stdout is not None
        line = await asyncio.wait_for(process.stdout.readline(), 20)
        assert f"127.0.0.1:{port}" in line.decode()
        async with aiohttp.ClientSession() as session:
            body = {"model": "tiny", "prompt": "x", "stream": False}
            async with session.post(f"http://127.0.0.1:{port}/api/generate", json=body) as response:
                assert (await response.json())["eval_count"] == 3
    finally:
        process.send_signal(signal.SIGINT)
        assert await asyncio.wait_for(process.wait(), 20) == 0
