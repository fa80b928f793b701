"""Request bodies of ``/v1/messages`` and ``/v1/responses`` read as Ollama's Go server reads them."""

from __future__ import annotations

from typing import Any

import orjson

from proxy.forward.request_facts import inspect_request
from proxy.forward.streams import Flavor


def req(flavor: Flavor, body: Any) -> Any:
    return inspect_request(flavor, orjson.dumps(body))


def test_messages_request() -> None:
    facts = req(
        Flavor.ANTHROPIC_MESSAGES,
        {
            "Model": "qwen3:0.6b",
            "max_tokens": 1024,
            "temperature": 0.5,
            "top_p": 0.9,
            "top_k": 40,
            "stop_sequences": ["END"],
            "system": [{"type": "text", "text": "Be brief."}],
            "thinking": {"type": "enabled", "budget_tokens": 2000},
            "tools": [{"name": "f", "input_schema": {}}],
            "messages": [
                {"role": "user", "content": "Hi"},
                {
                    "role": "assistant",
                    "content": [
                        {"type": "thinking", "thinking": "hm"},
                        {"type": "tool_use", "id": "t", "name": "f", "input": {}},
                    ],
                },
                {
                    "role": "user",
                    "content": [{"type": "tool_result", "tool_use_id": "t", "content": "sunny"}],
                },
                {
                    "role": "user",
                    "content": [{"type": "image", "source": {}}, {"type": "text", "text": "and?"}],
                },
            ],
        },
    )
    assert facts.model == "qwen3:0.6b" and facts.stream is False and facts.parse_error is None
    assert facts.prompt_text == "Be brief.\nHi\nhm\nsunny\nand?"
    assert facts.prompt_chars == len(facts.prompt_text)
    assert (facts.temperature, facts.top_p, facts.top_k, facts.max_tokens) == (0.5, 0.9, 40, 1024)
    assert facts.stop == ["END"]
    assert facts.extra == {"tools": 1, "images": 1, "thinking": "enabled", "thinking_budget_tokens": 2000}


def test_messages_stream_and_wrong_types() -> None:
    facts = req(
        Flavor.ANTHROPIC_MESSAGES,
        {
            "model": "m",
            "stream": True,
            "max_tokens": 1.5,
            "top_k": "x",
            "stop_sequences": "END",
            "messages": [],
        },
    )
    assert facts.stream is True and facts.max_tokens is None and facts.top_k is None and facts.stop is None
    assert facts.extra == {"max_tokens": 1.5, "top_k": "x", "stop_sequences": "END"}


def test_responses_request() -> None:
    facts = req(
        Flavor.OPENAI_RESPONSES,
        {
            "model": "llama3.2",
            "instructions": "Be brief.",
            "input": [
                {"role": "user", "content": "Hi"},
                {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "there"}]},
                {"type": "function_call", "call_id": "c", "name": "f", "arguments": '{"a":1}'},
                {"type": "function_call_output", "call_id": "c", "output": "42"},
            ],
            "temperature": 0.2,
            "top_p": 1,
            "max_output_tokens": 64,
            "reasoning": {"effort": "low"},
            "text": {"format": {"type": "json_schema", "schema": {}}},
        },
    )
    assert facts.stream is False  # Ollama's default for /v1/responses
    assert facts.prompt_text == 'Be brief.\nHi\nthere\n{"a":1}\n42'
    assert (facts.temperature, facts.top_p, facts.max_tokens) == (0.2, 1.0, 64)
    assert facts.extra == {"reasoning_effort": "low", "format": "json_schema"}


def test_responses_string_input_and_stream() -> None:
    facts = req(Flavor.OPENAI_RESPONSES, {"model": "m", "input": "hello", "stream": True})
    assert facts.prompt_text == "hello" and facts.stream is True and facts.max_tokens is None
