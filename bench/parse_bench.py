"""Micro-benchmark of the stream parsers' hot path: ns per token line, fast path vs ``orjson.loads``.

Run: ``python bench/parse_bench.py``. Not a test; it prints a table. One line per ``feed`` call, as Ollama
flushes one line per chunk; the ``orjson`` rows parse each line and pull the text out, which is what a
naive parser would do per token.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from pathlib import Path

import orjson

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from proxy.forward.streams import Flavor, make_parser

N = 200_000
TS = '"created_at":"2025-10-26T17:15:24.097767123Z"'
GEN = ('{"model":"llama3.2",' + TS + ',"response":" the","done":false}\n').encode()
CHAT = (
    '{"model":"llama3.2",' + TS + ',"message":{"role":"assistant","content":" the"},"done":false}\n'
).encode()
SSE_CHAT = (
    b'data: {"id":"chatcmpl-123","object":"chat.completion.chunk","created":1700000000,"model":"llama3.2",'
    b'"system_fingerprint":"fp_ollama","choices":[{"index":0,"delta":{"content":" the"},"finish_reason":null}]}\n\n'
)
SSE_CMPL = (
    b'data: {"id":"cmpl-123","object":"text_completion","created":1700000000,"choices":[{"text":" the",'
    b'"index":0,"finish_reason":null}],"model":"llama3.2","system_fingerprint":"fp_ollama",'
    b'"usage":{"prompt_tokens":0,"completion_tokens":0,"total_tokens":0}}\n\n'
)
DONE = (
    '{"model":"llama3.2",'
    + TS
    + ',"response":"","done":true,"done_reason":"stop","context":['
    + ",".join(str(100000 + i) for i in range(4096))
    + '],"total_duration":10706818083,"load_duration":6338219291,"prompt_eval_count":26,'
    '"prompt_eval_duration":130079000,"eval_count":259,"eval_duration":4232710000}\n'
).encode()


def per_call_ns(fn: Callable[[], object], n: int) -> float:
    start = time.perf_counter_ns()
    for _ in range(n):
        fn()
    return (time.perf_counter_ns() - start) / n


def feed_ns(flavor: Flavor, ctype: str, line: bytes, n: int = N) -> float:
    parser = make_parser(flavor, ctype)
    feed = parser.feed
    best = min(per_call_ns(lambda: feed(line), n) for _ in range(3))
    facts = parser.finish()
    assert facts.content_events >= n, facts.content_events
    return best


def orjson_ns(line: bytes, extract: Callable[[dict[str, object]], object], strip: int = 0) -> float:
    body = line[strip:].rstrip(b"\n")
    return min(per_call_ns(lambda: extract(orjson.loads(body)), N) for _ in range(3))


def main() -> None:
    rows = [
        ("ndjson generate", len(GEN), feed_ns(Flavor.GENERATE, "application/x-ndjson", GEN),
         orjson_ns(GEN, lambda o: o["response"])),
        ("ndjson chat", len(CHAT), feed_ns(Flavor.CHAT, "application/x-ndjson", CHAT),
         orjson_ns(CHAT, lambda o: o["message"]["content"])),  # type: ignore[index]
        ("sse chat", len(SSE_CHAT), feed_ns(Flavor.OPENAI_CHAT, "text/event-stream", SSE_CHAT),
         orjson_ns(SSE_CHAT, lambda o: o["choices"][0]["delta"]["content"], 6)),  # type: ignore[index]
        ("sse completion+zero usage", len(SSE_CMPL), feed_ns(Flavor.OPENAI_COMPLETION, "text/event-stream", SSE_CMPL),
         orjson_ns(SSE_CMPL, lambda o: o["choices"][0]["text"], 6)),  # type: ignore[index]
    ]  # fmt: skip
    print(
        f"{'path':<28}{'bytes':>6}{'feed ns':>10}{'ns/100B':>10}{'orjson ns':>11}{'orjson/100B':>13}{'speedup':>9}"
    )
    for name, size, fast, slow in rows:
        print(
            f"{name:<28}{size:>6}{fast:>10.0f}{fast * 100 / size:>10.0f}{slow:>11.0f}"
            f"{slow * 100 / size:>13.0f}{slow / fast:>8.1f}x"
        )
    done_parser = make_parser(Flavor.GENERATE, "application/x-ndjson")
    done_ns = min(per_call_ns(lambda: done_parser.feed(DONE), 2000) for _ in range(3))
    print(
        f"\ndone line with a 4096-token context ({len(DONE)} B), full parse in feed: {done_ns / 1000:.1f} µs"
    )
    fin = make_parser(Flavor.CHAT, "application/x-ndjson")
    for _ in range(1000):
        fin.feed(CHAT)
    start = time.perf_counter_ns()
    fin.finish()
    print(
        f"finish() of a 1000-token chat stream (decode text once): {(time.perf_counter_ns() - start) / 1000:.1f} µs"
    )


if __name__ == "__main__":
    main()
