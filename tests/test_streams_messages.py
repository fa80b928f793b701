"""``/v1/messages`` (Anthropic) and ``/v1/responses`` (OpenAI) bodies through proxy.forward.streams.

Recorded streams in Ollama's byte shapes (its ``anthropic.StreamConverter`` / ``ResponsesStreamConverter``,
spec §8.7) plus the vendors' own key orders, which take the full-parse path; expected values are written
out by hand. The property tests replay every sample under random chunkings, and arbitrary text through
the byte-scan paths, as tests/test_streams_props.py does for NDJSON and SSE.
"""

from __future__ import annotations

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxy.forward.streams import INSTRUMENTED, Flavor, make_parser
from tests.test_streams import JSON, SSE, Sample, check, run
from tests.test_streams_props import FAST, go_escape, split

MSG = Flavor.ANTHROPIC_MESSAGES
RESP = Flavor.OPENAI_RESPONSES


def ev(name: str, data: str, nl: str = "\n") -> str:
    return f"event: {name}{nl}data: {data}{nl}{nl}"


def m_start(input_tokens: int = 3) -> str:
    return ev(
        "message_start",
        '{"type":"message_start","message":{"id":"msg_1","type":"message","role":"assistant",'
        '"model":"qwen3:0.6b","content":[],"usage":{"input_tokens":'
        + str(input_tokens)
        + ',"output_tokens":0}}}',
    )


def m_block(index: int, block: str) -> str:
    return ev(
        "content_block_start",
        '{"type":"content_block_start","index":' + str(index) + ',"content_block":' + block + "}",
    )


def m_delta(index: int, kind: str, key: str, raw: str) -> str:
    return ev(
        "content_block_delta",
        '{"type":"content_block_delta","index":'
        + str(index)
        + ',"delta":{"type":"'
        + kind
        + '","'
        + key
        + '":"'
        + raw
        + '"}}',
    )


def m_text(index: int, raw: str) -> str:
    return m_delta(index, "text_delta", "text", raw)


def m_stop(index: int) -> str:
    return ev("content_block_stop", '{"type":"content_block_stop","index":' + str(index) + "}")


def m_end(reason: str = "end_turn", prompt: int = 26, completion: int = 5) -> str:
    usage = '{"input_tokens":' + str(prompt) + ',"output_tokens":' + str(completion) + "}"
    return ev(
        "message_delta",
        '{"type":"message_delta","delta":{"stop_reason":"' + reason + '"},"usage":' + usage + "}",
    ) + ev("message_stop", '{"type":"message_stop"}')


PING = ev("ping", '{"type":"ping"}')
TOOL = '{"type":"tool_use","id":"toolu_01","name":"get_weather","input":{}}'
M_ERROR = ev("error", '{"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}')
USAGE_26_5 = {"usage_prompt_tokens": 26, "usage_completion_tokens": 5}
CLEAN_MSG = {"complete": True, "error_message": None, "framing": "sse", "response_model": "qwen3:0.6b"}


def r_ev(kind: str, body: str) -> str:
    """A Responses event in Ollama's layout: a Go map, keys sorted, ``type`` last but one key here."""
    return ev(kind, "{" + body + ',"type":"' + kind + '"}')


def r_resp(status: str, usage: str = "null", extra: str = "") -> str:
    return (
        '{"background":false,"completed_at":null,"created_at":1700000000,"error":'
        + (extra or "null")
        + ',"id":"resp_1","model":"llama3.2","object":"response","output":[],"status":"'
        + status
        + '","usage":'
        + usage
        + "}"
    )


def r_text(raw: str, seq: int = 4) -> str:
    return r_ev(
        "response.output_text.delta",
        '"content_index":0,"delta":"' + raw + '","item_id":"msg_1","logprobs":[],"output_index":0,'
        '"sequence_number":' + str(seq),
    )


def r_think(raw: str) -> str:
    return r_ev(
        "response.reasoning_summary_text.delta",
        '"delta":"' + raw + '","item_id":"rs_1","output_index":0,"sequence_number":3,"summary_index":0',
    )


R_USAGE = '{"input_tokens":26,"output_tokens":5,"total_tokens":31,"input_tokens_details":{"cached_tokens":0}}'
R_HEAD = r_ev("response.created", '"response":' + r_resp("in_progress") + ',"sequence_number":0') + r_ev(
    "response.in_progress", '"response":' + r_resp("in_progress") + ',"sequence_number":1'
)
R_DONE = r_ev("response.completed", '"response":' + r_resp("completed", R_USAGE) + ',"sequence_number":9')
CLEAN_RESP = {"complete": True, "error_message": None, "framing": "sse", "response_model": "llama3.2"}

SAMPLES = [
    Sample(
        "messages-ollama",
        MSG,
        SSE,
        (
            m_start(3)
            + PING
            + m_block(0, '{"type":"thinking","thinking":""}')
            + m_delta(0, "thinking_delta", "thinking", "Let me")
            + m_delta(0, "thinking_delta", "thinking", " think")
            + m_stop(0)
            + m_block(1, '{"type":"text","text":""}')
            + m_text(1, "The")
            + m_text(1, r" \"sky\" \u003c")
            + m_text(1, "")
            + m_text(1, "😀 \\\\")
            + m_stop(1)
            + m_end()
        ).encode(),
        {
            **CLEAN_MSG,
            **USAGE_26_5,
            "done_reason": "end_turn",
            "response_text": 'The "sky" <😀 \\',
            "thinking_text": "Let me think",
            "content_events": 5,
            "tool_calls": 0,
        },
    ),
    Sample(
        "messages-tool-use",
        MSG,
        SSE,
        (
            m_start()
            + m_block(0, '{"type":"text","text":""}')
            + m_text(0, "Checking")
            + m_stop(0)
            + m_block(1, TOOL)
            + m_delta(1, "input_json_delta", "partial_json", r"{\"city\":\"Paris\"}")
            + m_stop(1)
            + m_end("tool_use")
        ).encode(),
        {**CLEAN_MSG, **USAGE_26_5, "done_reason": "tool_use", "tool_calls": 1, "content_events": 2},
    ),
    Sample(
        # Anthropic's own shape: message_delta carries output_tokens only; input_tokens is message_start's.
        "messages-anthropic-usage-crlf",
        MSG,
        SSE,
        (
            ev(
                "message_start",
                '{"type":"message_start","message":{"model":"qwen3:0.6b","usage":{"input_tokens":12,'
                '"output_tokens":1}}}',
                "\r\n",
            )
            + ev(
                "content_block_delta",
                '{"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "Hi"}}',
                "\r\n",
            )
            + ev(
                "message_delta",
                '{"type":"message_delta","delta":{"stop_reason":"max_tokens"},"usage":{"output_tokens":7}}',
                "\r\n",
            )
            + ev("message_stop", '{"type":"message_stop"}', "\r\n")
        ).encode(),
        {
            **CLEAN_MSG,
            "usage_prompt_tokens": 12,
            "usage_completion_tokens": 7,
            "done_reason": "max_tokens",
            "response_text": "Hi",
            "content_events": 1,
        },
    ),
    Sample(
        "messages-error-event",
        MSG,
        SSE,
        (m_start() + m_block(0, '{"type":"text","text":""}') + m_text(0, "Hel") + M_ERROR).encode(),
        {"complete": False, "error_message": "Overloaded", "response_text": "Hel", "content_events": 1},
    ),
    Sample(
        # No message_delta: message_start's input_tokens (Ollama's estimate) is not a usage count.
        "messages-truncated",
        MSG,
        SSE,
        (m_start(99) + m_block(0, '{"type":"text","text":""}') + m_text(0, "Hel") + m_text(0, "lo")).encode(),
        {
            "complete": False,
            "error_message": None,
            "usage_prompt_tokens": None,
            "usage_completion_tokens": None,
            "response_text": "Hello",
            "content_events": 2,
        },
    ),
    Sample(
        "messages-last-event-without-blank-line",
        MSG,
        SSE,
        (m_start() + m_text(0, "x") + m_end().rstrip("\n")).encode(),
        {**CLEAN_MSG, "response_text": "x", "done_reason": "end_turn"},
    ),
    Sample(
        "messages-body",
        MSG,
        JSON,
        b'{"id":"msg_1","type":"message","role":"assistant","model":"qwen3:0.6b","content":['
        b'{"type":"thinking","thinking":"hmm"},{"type":"text","text":"a\\u003eb"},'
        b'{"type":"tool_use","id":"toolu_00","name":"f","input":{"city":"Paris"}}],'
        b'"stop_reason":"tool_use","usage":{"input_tokens":8,"output_tokens":0}}\n',
        {
            **CLEAN_MSG,
            "framing": "json",
            "response_text": "a>b",
            "thinking_text": "hmm",
            "tool_calls": 1,
            "done_reason": "tool_use",
            "usage_prompt_tokens": 8,
            "usage_completion_tokens": 0,
        },
    ),
    Sample(
        "messages-error-body",
        MSG,
        "application/json",
        b'{"type":"error","error":{"type":"not_found_error","message":"model \'x\' not found"},'
        b'"request_id":"req_1"}\n',
        {"complete": False, "error_message": "model 'x' not found", "framing": "json"},
    ),
    Sample(
        "responses-ollama",
        RESP,
        SSE,
        (
            R_HEAD
            + r_ev(
                "response.output_item.added",
                '"item":{"id":"rs_1","summary":[],"type":"reasoning"},"output_index":0,"sequence_number":2',
            )
            + r_think("Let me")
            + r_think(r" \"think\"")
            + r_text("The")
            + r_text(r" sky \u0026")
            + r_text("")
            + r_text("😀")
            + R_DONE
        ).encode(),
        {
            **CLEAN_RESP,
            **USAGE_26_5,
            "done_reason": "completed",
            "response_text": "The sky &😀",
            "thinking_text": 'Let me "think"',
            "content_events": 5,
        },
    ),
    Sample(
        "responses-function-call",
        RESP,
        SSE,
        (
            R_HEAD
            + r_ev(
                "response.output_item.added",
                '"item":{"arguments":"","call_id":"call_1","id":"fc_1","name":"f","status":"in_progress",'
                '"type":"function_call"},"output_index":0,"sequence_number":2',
            )
            + r_ev(
                "response.function_call_arguments.delta",
                r'"delta":"{\"city\":\"Paris\"}","item_id":"fc_1","output_index":0,"sequence_number":3',
            )
            + R_DONE
        ).encode(),
        {**CLEAN_RESP, **USAGE_26_5, "tool_calls": 1, "content_events": 1, "response_text": ""},
    ),
    Sample(
        # OpenAI's own key order (type first): the full-parse path gives the same facts.
        "responses-openai-order",
        RESP,
        SSE,
        (
            ev(
                "response.output_text.delta",
                '{"type":"response.output_text.delta","sequence_number":4,'
                '"item_id":"msg_1","output_index":0,"content_index":0,"delta":"Hi","logprobs":[]}',
            )
            + ev(
                "response.incomplete",
                '{"type":"response.incomplete","sequence_number":5,"response":'
                '{"id":"r","object":"response","status":"incomplete","model":"gpt-oss:20b",'
                '"incomplete_details":{"reason":"max_output_tokens"},'
                '"usage":{"input_tokens":3,"output_tokens":1,"total_tokens":4}}}',
            )
        ).encode(),
        {
            "complete": True,
            "response_model": "gpt-oss:20b",
            "done_reason": "max_output_tokens",
            "response_text": "Hi",
            "usage_prompt_tokens": 3,
            "usage_completion_tokens": 1,
        },
    ),
    Sample(
        "responses-failed",
        RESP,
        SSE,
        (
            R_HEAD
            + r_text("Hel")
            + r_ev(
                "response.failed",
                '"response":'
                + r_resp("failed", extra='{"code":"server_error","message":"boom"}')
                + ',"sequence_number":5',
            )
        ).encode(),
        {"complete": False, "error_message": "boom", "done_reason": "failed", "response_text": "Hel"},
    ),
    Sample(
        "responses-error-event",
        RESP,
        SSE,
        (
            R_HEAD + ev("error", '{"type":"error","code":"x","message":"bad thing","sequence_number":2}')
        ).encode(),
        {"complete": False, "error_message": "bad thing"},
    ),
    Sample(
        "responses-truncated",
        RESP,
        SSE,
        (R_HEAD + r_text("Hel") + r_text("lo")).encode(),
        {
            "complete": False,
            "error_message": None,
            "usage_prompt_tokens": None,
            "response_text": "Hello",
            "content_events": 2,
            "response_model": "llama3.2",
        },
    ),
    Sample(
        "responses-body",
        RESP,
        JSON,
        b'{"id":"resp_1","object":"response","created_at":1,"completed_at":null,"status":"completed",'
        b'"incomplete_details":null,"model":"qwen3:0.6b","output":[{"id":"rs_1","type":"reasoning",'
        b'"summary":[{"type":"summary_text","text":"hmm"}],"encrypted_content":"hmm"},{"id":"msg_1",'
        b'"type":"message","status":"completed","role":"assistant","content":[{"type":"output_text",'
        b'"text":"Hi there","annotations":[],"logprobs":[]}]}],"error":null,"usage":{"input_tokens":8,'
        b'"output_tokens":4,"total_tokens":12}}\n',
        {
            "complete": True,
            "framing": "json",
            "response_model": "qwen3:0.6b",
            "response_text": "Hi there",
            "thinking_text": "hmm",
            "done_reason": "completed",
            "usage_prompt_tokens": 8,
            "usage_completion_tokens": 4,
        },
    ),
    Sample(
        "responses-error-body",
        RESP,
        "application/json",
        b'{"error":{"message":"model \'x\' not found","type":"not_found_error","param":null,"code":null}}\n',
        {"complete": False, "error_message": "model 'x' not found"},
    ),
]


@pytest.mark.parametrize("sample", SAMPLES, ids=lambda s: s.name)
def test_recorded_bodies(sample: Sample) -> None:
    facts, fed = run(sample)
    check(facts, sample.expect)
    if sample.content_type == SSE:
        assert fed == facts.content_events
        assert facts.malformed_lines == 0


def test_routes_are_instrumented() -> None:
    assert INSTRUMENTED["/v1/messages"] is MSG
    assert INSTRUMENTED["/v1/responses"] is RESP


def test_garbage_data_is_malformed_not_fatal() -> None:
    body = (m_start() + ev("content_block_delta", "{not json") + ev("x", "[1]") + m_text(0, "ok")).encode()
    facts, fed = run(Sample("garbage", MSG, SSE, body))
    assert facts.malformed_lines == 2 and facts.response_text == "ok" and fed == 1 and not facts.complete


def test_fast_and_full_paths_agree() -> None:
    """A delta read by byte scan and the same delta with one space more (full parse) give the same text."""
    for flavor, fast, slow in (
        (MSG, m_text(0, r"a \"b\" \u003c"), m_text(0, r"a \"b\" \u003c").replace('"index":0', '"index": 0')),
        (
            RESP,
            r_text(r"a \"b\" \u003c"),
            r_text(r"a \"b\" \u003c").replace('"logprobs":[]', '"logprobs": []'),
        ),
    ):
        one, fed_one = run(Sample("fast", flavor, SSE, fast.encode()))
        two, fed_two = run(Sample("slow", flavor, SSE, slow.encode()))
        assert one.response_text == two.response_text == 'a "b" <'
        assert fed_one == fed_two == one.content_events == two.content_events == 1


# -- split invariance -------------------------------------------------------------------------------


@FAST
@given(data=st.data())
def test_any_chunking_gives_the_same_facts(data: st.DataObject) -> None:
    sample = data.draw(st.sampled_from(SAMPLES), label="sample")
    cuts = data.draw(st.lists(st.integers(min_value=0, max_value=1 << 16), max_size=40), label="cuts")
    whole, whole_fed = run(sample)
    facts, fed = run(sample, split(sample.body, cuts))
    assert facts == whole
    assert fed == whole_fed


def test_one_byte_chunks_give_the_same_facts() -> None:
    for sample in SAMPLES:
        whole, whole_fed = run(sample)
        facts, fed = run(sample, [sample.body[i : i + 1] for i in range(len(sample.body))])
        assert facts == whole, sample.name
        assert fed == whole_fed, sample.name


tokens = st.lists(st.text(min_size=0, max_size=12), min_size=1, max_size=12)


@FAST
@given(parts=tokens, thinking=tokens, cuts=st.lists(st.integers(0, 1 << 12), max_size=20))
def test_arbitrary_text_survives_messages(parts: list[str], thinking: list[str], cuts: list[int]) -> None:
    body = m_start() + m_block(0, '{"type":"thinking","thinking":""}')
    body += "".join(m_delta(0, "thinking_delta", "thinking", go_escape(t)) for t in thinking)
    body += m_stop(0) + m_block(1, '{"type":"text","text":""}')
    body += "".join(m_text(1, go_escape(t)) for t in parts) + m_stop(1) + m_end()
    parser = make_parser(MSG, SSE)
    fed = sum(parser.feed(c) for c in split(body.encode(), cuts))
    facts = parser.finish()
    assert facts.response_text == "".join(parts)
    assert facts.thinking_text == "".join(thinking)
    assert fed == facts.content_events == sum(1 for t in parts + thinking if t)
    assert facts.complete and facts.usage_completion_tokens == 5


@FAST
@given(parts=tokens, thinking=tokens, cuts=st.lists(st.integers(0, 1 << 12), max_size=20))
def test_arbitrary_text_survives_responses(parts: list[str], thinking: list[str], cuts: list[int]) -> None:
    body = R_HEAD + "".join(r_think(go_escape(t)) for t in thinking)
    body += "".join(r_text(go_escape(t), seq=i) for i, t in enumerate(parts)) + R_DONE
    parser = make_parser(RESP, SSE)
    fed = sum(parser.feed(c) for c in split(body.encode(), cuts))
    facts = parser.finish()
    assert facts.response_text == "".join(parts)
    assert facts.thinking_text == "".join(thinking)
    assert fed == facts.content_events == sum(1 for t in parts + thinking if t)
    assert facts.complete and facts.usage_prompt_tokens == 26


@FAST
@given(body=st.binary(max_size=300), flavor=st.sampled_from([MSG, RESP]), cut=st.integers(0, 300))
def test_arbitrary_bytes_never_raise(body: bytes, flavor: Flavor, cut: int) -> None:
    prefix = b"event: x\ndata: "
    for ctype in (SSE, JSON):
        facts, fed = run(Sample("fuzz", flavor, ctype, prefix + body), [prefix + body[:cut], body[cut:]])
        assert facts.bytes_seen == len(prefix + body)
        assert 0 <= fed <= facts.content_events


def test_delta_text_is_json_string_body() -> None:
    """The byte-scan slice is decoded once, as JSON: escapes written by Go come out as the text."""
    raw = orjson.dumps("tab\t<é>").decode()[1:-1]
    facts, _ = run(Sample("esc", RESP, SSE, (R_HEAD + r_text(raw) + R_DONE).encode()))
    assert facts.response_text == "tab\t<é>"
