"""proxy.forward.request_facts: request bodies read the way Ollama's Go server reads them (spec §1, §3, §4, §6, §8)."""

from __future__ import annotations

import json
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.forward.request_facts import inspect_request
from proxy.forward.streams import Flavor


def req(flavor: Flavor, body: Any) -> Any:
    # json, not orjson: hypothesis makes integers beyond 64 bits, which Go and this module must survive
    return inspect_request(flavor, body if isinstance(body, bytes) else json.dumps(body).encode())


def test_generate_with_all_options_from_the_docs() -> None:
    facts = req(
        Flavor.GENERATE,
        {
            "model": "llama3.2",
            "prompt": "Why is the sky blue?",
            "stream": False,
            "options": {
                "num_keep": 5, "seed": 42, "num_predict": 100, "draft_num_predict": 4, "top_k": 20,
                "top_p": 0.9, "min_p": 0.0, "typical_p": 0.7, "repeat_last_n": 33, "temperature": 0.8,
                "repeat_penalty": 1.2, "presence_penalty": 1.5, "frequency_penalty": 1.0,
                "penalize_newline": True, "stop": ["\n", "user:"], "numa": False, "num_ctx": 1024,
                "num_batch": 2, "num_gpu": 1, "main_gpu": 0, "use_mmap": True, "num_thread": 8,
            },
        },
    )  # fmt: skip
    assert facts.parse_error is None
    assert (facts.model, facts.stream, facts.prompt_text, facts.prompt_chars) == (
        "llama3.2",
        False,
        "Why is the sky blue?",
        20,
    )
    assert (facts.temperature, facts.max_tokens, facts.top_k, facts.top_p) == (0.8, 100, 20, 0.9)
    assert (facts.repeat_penalty, facts.seed, facts.num_ctx, facts.stop) == (1.2, 42, 1024, ["\n", "user:"])
    assert facts.extra["options.num_keep"] == 5 and facts.extra["options.numa"] is False
    assert "options.temperature" not in facts.extra
    assert not facts.is_load and not facts.is_unload


def test_generate_prompt_text_and_defaults() -> None:
    facts = req(
        Flavor.GENERATE, {"model": "codellama:code", "system": "S", "prompt": "def f(", "suffix": "  return"}
    )
    assert facts.prompt_text == "S\ndef f(\n  return"
    assert facts.stream is True  # native default
    assert facts.temperature is None and facts.stop is None


@pytest.mark.parametrize("stream", [None, True])
def test_native_stream_absent_or_null_means_true(stream: bool | None) -> None:
    body = {"model": "m", "prompt": "x"} if stream is None else {"model": "m", "prompt": "x", "stream": None}
    assert req(Flavor.CHAT, body).stream is True


def test_v1_defaults_to_no_stream_and_records_only_what_was_sent() -> None:
    facts = req(Flavor.OPENAI_CHAT, {"model": "m", "messages": [{"role": "user", "content": "hi"}]})
    assert facts.stream is False
    assert facts.temperature is None and facts.top_p is None  # Ollama's 1.0 defaults are not invented


def test_keys_are_case_insensitive_and_last_duplicate_wins() -> None:
    facts = inspect_request(Flavor.GENERATE, b'{"MODEL":"a","Prompt":"p","model":"b","Model":"c"}')
    assert facts.model == "c" and facts.prompt_text == "p"
    facts = inspect_request(Flavor.GENERATE, b'{"model":"a","model":"b"}')
    assert facts.model == "b"
    facts = inspect_request(
        Flavor.CHAT, b'{"model":"m","messages":[{"ROLE":"user","Content":"x","content":"y"}]}'
    )
    assert facts.prompt_text == "y"


def test_option_keys_are_exact_like_options_from_map() -> None:
    facts = req(
        Flavor.GENERATE, {"model": "m", "prompt": "p", "options": {"Temperature": 0.1, "temperature": None}}
    )
    assert facts.temperature is None  # FromMap ignores "Temperature" and skips nil
    assert facts.extra["options.Temperature"] == 0.1


def test_native_int_option_accepts_float_like_go() -> None:
    facts = req(
        Flavor.GENERATE, {"model": "m", "prompt": "p", "options": {"num_predict": 100.9, "temperature": 1}}
    )
    assert facts.max_tokens == 100 and facts.temperature == 1.0 and isinstance(facts.temperature, float)


def test_wrong_types_become_none_with_raw_in_extra() -> None:
    facts = req(
        Flavor.OPENAI_CHAT,
        {
            "model": 5,
            "messages": [],
            "temperature": "hot",
            "max_tokens": 3.5,
            "seed": True,
            "stop": [1],
            "stream": "y",
        },
    )
    assert facts.model is None and facts.extra["model"] == 5
    assert facts.temperature is None and facts.extra["temperature"] == "hot"
    assert facts.max_tokens is None and facts.extra["max_tokens"] == 3.5
    assert facts.seed is None and facts.extra["seed"] is True
    assert facts.stop is None and facts.extra["stop"] == "<array of 1>"
    assert facts.stream is False and facts.extra["stream"] == "y"
    facts = req(Flavor.GENERATE, {"model": "m", "prompt": "p", "options": {"top_k": "many", "stop": "x"}})
    assert facts.top_k is None and facts.extra["options.top_k"] == "many"
    assert facts.stop == ["x"]


def test_chat_messages_thinking_images_and_tools() -> None:
    facts = req(
        Flavor.CHAT,
        {
            "model": "llama3.2",
            "messages": [
                {"role": "user", "content": "what is the weather in Toronto?", "images": ["aGk=", "aGk="]},
                {"role": "assistant", "content": "", "thinking": "look it up",
                 "tool_calls": [{"function": {"name": "get_weather", "arguments": {"city": "Toronto"}}}]},
                {"role": "tool", "content": "11 degrees celsius", "tool_name": "get_weather"},
            ],
            "tools": [{"type": "function", "function": {"name": "get_weather"}}],
            "think": True,
            "format": {"type": "object"},
            "keep_alive": "5m",
        },
    )  # fmt: skip
    assert facts.prompt_text == "what is the weather in Toronto?\nlook it up\n11 degrees celsius"
    assert facts.extra["images"] == 2 and facts.extra["tools"] == 1
    assert facts.extra["think"] is True and facts.extra["format"] == "schema"
    assert facts.extra["keep_alive"] == "5m"


def test_openai_chat_parts_reasoning_and_extras() -> None:
    facts = req(
        Flavor.OPENAI_CHAT,
        {
            "model": "m",
            "messages": [
                {"role": "system", "content": "be brief"},
                {"role": "user", "content": [{"type": "text", "text": "what is"},
                                             {"type": "image_url", "image_url": {"url": "data:..."}}]},
                {"role": "assistant", "content": "x", "reasoning": "hmm"},
            ],
            "stream": True,
            "stream_options": {"include_usage": True},
            "temperature": 0.2, "top_p": 0.5, "max_tokens": 64, "seed": 7, "stop": "END",
            "frequency_penalty": 0.1, "presence_penalty": 0.3,
            "response_format": {"type": "json_object"}, "reasoning_effort": "low",
        },
    )  # fmt: skip
    assert facts.prompt_text == "be brief\nwhat is\nx\nhmm"
    assert facts.stream is True
    assert (facts.temperature, facts.top_p, facts.max_tokens, facts.seed, facts.stop) == (
        0.2,
        0.5,
        64,
        7,
        ["END"],
    )
    assert facts.extra["include_usage"] is True and facts.extra["format"] == "json_object"
    assert facts.extra["frequency_penalty"] == 0.1 and facts.extra["reasoning_effort"] == "low"
    assert facts.extra["images"] == 1


def test_openai_completion_and_embeddings() -> None:
    facts = req(
        Flavor.OPENAI_COMPLETION, {"model": "m", "prompt": "def f(", "suffix": "pass", "max_tokens": 5}
    )
    assert facts.prompt_text == "def f(\npass" and facts.max_tokens == 5 and facts.stream is False
    facts = req(Flavor.OPENAI_EMBEDDINGS, {"model": "e", "input": ["a", "b"], "dimensions": 8})
    assert facts.prompt_text == "a\nb" and facts.extra["dimensions"] == 8 and facts.stream is False


@pytest.mark.parametrize(
    ("flavor", "body", "load", "unload"),
    [
        (Flavor.GENERATE, {"model": "m"}, True, False),
        (Flavor.GENERATE, {"model": "m", "prompt": ""}, True, False),
        (Flavor.GENERATE, {"model": "m", "keep_alive": 0}, True, True),
        (Flavor.GENERATE, {"model": "m", "keep_alive": "0"}, True, True),
        (Flavor.GENERATE, {"model": "m", "keep_alive": "0s"}, True, True),
        (Flavor.GENERATE, {"model": "m", "keep_alive": "5m"}, True, False),
        (Flavor.GENERATE, {"model": "m", "keep_alive": -1}, True, False),
        (Flavor.GENERATE, {"model": "m", "prompt": "hi", "keep_alive": 0}, False, False),
        (Flavor.CHAT, {"model": "m", "messages": []}, True, False),
        (Flavor.CHAT, {"model": "m", "keep_alive": 0}, True, True),
        (Flavor.CHAT, {"model": "m", "messages": [{"role": "user", "content": "x"}]}, False, False),
        (Flavor.EMBED, {"model": "m", "input": ""}, True, False),
        (Flavor.EMBED, {"model": "m", "input": ["a"]}, False, False),
        (Flavor.EMBEDDINGS, {"model": "m", "prompt": ""}, True, False),
        (Flavor.OPENAI_CHAT, {"model": "m", "messages": []}, False, False),
    ],
)
def test_load_and_unload(flavor: Flavor, body: dict[str, Any], load: bool, unload: bool) -> None:
    facts = req(flavor, body)
    assert (facts.is_load, facts.is_unload) == (load, unload)


@pytest.mark.parametrize(
    ("body", "error"),
    [
        (b"", "missing request body"),
        (b"  \n", "missing request body"),
        (b"not json", "body is not JSON"),
        (b"[1,2]", "body is JSON list, not an object"),
        (b"null", "body is JSON NoneType, not an object"),
        (b'{"model":NaN}', "body is not JSON"),
    ],
)
def test_parse_errors(body: bytes, error: str) -> None:
    facts = inspect_request(Flavor.GENERATE, body)
    assert facts.parse_error is not None and facts.parse_error.startswith(error)
    assert facts.model is None and facts.stream is True


def test_first_value_only_and_invalid_utf8_like_go() -> None:
    facts = inspect_request(Flavor.GENERATE, b'{"model":"m","prompt":"caf\xe9"} {"model":"other"}')
    assert facts.parse_error is None
    assert facts.model == "m" and facts.prompt_text == "caf\ufffd"
    facts = inspect_request(Flavor.GENERATE, b'{"model":"m","prompt":"a\\ud800b"}')
    assert facts.prompt_text == "a\ufffdb"


def test_extra_never_holds_long_text() -> None:
    facts = req(
        Flavor.GENERATE, {"model": "m", "prompt": "p", "options": {"weird": "x" * 1000}, "keep_alive": [1]}
    )
    assert len(facts.extra["options.weird"]) <= 65
    assert facts.extra["keep_alive"] == "<array of 1>"


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=5),
    max_leaves=30,
)
keys = st.sampled_from(
    ["model", "Model", "prompt", "messages", "input", "options", "stream", "keep_alive", "stop", "temperature",
     "max_tokens", "stream_options", "response_format", "reasoning", "format", "tools", "images", "suffix"]
)  # fmt: skip


@settings(max_examples=150, deadline=None)
@given(flavor=st.sampled_from([f for f in Flavor if f is not Flavor.OPENAI_TRANSCRIPTION]), body=st.dictionaries(keys, json_values, max_size=8))  # fmt: skip
def test_arbitrary_json_never_raises(flavor: Flavor, body: dict[str, Any]) -> None:
    facts = req(flavor, body)
    assert facts.parse_error is None
    assert facts.prompt_chars == len(facts.prompt_text)
    orjson.dumps(facts.extra)  # metadata must serialise


@settings(max_examples=150, deadline=None)
@given(flavor=st.sampled_from(list(Flavor)), body=st.binary(max_size=200))
def test_arbitrary_bytes_never_raise(flavor: Flavor, body: bytes) -> None:
    facts = inspect_request(flavor, body)
    assert facts.prompt_chars == len(facts.prompt_text)
