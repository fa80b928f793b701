"""Model loads, keep-alive and parallel slots, with real waits, shaped like Ollama's ``server/sched.go``.

* A request for a loaded model (and no forced reload) is scheduled at once, bypassing the load queue; it
  then waits on the model's slot semaphore, which has no depth limit (ollama/ollama#7758).
* A request that needs a load joins the pending queue; more than ``max_queue`` waiting gives 503. Loads
  are serialised across all models (one ``asyncio.Lock``), so a load of B waits for a load of A.
* Keep-alive is applied when a request finishes; expiry is lazy (checked whenever the state is read).
"""

from __future__ import annotations

import asyncio
import datetime as _dt
import logging
import time
from dataclasses import dataclass, field

from .config import EmulatorConfig, ModelSpec

__all__ = ["FOREVER_S", "LoadedView", "ModelRuntime", "QueueFullError", "Scheduler"]

logger = logging.getLogger(__name__)

FOREVER_S = 290 * 365 * 24 * 3600.0  # Go's time.Now().Add(math.MaxInt64) is ~292 years ahead


class QueueFullError(Exception):
    """The pending-load queue is full (Ollama's ErrMaxQueue)."""


@dataclass(slots=True)
class ModelRuntime:
    """The scheduler's state for one model."""

    spec: ModelSpec
    slots: asyncio.Semaphore
    num_parallel: int
    loaded: bool = False
    refs: int = 0
    keep_alive_s: float = 300.0
    expires_mono: float | None = None
    expires_wall: _dt.datetime | None = None
    unload_when_idle: bool = False
    loads: int = field(default=0)
    # The prompts (as (fingerprint, tokens) parts) whose KV state the slots hold; see config ``prompt_rate``.
    prefix_cache: list[tuple[tuple[str, int], ...]] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class LoadedView:
    """A loaded model as ``/api/ps`` shows it."""

    spec: ModelSpec
    expires_at: _dt.datetime


class Scheduler:
    """Owns every model's load state and slots; handlers call ``schedule`` then ``slot`` then ``release``."""

    def __init__(self, config: EmulatorConfig) -> None:
        self._config = config
        self._load_lock = asyncio.Lock()
        self._pending = 0
        self._models: dict[str, ModelRuntime] = {}

    def add(self, spec: ModelSpec) -> ModelRuntime:
        """Track ``spec`` under ``spec.name`` (callers pass normalised names)."""
        parallel = 1 if spec.is_embedding else (spec.num_parallel or self._config.num_parallel)
        runtime = ModelRuntime(spec=spec, slots=asyncio.Semaphore(parallel), num_parallel=parallel)
        if self._config.start_loaded:
            self._mark_loaded(runtime, self._config.keep_alive_s)
        self._models[spec.name] = runtime
        return runtime

    def remove(self, name: str) -> None:
        self._models.pop(name, None)

    def runtime(self, name: str) -> ModelRuntime:
        return self._models[name]

    @property
    def pending(self) -> int:
        """Requests waiting for a model load right now."""
        return self._pending

    def reset(self) -> None:
        """Put every model back in its start state (loaded or not, per config)."""
        for runtime in self._models.values():
            runtime.loaded = False
            runtime.expires_mono = None
            runtime.expires_wall = None
            runtime.unload_when_idle = False
            if self._config.start_loaded:
                self._mark_loaded(runtime, self._config.keep_alive_s)

    def _mark_loaded(self, runtime: ModelRuntime, keep_alive_s: float) -> None:
        runtime.loaded = True
        runtime.loads += 1
        runtime.prefix_cache.clear()
        self._set_expiry(runtime, keep_alive_s)

    @staticmethod
    def _set_expiry(runtime: ModelRuntime, keep_alive_s: float) -> None:
        runtime.keep_alive_s = keep_alive_s
        seconds = FOREVER_S if keep_alive_s < 0 else keep_alive_s
        runtime.expires_mono = time.monotonic() + seconds
        runtime.expires_wall = _dt.datetime.now().astimezone() + _dt.timedelta(seconds=seconds)

    def _expire(self) -> None:
        now = time.monotonic()
        for runtime in self._models.values():
            if (
                runtime.loaded
                and runtime.refs == 0
                and runtime.expires_mono is not None
                and runtime.expires_mono <= now
            ):
                logger.debug("model %s expired", runtime.spec.name)
                runtime.loaded = False

    def is_loaded(self, name: str) -> bool:
        self._expire()
        runtime = self._models.get(name)
        return runtime is not None and runtime.loaded

    async def schedule(self, name: str, keep_alive_s: float, force_load_s: float | None = None) -> None:
        """Return once ``name`` is loaded and referenced by this request (the ``checkpointLoaded`` point)."""
        self._expire()
        runtime = self._models[name]
        if runtime.loaded and force_load_s is None:
            runtime.refs += 1
            self._set_expiry(runtime, keep_alive_s)
            return
        if self._pending >= self._config.max_queue:
            raise QueueFullError
        self._pending += 1
        try:
            async with self._load_lock:
                if not runtime.loaded or force_load_s is not None:
                    delay = force_load_s
                    if delay is None:
                        delay = (
                            runtime.spec.load_s if runtime.spec.load_s is not None else self._config.load_s
                        )
                    runtime.loaded = False
                    await asyncio.sleep(delay)
                    self._mark_loaded(runtime, keep_alive_s)
        finally:
            self._pending -= 1
        runtime.refs += 1
        self._set_expiry(runtime, keep_alive_s)

    def release(self, name: str, keep_alive_s: float) -> None:
        """Drop this request's reference; start its keep-alive (0: unload now if nobody else uses it)."""
        runtime = self._models.get(name)
        if runtime is None:
            return
        runtime.refs = max(0, runtime.refs - 1)
        self._set_expiry(runtime, keep_alive_s)
        if runtime.refs == 0 and (keep_alive_s == 0 or runtime.unload_when_idle):
            runtime.loaded = False
            runtime.unload_when_idle = False

    def unload(self, name: str) -> None:
        """Unload now, or as soon as the requests using it finish (``keep_alive: 0`` with no prompt)."""
        runtime = self._models.get(name)
        if runtime is None:
            return
        if runtime.refs == 0:
            runtime.loaded = False
        else:
            runtime.unload_when_idle = True

    def loaded_models(self) -> list[LoadedView]:
        """Loaded models sorted by expiry, latest first (``/api/ps`` order)."""
        self._expire()
        views = [
            LoadedView(spec=r.spec, expires_at=r.expires_wall or _dt.datetime.now().astimezone())
            for r in self._models.values()
            if r.loaded
        ]
        return sorted(views, key=lambda view: view.expires_at, reverse=True)
