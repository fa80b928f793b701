"""OTLP export: real proxy, real emulator, a real OTLP/HTTP receiver on loopback decoding opentelemetry-proto.

Spans must carry the record's figures (equal to the emulator's ground truth), join the caller's W3C trace,
and never slow or break requests when the receiver is down (drops and failures counted in health).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import logging
import os
import statistics
import sys
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from opentelemetry.proto.trace.v1 import trace_pb2

from proxy.config import load_config
from proxy.exports.otel import otel_settings
from proxy.exports.otel_spans import MAX_NAME_CHARS, operation_name
from tests.fixtures.otlp import OtlpReceiver
from tests.fixtures.ports import free_port
from tests.fixtures.proxy import MakeProxy, ProxyHandle
from tests.polling import until

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"
TRACEPARENT = f"00-{TRACE_ID}-{PARENT_ID}-01"
CLIENT = trace_pb2.Span.SPAN_KIND_CLIENT
ERROR = trace_pb2.Status.STATUS_CODE_ERROR
UNSET = trace_pb2.Status.STATUS_CODE_UNSET


@pytest.fixture
async def receiver() -> AsyncIterator[OtlpReceiver]:
    r = await OtlpReceiver().start()
    yield r
    await r.stop()


@pytest.fixture(autouse=True)
def fast_batches(monkeypatch: pytest.MonkeyPatch) -> None:
    """No OTEL_* setting from the environment; the SDK exports spans every 50 ms (OTEL_BSP_SCHEDULE_DELAY)."""
    for var in [v for v in os.environ if v.startswith("OTEL_")]:
        monkeypatch.delenv(var)
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "50")


# Only the export under test: the other features (dashboard, Prometheus) stay out of these proxies.
ALONE: dict[str, Any] = {"dashboard__enabled": False, "metrics__enabled": False}


async def otel_proxy(make_proxy: MakeProxy, upstream: str, endpoint: str, **kw: Any) -> ProxyHandle:
    return await make_proxy(upstream, otel__enabled=True, otel__endpoint=endpoint, **ALONE, **kw)


async def post(
    session: aiohttp.ClientSession, url: str, body: dict[str, Any], headers: dict[str, str] | None = None
) -> tuple[int, str, bytes]:
    async with session.post(url, json=body, headers=headers or {}) as resp:
        return resp.status, resp.headers["X-Request-Id"], await resp.read()


async def health_otel(proxy: ProxyHandle, exported: int = 0, within: float = 10.0) -> dict[str, Any]:
    """The health's ``otel`` part, once it counts at least ``exported`` spans: the receiver holds a span as
    soon as the exporter's POST arrives, the exporter counts it only when the answer is back."""
    deadline = asyncio.get_running_loop().time() + within
    while True:
        async with aiohttp.ClientSession() as s, s.get(f"{proxy.url}/ollamon/health") as resp:
            part: dict[str, Any] = (await resp.json())["otel"]
        if part.get("spans_exported", 0) >= exported or asyncio.get_running_loop().time() > deadline:
            return part
        await asyncio.sleep(0.05)


def iso_ns(stamp: str) -> int:
    t = dt.datetime.fromisoformat(stamp.replace("Z", "+00:00"))
    return round(t.timestamp() * 1000) * 1_000_000


async def test_one_span_per_request_with_the_record_figures_and_the_callers_trace(
    receiver: OtlpReceiver, emulator: Any, make_proxy: MakeProxy
) -> None:
    proxy = await otel_proxy(make_proxy, emulator.url, receiver.url)
    generate = {
        "model": "llama3.2",
        "prompt": "why is the sky blue?",
        "options": {"num_predict": 6, "temperature": 0.3, "top_p": 0.8},
    }
    chat = {"model": "llama3.2", "messages": [{"role": "user", "content": "hi"}], "stream": False}
    async with aiohttp.ClientSession() as s:
        st1, rid1, _ = await post(
            s, f"{proxy.url}/api/generate", generate, {"traceparent": TRACEPARENT, "tracestate": "k=v"}
        )
        st2, rid2, _ = await post(s, f"{proxy.url}/api/chat", chat)
    assert (st1, st2) == (200, 200)
    rows = {r["request_id"]: r for r in await proxy.wait_rows(2)}
    await until(lambda: len(receiver.spans) >= 2, what="two spans received")
    await asyncio.sleep(0.2)
    assert len(receiver.spans) == 2  # one span per request, no more

    for rid, endpoint in ((rid1, "/api/generate"), (rid2, "/api/chat")):
        span, row, truth = receiver.by_request_id(rid), rows[rid], emulator.emu.entry(rid)
        op = operation_name(endpoint)
        assert span.name == f"{op} llama3.2"
        assert span.kind == CLIENT
        a = span.attributes
        assert a["gen_ai.operation.name"] == op
        assert a["gen_ai.provider.name"] == "ollama"
        assert a["gen_ai.request.model"] == "llama3.2"  # as the client named it
        assert a["gen_ai.response.model"] == row["model_name"] == "llama3.2:latest"
        assert a["gen_ai.usage.input_tokens"] == row["prompt_tokens"] == truth.prompt_eval_count
        assert a["gen_ai.usage.output_tokens"] == row["completion_tokens"] == truth.eval_count
        assert a["gen_ai.response.finish_reasons"] == [row["done_reason"]] == [truth.done_reason]
        assert a["server.address"] == "127.0.0.1"
        assert a["server.port"] == emulator.port
        assert a["http.response.status_code"] == 200
        assert "error.type" not in a
        assert span.status_code == UNSET
        # Content is opt-in (storage.store_text is off).
        assert "gen_ai.input.messages" not in a and "gen_ai.output.messages" not in a
        # Times: the record's arrival (ms precision) and arrival + response_time_ms.
        assert span.start_ns == iso_ns(row["timestamp"])
        assert abs((span.end_ns - span.start_ns) / 1e6 - row["response_time_ms"]) < 0.01
        (event,) = span.events
        assert event[0] == "gen_ai.first_token"
        assert abs((event[1] - span.start_ns) / 1e6 - row["ttft_ms"]) < 0.01
        assert a["ollamon.ttft_ms"] == pytest.approx(row["ttft_ms"])
        assert span.resource["service.name"] == "ollamon"

    gen = receiver.by_request_id(rid1)
    assert gen.attributes["gen_ai.request.temperature"] == pytest.approx(0.3)
    assert gen.attributes["gen_ai.request.top_p"] == pytest.approx(0.8)
    assert gen.attributes["gen_ai.request.max_tokens"] == 6 == emulator.emu.entry(rid1).eval_count
    assert gen.attributes["gen_ai.response.finish_reasons"] == ["length"]
    # The caller's trace: same trace id, the caller's span as parent.
    assert (gen.trace_id, gen.parent_span_id) == (TRACE_ID, PARENT_ID)
    # The header reached Ollama unchanged (ollamon is transparent; Ollama does not trace).
    other = receiver.by_request_id(rid2)
    assert other.parent_span_id == "" and other.trace_id != TRACE_ID  # no traceparent: a root span

    health = await health_otel(proxy, exported=2)
    assert health["enabled"] is True and health["exporting"] is True
    assert health["endpoint"] == f"{receiver.url}/v1/traces"
    assert (health["spans_exported"], health["spans_dropped"], health["spans_failed"]) == (2, 0, 0)


async def test_failed_request_gives_an_error_span(
    receiver: OtlpReceiver, emulator: Any, make_proxy: MakeProxy
) -> None:
    proxy = await otel_proxy(make_proxy, emulator.url, receiver.url)
    async with aiohttp.ClientSession() as s:
        status, rid, body = await post(s, f"{proxy.url}/api/generate", {"model": "nope", "prompt": "x"})
    assert status == 404
    (row,) = await proxy.wait_rows(1)
    await until(lambda: len(receiver.spans) >= 1, what="the error span")
    span = receiver.by_request_id(rid)
    assert span.status_code == ERROR
    assert span.attributes["error.type"] == "upstream_status"  # as the Prometheus error_type label
    assert span.attributes["http.response.status_code"] == 404
    assert span.status_message == row["error_message"] == json.loads(body)["error"]
    assert span.name == "text_completion nope"
    assert ("gen_ai.usage.output_tokens" in span.attributes) == (row["completion_tokens"] is not None)


async def test_content_attributes_only_with_store_text(
    receiver: OtlpReceiver, emulator: Any, make_proxy: MakeProxy
) -> None:
    proxy = await otel_proxy(make_proxy, emulator.url, receiver.url, storage__store_text=True)
    async with aiohttp.ClientSession() as s:
        status, rid, _ = await post(
            s, f"{proxy.url}/api/generate", {"model": "llama3.2", "prompt": "tell me"}
        )
    assert status == 200
    await until(lambda: len(receiver.spans) >= 1, what="the span")
    a = receiver.by_request_id(rid).attributes
    truth = emulator.emu.entry(rid)
    (inp,) = json.loads(a["gen_ai.input.messages"])
    assert inp == {"role": "user", "parts": [{"type": "text", "content": "tell me"}]}
    (out,) = json.loads(a["gen_ai.output.messages"])
    assert out["role"] == "assistant" and out["finish_reason"] == truth.done_reason
    assert out["parts"] == [{"type": "text", "content": truth.response_text}]


async def test_bad_or_unsampled_traceparent(
    receiver: OtlpReceiver, emulator: Any, make_proxy: MakeProxy, caplog: pytest.LogCaptureFixture
) -> None:
    proxy = await otel_proxy(make_proxy, emulator.url, receiver.url)
    caplog.set_level(logging.WARNING)
    long_model = "m" * 5000
    async with aiohttp.ClientSession() as s:
        st_bad, rid_bad, _ = await post(
            s, f"{proxy.url}/api/generate", {"model": "llama3.2", "prompt": "x"}, {"traceparent": "zz-<b>"}
        )
        st_off, rid_off, _ = await post(
            s,
            f"{proxy.url}/api/generate",
            {"model": "llama3.2", "prompt": "x"},
            # The caller did not sample this trace; its tracestate is junk (no log line per request).
            {"traceparent": f"00-{TRACE_ID}-{PARENT_ID}-00", "tracestate": "<script>,x=" + "y," * 50},
        )
        st_long, rid_long, _ = await post(
            s, f"{proxy.url}/api/generate", {"model": long_model, "prompt": "x"}
        )
    assert (st_bad, st_off) == (200, 200) and st_long >= 400  # Ollama refuses the name; still a span
    await proxy.wait_rows(3)
    await until(lambda: len(receiver.spans) >= 2, what="two spans")
    bad = receiver.by_request_id(rid_bad)
    assert bad.parent_span_id == "" and bad.trace_id != TRACE_ID  # malformed: a new root trace
    assert not [sp for sp in receiver.spans if sp.attributes["ollamon.request_id"] == rid_off]
    assert len(receiver.by_request_id(rid_long).name) == len("text_completion ") + MAX_NAME_CHARS
    health = await health_otel(proxy, exported=2)
    assert health["not_sampled"] == 1 and health["spans_exported"] == 2
    assert not [r for r in caplog.records if r.name.startswith("opentelemetry")]


async def test_receiver_down_requests_unaffected_and_losses_counted(
    emulator: Any, make_proxy: MakeProxy, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TIMEOUT", "1")  # seconds, per export with its retries
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    off = await make_proxy(emulator.url, **ALONE)
    on = await otel_proxy(make_proxy, emulator.url, dead, otel__max_queue=2)
    body = {"model": "llama3.2", "prompt": "same prompt"}

    async def timed(proxy: ProxyHandle, s: aiohttp.ClientSession) -> tuple[float, bytes]:
        start = time.perf_counter()
        status, _, answer = await post(s, f"{proxy.url}/api/generate", body)
        assert status == 200
        return time.perf_counter() - start, answer

    async with aiohttp.ClientSession() as s:
        await timed(off, s)  # warm the model
        seq_off: list[float] = []
        seq_on: list[float] = []
        answers: set[str] = set()
        for _ in range(15):
            for proxy, out in ((off, seq_off), (on, seq_on)):
                took, answer = await timed(proxy, s)
                out.append(took)
                lines = [json.loads(line) for line in answer.splitlines() if line]
                answers.add("".join(d.get("response", "") for d in lines) + str(lines[-1]["eval_count"]))
        # A burst bigger than the queue: some spans must be dropped, not waited for.
        burst = await asyncio.gather(*(post(s, f"{on.url}/api/generate", body) for _ in range(20)))
    assert {st for st, _, _ in burst} == {200}
    assert len(answers) == 1  # the same text through either proxy: the export changes no answer
    med_off, med_on = statistics.median(seq_off), statistics.median(seq_on)
    # Loose on purpose (2 busy cores): a blocking export would add its 1 s timeout to every request.
    assert med_on < max(4 * med_off, med_off + 0.25), (med_off, med_on)

    await on.wait_rows(35)
    part: dict[str, Any] = {}

    async def accounted() -> None:
        """Every record is a span exported, failed or dropped (none left queued)."""
        nonlocal part
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            part = await health_otel(on)
            if part["spans_failed"] + part["spans_dropped"] == 35 and part["spans_queued"] == 0:
                return
            await asyncio.sleep(0.1)
        raise AssertionError(f"spans not all accounted for: {part}")

    await accounted()
    assert part["spans_exported"] == 0
    assert part["spans_failed"] >= 1 and part["export_failures"] >= 1
    assert part["spans_dropped"] >= 1
    assert part["last_failure_at"] is not None
    started = time.perf_counter()
    await on.stop()
    assert time.perf_counter() - started < 15  # shutdown is bounded though the receiver is gone


async def test_spans_of_the_last_requests_go_out_at_shutdown(
    receiver: OtlpReceiver, emulator: Any, make_proxy: MakeProxy, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "60000")  # only the shutdown flush can send them
    proxy = await otel_proxy(make_proxy, emulator.url, receiver.url)
    async with aiohttp.ClientSession() as s:
        done = await asyncio.gather(
            *(post(s, f"{proxy.url}/api/generate", {"model": "llama3.2", "prompt": str(i)}) for i in range(5))
        )
    assert receiver.spans == []
    await proxy.stop()  # right away: the writer has not committed them yet
    assert sorted(sp.attributes["ollamon.request_id"] for sp in receiver.spans) == sorted(
        r for _, r, _ in done
    )
    assert len(proxy.rows()) == 5


async def test_standard_variables_turn_it_on(
    receiver: OtlpReceiver, emulator: Any, make_proxy: MakeProxy, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", receiver.url)
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_HEADERS", "x-tenant=acme")
    monkeypatch.setenv("OTEL_SERVICE_NAME", "llm-gateway")
    proxy = await make_proxy(emulator.url, **ALONE)  # otel.enabled is false: the variable alone turns it on
    async with aiohttp.ClientSession() as s:
        status, rid, _ = await post(s, f"{proxy.url}/api/generate", {"model": "llama3.2", "prompt": "x"})
    assert status == 200
    await until(lambda: len(receiver.spans) >= 1, what="the span")
    span = receiver.by_request_id(rid)
    assert span.resource["service.name"] == "llm-gateway"
    assert receiver.headers[0]["x-tenant"] == "acme"
    assert receiver.headers[0]["content-type"] == "application/x-protobuf"


async def test_off_by_default(emulator: Any, make_proxy: MakeProxy) -> None:
    proxy = await make_proxy(emulator.url, **ALONE)
    assert await health_otel(proxy) == {"enabled": False}


async def test_missing_sdk_logs_the_extra_and_serves(
    receiver: OtlpReceiver,
    emulator: Any,
    make_proxy: MakeProxy,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # The SDK is installed here; a None entry in sys.modules makes its import fail as if it were not.
    monkeypatch.setitem(sys.modules, "proxy.exports.otel_export", None)
    with caplog.at_level(logging.ERROR, logger="proxy.exports.otel"):
        proxy = await otel_proxy(make_proxy, emulator.url, receiver.url)
    assert "pip install 'ollamon[otel]'" in caplog.text
    async with aiohttp.ClientSession() as s:
        status, _, _ = await post(s, f"{proxy.url}/api/generate", {"model": "llama3.2", "prompt": "x"})
    assert status == 200
    await proxy.wait_rows(1)
    part = await health_otel(proxy)
    assert part["enabled"] is True and part["exporting"] is False
    assert "ollamon[otel]" in part["error"]
    assert receiver.posts == 0


def latest_histograms(receiver: OtlpReceiver) -> dict[str, list[Any]]:
    """Histogram data points of the newest metrics export, by metric name (cumulative temporality)."""
    out: dict[str, list[Any]] = {}
    for rm in receiver.metrics[-1].resource_metrics:
        for sm in rm.scope_metrics:
            for m in sm.metrics:
                out[m.name] = list(m.histogram.data_points)
    return out


async def test_metrics_over_otlp_match_the_records(
    receiver: OtlpReceiver, emulator: Any, make_proxy: MakeProxy, monkeypatch: pytest.MonkeyPatch
) -> None:
    from opentelemetry.proto.common.v1.common_pb2 import KeyValue

    from proxy.exports.prom_records import DURATION_BUCKETS, TOKEN_BUCKETS

    monkeypatch.setenv("OTEL_METRIC_EXPORT_INTERVAL", "100")
    proxy = await otel_proxy(make_proxy, emulator.url, receiver.url, metrics__max_models=1)
    async with aiohttp.ClientSession() as s:
        for prompt in ("a", "bb"):
            assert (await post(s, f"{proxy.url}/api/generate", {"model": "llama3.2", "prompt": prompt}))[
                0
            ] == 200
        assert (await post(s, f"{proxy.url}/api/generate", {"model": "nope", "prompt": "x"}))[0] == 404
    rows = await proxy.wait_rows(3)
    ok = [r for r in rows if r["success"]]

    def settled() -> bool:
        if not receiver.metrics:
            return False
        points = latest_histograms(receiver).get("gen_ai.client.operation.duration", [])
        return sum(p.count for p in points) == 3

    await until(settled, what="the three requests in the exported duration histogram")
    h = latest_histograms(receiver)

    def attrs(p: Any) -> dict[str, Any]:
        kv: list[KeyValue] = list(p.attributes)
        return {k.key: (k.value.string_value or k.value.int_value) for k in kv}

    by_model = {attrs(p)["gen_ai.request.model"]: p for p in h["gen_ai.client.operation.duration"]}
    assert set(by_model) == {"llama3.2:latest", "other"}  # the cap: "nope" is the second model
    good = by_model["llama3.2:latest"]
    assert good.count == 2 and list(good.explicit_bounds) == list(DURATION_BUCKETS)
    assert good.sum == pytest.approx(sum(r["response_time_ms"] for r in ok) / 1000)
    assert attrs(by_model["other"])["error.type"] == "upstream_status"
    assert "error.type" not in attrs(good)
    assert attrs(good)["gen_ai.operation.name"] == "text_completion"
    assert attrs(good)["server.port"] == emulator.port
    tokens = {
        (attrs(p)["gen_ai.request.model"], attrs(p)["gen_ai.token.type"]): p
        for p in h["gen_ai.client.token.usage"]
    }
    inp, out = tokens[("llama3.2:latest", "input")], tokens[("llama3.2:latest", "output")]
    assert inp.sum == sum(r["prompt_tokens"] for r in ok) and inp.count == 2
    assert out.sum == sum(r["completion_tokens"] for r in ok)
    assert list(inp.explicit_bounds) == list(TOKEN_BUCKETS)
    (ttft,) = h["gen_ai.server.time_to_first_token"]  # successful requests only
    assert ttft.count == 2 and ttft.sum == pytest.approx(sum(r["ttft_ms"] for r in ok) / 1000)
    health = await health_otel(proxy)
    assert health["metrics"]["exports"] >= 1 and health["metrics"]["models_overflowed"] >= 1


def test_settings_resolution() -> None:
    """Config first, then the standard variables, as docs/exports.md lists."""
    off = load_config(None, env={})
    on = load_config(None, env={}, overrides={("otel", "enabled"): True})
    assert otel_settings(off, {}) is None
    s = otel_settings(on, {})
    assert s is not None and s.endpoint == "http://localhost:4318/v1/traces"
    assert s.metrics_endpoint == "http://localhost:4318/v1/metrics" and s.service_name == ""
    env = {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318/", "OTEL_SERVICE_NAME": "gw"}
    s = otel_settings(off, env)  # the variable alone turns it on
    assert s is not None and s.endpoint == "http://c:4318/v1/traces" and s.service_name == "gw"
    s = otel_settings(off, {**env, "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://t/x"})
    assert s is not None and s.endpoint == "http://t/x" and s.metrics_endpoint == "http://c:4318/v1/metrics"
    mine = load_config(
        None,
        env={},
        overrides={
            ("otel", "enabled"): True,
            ("otel", "endpoint"): "https://o:1/",
            ("otel", "service_name"): "me",
        },
    )
    s = otel_settings(mine, {**env, "OTEL_METRICS_EXPORTER": "none"})
    assert s is not None and s.endpoint == "https://o:1/v1/traces" and s.service_name == "me"
    assert s.metrics_endpoint is None
    assert otel_settings(on, {"OTEL_SDK_DISABLED": "true"}) is None
