"""Per-upstream and per-instance figures (issue 16): ``summary(by=upstream|instance)``, the API's ``?by=``,
``ollamon stats --upstream`` / ``--by``, and the dashboard's table of hosts.

Storage-level: generated rows with known upstreams and instances, written the real way, against figures
computed here from the rows themselves (counts, sums, and percentiles by linear interpolation, written out
below rather than taken from storage/). End to end: two emulators as upstreams behind the real proxy, each
serving one model, with different prompt-evaluation times, so each host's request count and token total are
the emulator's own, and the slower host's TTFT is the larger.
"""

from __future__ import annotations

import asyncio
import math
import random
import sqlite3
import time
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from playwright.async_api import Browser

from storage.queries import Filters, QueryError, summary
from storage.records import InferenceRecord
from tests.analytics_gen import make_record, open_store, write
from tests.fixtures.cli import ollamon
from tests.fixtures.proxy import MakeProxy, ProxyHandle
from tests.fixtures.upstream_hosts import EmulatorHost, StartHosts

pytestmark = pytest.mark.timeout(180)

NOW = time.time()
UPSTREAMS = ("gpu-a", "gpu-b", None)  # None: a refused request, no host tried
INSTANCES = ("east:11435", "west:11435")


def quantile(values: list[float], q: float) -> float | None:
    """Linear interpolation between closest ranks (numpy's default), written out here."""
    if not values:
        return None
    s = sorted(values)
    pos = (len(s) - 1) * q
    lo = math.floor(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def by_hand(rows: list[InferenceRecord], seconds: float) -> dict[str, Any]:
    """The figures the breakdown gives, from the records (load/unload rows are not inferences)."""
    rows = [r for r in rows if r.done_reason not in ("load", "unload")]
    ok = [r for r in rows if r.success]
    failed = sum(1 for r in rows if not r.success and not r.cancelled)
    speeds = [r.tokens_per_second for r in ok if r.tokens_per_second is not None]
    ttft = [r.ttft_ms for r in ok if r.ttft_ms is not None]
    completion = sum(r.completion_tokens or 0 for r in rows)
    return {
        "requests": len(rows),
        "failed": failed,
        "error_rate": failed / len(rows) if rows else None,
        "ttft_ms_p50": quantile(ttft, 0.5),
        "ttft_ms_p95": quantile(ttft, 0.95),
        "tokens_per_second_avg": sum(speeds) / len(speeds) if speeds else None,
        "tokens_per_s": completion / seconds,
        "prompt_tokens": sum(r.prompt_tokens or 0 for r in rows),
        "completion_tokens": completion,
    }


def assert_figures(got: dict[str, Any], want: dict[str, Any]) -> None:
    for name, value in want.items():
        if isinstance(value, float):
            assert got[name] == pytest.approx(value, rel=1e-9), name
        else:
            assert got[name] == value, name


@pytest.fixture
async def history(tmp_path: Path) -> tuple[Path, list[InferenceRecord]]:
    """800 records over the last 50 minutes, each with an upstream and an instance, written with rollups."""
    rng = random.Random(16)
    records = []
    for i in range(800):
        r = make_record(rng, NOW - 3000 + i * 3.5, i)
        r.upstream, r.instance = rng.choice(UPSTREAMS), INSTANCES[i % 3 == 0]
        records.append(r)
    path = tmp_path / "by.db"
    store = await open_store(path)
    await write(store, records)
    await store.close()
    return path, records


@pytest.mark.parametrize("by", ["upstream", "instance"])
def test_each_group_equals_its_rows_counted_by_hand(
    history: tuple[Path, list[InferenceRecord]], by: str
) -> None:
    path, records = history
    since, until = NOW - 3600, NOW
    conn = sqlite3.connect(path)
    out = summary(conn, since, until, by=by)
    assert out["exact"] is True and out["by"] == by
    names = sorted({getattr(r, by) or "" for r in records})
    assert sorted(g[by] or "" for g in out["groups"]) == names
    for g in out["groups"]:
        mine = [r for r in records if (getattr(r, by) or None) == g[by]]
        assert_figures(g, by_hand(mine, until - since))
    # The groups add up to the overall, which is what the summary says without a breakdown.
    plain = summary(conn, since, until, exact=True)
    assert (
        sum(g["requests"] for g in out["groups"])
        == plain["overall"]["requests"]
        == out["overall"]["requests"]
    )
    assert out["overall"] == plain["overall"] and out["models"] == plain["models"]
    # Most requests first.
    counts = [g["requests"] for g in out["groups"]]
    assert counts == sorted(counts, reverse=True)


@pytest.mark.parametrize("by", ["upstream", "instance"])
def test_without_the_models_one_scan_gives_the_same_answer(
    history: tuple[Path, list[InferenceRecord]], by: str
) -> None:
    path, _ = history
    conn = sqlite3.connect(path)
    full = summary(conn, NOW - 3600, NOW, by=by)
    lean = summary(conn, NOW - 3600, NOW, by=by, per_model=False)
    assert "models" not in lean
    assert lean["groups"] == full["groups"]
    # Summed in another order: equal to the last bits.
    assert_figures(lean["overall"], full["overall"])


def test_filters_by_upstream_and_instance_keep_only_their_rows(
    history: tuple[Path, list[InferenceRecord]],
) -> None:
    path, records = history
    since, until = NOW - 3600, NOW
    conn = sqlite3.connect(path)
    for upstream, instance in (("gpu-a", None), (None, "west:11435"), ("gpu-b", "east:11435")):
        f = Filters(upstream=upstream, instance=instance)
        out = summary(conn, since, until, f)
        assert out["exact"] is True and out["filters"]["instance"] == instance
        mine = [
            r
            for r in records
            if (upstream is None or r.upstream == upstream) and (instance is None or r.instance == instance)
        ]
        assert_figures(out["overall"], by_hand(mine, until - since))
    # A filter and a breakdown together: the instance's rows, per upstream.
    out = summary(conn, since, until, Filters(instance="west:11435"), by="upstream")
    for g in out["groups"]:
        mine = [r for r in records if r.instance == "west:11435" and r.upstream == g["upstream"]]
        assert_figures(g, by_hand(mine, until - since))


def test_a_breakdown_from_rollups_or_by_an_unknown_column_is_refused(
    history: tuple[Path, list[InferenceRecord]],
) -> None:
    conn = sqlite3.connect(history[0])
    with pytest.raises(QueryError) as exc:
        summary(conn, NOW - 86400, NOW, by="upstream", exact=False)
    assert exc.value.param == "exact" and "rollups do not keep upstreams" in exc.value.reason
    with pytest.raises(QueryError) as exc:
        summary(conn, NOW - 86400, NOW, Filters(instance="east:11435"), exact=False)
    assert exc.value.param == "exact" and "instance" in exc.value.reason
    with pytest.raises(QueryError) as exc:
        summary(conn, NOW - 3600, NOW, by="model")
    assert exc.value.param == "by" and "upstream, instance" in exc.value.reason


# -- end to end: two emulators behind the proxy ---------------------------------------------------


async def two_hosts(
    emulator_hosts: StartHosts, make_proxy: MakeProxy
) -> tuple[ProxyHandle, list[EmulatorHost]]:
    """Host a serves llama3.2 with fast prompt evaluation, host b qwen3 with 60 ms of it."""
    a, b = await emulator_hosts(2, per_host=[{"prompt_eval_s": 0.002}, {"prompt_eval_s": 0.06}])
    hosts = [
        {"url": a.url, "name": "a", "models": ["llama3.2"]},
        {"url": b.url, "name": "b", "models": ["qwen3:0.6b"]},
    ]
    proxy = await make_proxy(
        "http://127.0.0.1:9",
        upstreams__hosts=hosts,
        upstreams__check_interval_s=60.0,
        server__instance="edge-1",
    )
    return proxy, [a, b]


async def send(session: aiohttp.ClientSession, url: str, model: str, n: int) -> None:
    for _ in range(n):
        async with session.post(
            f"{url}/api/generate", json={"model": model, "prompt": "hi", "stream": True}
        ) as resp:
            assert resp.status == 200
            await resp.read()


def served(host: EmulatorHost) -> int:
    assert host.emu is not None
    return sum(1 for e in host.emu.log if e.path == "/api/generate")


async def get_json(url: str) -> Any:
    async with aiohttp.ClientSession() as session, session.get(url) as resp:
        body = await resp.json()
        assert resp.status == 200, body
        return body


async def test_per_upstream_figures_match_each_hosts_ground_truth(
    emulator_hosts: StartHosts, make_proxy: MakeProxy, tmp_path: Path
) -> None:
    proxy, (a, b) = await two_hosts(emulator_hosts, make_proxy)
    async with aiohttp.ClientSession() as session:
        await send(session, proxy.url, "llama3.2", 5)
        await send(session, proxy.url, "qwen3:0.6b", 3)
    rows = await proxy.wait_rows(8)
    assert (served(a), served(b)) == (5, 3)
    body = await get_json(f"{proxy.url}/ollamon/api/summary?window=1h&by=upstream")
    groups = {g["upstream"]: g for g in body["groups"]}
    assert body["by"] == "upstream" and list(groups) == ["a", "b"]  # most requests first
    for name, host in (("a", a), ("b", b)):
        g = groups[name]
        mine = [r for r in rows if r["upstream"] == name]
        assert g["requests"] == served(host) == len(mine)
        assert g["failed"] == 0 and g["error_rate"] == 0
        # The emulator's eval_count is what Ollama reports: the rows and the group hold exactly that.
        assert host.emu is not None
        assert g["completion_tokens"] == sum(
            e.eval_count or 0 for e in host.emu.log if e.path == "/api/generate"
        )
        assert g["ttft_ms_p50"] == pytest.approx(quantile([r["ttft_ms"] for r in mine], 0.5))
    # 60 ms of prompt evaluation on b against 2 ms on a.
    assert groups["b"]["ttft_ms_p50"] > groups["a"]["ttft_ms_p50"] + 30
    # The filter gives the same figures as the group.
    only_b = await get_json(f"{proxy.url}/ollamon/api/summary?window=1h&upstream=b")
    assert only_b["overall"]["requests"] == 3
    assert only_b["overall"]["ttft_ms_p95"] == pytest.approx(groups["b"]["ttft_ms_p95"])
    # One instance wrote all of it.
    by_instance = await get_json(f"{proxy.url}/ollamon/api/summary?window=1h&by=instance")
    assert [(g["instance"], g["requests"]) for g in by_instance["groups"]] == [("edge-1", 8)]
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{proxy.url}/ollamon/api/summary?by=model") as resp:
            assert resp.status == 400 and "'by'" in (await resp.json())["error"]

    # The CLI, from the file and from the API: one row per host.
    for source in (("--db", str(proxy.db_path)), ("--url", proxy.url)):
        r = await asyncio.to_thread(ollamon, "stats", *source, "--upstream", cwd=tmp_path)
        assert r.returncode == 0, r.stderr
        table = r.stdout.split("\n\n")[-1].splitlines()
        assert table[0].split()[:4] == ["upstream", "requests", "failed", "error_rate"]
        assert [line.split()[:2] for line in table[2:]] == [["a", "5"], ["b", "3"]]
        r = await asyncio.to_thread(ollamon, "stats", *source, "--upstream", "b", "--json", cwd=tmp_path)
        assert r.returncode == 0, r.stderr
        data = orjson.loads(r.stdout)
        assert data["filters"]["upstream"] == "b" and data["overall"]["requests"] == 3
    r = ollamon("stats", "--db", str(proxy.db_path), "--upstream", "--by", "instance", cwd=tmp_path)
    assert r.returncode == 2 and "one breakdown at a time" in r.stderr


# -- the dashboard ---------------------------------------------------------------------------------


async def test_the_dashboard_shows_a_row_per_upstream_when_there_are_several(
    emulator_hosts: StartHosts, make_proxy: MakeProxy, browser: Browser
) -> None:
    proxy, _ = await two_hosts(emulator_hosts, make_proxy)
    page = await browser.new_page(viewport={"width": 1280, "height": 900})
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.set_default_timeout(20_000)
    await page.goto(f"{proxy.url}/ollamon/")
    await page.wait_for_function("() => document.querySelector('#st-live .val').textContent === 'connected'")
    assert await page.locator("#hosts").is_hidden()  # nothing recorded: no table
    async with aiohttp.ClientSession() as session:
        await send(session, proxy.url, "llama3.2", 5)
        await send(session, proxy.url, "qwen3:0.6b", 3)
    await proxy.wait_rows(8)
    await page.click(".windows button[data-window='1h']")  # reloads the tables at once
    await page.wait_for_selector("#upstreams-table tbody tr[data-name='b']")
    cells = await page.locator("#upstreams-table tbody tr").evaluate_all(
        "rows => rows.map(r => Array.from(r.cells).slice(0, 4).map(c => c.textContent))"
    )
    assert cells == [["a", "5", "0", "0.00 %"], ["b", "3", "0", "0.00 %"]]
    assert "1 h" in (await page.locator("#hosts-window").text_content() or "")
    # One instance wrote everything: no table for instances.
    assert await page.locator("#instances-wrap").is_hidden()
    assert errors == []
