"""The emulator as a guard model: ``llama-guard3`` and ``shieldgemma`` answer with a verdict, not text.

A chat to a model whose name starts with ``llama-guard`` answers as Llama Guard 3 does: ``safe``, or
``unsafe`` and on the next line the hazard categories (``unsafe\\nS1,S10``). A model whose name starts
with ``shieldgemma`` answers ``Yes`` (violates the policy) or ``No``. The verdict is scripted by a marker
in the messages judged: ``[unsafe]`` (category S1) or ``[unsafe:S1,S10]``; without one the answer is safe.
Tests serve such a model by adding a ``ModelSpec`` with that name to the emulator's catalogue.
"""

from __future__ import annotations

import re
from typing import Any

__all__ = ["MARKER", "apply_guard", "guard_reply"]

MARKER = re.compile(r"\[unsafe(?::(S\d{1,2}(?:,S\d{1,2})*))?\]")


def guard_reply(model: str, messages: list[dict[str, Any]]) -> list[str] | None:
    """The verdict's tokens for a guard ``model``, or None when ``model`` is not a guard model."""
    name = model.lower()
    text = "\n".join(str(m.get("content") or "") for m in messages)
    found = MARKER.search(text)
    if name.startswith("llama-guard"):
        if found is None:
            return ["safe"]
        return ["unsafe", "\n", found.group(1) or "S1"]
    if name.startswith("shieldgemma"):
        return ["Yes" if found is not None else "No"]
    return None


def apply_guard(plan: Any, messages: list[dict[str, Any]]) -> None:
    """Script ``plan`` (engine.Plan) to answer the verdict when its model is a guard model."""
    script = guard_reply(plan.model, messages)
    if script is None:
        return
    plan.tokens = len(script)
    plan.think_tokens = 0
    plan.done_reason = "stop"
    plan.extra["script"] = script
