"""The Prometheus series read at scrape time from ollamon's in-memory state (a custom collector).

Live requests per model (``proxy.forward.live``), the writer's queue and counters, whether Redis, the
upstream and the database are up, the alert rules' states and the sampler's latest reading. Every value
comes from memory; the upstream's comes from the shared probe's cached ``GET /`` (the handler refreshes
it before collecting, bounded at 2 s), never from SQLite.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from typing import Any

from aiohttp import web

from alerts.engine import AlertEngine
from proxy.exports.prom_records import ModelCap
from proxy.exports.prom_text import ScrapeFamily, escape_label, label_pairs
from proxy.forward.live import live_by_model
from proxy.keys import CONFIG_KEY, ENGINE_KEY, FORWARDER_KEY, REDIS_KEY, WRITER_KEY
from proxy.resources.inventory import INVENTORY_KEY, model_key
from proxy.resources.sampler import SAMPLER_KEY

__all__ = ["StateCollector", "find_engine"]

logger = logging.getLogger(__name__)

_LIVE = (
    ("in_flight", "Inference requests between handler entry and the last byte to the client."),
    ("generating", "In-flight requests that have sent their first content event."),
    ("waiting", "In-flight requests with no content event yet (queued, loading or evaluating the prompt)."),
    ("loading", "Waiting requests for a model the inventory says is not loaded."),
    ("queued", "Waiting requests beyond the model's free parallel slots (needs inventory.num_parallel)."),
)
_MIB = float(1 << 20)
# (series, GpuSample field, scale to the base unit, help): the vocabulary's stems in Prometheus base units.
_GPU = (
    ("utilization_percent", "utilization_percent", 1.0, "GPU utilization (NVML utilization_percent)."),
    ("memory_used_bytes", "memory_used_mb", _MIB, "GPU memory used as nvidia-smi shows it (memory_used_mb)."),
    ("memory_total_bytes", "memory_total_mb", _MIB, "GPU memory total (memory_total_mb)."),
    ("temperature_celsius", "temperature_c", 1.0, "GPU temperature (temperature_c)."),
    ("power_watts", "power_w", 1.0, "GPU power draw (power_w)."),
)
_SYSTEM = (
    ("cpu_percent", "Host CPU busy, percent of all cores."),
    ("memory_percent", "Host memory used, percent."),
    ("disk_percent", "Disk used on the database's volume, percent."),
)
_STATE_RANK = {"pending": 1, "firing": 2}


def find_engine(app: web.Application) -> AlertEngine | None:
    """The alert engine, when alerts are on."""
    return app.get(ENGINE_KEY)


class StateCollector:
    """Builds the scrape-time families for ``app``; ``upstream`` is the probe's latest verdict."""

    def __init__(self, app: web.Application, models: ModelCap) -> None:
        self.app = app
        self.models = models
        self.upstream: bool | None = None
        self.errors = 0

    def render(self, openmetrics: bool) -> bytes:
        return "".join(f.render(openmetrics) for f in self.collect()).encode()

    def collect(self) -> Iterator[ScrapeFamily]:
        parts: tuple[Callable[[], Iterator[ScrapeFamily]], ...] = (
            self._live,
            self._writer,
            self._up,
            self._alerts,
            self._sampler,
        )
        for part in parts:
            try:
                yield from list(part())
            except Exception:  # one broken source must not take the whole scrape down
                self.errors += 1
                if self.errors == 1:
                    logger.exception("prometheus: a scrape-time source failed; its series are left out")

    def _live(self) -> Iterator[ScrapeFamily]:
        forwarder = self.app.get(FORWARDER_KEY)
        if forwarder is None:
            return
        inventory = self.app.get(INVENTORY_KEY)
        loaded: Callable[[str], bool | None] | None = None
        if inventory is not None:
            known = inventory.models

            def loaded(model: str) -> bool | None:
                info = known.get(model_key(model))
                return None if info is None else bool(info.loaded)

        num_parallel = self.app[CONFIG_KEY].inventory.num_parallel
        per_model = live_by_model(forwarder.live, loaded=loaded, num_parallel=num_parallel)
        sums: dict[str, list[int]] = {}
        for model, live in per_model.items():
            acc = sums.setdefault(self.models.label(model), [0, 0, 0, 0, 0])
            acc[0] += live.in_flight
            acc[1] += live.generating
            acc[2] += live.waiting
            acc[3] += live.loading
            acc[4] += live.queued
        families = [ScrapeFamily(f"ollamon_{name}", doc) for name, doc in _LIVE]
        for label, acc in sums.items():
            labels = f'model="{escape_label(label)}"'
            for family, value in zip(families, acc, strict=True):
                family.add(value, labels)
        yield from families
        total = ScrapeFamily(
            "ollamon_in_flight_all", "Every request being forwarded now, instrumented or not."
        )
        total.add(forwarder.in_flight)
        yield total

    def _writer(self) -> Iterator[ScrapeFamily]:
        writer = self.app.get(WRITER_KEY)
        if writer is None:
            return
        depth = ScrapeFamily("ollamon_writer_queue_depth", "Records waiting in the writer's queue.")
        depth.add(int(writer.stats()["queue_depth"]))
        yield depth
        written = ScrapeFamily("ollamon_records_written", "Records committed to the store.", "counter")
        written.add(writer.written)
        yield written
        dropped = ScrapeFamily(
            "ollamon_records_dropped",
            "Records dropped because the writer's queue was full (records_dropped).",
            "counter",
        )
        dropped.add(writer.dropped)
        yield dropped

    def _up(self) -> Iterator[ScrapeFamily]:
        writer = self.app.get(WRITER_KEY)
        if writer is not None:
            db = ScrapeFamily(
                "ollamon_database_up", "1 while the writer's commits succeed (0 during a write outage)."
            )
            db.add(0 if writer.outage.failing else 1)
            yield db
        if self.upstream is not None:
            up = ScrapeFamily(
                "ollamon_upstream_up", "1 when GET / on Ollama answers below 500 (the upstream_down probe)."
            )
            up.add(1 if self.upstream else 0)
            yield up
        view = self.app.get(REDIS_KEY)
        if view is not None:
            redis = ScrapeFamily("ollamon_redis_up", "1 when the Redis view is applying batches.")
            redis.add(1 if view.status() == "ok" else 0)
            yield redis

    def _alerts(self) -> Iterator[ScrapeFamily]:
        engine = find_engine(self.app)
        if engine is None:
            return
        state = ScrapeFamily(
            "ollamon_alert_state",
            "Worst state of the rule over its label sets: 0 inactive, 1 pending, 2 firing.",
        )
        instances = ScrapeFamily("ollamon_alerts", "Open alerts of the rule, by state.")
        counts: dict[tuple[str, str], int] = {}
        for (rule_name, _), alert in engine.alerts.items():
            if alert.state in _STATE_RANK:
                counts[(rule_name, alert.state)] = counts.get((rule_name, alert.state), 0) + 1
        for rule in engine.spec.rules:
            worst = max(
                (_STATE_RANK[s] for s in _STATE_RANK if counts.get((rule.name, s))),
                default=0,
            )
            state.add(worst, label_pairs(("rule", "severity"), (rule.name, rule.severity)))
            for s in _STATE_RANK:
                instances.add(counts.get((rule.name, s), 0), label_pairs(("rule", "state"), (rule.name, s)))
        yield state
        yield instances

    def _sampler(self) -> Iterator[ScrapeFamily]:
        sampler = self.app.get(SAMPLER_KEY)
        snap = sampler.latest if sampler is not None else None
        if snap is None:
            return
        for attr, doc in _SYSTEM:
            value = getattr(snap.system, attr)
            if value is not None:
                g = ScrapeFamily(f"ollamon_{attr}", doc)
                g.add(float(value))
                yield g
        if not snap.gpus:
            return
        for series, attr, scale, doc in _GPU:
            g = ScrapeFamily(f"ollamon_gpu_{series}", doc)
            for gpu in snap.gpus:
                reading: Any = getattr(gpu, attr)
                if reading is not None:
                    g.add(float(reading) * scale, f'gpu="{gpu.gpu_index}"')
            yield g
