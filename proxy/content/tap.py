"""What the request path's record builder does for content analysis (``Capture.build``, writer thread).

``ContentTap.apply`` hands the analyzer the record's text in memory only (``content_text``, never a
column) and, with ``redact``, replaces PII in the text that ``storage.store_text`` will store, before
the record reaches the writer's batch: the secret never touches the database file or its WAL.
"""

from __future__ import annotations

from dataclasses import dataclass

from proxy.content.redact import redact as redact_text
from storage.records import InferenceRecord

__all__ = ["ContentTap"]


@dataclass(frozen=True, slots=True)
class ContentTap:
    """Set on the Forwarder by proxy/api/content.py when ``content.enabled``."""

    redact: bool = False

    def apply(self, rec: InferenceRecord, prompt: str | None, response: str | None) -> None:
        """Attach the text for the analyzer; redact the stored copies when asked."""
        rec.content_text = (prompt, response)
        if self.redact:
            if rec.prompt_text:
                rec.prompt_text = redact_text(rec.prompt_text)
            if rec.response_text:
                rec.response_text = redact_text(rec.response_text)
