"""Scraping and reading /ollamon/metrics in tests, with prometheus_client's own parser."""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import aiohttp
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

__all__ = ["Scrape", "bucket_counts", "histogram_buckets", "scrape", "scrape_until"]


class Scrape:
    """A parsed exposition: ``families[name]`` is a prometheus_client Metric; helpers filter samples."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.families = {f.name: f for f in text_string_to_metric_families(text)}

    def samples(self, name: str, **labels: str) -> list[Sample]:
        """Samples named exactly ``name`` (e.g. ``x_bucket``) whose labels include ``labels``."""
        out = []
        for family in self.families.values():
            for s in family.samples:
                if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                    out.append(s)
        return out

    def value(self, name: str, **labels: str) -> float:
        """The sum of the matching samples' values (0 when none match)."""
        return sum(s.value for s in self.samples(name, **labels))

    def label_values(self, name: str, label: str) -> set[str]:
        return {s.labels[label] for s in self.samples(name) if label in s.labels}


async def scrape(url: str, headers: Mapping[str, str] | None = None) -> Scrape:
    async with aiohttp.ClientSession() as s, s.get(url, headers=dict(headers or {})) as r:
        assert r.status == 200, (r.status, await r.text())
        assert r.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        return Scrape(await r.text())


def bucket_counts(values: Iterable[float], bounds: Iterable[float]) -> dict[float, float]:
    """Cumulative counts per upper bound (``inf`` included): what the ``_bucket`` samples must say."""
    vals = list(values)
    out = {float(b): float(sum(1 for v in vals if v <= b)) for b in bounds}
    out[math.inf] = float(len(vals))
    return out


def histogram_buckets(sc: Scrape, name: str, **labels: Any) -> dict[float, float]:
    """The ``_bucket`` samples of one label set, keyed by their ``le`` as a float."""
    return {float(s.labels["le"]): s.value for s in sc.samples(f"{name}_bucket", **labels)}


async def scrape_until(
    url: str,
    predicate: Callable[[Scrape], bool],
    headers: Mapping[str, str] | None = None,
    within: float = 10.0,
) -> Scrape:
    """Scrape until ``predicate`` holds (the export sees a batch just after SQLite commits it)."""
    deadline = time.monotonic() + within
    while True:
        sc = await scrape(url, headers)
        if predicate(sc):
            return sc
        if time.monotonic() > deadline:
            ours = "\n".join(line for line in sc.text.splitlines() if line.startswith("ollamon_"))
            raise AssertionError(f"scrape of {url}: not in the expected state within {within:g} s:\n{ours}")
        await asyncio.sleep(0.02)
