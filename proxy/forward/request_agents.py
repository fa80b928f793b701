"""The request side of ``/v1/messages`` (Anthropic Messages) and ``/v1/responses`` (OpenAI Responses).

The prompt is every text the model reads (system / instructions, message blocks, tool results, function
call arguments and outputs in the history); sampling fields go to the same ``RequestFacts`` fields as on the
other routes. Keys are read Go-style (``request_json.fold``).
"""

from __future__ import annotations

from typing import Any

from proxy.forward.request_json import RequestFacts, fold, set_numbers, small, stop_list, texts

__all__ = ["fill_messages", "fill_responses"]

# Anthropic Messages / OpenAI Responses fields recorded as facts; Go binds *float64 / *int / int
_MESSAGES_FIELDS = {
    "temperature": ("temperature", "f"),
    "top_p": ("top_p", "f"),
    "top_k": ("top_k", "i"),
    "max_tokens": ("max_tokens", "i"),
}
_RESPONSES_FIELDS = {
    "temperature": ("temperature", "f"),
    "top_p": ("top_p", "f"),
    "max_output_tokens": ("max_tokens", "i"),
}


def _block_texts(content: Any) -> tuple[list[str], int]:
    """A Messages/Responses content value: a string, or blocks whose text (and thinking) the model reads."""
    if isinstance(content, str):
        return texts(content), 0
    parts: list[str] = []
    images = 0
    for raw in content if isinstance(content, list) else ():
        if not isinstance(raw, dict):
            continue
        block = fold(raw)
        kind = block.get("type")
        if kind in ("image", "input_image"):
            images += 1
        parts.extend(texts(block.get("text")))
        parts.extend(texts(block.get("thinking")))
        if kind == "tool_result":
            inner, more = _block_texts(block.get("content"))
            parts.extend(inner)
            images += more
    return parts, images


def fill_messages(facts: RequestFacts, top: dict[str, Any]) -> None:
    """``/v1/messages`` (anthropic.MessagesRequest): system + every message's blocks are the prompt."""
    extra = facts.extra
    parts, images = _block_texts(top.get("system"))
    facts.turns = 1 if parts else 0  # a system prompt is one more message to the template
    messages = top.get("messages")
    for raw in messages if isinstance(messages, list) else ():
        if isinstance(raw, dict):
            more, n = _block_texts(fold(raw).get("content"))
            parts.extend(more)
            images += n
            facts.turns += 1
    if messages is not None and not isinstance(messages, list):
        extra["messages"] = small(messages)
    facts.prompt_text = "\n".join(parts)
    if images:
        extra["images"] = images
    set_numbers(facts, top, _MESSAGES_FIELDS)
    stop = top.get("stop_sequences")
    if stop is not None:
        facts.stop = stop_list(stop) if isinstance(stop, list) else None
        if facts.stop is None:
            extra["stop_sequences"] = small(stop)
    for key, inner, name in (
        ("thinking", "type", "thinking"),
        ("thinking", "budget_tokens", "thinking_budget_tokens"),
        ("tool_choice", "type", "tool_choice"),
        ("output_config", "effort", "reasoning_effort"),
    ):
        value = top.get(key)
        if isinstance(value, dict):
            found = fold(value).get(inner)
            if found is not None:
                extra[name] = small(found)


def fill_responses(facts: RequestFacts, top: dict[str, Any]) -> None:
    """``/v1/responses`` (openai.ResponsesRequest): instructions + input items are the prompt."""
    extra = facts.extra
    parts = texts(top.get("instructions"))
    images = 0
    inp = top.get("input")
    facts.turns = 1 if parts else 0  # instructions are a system message
    if isinstance(inp, str):
        parts.extend(texts(inp))
        facts.turns += 1
    elif isinstance(inp, list):
        for raw in inp:
            if not isinstance(raw, dict):
                continue
            facts.turns += 1
            item = fold(raw)
            more, n = _block_texts(item.get("content"))
            parts.extend(more)
            images += n
            parts.extend(texts(item.get("output")))  # function_call_output
            parts.extend(texts(item.get("arguments")))  # function_call in the history
    elif inp is not None:
        extra["input"] = small(inp)
    facts.prompt_text = "\n".join(parts)
    if images:
        extra["images"] = images
    set_numbers(facts, top, _RESPONSES_FIELDS)
    for key in ("truncation", "background"):
        if top.get(key) is not None:
            extra[key] = small(top[key])
    for key, inner, name in (("reasoning", "effort", "reasoning_effort"), ("text", "format", "format")):
        value = top.get(key)
        if isinstance(value, dict):
            found = fold(value).get(inner)
            if isinstance(found, dict):
                found = fold(found).get("type")
            if found is not None:
                extra[name] = small(found)
