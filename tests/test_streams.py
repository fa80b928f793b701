"""Recorded upstream bodies (spec §3.3, §4.2, §5, §6, §8.3, §8.4, §9) through proxy.forward.streams.

``SAMPLES`` is shared with tests/test_streams_props.py, which replays every one under random chunkings.
Expected values are written out by hand from the spec, not computed by the code under test.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import orjson
import pytest

from proxy.forward.streams import INSTRUMENTED, Flavor, StreamFacts, make_parser

ND = "application/x-ndjson"
SSE = "text/event-stream"
JSON = "application/json; charset=utf-8"
TS = '"created_at":"2025-10-26T17:15:24.097767Z"'
DONE_METRICS = (
    '"total_duration":10706818083,"load_duration":6338219291,"prompt_eval_count":26,'
    '"prompt_eval_duration":130079000,"eval_count":259,"eval_duration":4232710000'
)
METRICS = {
    "total_duration_ns": 10706818083,
    "load_duration_ns": 6338219291,
    "prompt_eval_count": 26,
    "prompt_eval_duration_ns": 130079000,
    "eval_count": 259,
    "eval_duration_ns": 4232710000,
}
CHUNK_HEAD = (
    '{"id":"chatcmpl-123","object":"chat.completion.chunk","created":1700000000,"model":"llama3.2",'
    '"system_fingerprint":"fp_ollama","choices":'
)
CMPL_ZERO = '"usage":{"prompt_tokens":0,"completion_tokens":0,"total_tokens":0}'


@dataclass
class Sample:
    name: str
    flavor: Flavor
    content_type: str
    body: bytes
    expect: dict[str, Any] = field(default_factory=dict)


def gen(text: str, extra: str = "") -> str:
    return '{"model":"llama3.2",' + TS + ',"response":"' + text + '"' + extra + ',"done":false}\n'


def chat(content: str, extra: str = "") -> str:
    return (
        '{"model":"llama3.2",'
        + TS
        + ',"message":{"role":"assistant","content":"'
        + content
        + '"'
        + extra
        + "},"
        '"done":false}\n'
    )


def sse(payload: str, nl: str = "\n") -> str:
    return "data: " + payload + nl + nl


def chat_chunk(delta: str, finish: str = "null") -> str:
    return CHUNK_HEAD + '[{"index":0,"delta":' + delta + ',"finish_reason":' + finish + "}]}"


def cmpl_chunk(text: str, finish: str = "null", usage: str = CMPL_ZERO) -> str:
    return (
        '{"id":"cmpl-123","object":"text_completion","created":1700000000,"choices":[{"text":"'
        + text
        + '","index":0,"finish_reason":'
        + finish
        + '}],"model":"llama3.2","system_fingerprint":"fp_ollama",'
        + usage
        + "}"
    )


GEN_DONE = '{"model":"llama3.2",' + TS + ',"response":"","done":true,"done_reason":"stop","context":[1,2,3],'
GEN_DONE += DONE_METRICS + "}\n"
CHAT_DONE = '{"model":"llama3.2",' + TS + ',"message":{"role":"assistant","content":""},"done":true,'
CHAT_DONE += '"done_reason":"stop",' + DONE_METRICS + "}\n"
CLEAN = {"complete": True, "error_message": None, "done_reason": "stop", "response_model": "llama3.2"}
USAGE_CHUNK = CHUNK_HEAD + '[],"usage":{"prompt_tokens":26,"completion_tokens":282,"total_tokens":308}}'
TOOL = '{"id":"call_ab12cd34","function":{"index":0,"name":"get_weather","arguments":{"city":"Tokyo"}}}'
# arguments holding the very keys the fast path looks for: a nested key must not fool it
SNEAKY = (
    '{"id":"call_x1","function":{"index":1,"name":"f","arguments":'
    '{"done":true,"error":"no","response":"x","done_reason":"length"}}}'
)

SAMPLES = [
    Sample(
        "generate-spec",
        Flavor.GENERATE,
        ND,
        (gen("That") + gen(" is") + gen(" blue") + GEN_DONE).encode(),
        {**CLEAN, **METRICS, "framing": "ndjson", "response_text": "That is blue", "content_events": 3},
    ),
    Sample(
        "generate-escapes",
        Flavor.GENERATE,
        ND,
        (
            gen(r"line\nnext")
            + gen(r"say \"hi\"")
            + gen("back\\\\")  # a string ending in an escaped backslash: \\ then the closing quote
            + gen(r" \u003cb\u003e \u0026")
            + gen("😀 é 中文")
            + gen(r"\"")
            + gen(r"\\\"")
            + '{"model":"llama3.2",'
            + TS
            + ',"response":"!","done":true,"done_reason":"stop",'
            + DONE_METRICS
            + "}\n"
        ).encode(),
        {
            **CLEAN,
            "response_text": 'line\nnextsay "hi"back\\ <b> &😀 é 中文"\\"!',
            "content_events": 8,
            "eval_count": 259,
        },
    ),
    Sample(
        "generate-thinking",
        Flavor.GENERATE,
        ND,
        (
            gen("", ',"thinking":"Let me"') + gen("", ',"thinking":" count."') + gen("Three") + GEN_DONE
        ).encode(),
        {**CLEAN, "response_text": "Three", "thinking_text": "Let me count.", "content_events": 3},
    ),
    Sample(
        "chat-spec",
        Flavor.CHAT,
        ND,
        (chat("The") + chat(" sky") + chat(' is \\"blue\\"') + CHAT_DONE).encode(),
        {
            **CLEAN,
            **METRICS,
            "response_text": 'The sky is "blue"',
            "content_events": 3,
            "final": {"done": True},
        },
    ),
    Sample(
        "chat-thinking",
        Flavor.CHAT,
        ND,
        (chat("", ',"thinking":"Let me count..."') + chat("3") + CHAT_DONE).encode(),
        {**CLEAN, "response_text": "3", "thinking_text": "Let me count...", "content_events": 2},
    ),
    Sample(
        "chat-tool-calls-streamed",
        Flavor.CHAT,
        ND,
        (chat("", ',"tool_calls":[' + TOOL + "]") + CHAT_DONE).encode(),
        {**CLEAN, "tool_calls": 1, "content_events": 1, "response_text": ""},
    ),
    Sample(
        "chat-tool-calls-on-done-line",
        Flavor.CHAT,
        ND,
        (
            chat("Checking")
            + '{"model":"llama3.2",'
            + TS
            + ',"message":{"role":"assistant","content":" now","tool_calls":['
            + TOOL
            + ","
            + SNEAKY
            + ']},"done":true,"done_reason":"stop",'
            + DONE_METRICS
            + "}\n"
        ).encode(),
        {**CLEAN, "tool_calls": 2, "content_events": 2, "response_text": "Checking now"},
    ),
    Sample(
        "chat-sneaky-tool-call-mid-stream",
        Flavor.CHAT,
        ND,
        (chat("", ',"tool_calls":[' + SNEAKY + "]") + chat("ok")).encode(),
        {"complete": False, "error_message": None, "done_reason": None, "tool_calls": 1, "content_events": 2},
    ),
    Sample(
        "generate-mid-stream-error",  # verbatim from docs/api/errors.mdx (spec §5)
        Flavor.GENERATE,
        ND,
        (
            b'{"model":"gemma4","created_at":"2025-10-26T17:21:21.196249Z","response":" Yes","done":false}\n'
            b'{"model":"gemma4","created_at":"2025-10-26T17:21:21.207235Z","response":".","done":false}\n'
            b'{"model":"gemma4","created_at":"2025-10-26T17:21:21.219166Z","response":"I","done":false}\n'
            b'{"model":"gemma4","created_at":"2025-10-26T17:21:21.231094Z","response":"can","done":false}\n'
            b'{"error":"an error was encountered while running the model"}\n'
        ),
        {
            "complete": False,
            "error_message": "an error was encountered while running the model",
            "response_text": " Yes.Ican",
            "response_model": "gemma4",
            "content_events": 4,
            "eval_count": None,
            "final": None,
        },
    ),
    Sample(
        "generate-truncated-no-done",
        Flavor.GENERATE,
        ND,
        (gen("Once") + gen(" upon")).encode(),
        {
            "complete": False,
            "error_message": None,
            "response_text": "Once upon",
            "response_model": "llama3.2",
        },
    ),
    Sample(
        "generate-cut-mid-line",
        Flavor.GENERATE,
        ND,
        (gen("Once") + gen(" upon")[:40]).encode(),
        {"complete": False, "response_text": "Once", "malformed_lines": 1, "content_events": 1},
    ),
    Sample(
        "generate-garbage-lines",
        Flavor.GENERATE,
        ND,
        (
            "hello world\n"
            + gen("A")
            + "\n"
            + '{"response":"unterminated\n'
            + "[1,2]\n"
            + gen("B")
            + GEN_DONE
        ).encode(),
        {**CLEAN, "response_text": "AB", "malformed_lines": 3, "content_events": 2},
    ),
    Sample(
        "generate-crlf",
        Flavor.GENERATE,
        ND,
        (gen("A") + gen("B") + GEN_DONE).replace("\n", "\r\n").encode(),
        {**CLEAN, "response_text": "AB", "malformed_lines": 0},
    ),
    Sample(
        "generate-load",
        Flavor.GENERATE,
        ND,
        ('{"model":"llama3.2",' + TS + ',"response":"","done":true,"done_reason":"load"}\n').encode(),
        {
            "complete": True,
            "done_reason": "load",
            "content_events": 0,
            "eval_count": None,
            "total_duration_ns": None,
        },
    ),
    Sample(
        "chat-unload",
        Flavor.CHAT,
        JSON,
        (
            '{"model":"x",'
            + TS
            + ',"message":{"role":"assistant","content":""},"done":true,"done_reason":"unload"}'
        ).encode(),
        {
            "framing": "json",
            "complete": True,
            "done_reason": "unload",
            "content_events": 0,
            "eval_count": None,
        },
    ),
    Sample(
        "sse-chat-no-usage",  # spec §8.3 order without include_usage
        Flavor.OPENAI_CHAT,
        SSE,
        (
            sse(chat_chunk('{"role":"assistant","content":"The"}'))
            + sse(chat_chunk('{"content":" sky"}'))
            + sse(chat_chunk('{"content":" \\u003cis\\u003e"}'))
            + sse(chat_chunk("{}", '"stop"'))
            + "data: [DONE]\n\n"
        ).encode(),
        {
            **CLEAN,
            "framing": "sse",
            "response_text": "The sky <is>",
            "content_events": 3,
            "usage_prompt_tokens": None,
            "eval_count": None,
        },
    ),
    Sample(
        "sse-chat-usage",
        Flavor.OPENAI_CHAT,
        SSE,
        (
            sse(chat_chunk('{"role":"assistant","content":"The"}'))
            + sse(chat_chunk('{"content":" end"}'))
            + sse(chat_chunk("{}", '"length"'))
            + sse(USAGE_CHUNK)
            + "data: [DONE]\n\n"
        ).encode(),
        {
            "complete": True,
            "done_reason": "length",
            "response_text": "The end",
            "usage_prompt_tokens": 26,
            "usage_completion_tokens": 282,
            "final": {
                "choices": None,
                "usage": {"prompt_tokens": 26, "completion_tokens": 282, "total_tokens": 308},
            },
        },
    ),
    Sample(
        "sse-chat-reasoning-tools-crlf",
        Flavor.OPENAI_CHAT,
        SSE,
        (
            sse(chat_chunk('{"role":"assistant","content":"","reasoning":"Hmm"}'), "\r\n")
            + sse(chat_chunk('{"reasoning":" ok"}'), "\r\n")
            + sse(
                chat_chunk(
                    '{"content":"","tool_calls":[{"id":"call_x","index":0,"type":"function",'
                    '"function":{"name":"f","arguments":"{\\"a\\":1}"}}]}'
                ),
                "\r\n",
            )
            + sse(chat_chunk("{}", '"tool_calls"'), "\r\n")
            + "data: [DONE]\r\n\r\n"
        ).encode(),
        {
            "complete": True,
            "done_reason": "tool_calls",
            "thinking_text": "Hmm ok",
            "response_text": "",
            "tool_calls": 1,
            "content_events": 3,
        },
    ),
    Sample(
        "sse-chat-mid-stream-error",  # §8.3: an empty content chunk, then the stream just ends
        Flavor.OPENAI_CHAT,
        SSE,
        (
            sse(chat_chunk('{"role":"assistant","content":"Hel"}'))
            + sse(chat_chunk('{"content":"lo"}'))
            + sse(chat_chunk('{"content":""}'))
        ).encode(),
        {"complete": False, "error_message": None, "response_text": "Hello", "content_events": 2},
    ),
    Sample(
        "sse-completion-include-usage",  # §8.4: zero usage on every chunk, real usage after the done chunk
        Flavor.OPENAI_COMPLETION,
        SSE,
        (
            sse(cmpl_chunk("The"))
            + sse(cmpl_chunk(" sky"))
            + sse(cmpl_chunk("", '"stop"'))
            + sse(
                '{"id":"cmpl-123","object":"text_completion","created":1700000000,"choices":[],'
                '"model":"llama3.2","system_fingerprint":"fp_ollama",'
                '"usage":{"prompt_tokens":26,"completion_tokens":282,"total_tokens":308}}'
            )
            + "data: [DONE]\n\n"
        ).encode(),
        {
            **CLEAN,
            "response_text": "The sky",
            "content_events": 2,
            "usage_prompt_tokens": 26,
            "usage_completion_tokens": 282,
        },
    ),
    Sample(
        "sse-completion-no-usage",
        Flavor.OPENAI_COMPLETION,
        SSE,
        (
            sse(cmpl_chunk("A", usage='"x":1'))
            + sse(cmpl_chunk("B", '"length"', usage='"x":1'))
            + ": a comment\n\n"
            + "data: [DONE]\n\n"
        ).encode(),
        {"complete": True, "done_reason": "length", "response_text": "AB", "content_events": 2},
    ),
    Sample(
        "json-generate",  # §3.4, pretty-printed as in docs/api.md
        Flavor.GENERATE,
        JSON,
        b"""{
  "model": "llama3.2",
  "created_at": "2023-08-04T19:22:45.499127Z",
  "response": "The sky is blue because it is the color of the sky.",
  "done": true,
  "context": [1, 2, 3],
  "total_duration": 5043500667,
  "load_duration": 5025959,
  "prompt_eval_count": 26,
  "prompt_eval_duration": 325953000,
  "eval_count": 290,
  "eval_duration": 4709213000
}""",
        {
            "framing": "json",
            "complete": True,
            "response_text": "The sky is blue because it is the color of the sky.",
            "content_events": 1,
            "eval_count": 290,
            "total_duration_ns": 5043500667,
            "final": {"context": None, "response": None, "eval_count": 290},
        },
    ),
    Sample(
        "json-chat",  # §4.3
        Flavor.CHAT,
        JSON,
        b'{"model": "llama3.2", "created_at": "2023-12-12T14:13:43.416799Z", "message": {"role": "assistant", '
        b'"content": "Hello! How are you today?"}, "done": true, "total_duration": 5191566416, '
        b'"load_duration": 2154458, "prompt_eval_count": 26, "prompt_eval_duration": 383809000, '
        b'"eval_count": 298, "eval_duration": 4799921000}',
        {
            "complete": True,
            "response_text": "Hello! How are you today?",
            "eval_count": 298,
            "done_reason": None,
        },
    ),
    Sample(
        "json-embed",  # §6.1 verbatim
        Flavor.EMBED,
        JSON,
        b"""{
  "model": "all-minilm",
  "embeddings": [
    [
      0.010071029, -0.0017594862, 0.05007221, 0.04692972, 0.054916814,
      0.008599704, 0.105441414, -0.025878139, 0.12958129, 0.031952348
    ]
  ],
  "total_duration": 14143917,
  "load_duration": 1019500,
  "prompt_eval_count": 8
}""",
        {
            "complete": True,
            "embeddings": 1,
            "total_duration_ns": 14143917,
            "load_duration_ns": 1019500,
            "prompt_eval_count": 8,
            "eval_count": None,
            "response_model": "all-minilm",
            "final": {"embeddings": None, "prompt_eval_count": 8},
        },
    ),
    Sample(
        "json-embed-load",
        Flavor.EMBED,
        JSON,
        b'{"model":"x","embeddings":[]}',
        {"complete": True, "embeddings": 0, "total_duration_ns": None},
    ),
    Sample(
        "json-embeddings-legacy",
        Flavor.EMBEDDINGS,
        JSON,
        b'{"embedding":[0.5670403838157654,0.009260174818336964]}',
        {"complete": True, "embeddings": 1, "response_model": None, "final": {"embedding": None}},
    ),
    Sample(
        "json-openai-chat",
        Flavor.OPENAI_CHAT,
        "application/json",
        (
            b'{"id":"chatcmpl-123","object":"chat.completion","created":1700000000,"model":"llama3.2",'
            b'"system_fingerprint":"fp_ollama","choices":[{"index":0,"message":{"role":"assistant","content":"Hi",'
            b'"reasoning":"think","tool_calls":[{"id":"call_x","index":0,"type":"function","function":'
            b'{"name":"f","arguments":"{\\"a\\":1}"}}]},"finish_reason":"tool_calls"}],'
            b'"usage":{"prompt_tokens":26,"completion_tokens":282,"total_tokens":308}}\n'
        ),
        {
            "complete": True,
            "response_text": "Hi",
            "thinking_text": "think",
            "tool_calls": 1,
            "done_reason": "tool_calls",
            "usage_prompt_tokens": 26,
            "usage_completion_tokens": 282,
        },
    ),
    Sample(
        "json-openai-completion",
        Flavor.OPENAI_COMPLETION,
        "application/json",
        b'{"id":"cmpl-7","object":"text_completion","created":1,"model":"m","system_fingerprint":"fp_ollama",'
        b'"choices":[{"text":"Done.","index":0,"finish_reason":"stop"}],'
        b'"usage":{"prompt_tokens":3,"completion_tokens":2,"total_tokens":5}}\n',
        {"complete": True, "response_text": "Done.", "done_reason": "stop", "usage_completion_tokens": 2},
    ),
    Sample(
        "json-openai-embeddings",  # §8.5
        Flavor.OPENAI_EMBEDDINGS,
        "application/json",
        b'{"object":"list","data":[{"object":"embedding","embedding":[0.1,0.2],"index":0},'
        b'{"object":"embedding","embedding":[0.3,0.4],"index":1}],"model":"x",'
        b'"usage":{"prompt_tokens":8,"total_tokens":8}}\n',
        {"complete": True, "embeddings": 2, "usage_prompt_tokens": 8, "final": {"data": None, "model": "x"}},
    ),
    Sample(
        "json-native-error",  # §9
        Flavor.GENERATE,
        JSON,
        b'{"error":"model \'llama3.2\' not found"}',
        {"framing": "json", "complete": False, "error_message": "model 'llama3.2' not found"},
    ),
    Sample(
        "json-busy-error",
        Flavor.CHAT,
        "application/json",
        b'{"error":"server busy, please try again.  maximum pending requests exceeded"}',
        {
            "complete": False,
            "error_message": "server busy, please try again.  maximum pending requests exceeded",
        },
    ),
    Sample(
        "json-openai-error",  # §8.1
        Flavor.OPENAI_CHAT,
        "application/json",
        b'{"error":{"message":"model \'foo\' not found","type":"not_found_error","param":null,"code":null}}\n',
        {"complete": False, "error_message": "model 'foo' not found"},
    ),
    Sample(
        "text-404",  # gin's own 404
        Flavor.GENERATE,
        "text/plain",
        b"404 page not found",
        {"framing": "other", "complete": False, "error_message": "404 page not found", "final": None},
    ),
    Sample(
        "empty-403",
        Flavor.CHAT,
        "",
        b"",
        {"framing": "other", "complete": False, "error_message": None, "bytes_seen": 0},
    ),
]
STREAMED = [s for s in SAMPLES if s.content_type in (ND, SSE)]


def run(sample: Sample, chunks: list[bytes] | None = None) -> tuple[StreamFacts, int]:
    parser = make_parser(sample.flavor, sample.content_type)
    fed = sum(parser.feed(c) for c in (chunks if chunks is not None else [sample.body]))
    return parser.finish(), fed


def check(facts: StreamFacts, expect: dict[str, Any]) -> None:
    for key, want in expect.items():
        got = getattr(facts, key)
        if key == "final" and isinstance(want, dict):
            assert got is not None
            for k, v in want.items():
                assert got.get(k) == v, (k, got)
        else:
            assert got == want, (key, got, want)


@pytest.mark.parametrize("sample", SAMPLES, ids=lambda s: s.name)
def test_recorded_sample(sample: Sample) -> None:
    facts, fed = run(sample)
    check(facts, sample.expect)
    assert facts.bytes_seen == len(sample.body)
    if sample.content_type in (ND, SSE) and sample.name != "generate-cut-mid-line":
        assert fed == facts.content_events
    if sample.content_type not in (ND, SSE):
        assert fed == 0


@pytest.mark.parametrize("sample", [s for s in SAMPLES if s.content_type == ND], ids=lambda s: s.name)
def test_ndjson_fast_path_matches_full_parse(sample: Sample) -> None:
    """An independent reading: orjson on every line gives the same text, thinking and event count."""
    text, thinking, events = [], [], 0
    for line in sample.body.split(b"\n"):
        try:
            obj = orjson.loads(line)
        except orjson.JSONDecodeError:
            continue
        if not isinstance(obj, dict) or "error" in obj:
            continue
        msg = obj.get("message") or {}
        parts = [obj.get("response") or "", msg.get("content") or ""]
        thinks = [obj.get("thinking") or "", msg.get("thinking") or ""]
        text += parts
        thinking += thinks
        events += any(parts) or any(thinks) or bool(msg.get("tool_calls"))
    facts, _ = run(sample)
    assert facts.response_text == "".join(text)
    assert facts.thinking_text == "".join(thinking)
    assert facts.content_events == events


def test_quote_split_at_every_chunk_boundary() -> None:
    body = (gen(r"a\"b\\") + gen(r"\\\"c") + GEN_DONE).encode()
    for cut in range(1, len(body)):
        facts, fed = run(Sample("x", Flavor.GENERATE, ND, body), [body[:cut], body[cut:]])
        assert facts.response_text == 'a"b\\\\"c'
        assert fed == facts.content_events == 2
        assert facts.complete


def test_feed_counts_events_in_the_chunk_that_completes_them() -> None:
    parser = make_parser(Flavor.CHAT, ND)
    line = chat("Hi").encode()
    assert parser.feed(line[:-1]) == 0  # the newline has not arrived
    assert parser.feed(b"\n" + chat("a").encode() + chat("b").encode()) == 3
    assert parser.feed(CHAT_DONE.encode()) == 0
    assert parser.finish().content_events == 3


def test_finish_is_idempotent_and_flushes_the_tail() -> None:
    parser = make_parser(Flavor.GENERATE, ND)
    parser.feed(gen("x").encode() + GEN_DONE.encode().rstrip(b"\n"))
    first = parser.finish()
    assert first.complete and first.response_text == "x"
    assert parser.finish() is first


def test_sse_multiline_data_and_trailing_event_without_blank_line() -> None:
    payload = chat_chunk('{"content":"X"}')
    body = ("data: " + payload[:30] + "\ndata:" + payload[30:] + "\n\n" + "data: [DONE]\n").encode()
    facts, _ = run(Sample("x", Flavor.OPENAI_CHAT, SSE, body))
    # two data lines are joined by "\n", which is whitespace between JSON tokens at this cut
    assert facts.response_text == "X"
    assert facts.complete


def test_body_over_cap_keeps_numbers_from_the_tail() -> None:
    vectors = ",".join("[" + ",".join(["0.0123456789"] * 200) + "]" for _ in range(50))
    body = (
        '{"model":"all-minilm","embeddings":[' + vectors + '],"total_duration":14143917,'
        '"load_duration":1019500,"prompt_eval_count":8}'
    ).encode()
    parser = make_parser(Flavor.EMBED, JSON, max_body_bytes=10_000)
    for i in range(0, len(body), 4096):
        assert parser.feed(body[i : i + 4096]) == 0
    facts = parser.finish()
    assert facts.capture_truncated
    assert facts.bytes_seen == len(body)
    assert (facts.total_duration_ns, facts.load_duration_ns, facts.prompt_eval_count) == (
        14143917,
        1019500,
        8,
    )
    assert facts.embeddings == 50
    assert facts.response_model == "all-minilm"
    assert facts.complete and facts.framing == "json"


def test_openai_embeddings_body_over_cap_counts_vectors() -> None:
    items = ",".join(
        '{"object":"embedding","embedding":[' + ",".join(["0.5"] * 300) + f'],"index":{i}}}' for i in range(7)
    )
    body = (
        '{"object":"list","data":[' + items + '],"model":"e","usage":{"prompt_tokens":9,"total_tokens":9}}\n'
    )
    parser = make_parser(Flavor.OPENAI_EMBEDDINGS, "application/json", max_body_bytes=1000)
    parser.feed(body.encode())
    facts = parser.finish()
    assert facts.capture_truncated and facts.embeddings == 7
    assert facts.usage_prompt_tokens == 9 and facts.response_model == "e"


def test_non_json_error_body_is_trimmed_to_500_chars() -> None:
    parser = make_parser(Flavor.GENERATE, "text/html")
    parser.feed(b"  <html>" + b"x" * 1000 + b"</html>\n")
    facts = parser.finish()
    assert facts.framing == "other" and not facts.complete
    assert facts.error_message is not None
    assert facts.error_message.startswith("<html>") and len(facts.error_message) == 500


@pytest.mark.parametrize(
    ("content_type", "framing"),
    [
        ("application/x-ndjson", "ndjson"),
        ("Application/X-NDJSON; charset=utf-8", "ndjson"),
        ("text/event-stream", "sse"),
        ("application/json; charset=utf-8", "json"),
        (None, "other"),
    ],
)
def test_make_parser_picks_by_content_type(content_type: str | None, framing: str) -> None:
    parser = make_parser(Flavor.GENERATE, content_type)
    parser.feed(
        b'{"model":"m","response":"","done":true,"done_reason":"load"}\n' if framing != "other" else b""
    )
    assert parser.finish().framing == framing


def test_instrumented_paths() -> None:
    assert INSTRUMENTED["/api/generate"] is Flavor.GENERATE
    assert INSTRUMENTED["/v1/chat/completions"] is Flavor.OPENAI_CHAT
    assert set(INSTRUMENTED.values()) == set(Flavor)
