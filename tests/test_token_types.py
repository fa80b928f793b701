"""Thinking and tool-call tokens per response (proxy/forward/conversations.py ``token_types``), checked
against the emulator's own thinking text and tool calls on every route that carries them."""

from __future__ import annotations

from typing import Any

import aiohttp
import orjson
import pytest

from proxy.emulator.anthropic import tool_arguments
from proxy.forward.tokens import estimate_tokens
from tests.fixtures.emulator import RunningEmulator
from tests.fixtures.proxy import MakeProxy

_USER = [{"role": "user", "content": "hi"}]
_TOOL = {"name": "lookup", "description": "d", "input_schema": {"type": "object"}}


def _tool_text(calls: int) -> str:
    return "".join("lookup" + orjson.dumps(tool_arguments(n)).decode() for n in range(calls))


@pytest.mark.parametrize("stream", [True, False])
@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/api/chat", {"model": "qwen3:0.6b", "messages": _USER}),
        ("/v1/chat/completions", {"model": "qwen3:0.6b", "messages": _USER}),
    ],
)
async def test_thinking_tokens(
    emulator: RunningEmulator, make_proxy: MakeProxy, path: str, body: dict[str, Any], stream: bool
) -> None:
    proxy = await make_proxy(emulator.url)
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{proxy.url}{path}", json={**body, "stream": stream}) as resp:
            assert resp.status == 200
            await resp.read()
        no_think = {**body, "model": "llama3.2", "stream": stream}
        async with http.post(f"{proxy.url}{path}", json=no_think) as resp:
            assert resp.status == 200
            await resp.read()
    rows = await proxy.wait_rows(2)
    truth = {e.request_id: e for e in emulator.emu.log}
    thinking = truth[rows[0]["request_id"]].thinking_text
    assert thinking and rows[0]["thinking_tokens"] == estimate_tokens(thinking) > 0
    assert rows[1]["thinking_tokens"] == 0 and rows[0]["tool_call_tokens"] == rows[1]["tool_call_tokens"] == 0


@pytest.mark.parametrize("stream", [True, False])
@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/messages", {"model": "llama3.2", "max_tokens": 50, "messages": _USER, "tools": [_TOOL]}),
        (
            "/v1/responses",
            {"model": "llama3.2", "input": "hi", "tools": [{"type": "function", "name": "lookup"}]},
        ),
    ],
)
async def test_tool_call_tokens(
    emulator: RunningEmulator, make_proxy: MakeProxy, path: str, body: dict[str, Any], stream: bool
) -> None:
    proxy = await make_proxy(emulator.url)
    async with aiohttp.ClientSession() as http:
        headers = {"X-Emulate": "tool_calls=3"}
        async with http.post(f"{proxy.url}{path}", json={**body, "stream": stream}, headers=headers) as resp:
            assert resp.status == 200
            await resp.read()
    (row,) = await proxy.wait_rows(1)
    assert row["tool_call_tokens"] == estimate_tokens(_tool_text(3)) > 0
    assert row["thinking_tokens"] == 0
