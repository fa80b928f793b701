"""Conversations in the app: ``setup(app)`` switches tracking on in the forwarder and serves
``GET /ollamon/api/conversations`` and ``GET /ollamon/api/conversations/{id}`` (docs/conversations.md).

The ids, turns and cache estimates are computed in ``Capture.build`` (proxy/forward/conversations.py), on
the writer's worker thread; the routes only read the database on a worker thread.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from typing import TypeVar

from aiohttp import web

from proxy.answers import BadParameter, json_error, json_response
from proxy.api.params import check_known, parse_int, parse_model, parse_window
from proxy.forward.conversations import Conversations
from proxy.keys import CONFIG_KEY, FORWARDER_KEY, STORE_KEY
from storage.errors import StorageError
from storage.reads import Reads

__all__ = ["get_conversation", "list_conversations", "setup"]

logger = logging.getLogger(__name__)

T = TypeVar("T")
MAX_LIMIT = 1000
DEFAULT_WINDOW_S = 86400.0
MAX_ID_CHARS = 4096


def _reads(app: web.Application) -> Reads:
    reads: Reads = app[STORE_KEY].reads
    return reads


async def list_conversations(request: web.Request) -> web.Response:
    """``?window=`` (or ``since``/``until``; default 24h), ``?model=``, ``?limit=`` (default 50)."""
    q = request.query
    try:
        check_known(q, ("window", "since", "until", "model", "limit"))
        since, until = parse_window(q, time.time(), DEFAULT_WINDOW_S)
        model = parse_model(q.get("model"))
        limit = parse_int("limit", q.get("limit"), 50, 1, MAX_LIMIT)
    except BadParameter as exc:
        return json_error(400, str(exc))

    try:
        found = await asyncio.to_thread(_reads(request.app).conversations, since, until, model, limit)
        body = {
            "since": since,
            "until": until,
            **found,
            "estimated": ["prompt_cached_tokens", "prompt_new_tokens", "cache_reuse_ratio"],
        }
        return json_response(body)
    except StorageError as exc:
        logger.warning("conversations: database error: %s", exc)
        return json_error(503, f"the database cannot answer now: {exc}")


async def get_conversation(request: web.Request) -> web.Response:
    """One conversation's requests in order, with tokens, cache reuse and latency per turn."""
    if request.query:
        return json_error(400, "bad parameter: this endpoint takes no query parameters")
    conversation_id = request.match_info["id"]
    if len(conversation_id) > MAX_ID_CHARS:
        return json_error(400, f"bad parameter 'id': longer than {MAX_ID_CHARS} characters")
    try:
        found = await asyncio.to_thread(_reads(request.app).conversation, conversation_id)
    except StorageError as exc:
        logger.warning("conversations: database error: %s", exc)
        return json_error(503, f"the database cannot answer now: {exc}")
    if found is None:
        return json_error(404, "no such conversation")
    return json_response(found)


def setup(app: web.Application) -> None:
    """Register the routes; when ``conversations.enabled``, hand the forwarder its tracker."""
    app.router.add_get("/ollamon/api/conversations", list_conversations)
    app.router.add_get("/ollamon/api/conversations/{id}", get_conversation)
    c = app[CONFIG_KEY].conversations
    if not c.enabled:
        return

    async def ctx(app: web.Application) -> AsyncIterator[None]:
        app[FORWARDER_KEY].conversations = Conversations(
            header=c.header, max_id_chars=c.max_id_chars, max_models=c.max_models
        )
        yield

    app.cleanup_ctx.append(ctx)
