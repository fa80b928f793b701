"""Property tests: chunking never changes the facts, and any text survives the byte-scan fast path."""

from __future__ import annotations

import itertools

import orjson
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proxy.forward.streams import Flavor, make_parser
from tests.test_streams import ND, SAMPLES, SSE, Sample, run

FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def split(body: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(body) + 1) for c in cuts})
    edges = [0, *points, len(body)]
    return [body[a:b] for a, b in itertools.pairwise(edges)]


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
        if sample.content_type in (ND, SSE) and sample.body.endswith(b"\n"):
            assert fed == facts.content_events, sample.name


def go_escape(text: str) -> str:
    """A JSON string body the way Go writes it: <, >, & and U+2028/9 escaped, other non-ASCII raw."""
    raw = orjson.dumps(text).decode()[1:-1]
    for ch, esc in (
        ("<", "\\u003c"),
        (">", "\\u003e"),
        ("&", "\\u0026"),
        ("\u2028", "\\u2028"),
        ("\u2029", "\\u2029"),
    ):
        raw = raw.replace(ch, esc)
    return raw


tokens = st.lists(st.text(min_size=0, max_size=12), min_size=1, max_size=12)


@FAST
@given(parts=tokens, thinking=tokens, cuts=st.lists(st.integers(0, 1 << 12), max_size=20))
def test_arbitrary_text_survives_ndjson(parts: list[str], thinking: list[str], cuts: list[int]) -> None:
    lines = []
    for i, text in enumerate(parts):
        think = thinking[i] if i < len(thinking) else ""
        extra = f',"thinking":"{go_escape(think)}"' if think else ""
        lines.append(
            '{"model":"m","created_at":"2025-01-01T00:00:00Z","message":{"role":"assistant","content":"'
            + go_escape(text)
            + '"'
            + extra
            + '},"done":false}\n'
        )
    lines.append(
        '{"model":"m","message":{"role":"assistant","content":""},"done":true,"done_reason":"stop"}\n'
    )
    body = "".join(lines).encode()
    parser = make_parser(Flavor.CHAT, ND)
    fed = sum(parser.feed(c) for c in split(body, cuts))
    facts = parser.finish()
    used_thinking = thinking[: len(parts)]
    assert facts.response_text == "".join(parts)
    assert facts.thinking_text == "".join(used_thinking)
    expected = sum(1 for i, t in enumerate(parts) if t or (i < len(thinking) and thinking[i]))
    assert fed == facts.content_events == expected
    assert facts.complete and facts.malformed_lines == 0


@FAST
@given(parts=tokens, cuts=st.lists(st.integers(0, 1 << 12), max_size=20))
def test_arbitrary_text_survives_sse(parts: list[str], cuts: list[int]) -> None:
    events = [
        'data: {"id":"chatcmpl-1","object":"chat.completion.chunk","created":1,"model":"m",'
        '"system_fingerprint":"fp_ollama","choices":[{"index":0,"delta":{"content":"'
        + go_escape(text)
        + '"},"finish_reason":null}]}\n\n'
        for text in parts
    ]
    body = ("".join(events) + "data: [DONE]\n\n").encode()
    parser = make_parser(Flavor.OPENAI_CHAT, SSE)
    fed = sum(parser.feed(c) for c in split(body, cuts))
    facts = parser.finish()
    assert facts.response_text == "".join(parts)
    assert fed == facts.content_events == sum(1 for t in parts if t)
    assert facts.complete


@FAST
@given(
    body=st.binary(max_size=300), flavor=st.sampled_from(list(Flavor)), ctype=st.sampled_from([ND, SSE, "x"])
)
def test_arbitrary_bytes_never_raise(body: bytes, flavor: Flavor, ctype: str) -> None:
    facts, fed = run(Sample("fuzz", flavor, ctype, body))
    assert facts.bytes_seen == len(body)
    assert 0 <= fed <= facts.content_events


def test_line_per_chunk_like_ollama_flushes_gives_the_same_facts() -> None:
    """One line (NDJSON) or one event (SSE) per chunk: the inline fast paths, checked against one chunk."""
    for sample in SAMPLES:
        if sample.content_type == ND:
            chunks = sample.body.splitlines(keepends=True)
        elif sample.content_type == SSE:
            chunks, event = [], b""
            for line in sample.body.splitlines(keepends=True):
                event += line
                if line in (b"\n", b"\r\n"):
                    chunks.append(event)
                    event = b""
            chunks += [event] if event else []
        else:
            continue
        whole, whole_fed = run(sample)
        facts, fed = run(sample, chunks)
        assert facts == whole, sample.name
        assert fed == whole_fed, sample.name


def test_fast_paths_are_taken_for_token_lines() -> None:
    """The inline path must not touch the line buffer: feed token lines after the first one."""
    from tests.test_streams import chat_chunk, cmpl_chunk, gen, sse

    cases = [
        (Flavor.GENERATE, ND, [gen("a").encode(), gen("b").encode(), gen("").encode()]),
        (
            Flavor.OPENAI_CHAT,
            SSE,
            [sse(chat_chunk('{"content":"' + t + '"}')).encode() for t in "ab"] + [b""],
        ),
        (Flavor.OPENAI_COMPLETION, SSE, [sse(cmpl_chunk(t)).encode() for t in "ab"] + [b""]),
    ]
    for flavor, ctype, (first, second, third) in cases:
        parser = make_parser(flavor, ctype)
        assert parser.feed(first) == 1
        calls: list[bytes] = []
        original = type(parser).__mro__[1].feed  # LineParser.feed, the general path

        def spy(self: object, chunk: bytes, _orig: object = original, calls: list[bytes] = calls) -> int:
            calls.append(chunk)
            return _orig(self, chunk)  # type: ignore[operator]

        type(parser).__mro__[1].feed = spy  # type: ignore[method-assign]
        try:
            assert parser.feed(second) == 1
            if third:
                assert parser.feed(third) == 0
        finally:
            type(parser).__mro__[1].feed = original  # type: ignore[method-assign]
        assert calls == [], flavor
        assert parser.finish().response_text == "ab"
