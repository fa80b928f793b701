"""The ``Emulator`` object: installed models, blobs, the scheduler and the ground-truth log.

It lives in the aiohttp app under ``EMULATOR_KEY`` so handlers and in-process tests share one instance.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import re

from aiohttp import web

from storage.model_names import short_model_name

from .config import EmulatorConfig, ModelSpec
from .groundtruth import GroundTruthLog, LogEntry
from .scheduler import Scheduler

__all__ = ["EMULATOR_KEY", "Emulator", "normalize_name", "valid_name"]

_NAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-/]*(:[A-Za-z0-9_][A-Za-z0-9_.\-]*)?$")


def valid_name(name: str) -> bool:
    """Whether Ollama's name parser would accept ``name`` (an approximation of ``model.ParseName``)."""
    return bool(_NAME_RE.match(name)) and len(name) <= 350


def normalize_name(name: str) -> str:
    """``llama3.2`` -> ``llama3.2:latest``; the default registry and namespace are dropped."""
    return short_model_name(name)


class Emulator:
    """Everything one emulator instance knows; see ``proxy.emulator`` for how tests use it."""

    def __init__(self, config: EmulatorConfig) -> None:
        self.config = config
        self.catalogue: dict[str, ModelSpec] = {
            normalize_name(m.name): dataclasses.replace(m, name=normalize_name(m.name)) for m in config.models
        }
        self.installed: dict[str, ModelSpec] = dict(self.catalogue)
        now = _dt.datetime.now().astimezone()
        self.modified_at: dict[str, _dt.datetime] = {
            name: now - _dt.timedelta(days=index + 1) for index, name in enumerate(self.installed)
        }
        self.blobs: dict[str, int] = {}
        self.scheduler = Scheduler(config)
        for spec in self.installed.values():
            self.scheduler.add(spec)
        self.ground_truth = GroundTruthLog(config.log_size)

    @property
    def log(self) -> list[LogEntry]:
        """Ground-truth entries, oldest first (a copy; entries themselves are live)."""
        return self.ground_truth.entries

    def entry(self, request_id: str) -> LogEntry:
        """The newest entry with this request id; ``KeyError`` if none."""
        for item in reversed(self.ground_truth.entries):
            if item.request_id == request_id:
                return item
        raise KeyError(request_id)

    def inference_entries(self) -> list[LogEntry]:
        """Entries that reached generation or embedding (not load/unload calls, not rejected requests)."""
        return [e for e in self.log if e.prompt_eval_count is not None]

    async def wait_idle(self) -> None:
        """Return once no request is in flight (handlers' ``finally`` blocks have all run)."""
        await self.ground_truth.wait_idle()

    def reset(self, unload: bool = True) -> None:
        """Clear the log; with ``unload``, models go back to their start state too."""
        self.ground_truth.clear()
        if unload:
            self.scheduler.reset()

    def resolve(self, name: str) -> ModelSpec | None:
        """The installed model ``name`` refers to, or ``None``."""
        return self.installed.get(normalize_name(name))

    def install(self, name: str, spec: ModelSpec) -> ModelSpec:
        """Install ``spec`` under ``name`` (pull, copy, create)."""
        full = normalize_name(name)
        spec = dataclasses.replace(spec, name=full)
        self.installed[full] = spec
        self.modified_at[full] = _dt.datetime.now().astimezone()
        self.scheduler.remove(full)
        self.scheduler.add(spec)
        return spec

    def uninstall(self, name: str) -> bool:
        full = normalize_name(name)
        if full not in self.installed:
            return False
        del self.installed[full]
        self.scheduler.unload(full)
        self.scheduler.remove(full)
        return True


EMULATOR_KEY = web.AppKey("emulator", Emulator)
