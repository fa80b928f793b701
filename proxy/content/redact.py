"""Redaction: the text with every PII span replaced by its kind (``<EMAIL>``, ``<CARD>``, ...)."""

from __future__ import annotations

from proxy.content.pii import find

__all__ = ["redact"]


def redact(text: str) -> str:
    """``text`` with each span ``find`` reports replaced by ``<KIND>``; the rest unchanged."""
    spans = find(text)
    if not spans:
        return text
    parts: list[str] = []
    at = 0
    for span in spans:
        parts.append(text[at : span.start])
        parts.append(f"<{span.kind.upper()}>")
        at = span.end
    parts.append(text[at:])
    return "".join(parts)
