"""The vocabulary shared by the stream parsers: which endpoint a body came from, and what was learned.

Kept apart from the parsers so that ``streams_collect`` (the shared accumulator) and the three framings can
all import it without a cycle through ``proxy.forward.streams``.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any

__all__ = ["INSTRUMENTED", "Flavor", "StreamFacts"]


class Flavor(enum.Enum):
    """The instrumented endpoints; each has its own response shape."""

    GENERATE = "generate"
    CHAT = "chat"
    EMBED = "embed"
    EMBEDDINGS = "embeddings"
    OPENAI_CHAT = "openai_chat"
    OPENAI_COMPLETION = "openai_completion"
    OPENAI_EMBEDDINGS = "openai_embeddings"
    ANTHROPIC_MESSAGES = "anthropic_messages"
    OPENAI_RESPONSES = "openai_responses"
    OPENAI_TRANSCRIPTION = "openai_transcription"


INSTRUMENTED: dict[str, Flavor] = {
    "/api/generate": Flavor.GENERATE,
    "/api/chat": Flavor.CHAT,
    "/api/embed": Flavor.EMBED,
    "/api/embeddings": Flavor.EMBEDDINGS,
    "/v1/chat/completions": Flavor.OPENAI_CHAT,
    "/v1/completions": Flavor.OPENAI_COMPLETION,
    "/v1/embeddings": Flavor.OPENAI_EMBEDDINGS,
    "/v1/messages": Flavor.ANTHROPIC_MESSAGES,
    "/v1/responses": Flavor.OPENAI_RESPONSES,
    "/v1/audio/transcriptions": Flavor.OPENAI_TRANSCRIPTION,
}


@dataclass(slots=True)
class StreamFacts:
    """What one upstream response body said, independent of how its bytes were chunked.

    ``complete`` means a clean terminal marker was seen and no error: a native ``done:true`` line, SSE
    ``data: [DONE]``, Messages ``message_stop``, Responses ``response.completed``/``response.incomplete``, or
    a JSON body that parsed and has no ``error``. Native duration/count metrics of an
    inference's done line are 0 when absent (Ollama omits zero values); they stay ``None`` when no done line
    was seen or the done line was a load/unload. ``final`` is the terminal object without bulky or
    text-bearing fields (vectors, ``context``, response text): it is meant for metadata, and text is stored
    only when the operator opts in.
    """

    framing: str = "other"  # ndjson | sse | json | other
    complete: bool = False
    error_message: str | None = None
    done_reason: str | None = None
    response_model: str | None = None
    prompt_eval_count: int | None = None
    eval_count: int | None = None
    total_duration_ns: int | None = None
    load_duration_ns: int | None = None
    prompt_eval_duration_ns: int | None = None
    eval_duration_ns: int | None = None
    usage_prompt_tokens: int | None = None
    usage_completion_tokens: int | None = None
    content_events: int = 0
    tool_calls: int = 0
    tool_call_text: str = ""  # tool-call names and arguments as generated (objects as compact JSON), capped
    response_text: str = ""
    thinking_text: str = ""
    embeddings: int | None = None
    final: dict[str, Any] | None = None
    bytes_seen: int = 0
    capture_truncated: bool = False
    malformed_lines: int = 0  # NDJSON lines / SSE events that were not JSON objects
    text_dropped_bytes: int = 0  # escaped text past streams_collect.MAX_TEXT_BYTES: counted, not kept
    text_kept_bytes: int = 0  # escaped text kept (the base for scaling an estimate when some was dropped)
    response_dropped_chars: int = 0  # characters of response text (not thinking) past the cap
