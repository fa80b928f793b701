"""The fast families of proxy/exports/prom_text.py, read back with prometheus_client's own parsers."""

from __future__ import annotations

import math

from prometheus_client.openmetrics.parser import text_string_to_metric_families as parse_openmetrics
from prometheus_client.parser import text_string_to_metric_families as parse_text

from proxy.exports.prom_text import CounterFamily, HistogramFamily, ScrapeFamily, label_pairs


def _text(*families: CounterFamily | HistogramFamily, openmetrics: bool = False) -> str:
    body = b"".join(part for f in families for part in f.render(openmetrics)).decode()
    return body + "# EOF\n" if openmetrics else body


def test_histogram_buckets_edges_and_cache_invalidation() -> None:
    h = HistogramFamily("x_seconds", "doc", ["m"], [0.1, 1.0, 10.0], unit="seconds")
    for v in (0.1, 0.5, 1.0, 20.0, -3.0):  # a value on a bound belongs to that bucket; negatives count as 0
        h.observe(("a",), v)
    first = _text(h)
    (family,) = parse_text(first)
    buckets = {float(s.labels["le"]): s.value for s in family.samples if s.name == "x_seconds_bucket"}
    assert buckets == {0.1: 2.0, 1.0: 4.0, 10.0: 4.0, math.inf: 5.0}
    assert _text(h) == first  # nothing changed: the cached lines
    h.observe(("a",), 5.0)
    h.observe(("b",), 0.01)
    (family,) = parse_text(_text(h))
    counts = {s.labels["m"]: s.value for s in family.samples if s.name == "x_seconds_count"}
    sums = {s.labels["m"]: s.value for s in family.samples if s.name == "x_seconds_sum"}
    assert counts == {"a": 6.0, "b": 1.0}
    assert sums == {"a": 0.1 + 0.5 + 1.0 + 20.0 + 5.0, "b": 0.01}
    (om,) = parse_openmetrics(_text(h, openmetrics=True))
    assert om.type == "histogram" and om.unit == "seconds"


def test_counters_and_hostile_labels_in_both_formats() -> None:
    c = CounterFamily("y", "a doc with \\ and\nnewline", ["model"])
    hostile = 'a"b\\c\nd}{'
    c.inc((hostile,))
    c.inc((hostile,), 2.5)
    c.inc(("plain",))
    for openmetrics, parse in ((False, parse_text), (True, parse_openmetrics)):
        (family,) = parse(_text(c, openmetrics=openmetrics))
        assert family.type == "counter" and family.name == "y"
        values = {s.labels["model"]: s.value for s in family.samples if s.name == "y_total"}
        assert values == {hostile: 3.5, "plain": 1.0}


def test_scrape_families() -> None:
    g = ScrapeFamily("g", "gauge doc")
    g.add(3, label_pairs(["k"], ['v"']))
    g.add(0.5)
    n = ScrapeFamily("n", "counter doc", "counter")
    n.add(7)
    text = g.render(False) + n.render(False)
    fams = {f.name: f for f in parse_text(text)}
    assert [(s.labels, s.value) for s in fams["g"].samples] == [({"k": 'v"'}, 3.0), ({}, 0.5)]
    assert fams["n"].type == "counter" and fams["n"].samples[0].value == 7.0
    om = {f.name: f for f in parse_openmetrics(g.render(True) + n.render(True) + "# EOF\n")}
    assert om["n"].samples[0].name == "n_total"
