"""Pure response parsers: upstream body bytes in, ``StreamFacts`` out. No I/O, no asyncio.

The proxy writes each upstream chunk to the client unchanged and then calls ``parser.feed(chunk)``; the
parser only reads. ``feed`` is the hot path and does byte scans (no JSON decode of token lines); the
expensive part (decoding text, parsing a final JSON body) happens in ``finish()``, which the proxy calls
later on a worker thread. Lines and SSE events are buffered to their boundary, so how the transport split
the bytes cannot change the facts.

Which parser is picked depends on the upstream Content-Type, not on the request's ``stream`` flag: Ollama
answers errors raised before the first byte with a JSON body even to a streaming request.

Modules: ``streams_types`` (Flavor, StreamFacts), ``streams_collect`` (shared accumulator),
``streams_lines`` (chunk → line splitting), ``streams_ndjson``, ``streams_sse``, ``streams_body``;
``events`` (named SSE events) under ``messages`` (Anthropic Messages) and ``responses`` (OpenAI Responses).
"""

from __future__ import annotations

from typing import Protocol

from proxy.forward.streams.body import BodyParser
from proxy.forward.streams.facts import INSTRUMENTED, Flavor, StreamFacts
from proxy.forward.streams.messages import MessagesParser
from proxy.forward.streams.ndjson import NdjsonParser
from proxy.forward.streams.responses import ResponsesParser
from proxy.forward.streams.sse import SseParser

__all__ = ["INSTRUMENTED", "Flavor", "StreamFacts", "StreamParser", "make_parser"]


class StreamParser(Protocol):
    """What the proxy drives: ``feed`` per chunk on the event loop, ``finish`` once, off it."""

    def feed(self, chunk: bytes) -> int:
        """Read ``chunk``; return how many content-bearing events completed in it."""
        ...

    def finish(self) -> StreamFacts:
        """Flush a trailing partial line/event and return the facts."""
        ...


def make_parser(flavor: Flavor, content_type: str | None, *, max_body_bytes: int = 8 << 20) -> StreamParser:
    """Pick the parser for an upstream response by its Content-Type.

    ``application/x-ndjson`` → NDJSON lines; ``text/event-stream`` → SSE (named ``event:`` frames for
    ``/v1/messages`` and ``/v1/responses``, ``data:``-only chunks for the other ``/v1`` routes); anything
    else (JSON bodies, error bodies, text/plain 404s) → a body parser that keeps up to ``max_body_bytes``
    and parses in ``finish``.
    """
    media = (content_type or "").split(";", 1)[0].strip().lower()
    if media == "application/x-ndjson":
        return NdjsonParser(flavor)
    if media == "text/event-stream":
        if flavor is Flavor.ANTHROPIC_MESSAGES:
            return MessagesParser()
        if flavor is Flavor.OPENAI_RESPONSES:
            return ResponsesParser()
        return SseParser(flavor)
    return BodyParser(flavor, max_body_bytes)
