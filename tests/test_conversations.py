"""Conversation ids and turns through the official ``ollama`` client, the conversations API, and the id rules
for every chat route (proxy/forward/conversations.py, docs/conversations.md)."""

from __future__ import annotations

import asyncio
import http.client
import json
from typing import Any
from urllib.parse import quote

import aiohttp
import ollama
import pytest
from yarl import URL

from proxy.forward.conversations import Conversations, chat_opening
from proxy.forward.request_facts import inspect_request
from proxy.forward.streams.facts import Flavor
from tests.fixtures.emulator import RunningEmulator
from tests.fixtures.proxy import MakeProxy


async def _chat(client: ollama.AsyncClient, history: list[dict[str, Any]], text: str) -> None:
    history.append({"role": "user", "content": text})
    reply = await client.chat(model="llama3.2", messages=history)
    history.append({"role": "assistant", "content": reply.message.content})


async def test_official_client_chats(emulator: RunningEmulator, make_proxy: MakeProxy) -> None:
    proxy = await make_proxy(emulator.url)
    async with ollama.AsyncClient(host=proxy.url) as client:
        first: list[dict[str, Any]] = [{"role": "system", "content": "be brief"}]
        for text in ("hello", "tell me more", "and then?"):
            await _chat(client, first, text)
        # Regenerate the last answer: the same history up to the last user message, sent again.
        await client.chat(model="llama3.2", messages=first[:-1])
        other: list[dict[str, Any]] = [{"role": "system", "content": "be brief"}]
        for text in ("a different opening", "tell me more"):
            await _chat(client, other, text)
        # A generate call has no history: no derived conversation.
        await client.generate(model="llama3.2", prompt="hello")
    rows = await proxy.wait_rows(7)
    ids = [r["conversation_id"] for r in rows]
    turns = [r["turn"] for r in rows]
    assert ids[0] == ids[1] == ids[2] == ids[3] and ids[0] is not None
    assert ids[4] == ids[5] and ids[4] != ids[0] and ids[4] is not None
    assert turns[:6] == [1, 2, 3, 3, 1, 2]
    assert ids[6] is None and turns[6] is None

    async with aiohttp.ClientSession() as http:
        async with http.get(f"{proxy.url}/ollamon/api/conversations?window=1h") as resp:
            assert resp.status == 200
            listing = await resp.json()
        by_id = {c["conversation_id"]: c for c in listing["conversations"]}
        assert set(by_id) == {ids[0], ids[4]}
        assert by_id[ids[0]]["request_count"] == 4 and by_id[ids[0]]["turns"] == 3
        assert by_id[ids[4]]["request_count"] == 2 and by_id[ids[4]]["turns"] == 2
        expected_prompt = sum(r["prompt_tokens"] for r in rows[:4])
        assert by_id[ids[0]]["prompt_tokens"] == expected_prompt
        async with http.get(f"{proxy.url}/ollamon/api/conversations/{ids[0]}") as resp:
            assert resp.status == 200
            detail = await resp.json()
        assert [t["turn"] for t in detail["requests"]] == [1, 2, 3, 3]
        assert [t["request_id"] for t in detail["requests"]] == [r["request_id"] for r in rows[:4]]
        assert [t["response_time_ms"] for t in detail["requests"]] == [
            r["response_time_ms"] for r in rows[:4]
        ]
        async with http.get(f"{proxy.url}/ollamon/api/conversations?model=llama3.2&limit=1") as resp:
            assert resp.status == 200
            assert [c["conversation_id"] for c in (await resp.json())["conversations"]] == [ids[4]]
        async with http.get(f"{proxy.url}/ollamon/api/conversations?model=other") as resp:
            assert (await resp.json())["conversations"] == []


@pytest.mark.parametrize(
    "query", ["limit=0", "limit=x", "window=forever", "colour=red", "limit=1&limit=2", "since=1h&window=1h"]
)
async def test_list_bad_params(emulator: RunningEmulator, make_proxy: MakeProxy, query: str) -> None:
    proxy = await make_proxy(emulator.url)
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{proxy.url}/ollamon/api/conversations?{query}") as resp:
            assert resp.status == 400
            assert "bad parameter" in (await resp.json())["error"]


async def test_unknown_and_hostile_ids(emulator: RunningEmulator, make_proxy: MakeProxy) -> None:
    proxy = await make_proxy(emulator.url)
    hostile = "<script>alert(1)</script>' OR 1=1 --"
    async with aiohttp.ClientSession() as http:
        body = {"model": "llama3.2", "messages": [{"role": "user", "content": "x"}], "stream": False}
        async with http.post(
            f"{proxy.url}/api/chat", json=body, headers={"X-Conversation-Id": hostile + "x" * 300}
        ) as resp:
            assert resp.status == 200
        rows = await proxy.wait_rows(1)
        assert rows[0]["conversation_id"] == (hostile + "x" * 300)[:128] and rows[0]["turn"] == 1
        async with http.get(f"{proxy.url}/ollamon/api/conversations/nope") as resp:
            assert resp.status == 404 and (await resp.json()) == {"error": "no such conversation"}
        url = f"{proxy.url}/ollamon/api/conversations/{quote(rows[0]['conversation_id'], safe='')}"
        async with http.get(URL(url, encoded=True)) as resp:
            assert resp.status == 200
            assert (await resp.json())["conversation_id"] == rows[0]["conversation_id"]
        async with http.get(f"{proxy.url}/ollamon/api/conversations/nope?x=1") as resp:
            assert resp.status == 400


async def test_disabled(emulator: RunningEmulator, make_proxy: MakeProxy) -> None:
    proxy = await make_proxy(emulator.url, conversations__enabled=False)
    async with aiohttp.ClientSession() as http:
        body = {"model": "llama3.2", "messages": [{"role": "user", "content": "x"}], "stream": False}
        async with http.post(f"{proxy.url}/api/chat", json=body, headers={"X-Conversation-Id": "c1"}) as resp:
            assert resp.status == 200
    rows = await proxy.wait_rows(1)
    assert rows[0]["conversation_id"] is None and rows[0]["turn"] is None


def _opening(flavor: Flavor, body: bytes) -> tuple[str, int] | None:
    return inspect_request(flavor, body).opening


def test_openings_per_route() -> None:
    msgs = b'[{"role":"system","content":"s"},{"role":"user","content":"a"},{"role":"assistant","content":"b"},{"role":"user","content":"c"}]'
    native = _opening(Flavor.CHAT, b'{"model":"m","messages":' + msgs + b"}")
    openai = _opening(Flavor.OPENAI_CHAT, b'{"model":"m","messages":' + msgs + b"}")
    assert native is not None and native == openai and native[1] == 2
    first = _opening(
        Flavor.CHAT, b'{"messages":[{"role":"system","content":"s"},{"role":"user","content":"a"}]}'
    )
    assert first == (native[0], 1)
    # Go folds keys: "Messages" and "Role" read as "messages" and "role".
    folded = _opening(
        Flavor.CHAT, b'{"Messages":[{"Role":"system","content":"s"},{"role":"user","Content":"a"}]}'
    )
    assert folded == first
    assert _opening(Flavor.CHAT, b'{"messages":[{"role":"user","content":"other"}]}') != first
    assert _opening(Flavor.CHAT, b'{"messages":[{"role":"system","content":"s"}]}') is None
    assert _opening(Flavor.GENERATE, b'{"model":"m","prompt":"a"}') is None
    # Anthropic: tool results come back as user messages but are not user turns.
    tool_loop = (
        b'{"system":"s","messages":[{"role":"user","content":"a"},{"role":"assistant","content":[{"type":"tool_use","id":"t","name":"f","input":{}}]},'
        b'{"role":"user","content":[{"type":"tool_result","tool_use_id":"t","content":"42"}]}]}'
    )
    anthropic = _opening(Flavor.ANTHROPIC_MESSAGES, tool_loop)
    assert anthropic is not None and anthropic[1] == 1
    assert (
        _opening(Flavor.ANTHROPIC_MESSAGES, b'{"system":"s","messages":[{"role":"user","content":"a"}]}')
        == anthropic
    )
    responses = _opening(Flavor.OPENAI_RESPONSES, b'{"instructions":"s","input":"a"}')
    items = _opening(
        Flavor.OPENAI_RESPONSES,
        b'{"instructions":"s","input":[{"role":"user","content":"a"},{"type":"function_call_output","output":"1"},{"role":"user","content":"b"}]}',
    )
    assert responses is not None and items is not None and items[1] == 2 and responses[1] == 1


def test_id_mixes_caller_and_bounds_header() -> None:
    conv = Conversations(max_id_chars=8)
    opening = chat_opening(Flavor.CHAT, {"messages": [{"role": "user", "content": "hi"}]})
    a = conv.conversation_id(None, opening, "alice", "10.0.0.1")
    assert a == conv.conversation_id(None, opening, "alice", "10.0.0.1")
    assert a != conv.conversation_id(None, opening, "bob", "10.0.0.1")
    assert a != conv.conversation_id(None, opening, "alice", "10.0.0.2")
    assert conv.conversation_id("0123456789", opening, "alice", None) == "01234567"
    assert conv.conversation_id(None, None, "alice", None) is None


async def test_cache_reuse_estimate_vs_emulator(make_emulator: Any, make_proxy: MakeProxy) -> None:
    """The emulator's prefix cache (config ``prompt_rate``) is the ground truth: per request the estimated
    cached tokens are within 15% of the prompt's tokens of the truth, and per model the ratio within 0.1."""
    emulator = await make_emulator(prompt_rate=2000.0, prompt_eval_s=0.0, start_loaded=True)
    proxy = await make_proxy(emulator.url)
    words = " ".join(f"w{i}" for i in range(300))
    async with ollama.AsyncClient(host=proxy.url) as client:
        for name in ("a", "b", "c"):
            history: list[dict[str, Any]] = []
            for turn in range(3):
                await _chat(client, history, f"{name} {turn} {words}")
    rows = await proxy.wait_rows(9)
    truth = {e.request_id: e for e in emulator.emu.log}
    assert [r["turn"] for r in rows] == [1, 2, 3] * 3
    compared = 0
    cached_sum = new_sum = true_cached_sum = true_total = 0
    for r in rows:
        entry = truth[r["request_id"]]
        assert entry.prompt_cached_count is not None and entry.prompt_eval_count == r["prompt_tokens"]
        # The first request is its model's first cold sample, so every row has an estimate.
        compared += 1
        assert r["prompt_cached_tokens"] + r["prompt_new_tokens"] == r["prompt_tokens"]
        error = abs(r["prompt_cached_tokens"] - entry.prompt_cached_count)
        assert error <= 0.15 * r["prompt_tokens"], (r, entry)
        cached_sum += r["prompt_cached_tokens"]
        new_sum += r["prompt_new_tokens"]
        true_cached_sum += entry.prompt_cached_count
        true_total += entry.prompt_eval_count
    assert compared == 9
    assert true_cached_sum > 0.3 * true_total  # later turns really reuse the cache
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{proxy.url}/ollamon/api/conversations") as resp:
            reuse = (await resp.json())["cache_reuse_by_model"]["llama3.2:latest"]
    assert reuse["prompt_cached_tokens"] == cached_sum and reuse["prompt_new_tokens"] == new_sum
    assert abs(reuse["cache_reuse_ratio"] - true_cached_sum / true_total) < 0.1


async def test_cli(
    emulator: RunningEmulator, make_proxy: MakeProxy, capsys: pytest.CaptureFixture[str]
) -> None:
    from proxy.cli.main import main

    proxy = await make_proxy(emulator.url)
    hostile = "evil\u202eid\u2028"

    def post() -> int:
        # aiohttp's client refuses these bytes in headers (its server takes them); http.client sends them.
        conn = http.client.HTTPConnection(proxy.host_port, timeout=30)
        body = b'{"model":"llama3.2","messages":[{"role":"user","content":"x"}],"stream":false}'
        conn.putrequest("POST", "/api/chat")
        conn.putheader("X-Conversation-Id", hostile.encode())
        conn.putheader("Content-Length", str(len(body)))
        conn.endheaders(body)
        status = conn.getresponse().status
        conn.close()
        return status

    for _ in range(2):
        assert await asyncio.to_thread(post) == 200
    rows = await proxy.wait_rows(2)
    assert rows[0]["conversation_id"] == hostile
    for source in (["--db", str(proxy.db_path)], ["--url", proxy.url]):
        assert await asyncio.to_thread(main, ["conversations", *source]) == 0
        out = capsys.readouterr().out
        assert "\u202e" not in out and "\u2028" not in out and "evil\\u202eid\\u2028" in out
        assert await asyncio.to_thread(main, ["conversations", *source, hostile]) == 0
        out = capsys.readouterr().out
        assert "2 request(s), 1 turn(s)" in out and "\u202e" not in out and out.count("llama3.2:latest") == 3
        assert await asyncio.to_thread(main, ["conversations", *source, "--json", hostile]) == 0
        assert json.loads(capsys.readouterr().out)["request_count"] == 2
        assert await asyncio.to_thread(main, ["conversations", *source, "missing"]) == 1
        assert "no such conversation" in capsys.readouterr().err
    assert (
        await asyncio.to_thread(main, ["conversations", "--db", str(proxy.db_path), "--since", "soon"]) == 2
    )
    assert "bad parameter 'since'" in capsys.readouterr().err
