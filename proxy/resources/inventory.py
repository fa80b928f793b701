"""The model inventory: what Ollama has installed and loaded, from its own API.

``/api/tags`` (installed models and their digests) and ``/api/show`` (family, parameters, quantization,
context length, template, capabilities) fill ``model_info``; ``/api/ps`` tells what is loaded now. One
task polls, one request at a time: ``/api/ps`` every ``inventory.ps_interval_s``, ``/api/tags`` every
``inventory.tags_interval_s``, and ``/api/tags`` sooner when traffic names a model the inventory does not
know (at most once per ``min_gap_s``; a name Ollama does not have is not asked about again until the next
regular poll). When Ollama is down the task backs off (doubling up to ``backoff_max_s``) and logs one line
per outage. Changes become ``model_events`` rows: ``seen``, ``version`` (digest changed: a new version was
pulled), ``load``, ``unload``, ``removed``.

The writer thread calls ``observe()`` while it builds each record: a dict lookup for the digest
(``model_version``) plus, for an unknown name or a cold load, a hand-off to the loop.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import logging
import time
from collections import deque
from typing import Any

import aiohttp
from aiohttp import web

from proxy.upstream_url import Upstream
from storage.model_names import short_model_name
from storage.records import iso_utc
from storage.resources import ModelEvent, ModelInfo
from storage.tasks import spawn
from storage.writer import Writer

__all__ = ["INVENTORY_KEY", "Inventory", "model_key"]

logger = logging.getLogger(__name__)


def model_key(name: str) -> str:
    """Ollama's short name: ``Llama3.2`` -> ``llama3.2:latest`` (names are case-insensitive)."""
    return short_model_name(name)


class _PollError(Exception):
    """Ollama did not answer a poll usefully (unreachable, timeout, non-2xx, not JSON)."""


def _now() -> str:
    return iso_utc(time.time())


def _str_list(value: Any) -> list[str] | None:
    return [str(v) for v in value] if isinstance(value, list) else None


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


class Inventory:
    """Keeps ``model_info`` current; ``start()``/``stop()`` around its polling task."""

    def __init__(
        self,
        *,
        session: aiohttp.ClientSession,
        upstream: Upstream,
        writer: Writer | None = None,
        ps_interval_s: float = 30.0,
        tags_interval_s: float = 300.0,
        cold_load_ms: float = 250.0,
        min_gap_s: float = 1.0,
        backoff_initial_s: float = 1.0,
        backoff_max_s: float = 60.0,
        timeout_s: float = 5.0,
    ) -> None:
        self.session = session
        self.upstream = upstream
        self.writer = writer
        self.ps_interval_s = ps_interval_s
        self.tags_interval_s = tags_interval_s
        self.cold_load_ms = cold_load_ms
        self.min_gap_s = min_gap_s
        self.backoff_initial_s = backoff_initial_s
        self.backoff_max_s = backoff_max_s
        self.timeout_s = timeout_s
        self.models: dict[str, ModelInfo] = {}
        self.events: deque[ModelEvent] = deque(maxlen=200)
        self._digests: dict[str, str] = {}  # replaced, never mutated: read by the writer thread
        self._asked: dict[str, float] = {}  # writer thread only: unknown name -> when it was last asked
        self._unknown: set[str] = set()  # names traffic used that the inventory did not know
        self._absent: set[str] = set()  # of those, the ones /api/tags did not list either
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake = asyncio.Event()
        self._stopping = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._want_tags = self._want_ps = False
        self._next_tags = self._next_ps = 0.0
        self._last_poll = -1e9
        self._retry_at = 0.0
        self._delay = backoff_initial_s
        self._request_loads: set[str] = set()  # loads seen in traffic since the last /api/ps
        self.reachable: bool | None = None
        self.last_error: str | None = None
        self.requests = 0  # HTTP requests sent to Ollama
        self.failures = 0

    # -- lifecycle -------------------------------------------------------------------------------

    async def start(self, initial_timeout_s: float = 3.0) -> None:
        """Poll once (bounded by ``initial_timeout_s``) so the first requests find their digests, then
        start the polling task."""
        self._loop = asyncio.get_running_loop()
        try:
            await asyncio.wait_for(self._poll(tags=True, ps=True), initial_timeout_s)
        except TimeoutError:
            self._failed(f"the first poll took longer than {initial_timeout_s:g} s")
        self._task = spawn(self._run(), name="model-inventory")

    async def stop(self) -> None:
        self._stopping.set()
        self._wake.set()
        if self._task is not None:
            await self._task
            self._task = None

    # -- from the writer thread ------------------------------------------------------------------

    def observe(
        self, model_name: str, load_duration_ms: float | None, request_id: str, arrival_wall: float
    ) -> str | None:
        """The digest of ``model_name`` (None when unknown: a tags poll is then requested); notes a cold load."""
        key = model_key(model_name)
        digest = self._digests.get(key)
        now = time.monotonic()
        if digest is None and now - self._asked.get(key, -1e9) >= self.min_gap_s:
            self._asked[key] = now
            self._call_soon(self._unknown_name, key)
        if load_duration_ms is not None and load_duration_ms >= self.cold_load_ms:
            self._call_soon(self._cold_load, key, arrival_wall, load_duration_ms, request_id)
        return digest

    def _call_soon(self, fn: Any, *args: Any) -> None:
        loop = self._loop
        if loop is None:
            return
        try:
            loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:  # the loop closed during shutdown: nothing left to refresh
            pass

    # -- on the loop -----------------------------------------------------------------------------

    def refresh_soon(self, tags: bool = False) -> None:
        """Poll ``/api/ps`` (and ``/api/tags`` with ``tags``) as soon as ``min_gap_s`` allows: a model action
        (unload, keep, load, pull) changed what Ollama has loaded or installed."""
        self._want_ps = True
        self._want_tags = self._want_tags or tags
        self._wake.set()

    def _unknown_name(self, key: str) -> None:
        if key not in self._absent and key not in self._digests:
            self._unknown.add(key)
            self._want_tags = True
            self._wake.set()

    def _cold_load(self, key: str, arrival_wall: float, load_ms: float, request_id: str) -> None:
        stamp = iso_utc(arrival_wall + load_ms / 1000.0)
        info = self.models.get(key)
        if info is not None:
            info.loaded, info.loaded_at, info.updated_at = True, stamp, _now()
            self._submit(dataclasses.replace(info))
        self._request_loads.add(key)
        self._event(
            key, "load", info.model_version if info else None, source="request", request_id=request_id,
            detail={"load_duration_ms": round(load_ms, 3)}, timestamp=stamp,
        )  # fmt: skip
        self._want_ps = True
        self._wake.set()

    def _submit(self, record: ModelInfo | ModelEvent) -> None:
        if self.writer is not None:
            self.writer.submit(record)

    def _event(self, key: str, event: str, version: str | None, **fields: Any) -> None:
        fields.setdefault("timestamp", _now())
        ev = ModelEvent(model_name=key, event=event, model_version=version, **fields)
        self.events.append(ev)
        self._submit(ev)

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while not self._stopping.is_set():
            now = loop.time()
            if now >= self._retry_at:
                soon = self._last_poll + self.min_gap_s
                tags = now >= self._next_tags or (self._want_tags and now >= soon)
                ps = now >= self._next_ps or (self._want_ps and now >= soon)
                if tags or ps:
                    await self._poll(tags=tags, ps=ps)
                    continue
            wake_at = min(self._next_tags, self._next_ps)
            if self._want_tags or self._want_ps:
                wake_at = min(wake_at, self._last_poll + self.min_gap_s)
            wake_at = max(wake_at, self._retry_at)
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), max(0.0, wake_at - loop.time()))
            except TimeoutError:
                pass

    async def _poll(self, *, tags: bool, ps: bool) -> None:
        """One round: tags (+ show for new or changed digests), then ps. One request in flight."""
        loop = asyncio.get_running_loop()
        self._last_poll = loop.time()
        try:
            if tags:
                self._want_tags = False
                await self._refresh_tags()
                self._next_tags = loop.time() + self.tags_interval_s
            if ps:
                self._want_ps = False
                await self._refresh_ps()
                self._next_ps = loop.time() + self.ps_interval_s
        except _PollError as exc:
            self._failed(str(exc))
            return
        if self.reachable is False:
            logger.info("model inventory: Ollama at %s answers again", self.upstream)
        self.reachable, self.last_error = True, None
        self._delay = self.backoff_initial_s
        self._retry_at = 0.0

    def _failed(self, reason: str) -> None:
        self.failures += 1
        self.last_error = reason
        if self.reachable is not False:
            logger.warning(
                "model inventory: cannot poll Ollama at %s (%s); retrying with back-off up to %g s",
                self.upstream, reason, self.backoff_max_s,
            )  # fmt: skip
        else:
            logger.debug("model inventory: Ollama still unreachable (%s)", reason)
        self.reachable = False
        loop = asyncio.get_running_loop()
        self._retry_at = loop.time() + self._delay
        self._delay = min(self._delay * 2, self.backoff_max_s)

    async def _call(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        self.requests += 1
        try:
            async with self.session.request(
                method,
                self.upstream.url_for(path, ""),
                json=body,
                headers={"Host": self.upstream.host_header, "User-Agent": "ollamon-inventory"},
                timeout=aiohttp.ClientTimeout(total=self.timeout_s),
            ) as resp:
                if resp.status == 404 and path == "/api/show":
                    return None  # removed between tags and show
                if resp.status >= 300:
                    raise _PollError(f"{method} {path} answered HTTP {resp.status}")
                return await resp.json(content_type=None)
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            raise _PollError(f"{method} {path}: {type(exc).__name__}: {exc}") from exc

    async def _refresh_tags(self) -> None:
        data = await self._call("GET", "/api/tags")
        entries = data.get("models") if isinstance(data, dict) else None
        if not isinstance(entries, list):
            raise _PollError("GET /api/tags: no models list")
        listed: set[str] = set()
        for entry in entries:
            if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
                continue
            key = model_key(entry["name"])
            listed.add(key)
            digest = entry.get("digest") if isinstance(entry.get("digest"), str) else None
            info = self.models.get(key)
            if info is None or info.model_version != digest or not info.installed:
                await self._learn(key, entry, digest, info)
            elif info.modified_at != entry.get("modified_at"):
                info.modified_at, info.updated_at = entry.get("modified_at"), _now()
                self._submit(dataclasses.replace(info))
        for key, info in self.models.items():
            if info.installed and key not in listed:
                info.installed, info.loaded, info.updated_at = False, False, _now()
                self._submit(dataclasses.replace(info))
                self._event(key, "removed", info.model_version, source="tags")
        self._absent = {k for k in self._absent | self._unknown if k not in listed}
        self._unknown.clear()
        self._digests = {
            k: i.model_version for k, i in self.models.items() if i.installed and i.model_version
        }

    async def _learn(
        self, key: str, entry: dict[str, Any], digest: str | None, old: ModelInfo | None
    ) -> None:
        """A new model, a new digest, or a model back: read /api/show and record the change."""
        show = await self._call("POST", "/api/show", {"model": entry["name"]})
        info = _model_info(key, entry, show if isinstance(show, dict) else {}, old)
        self.models[key] = info
        self._submit(dataclasses.replace(info))
        if old is None:
            self._event(key, "seen", digest, source="tags")
        elif old.model_version != digest:
            self._event(key, "version", digest, previous_version=old.model_version, source="tags")
        else:
            self._event(key, "seen", digest, source="tags", detail={"reinstalled": True})

    async def _refresh_ps(self) -> None:
        data = await self._call("GET", "/api/ps")
        entries = data.get("models") if isinstance(data, dict) else None
        if not isinstance(entries, list):
            raise _PollError("GET /api/ps: no models list")
        loaded: dict[str, dict[str, Any]] = {}
        for entry in entries:
            if isinstance(entry, dict) and isinstance(entry.get("name"), str):
                loaded[model_key(entry["name"])] = entry
        if any(k not in self.models for k in loaded):
            self._want_tags = True  # loaded but unknown: learn it on the next round
        stamp = _now()
        for key, info in self.models.items():
            entry = loaded.get(key)
            if entry is not None:
                vram, expires = _int(entry.get("size_vram")), entry.get("expires_at")
                changed = not info.loaded or info.size_vram_bytes != vram or info.expires_at != expires
                if not info.loaded and key not in self._request_loads:
                    info.loaded_at = stamp
                    self._event(key, "load", info.model_version, source="ps")
                info.loaded, info.size_vram_bytes, info.expires_at = True, vram, expires
            else:
                changed = info.loaded
                if info.loaded:
                    self._event(key, "unload", info.model_version, source="ps")
                info.loaded, info.size_vram_bytes, info.expires_at = False, None, None
            if changed:
                info.updated_at = stamp
                self._submit(dataclasses.replace(info))
        self._request_loads.clear()

    # -- reading ---------------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        return {
            "reachable": self.reachable,
            "last_error": self.last_error,
            "models": len(self.models),
            "requests": self.requests,
            "failures": self.failures,
        }


def _model_info(key: str, entry: dict[str, Any], show: dict[str, Any], old: ModelInfo | None) -> ModelInfo:
    details = show.get("details") or entry.get("details") or {}
    meta = show.get("model_info") or {}
    arch = meta.get("general.architecture")
    template = show.get("template")
    stamp = _now()
    return ModelInfo(
        model_name=key,
        updated_at=stamp,
        model_version=entry.get("digest"),
        family=details.get("family"),
        families=_str_list(details.get("families")),
        format=details.get("format"),
        parameter_size=details.get("parameter_size"),
        parameter_count=_int(meta.get("general.parameter_count")),
        quantization_level=details.get("quantization_level"),
        context_length=_int(meta.get(f"{arch}.context_length")) if arch else None,
        embedding_length=_int(meta.get(f"{arch}.embedding_length")) if arch else None,
        capabilities=_str_list(show.get("capabilities")),
        template_hash=hashlib.sha256(template.encode()).hexdigest() if isinstance(template, str) else None,
        size_bytes=_int(entry.get("size")),
        modified_at=entry.get("modified_at"),
        installed=True,
        loaded=old.loaded if old else False,
        size_vram_bytes=old.size_vram_bytes if old else None,
        loaded_at=old.loaded_at if old else None,
        expires_at=old.expires_at if old else None,
        first_seen=old.first_seen if old else stamp,
    )


INVENTORY_KEY = web.AppKey("inventory", Inventory)
