"""Conversation ids, turn numbers and prompt-cache reuse estimates (docs/conversations.md).

Two parts, both off the request path:

* ``chat_opening`` runs where the request body is read (``request_facts``): for the chat routes it hashes the
  conversation's *opening* (the leading system/developer messages and the first user message) and counts user
  turns. A regenerate sends the same history again, so it gets the same opening and the same turn.
* ``Conversations.apply`` runs in ``Capture.build`` on the writer's worker thread: it picks the id (the
  client's header, cut to a bounded length, else a hash of the opening with the caller's user id and address)
  and estimates how many prompt tokens Ollama took from its KV cache. Ollama's ``prompt_eval_count`` counts
  cached tokens while ``prompt_eval_duration`` covers only the tokens evaluated anew, so
  ``new ≈ prompt_eval_duration * cold rate``, where the cold rate (tokens/s) is the median of the model's
  recent first-turn requests, which start with an empty cache for their conversation. State is bounded: a
  small ring of rates per model, ``max_models`` models (least recently seen dropped first).
"""

from __future__ import annotations

import hashlib
import logging
import statistics
import threading
from collections import OrderedDict, deque
from typing import Any

import orjson

from proxy.forward.request_json import fold
from proxy.forward.streams.facts import Flavor, StreamFacts
from proxy.forward.tokens import estimate_tokens
from storage.records import InferenceRecord

__all__ = ["Conversations", "Opening", "chat_opening", "token_types"]

logger = logging.getLogger(__name__)

Opening = tuple[str, int]  # (sha256 hex of the opening messages, user turn number)

_SYSTEM_ROLES = frozenset({"system", "developer"})
_RATE_SAMPLES = 32  # first-turn rates kept per model
_MIN_COLD_NS = 1_000_000  # a first turn shorter than 1 ms of prompt evaluation says nothing about the rate


def _digest(parts: list[Any]) -> str:
    return hashlib.sha256(orjson.dumps(parts, option=orjson.OPT_SORT_KEYS, default=str)).hexdigest()


def _message_key(msg: dict[str, Any]) -> list[Any]:
    """What identifies a message: its role, content and attached images, as sent (other keys vary by client)."""
    images = msg.get("images")
    return [msg.get("role"), msg.get("content"), images or None]


def _only_tool_results(content: Any) -> bool:
    """An Anthropic user message that only hands back tool results is not a user turn."""
    return (
        isinstance(content, list)
        and bool(content)
        and all(isinstance(b, dict) and fold(b).get("type") == "tool_result" for b in content)
    )


def _from_messages(lead: list[Any], messages: list[Any], anthropic: bool) -> Opening | None:
    opening = list(lead)
    first_user: list[Any] | None = None
    turn = 0
    for raw in messages:
        if not isinstance(raw, dict):
            continue
        msg = fold(raw)
        role = msg.get("role")
        if role == "user" and not (anthropic and _only_tool_results(msg.get("content"))):
            turn += 1
            if first_user is None:
                first_user = _message_key(msg)
        elif first_user is None and turn == 0 and role in _SYSTEM_ROLES:
            opening.append(_message_key(msg))
    if first_user is None:
        return None
    opening.append(first_user)
    return _digest(opening), turn


def chat_opening(flavor: Flavor, top: dict[str, Any]) -> Opening | None:
    """(digest of the opening, user turn) of a chat request's folded body; None for other routes and for a
    chat without a user message. Runs where the body is parsed, so it must stay cheap: one pass, one hash."""
    if flavor in (Flavor.CHAT, Flavor.OPENAI_CHAT):
        messages = top.get("messages")
        return _from_messages([], messages, False) if isinstance(messages, list) else None
    if flavor is Flavor.ANTHROPIC_MESSAGES:
        messages = top.get("messages")
        lead = [["system", top.get("system"), None]] if top.get("system") else []
        return _from_messages(lead, messages, True) if isinstance(messages, list) else None
    if flavor is Flavor.OPENAI_RESPONSES:
        lead = [["system", top.get("instructions"), None]] if top.get("instructions") else []
        inp = top.get("input")
        if isinstance(inp, str):
            return (_digest([*lead, ["user", inp, None]]), 1) if inp else None
        if isinstance(inp, list):
            items = [i for i in inp if isinstance(i, dict) and fold(i).get("role") is not None]
            return _from_messages(lead, items, False)
    return None


class Conversations:
    """The conversation settings and the cold prompt-rate state; ``apply`` is called from ``Capture.build``
    (the writer's worker thread), reads only the record and the parsed facts, and never raises."""

    def __init__(self, *, header: str = "X-Conversation-Id", max_id_chars: int = 128, max_models: int = 256):
        self.header = header
        self.max_id_chars = max_id_chars
        self.max_models = max_models
        self._rates: OrderedDict[str, deque[float]] = OrderedDict()
        self._lock = threading.Lock()

    def conversation_id(
        self, header_value: str | None, opening: Opening | None, user_id: str | None, client: str | None
    ) -> str | None:
        """The client's id when it sent one (cut to ``max_id_chars``), else a hash of the opening messages,
        the user id and the client address (so two callers who both open with "hi" stay apart)."""
        if header_value:
            return header_value[: self.max_id_chars]
        if opening is None:
            return None
        mixed = hashlib.sha256(orjson.dumps([opening[0], user_id, client])).hexdigest()
        return "h" + mixed[:23]

    def cold_rate(self, model: str) -> float | None:
        """The model's median first-turn prompt-evaluation rate (tokens/s), or None before any."""
        with self._lock:
            samples = self._rates.get(model)
            return statistics.median(samples) if samples else None

    def _learn(self, model: str, rate: float) -> None:
        with self._lock:
            samples = self._rates.get(model)
            if samples is None:
                samples = self._rates[model] = deque(maxlen=_RATE_SAMPLES)
                while len(self._rates) > self.max_models:
                    self._rates.popitem(last=False)
            else:
                self._rates.move_to_end(model)
            samples.append(rate)

    def apply(
        self,
        rec: InferenceRecord,
        opening: Opening | None,
        header_value: str | None,
        facts: StreamFacts | None,
    ) -> None:
        """Fill the record's conversation and token-type columns; a bug here costs only these columns."""
        try:
            rec.conversation_id = self.conversation_id(header_value, opening, rec.user_id, rec.client_addr)
            if rec.conversation_id is not None and opening is not None:
                rec.turn = opening[1]
            if facts is not None:
                self._cache(rec, facts)
                token_types(rec, facts)
        except Exception:
            logger.exception("conversations: cannot fill request %s", rec.request_id)

    def _cache(self, rec: InferenceRecord, facts: StreamFacts) -> None:
        count, duration_ns = facts.prompt_eval_count, facts.prompt_eval_duration_ns
        model = rec.model_name
        if not rec.success or model is None or not count or duration_ns is None:
            return
        if rec.turn == 1 and duration_ns >= _MIN_COLD_NS:
            self._learn(model, count / (duration_ns / 1e9))
        rate = self.cold_rate(model)
        if rate is None:
            return
        new = max(1, min(count, round(duration_ns / 1e9 * rate)))
        rec.prompt_new_tokens = new
        rec.prompt_cached_tokens = count - new


def token_types(rec: InferenceRecord, facts: StreamFacts) -> None:
    """Thinking and tool-call tokens of the response, estimated with the token estimator over the text the
    parser collected (tool calls: names and arguments as generated); 0 for a complete response without any,
    NULL when the response is incomplete and has none."""
    known = rec.success and facts.complete
    if facts.thinking_text or known:
        rec.thinking_tokens = estimate_tokens(facts.thinking_text)
    if facts.tool_call_text or known:
        rec.tool_call_tokens = estimate_tokens(facts.tool_call_text)
