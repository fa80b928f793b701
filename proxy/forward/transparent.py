"""The response ollamon writes to the client: exactly the headers it is given, nothing of aiohttp's own.

Ollama's answers carry no ``Server`` header, and an answer without ``Content-Type`` must stay without one,
so relayed answers (proxy/forward/handler.py) and ollamon's merged ones (proxy/forward/routed.py) both use it.
"""

from __future__ import annotations

from aiohttp import web

__all__ = ["TransparentResponse"]


class TransparentResponse(web.StreamResponse):
    """A StreamResponse that adds no headers of its own (no ``Server``, no default ``Content-Type``)."""

    def __init__(self, *, status: int, reason: str | None, headers: object, had_content_type: bool) -> None:
        super().__init__(status=status, reason=reason, headers=headers)  # type: ignore[arg-type]
        self._had_content_type = had_content_type

    async def _prepare_headers(self) -> None:
        await super()._prepare_headers()
        self._headers.popall("Server", None)
        if not self._had_content_type:
            self._headers.popall("Content-Type", None)
