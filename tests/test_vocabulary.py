"""One vocabulary: one name per figure (alert rules, API, CLI, docs), one quantile method behind it, and one
name per model (the one Ollama resolves), whichever spelling a client or a filter uses.

Through the real proxy, the emulator as Ollama, real SQLite files; the emulator's ground truth and the stored
rows say what happened.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import re
import sqlite3
import time
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from alerts.metrics import METRICS, RENAMED, MetricKind
from alerts.rules import parse_alerts
from proxy.cli.main import main as cli_main
from proxy.config import load_config
from proxy.keys import ENGINE_KEY
from storage.histogram import error_bound, exact_quantile
from storage.migrations import MIGRATIONS, apply_migrations
from storage.queries import FIGURES, Filters, summary
from storage.rollups import backfill
from tests.alerts_helpers import generate, get_json
from tests.fixtures.proxy import MakeProxy

ROOT = Path(__file__).resolve().parents[1]
ALERT_ONLY = {"cancel_rate"}  # a ratio the summary shows as the count `cancelled`
API = "/ollamon/api"


# -- names ------------------------------------------------------------------------------------------


def _vocabulary_table() -> dict[str, list[str]]:
    """docs/metrics.md "Names": {name: [unit, definition, where]}."""
    text = (ROOT / "docs" / "metrics.md").read_text()
    section = text.split("## Names", 1)[1].split("\n## ", 1)[0]
    out: dict[str, list[str]] = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 4 and cells[0].startswith("`"):
            for name in re.findall(r"`([a-z0-9_]+)`", cells[0]):
                out[name] = cells[1:]
    return out


def test_alert_metrics_and_summary_figures_share_their_names() -> None:
    request_metrics = {n for n, s in METRICS.items() if s.kind is MetricKind.REQUESTS}
    assert request_metrics - ALERT_ONLY <= set(FIGURES)
    # Every latency and speed statistic of the summary can be alerted on, under the same name.
    stats = {n for n in FIGURES if re.search(r"_(avg|p\d+)$", n)}
    assert stats <= request_metrics
    assert all(re.fullmatch(r"[a-z0-9_]+_(avg|p\d\d)", n) for n in stats)
    # No name is spelled the old way (statistic first).
    assert not [n for n in {*METRICS, *FIGURES} if re.match(r"(p\d+|avg)_", n)]
    assert set(RENAMED.values()) <= set(METRICS) and not set(RENAMED) & set(METRICS)


def test_docs_table_lists_every_name_once_with_where_it_appears() -> None:
    table = _vocabulary_table()
    assert set(table) == set(FIGURES) | set(METRICS)
    for name, (unit, definition, where) in table.items():
        assert definition, name
        if name in FIGURES:
            assert "API" in where and "CLI" in where, name
        if name in METRICS:
            assert "alerts" in where, name
            assert unit == METRICS[name].unit or (unit == "" and METRICS[name].unit == ""), (name, unit)


def test_shipped_config_and_docs_use_the_names() -> None:
    config = load_config(ROOT / "config.yaml", env={})
    spec = parse_alerts(config.alerts.rules, config.alerts.channels, config.source, env={})
    used = {c.metric for r in spec.rules for c in r.conditions}
    assert "ttft_ms_p95" in used and used <= set(METRICS)
    for doc in ("config.yaml", "docs/alerts.md", "docs/analytics.md", "README.md"):
        text = (ROOT / doc).read_text()
        stale = [old for old in RENAMED if re.search(rf"(?<![A-Za-z0-9_']){old}(?![A-Za-z0-9_'])", text)]
        assert stale == [], (doc, stale)


# -- one quantile method: the alert window and the summary agree ------------------------------------


async def _engine_values(s: aiohttp.ClientSession, url: str, n: int) -> dict[str, Any]:
    """The rule's instance values once the engine has counted ``n`` requests."""
    deadline = time.monotonic() + 20
    while True:
        status, body = await get_json(s, f"{url}{API}/alert-rules")
        assert status == 200
        (rule,) = body["rules"]
        values = rule["last_value"] or {}
        if values.get("requests_per_s") is not None and round(values["requests_per_s"] * 600) == n:
            return dict(values)
        if time.monotonic() > deadline:
            raise AssertionError(f"the engine did not count {n} requests: {body}")
        await asyncio.sleep(0.05)


async def test_alert_window_p95_agrees_with_the_summary(emulator: Any, make_proxy: MakeProxy) -> None:
    figures = ["ttft_ms_p95", "response_time_ms_p95", "response_time_ms_p50", "tokens_per_second_avg"]
    rule = {
        "name": "vocabulary",
        "when": {
            "any": [
                *({"metric": f, "window": "10m", "threshold": 1e12, "min_requests": 1} for f in figures),
                {"metric": "requests_per_s", "window": "10m", "threshold": 1e12},
            ]
        },
    }
    proxy = await make_proxy(
        emulator.url, alerts__interval_s=0.05, alerts__rules=[rule], alerts__channels={"log": {"type": "log"}}
    )
    since = time.time() - 1
    n_ok = 24
    async with aiohttp.ClientSession() as s:
        # Spread TTFT over 0..230 ms of prompt evaluation; two failures must not count in latency figures.
        for i in range(n_ok):
            status, _ = await generate(s, proxy.url, emulate=f"prompt_eval_ms={i * 10}")
            assert status == 200
        for _ in range(2):
            status, _ = await generate(s, proxy.url, emulate="error_status=500")
            assert status == 500
        rows = await proxy.wait_rows(n_ok + 2)
        alert = await _engine_values(s, proxy.url, n_ok + 2)
        until = time.time() + 1
        window = f"since={since:.3f}&until={until:.3f}&model=llama3.2"
        status, exact = await get_json(s, f"{proxy.url}{API}/summary?{window}&exact=true")
        assert status == 200 and exact["overall"]["requests"] == n_ok + 2
        status, rolled = await get_json(s, f"{proxy.url}{API}/summary?{window}&exact=false")
        assert status == 200 and rolled["exact"] is False
    ok = [r for r in rows if r["success"]]
    assert len(ok) == n_ok
    truth = sorted(r["ttft_ms"] for r in ok)
    assert truth[-1] - truth[0] > 100  # the spread is real: a wrong quantile would show
    for f in figures:
        a, e, r = alert[f], exact["overall"][f], rolled["overall"][f]
        if f.endswith("_avg"):
            assert a == pytest.approx(e, rel=1e-9) and r == pytest.approx(e, rel=1e-9), f
            continue
        # The exact summary computes the definition; the alert window estimates it within the bound, and
        # the rollups are the same sketch as the alert window, so they give the same number.
        assert abs(a - e) <= error_bound(e), (f, a, e)
        assert r == pytest.approx(a, rel=1e-12), (f, r, a)
    column = sorted(r["ttft_ms"] for r in ok)
    assert exact["overall"]["ttft_ms_p95"] == pytest.approx(exact_quantile(column, 0.95), rel=1e-9)


# -- one model name ---------------------------------------------------------------------------------

SPELLINGS = ["llama3.2", "Llama3.2", "llama3.2:latest", "registry.ollama.ai/library/llama3.2:latest"]


def _cli_json(*argv: str) -> Any:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert cli_main(list(argv)) == 0
    return orjson.loads(out.getvalue())


async def test_every_spelling_is_stored_canonically_and_found_by_every_filter(
    emulator: Any, make_proxy: MakeProxy
) -> None:
    rule = {
        "name": "by-name",
        "when": {
            "metric": "error_rate",
            "window": "10m",
            "threshold": 2,
            "min_requests": 1,
            "model": "Llama3.2",
        },
    }
    proxy = await make_proxy(
        emulator.url, alerts__interval_s=0.05, alerts__rules=[rule], alerts__channels={"log": {"type": "log"}}
    )
    async with aiohttp.ClientSession() as s:
        ids = []
        for name in SPELLINGS:
            async with s.post(
                f"{proxy.url}/api/generate", json={"model": name, "prompt": "hi", "stream": False}
            ) as r:
                assert r.status == 200, await r.text()
                ids.append(r.headers["X-Request-Id"])
        await generate(s, proxy.url, model="qwen3:0.6b")
        rows = await proxy.wait_rows(len(SPELLINGS) + 1)
        status, tags = await get_json(s, f"{emulator.url}/api/tags")  # the names Ollama lists
        installed = {m["name"] for m in tags["models"]}
        by_id = {r["request_id"]: r for r in rows}
        for rid, name in zip(ids, SPELLINGS, strict=True):
            row = by_id[rid]
            assert emulator.emu.entry(rid).model == name  # what the client sent, Ollama's ground truth
            assert row["model_name"] == "llama3.2:latest" and row["model_name"] in installed
            meta = json.loads(row["metadata"])
            assert meta.get("model_as_sent") == (None if name == "llama3.2:latest" else name)
        counts = {}
        for name in ("llama3.2", "LLAMA3.2:latest", "llama3.2:latest"):
            status, body = await get_json(s, f"{proxy.url}{API}/summary?window=1h&model={name}")
            assert status == 200
            counts[name] = body["overall"]["requests"]
            status, body = await get_json(s, f"{proxy.url}{API}/requests?model={name}")
            assert status == 200 and {r["request_id"] for r in body["requests"]} == set(ids)
        assert set(counts.values()) == {len(SPELLINGS)}
        # The alert rule's model filter, written with yet another spelling, sees the same requests.
        engine = proxy.app[ENGINE_KEY]
        (cond,) = engine.spec.rules[0].conditions
        assert cond.model == "llama3.2:latest"
        deadline = time.monotonic() + 10
        while engine.requests.records < len(SPELLINGS) + 1:
            assert time.monotonic() < deadline, "the engine never counted the requests"
            await asyncio.sleep(0.05)
        await engine.evaluate()
        assert engine.requests.totals(cond.window_s, cond.model).n == len(SPELLINGS)
        assert engine.requests.models(cond.window_s, "llama3.?") == ["llama3.2:latest"]  # a glob, too
    await proxy.stop()
    for name in ("llama3.2", "llama3.2:latest"):
        stats = _cli_json("stats", "--db", str(proxy.db_path), "--since", "1h", "--model", name, "--json")
        assert stats["overall"]["requests"] == len(SPELLINGS), name


# -- existing databases -----------------------------------------------------------------------------


def _old_database(path: Path) -> None:
    """A database as the previous release left it: the client's spellings in model_name, rolled up."""
    conn = sqlite3.connect(path)
    apply_migrations(conn, [m for m in MIGRATIONS if m.__name__ < "m005"])
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime(time.time() - 120))
    rows = [
        ("a", "llama3.2", 1, 0, 100.0, '{"bytes_in": 1}'),
        ("b", "Llama3.2", 1, 0, 300.0, None),
        ("c", "llama3.2:latest", 1, 0, 200.0, "{}"),
        ("d", "qwen3:0.6b", 0, 0, 50.0, "{}"),
    ]
    conn.executemany(
        "INSERT INTO inference_metrics (timestamp, request_id, model_name, success, cancelled, response_time_ms,"
        " metadata, endpoint) VALUES (?, ?, ?, ?, ?, ?, ?, '/api/generate')",
        [(stamp, *r) for r in rows],
    )
    conn.execute(
        "INSERT INTO error_metrics (timestamp, request_id, error_type, error_message, model_name, severity)"
        " VALUES (?, 'e', 'upstream_status', 'x', 'Llama3.2', 'error')",
        (stamp,),
    )
    conn.execute("DELETE FROM rollup_minute")
    conn.execute("DELETE FROM rollup_hour")
    backfill(conn)
    conn.commit()
    conn.close()


def test_migration_normalises_old_rows_and_merges_their_rollups(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    _old_database(path)
    conn = sqlite3.connect(path)
    before = conn.execute("SELECT COUNT(*) FROM rollup_minute WHERE model_name LIKE '%lama%'").fetchone()[0]
    assert before == 3 * 2  # three spellings at levels 0 and 1 (level 2 is every model, named '')
    assert apply_migrations(conn) == [m.__name__ for m in MIGRATIONS if m.__name__ >= "m005"]
    names = dict(conn.execute("SELECT request_id, model_name FROM inference_metrics"))
    assert names == {
        "a": "llama3.2:latest",
        "b": "llama3.2:latest",
        "c": "llama3.2:latest",
        "d": "qwen3:0.6b",
    }
    meta = {
        rid: json.loads(m) for rid, m in conn.execute("SELECT request_id, metadata FROM inference_metrics")
    }
    assert meta["a"] == {"bytes_in": 1, "model_as_sent": "llama3.2"}
    assert meta["b"] == {"model_as_sent": "Llama3.2"} and meta["c"] == {} and meta["d"] == {}
    assert conn.execute("SELECT model_name FROM error_metrics").fetchone() == ("llama3.2:latest",)
    merged = conn.execute(
        "SELECT level, requests, response_time_ms_n FROM rollup_minute WHERE model_name = 'llama3.2:latest'"
        " ORDER BY level"
    ).fetchall()
    assert merged == [(0, 3, 3), (1, 3, 3)]
    assert (
        conn.execute("SELECT COUNT(*) FROM rollup_minute WHERE model_name GLOB '*Llama*'").fetchone()[0] == 0
    )
    now = time.time()
    for exact in (True, False):
        for name in ("llama3.2", "Llama3.2", "llama3.2:latest"):
            got = summary(conn, now - 3 * 3600, now, Filters(model=name), exact=exact)["overall"]
            assert got["requests"] == 3 and got["response_time_ms_p50"] == pytest.approx(200, rel=0.011)
    assert apply_migrations(conn) == []
    conn.close()
