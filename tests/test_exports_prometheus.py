"""GET /ollamon/metrics after real traffic through the proxy (emulator upstream): every count, sum and bucket
is checked against the rows the same requests left in SQLite, parsed with prometheus_client's own parser."""

from __future__ import annotations

import logging
import math
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import aiohttp
import pytest

from proxy.exports.prom_records import (
    DURATION_BUCKETS,
    LOAD_BUCKETS,
    OPERATION_NAMES,
    QUEUE_BUCKETS,
    TOKEN_BUCKETS,
    TPOT_BUCKETS,
    TTFT_BUCKETS,
    status_class,
)
from proxy.forward.streams import INSTRUMENTED
from tests.fixtures.proxy import MakeProxy, ProxyHandle
from tests.polling import until
from tests.prom_helpers import Scrape, bucket_counts, histogram_buckets, scrape, scrape_until

# (path, body, X-Emulate): known traffic of every kind the export distinguishes.
TRAFFIC: list[tuple[str, dict[str, Any], str]] = [
    ("/api/generate", {"model": "llama3.2", "prompt": "one"}, "tokens=5;interval_ms=4"),
    ("/api/generate", {"model": "llama3.2", "prompt": "two"}, "tokens=8;interval_ms=4"),
    ("/api/generate", {"model": "llama3.2", "prompt": "three"}, "tokens=12;interval_ms=4"),
    ("/api/chat", {"model": "qwen3:0.6b", "messages": [{"role": "user", "content": "hi"}], "stream": False}, "tokens=6"),
    ("/v1/chat/completions", {"model": "llama3.2", "messages": [{"role": "user", "content": "x"}], "stream": True}, "tokens=4"),
    ("/api/embed", {"model": "all-minilm", "input": ["a", "b"]}, ""),
    ("/api/generate", {"model": "missing-model", "prompt": "x"}, "error_status=404;error_message=model 'missing-model' not found"),
    ("/api/generate", {"model": "llama3.2", "prompt": "boom"}, "tokens=9;error_after=3"),
]  # fmt: skip


async def _send(proxy: ProxyHandle, traffic: list[tuple[str, dict[str, Any], str]]) -> None:
    async with aiohttp.ClientSession() as s:
        for path, body, emulate in traffic:
            headers = {"X-Emulate": emulate} if emulate else {}
            async with s.post(proxy.url + path, json=body, headers=headers) as r:
                await r.read()


def _error_types(proxy: ProxyHandle) -> dict[str, str]:
    return {e["request_id"]: e["error_type"] for e in proxy.rows("error_metrics")}


def _row_error_type(row: dict[str, Any], errors: dict[str, str]) -> str:
    if row["success"]:
        return ""
    if row["cancelled"]:
        return "cancelled"
    return errors.get(row["request_id"], "_OTHER")


def _check_histogram(
    sc: Scrape,
    name: str,
    bounds: tuple[float, ...],
    groups: dict[tuple[tuple[str, str], ...], list[float]],
) -> None:
    """Each label set's _count, _sum and cumulative buckets equal what its values say; no other sets."""
    assert groups, f"{name}: the traffic should have produced values"
    for key, values in groups.items():
        labels = dict(key)
        assert sc.value(f"{name}_count", **labels) == len(values), (name, labels)
        assert sc.value(f"{name}_sum", **labels) == pytest.approx(sum(values), rel=1e-9, abs=1e-12)
        assert histogram_buckets(sc, name, **labels) == bucket_counts(values, bounds), (name, labels)
    exported = sum(s.value for s in sc.samples(f"{name}_count"))
    assert exported == sum(len(v) for v in groups.values()), f"{name}: series the records do not explain"


def _group(
    rows: list[dict[str, Any]],
    labels: Callable[[dict[str, Any]], dict[str, str] | None],
    value: Callable[[dict[str, Any]], float | None],
) -> dict[tuple[tuple[str, str], ...], list[float]]:
    out: dict[tuple[tuple[str, str], ...], list[float]] = defaultdict(list)
    for row in rows:
        lab, v = labels(row), value(row)
        if lab is not None and v is not None:
            out[tuple(sorted(lab.items()))].append(v)
    return out


def _s(ms: float | None) -> float | None:
    return None if ms is None else ms / 1000.0


def _gen_ai(row: dict[str, Any]) -> dict[str, str]:
    return {
        "gen_ai_operation_name": OPERATION_NAMES[row["endpoint"]],
        "gen_ai_provider_name": "ollama",
        "gen_ai_request_model": row["model_name"],
    }


async def test_scrape_matches_the_stored_records(emulator: Any, make_proxy: MakeProxy) -> None:
    proxy = await make_proxy(emulator.url)
    await _send(proxy, TRAFFIC)
    rows = await proxy.wait_rows(len(TRAFFIC))
    sc = await scrape_until(
        f"{proxy.url}/ollamon/metrics", lambda sc: sc.value("ollamon_requests_total") >= len(TRAFFIC)
    )
    assert sc.value("ollamon_requests_total") == len(TRAFFIC)
    errors = _error_types(proxy)
    assert {_row_error_type(r, errors) for r in rows} == {"", "upstream_status", "stream_error"}

    # Counters by (model, endpoint, status class), failed by error type.
    by_status: dict[tuple[str, str, str], int] = defaultdict(int)
    for r in rows:
        by_status[(r["model_name"], r["endpoint"], status_class(r["status_code"]))] += 1
    for (model, endpoint, cls), n in by_status.items():
        assert sc.value("ollamon_requests_total", model=model, endpoint=endpoint, status_class=cls) == n
    assert sc.value("ollamon_requests_total", status_class="4xx") == 1
    failed = [r for r in rows if not r["success"] and not r["cancelled"]]
    assert sc.value("ollamon_failed_total") == len(failed) == 2
    assert sc.value("ollamon_failed_total", model="missing-model:latest", error_type="upstream_status") == 1
    assert sc.value("ollamon_failed_total", model="llama3.2:latest", error_type="stream_error") == 1
    assert sc.value("ollamon_cancelled_total") == 0

    def with_error(row: dict[str, Any]) -> dict[str, str]:
        return {**_gen_ai(row), "error_type": _row_error_type(row, errors)}

    _check_histogram(
        sc,
        "gen_ai_client_operation_duration_seconds",
        DURATION_BUCKETS,
        _group(rows, with_error, lambda r: r["response_time_ms"] / 1000.0),
    )
    # The 404 carries its error type on the duration histogram.
    assert (
        sc.value(
            "gen_ai_client_operation_duration_seconds_count",
            gen_ai_request_model="missing-model:latest",
            error_type="upstream_status",
        )
        == 1
    )

    def tokens(kind: str, column: str) -> dict[tuple[tuple[str, str], ...], list[float]]:
        def labels(row: dict[str, Any]) -> dict[str, str] | None:
            if kind == "output" and OPERATION_NAMES[row["endpoint"]] == "embeddings":
                return None
            return {**_gen_ai(row), "gen_ai_token_type": kind}

        return _group(rows, labels, lambda r: None if r[column] is None else float(r[column]))

    token_groups = {**tokens("input", "prompt_tokens"), **tokens("output", "completion_tokens")}
    _check_histogram(sc, "gen_ai_client_token_usage", TOKEN_BUCKETS, token_groups)
    assert sc.value("gen_ai_client_token_usage_sum", gen_ai_token_type="output") == sum(
        r["completion_tokens"] for r in rows if r["completion_tokens"] and r["endpoint"] != "/api/embed"
    )

    ok = [r for r in rows if r["success"]]
    _check_histogram(
        sc,
        "gen_ai_server_time_to_first_token_seconds",
        TTFT_BUCKETS,
        _group(ok, _gen_ai, lambda r: None if r["ttft_ms"] is None else r["ttft_ms"] / 1000.0),
    )

    def tpot(row: dict[str, Any]) -> float | None:
        n = row["completion_tokens"]
        if row["ttft_ms"] is None or n is None or n < 2:
            return None
        return max(0.0, row["response_time_ms"] - row["ttft_ms"]) / (n - 1) / 1000.0

    _check_histogram(
        sc, "gen_ai_server_time_per_output_token_seconds", TPOT_BUCKETS, _group(ok, _gen_ai, tpot)
    )

    def model(row: dict[str, Any]) -> dict[str, str]:
        return {"model": row["model_name"]}

    _check_histogram(
        sc, "ollamon_queue_time_seconds", QUEUE_BUCKETS, _group(rows, model, lambda r: _s(r["queue_time_ms"]))
    )
    _check_histogram(
        sc,
        "ollamon_load_duration_seconds",
        LOAD_BUCKETS,
        _group(rows, model, lambda r: _s(r["load_duration_ms"])),
    )
    assert sc.value("ollamon_records_written_total") >= len(TRAFFIC)
    assert sc.value("ollamon_records_dropped_total") == 0
    assert sc.value("ollamon_database_up") == 1
    assert sc.value("ollamon_upstream_up") == 1
    assert sc.samples("ollamon_writer_queue_depth")
    assert not sc.samples("ollamon_redis_up")  # Redis is off here: no series rather than a false 0


def test_every_instrumented_route_has_an_operation_name() -> None:
    assert set(OPERATION_NAMES) == set(INSTRUMENTED)
    assert set(OPERATION_NAMES.values()) <= {"chat", "text_completion", "embeddings", "transcription"}


async def test_openmetrics_when_asked(emulator: Any, make_proxy: MakeProxy) -> None:
    from prometheus_client.openmetrics.parser import text_string_to_metric_families as parse_om

    from proxy.exports.prometheus import PROMETHEUS_KEY
    from storage.records import InferenceRecord

    proxy = await make_proxy(emulator.url)
    await _send(proxy, TRAFFIC[:1])
    await proxy.wait_rows(1)
    hostile = 'm\\"x\n{le="1"} 99'
    proxy.app[PROMETHEUS_KEY].records.offer(
        [
            InferenceRecord(
                "2026-01-01T00:00:00.000Z", "h", model_name=hostile, endpoint="/api/chat", energy_j=1.5
            )
        ]
    )
    url = f"{proxy.url}/ollamon/metrics"
    async with aiohttp.ClientSession() as s:
        # What Prometheus 2.x sends by default.
        accept = (
            "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,"
            "text/plain;version=0.0.4;q=0.5,*/*;q=0.1"
        )
        async with s.get(url, headers={"Accept": accept}) as r:
            assert r.status == 200
            assert r.headers["Content-Type"].startswith("application/openmetrics-text; version=1.0.0")
            text = await r.text()
        assert text.endswith("# EOF\n")
        families = {f.name: f for f in parse_om(text)}
        assert families["gen_ai_client_operation_duration_seconds"].unit == "seconds"
        assert families["gen_ai_client_operation_duration_seconds"].type == "histogram"
        assert families["ollamon_requests"].type == "counter"
        energy = {s.labels["model"]: s.value for s in families["ollamon_energy_joules"].samples}
        assert energy == {hostile: 1.5}
        assert text.count("# EOF") == 1
        # A malformed version is not an error: the plain text format answers.
        for bad in (
            "application/openmetrics-text; version=garbage",
            "text/plain; version=x.y",
            "application/openmetrics-text; version=0.0.1",
        ):
            async with s.get(url, headers={"Accept": bad}) as r:
                assert r.status == 200, bad
                body = await r.text()
                assert "ollamon_requests_total" in body
        async with s.get(url) as r:
            assert r.headers["Content-Type"] == "text/plain; version=0.0.4; charset=utf-8"


async def test_model_labels_are_capped(emulator: Any, make_proxy: MakeProxy) -> None:
    from proxy.exports.prometheus import PROMETHEUS_KEY
    from storage.records import InferenceRecord

    proxy = await make_proxy(emulator.url, metrics__max_models=100)
    proxied = [("/api/generate", {"model": f"proxied-{i}", "prompt": "p"}, "tokens=2") for i in range(3)]
    await _send(proxy, proxied)
    await proxy.wait_rows(3)
    exporter = proxy.app[PROMETHEUS_KEY]
    await until(lambda: exporter.records.offered == 3, what="the 3 proxied records observed")
    hostile = [f'evil-{i}"}} injected{{x="1\n' for i in range(500)]
    exporter.records.offer(
        [
            InferenceRecord(
                timestamp="2026-01-01T00:00:00.000Z",
                request_id=f"r{i}",
                model_name=name,
                endpoint="/api/chat",
                status_code=200,
                response_time_ms=10.0,
            )
            for i, name in enumerate(hostile)
        ]
    )
    sc = await scrape(f"{proxy.url}/ollamon/metrics")
    models = sc.label_values("ollamon_requests_total", "model")
    assert len(models) == 101 and "other" in models
    assert {f"proxied-{i}:latest" for i in range(3)} <= models
    assert sc.value("ollamon_requests_total", model="other") == 500 - 97
    assert sc.value("ollamon_requests_total") == 503
    assert (
        len(sc.label_values("gen_ai_client_operation_duration_seconds_count", "gen_ai_request_model")) == 101
    )
    # Hostile names come back exactly: escaped by the library, not spliced into the format.
    assert hostile[0] in models


async def test_admin_token_guards_metrics(emulator: Any, make_proxy: MakeProxy) -> None:
    token = "metrics-token-0123456789"
    proxy = await make_proxy(emulator.url, admin__token=token)
    async with aiohttp.ClientSession() as s:
        async with s.get(f"{proxy.url}/ollamon/metrics") as r:
            assert r.status == 401
            assert "admin token" in (await r.json())["error"]
        async with s.get(
            f"{proxy.url}/ollamon/metrics", headers={"Authorization": "Bearer wrong-0123456789"}
        ) as r:
            assert r.status == 401
    sc = await scrape(f"{proxy.url}/ollamon/metrics", {"Authorization": f"Bearer {token}"})
    assert "ollamon_in_flight_all" in sc.families


@pytest.mark.parametrize("token", ["", "side-token-0123456789"])
async def test_metrics_listen_serves_it_alone(emulator: Any, make_proxy: MakeProxy, token: str) -> None:
    from proxy.exports.prometheus import METRICS_RUNNER_KEY

    proxy = await make_proxy(emulator.url, metrics__listen="127.0.0.1:0", admin__token=token)
    await _send(proxy, TRAFFIC[:2])
    await proxy.wait_rows(2)
    port = proxy.app[METRICS_RUNNER_KEY].addresses[0][1]
    side = f"http://127.0.0.1:{port}"
    auth = {"Authorization": f"Bearer {token}"} if token else {}
    async with aiohttp.ClientSession() as s:
        if token:
            async with s.get(f"{side}/metrics") as r:
                assert r.status == 401
                assert "admin token" in (await r.json())["error"]
        for path in ("/api/tags", "/ollamon/api/requests", "/"):
            async with s.get(side + path, headers=auth) as r:
                assert r.status == 404, path  # nothing but the metrics here
                assert "only /metrics" in (await r.json())["error"]
    for path in ("/metrics", "/ollamon/metrics"):
        sc = await scrape_until(side + path, lambda sc: sc.value("ollamon_requests_total") == 2, auth)
        assert "gen_ai_client_operation_duration_seconds" in sc.families
    main = await scrape(f"{proxy.url}/ollamon/metrics", auth)
    assert main.value("ollamon_requests_total") == sc.value("ollamon_requests_total")


async def test_disabled_export_is_not_served(emulator: Any, make_proxy: MakeProxy) -> None:
    proxy = await make_proxy(emulator.url, metrics__enabled=False)
    async with aiohttp.ClientSession() as s, s.get(f"{proxy.url}/ollamon/metrics") as r:
        assert r.status == 404


async def test_two_apps_keep_their_own_series(emulator: Any, make_proxy: MakeProxy) -> None:
    a = await make_proxy(emulator.url)
    b = await make_proxy(emulator.url)
    await _send(a, TRAFFIC[:3])
    await a.wait_rows(3)
    sa = await scrape_until(f"{a.url}/ollamon/metrics", lambda sc: sc.value("ollamon_requests_total") >= 3)
    sb = await scrape(f"{b.url}/ollamon/metrics")
    assert sa.value("ollamon_requests_total") == 3
    assert sb.value("ollamon_requests_total") == 0
    assert not math.isnan(sa.value("gen_ai_client_operation_duration_seconds_sum"))


async def test_metrics_listen_beyond_loopback_without_token_warns(
    emulator: Any, make_proxy: MakeProxy, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="proxy.exports.prometheus"):
        await make_proxy(emulator.url, metrics__listen="0.0.0.0:0")
    assert any("beyond loopback without admin.token" in r.getMessage() for r in caplog.records)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="proxy.exports.prometheus"):
        await make_proxy(emulator.url, metrics__listen="0.0.0.0:0", admin__token="t" * 20)
        await make_proxy(emulator.url, metrics__listen="127.0.0.1:0")
    assert not any("beyond loopback" in r.getMessage() for r in caplog.records)
