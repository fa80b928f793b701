"""Issue 16: one alert evaluator per fleet. The lease on a real PostgreSQL (two contenders, release, crash,
hang, a dropped connection), then two real alert engines on one SQLite file (two stores, two writers) with
the lease in PostgreSQL and a real webhook receiver: one webhook per firing, a failover that announces
nothing twice; and retention on the maintenance lease holder only.

Timings are bounds with wide margins: the machine is shared, so only "no later than" is asserted, and what
was measured is printed (pytest -s shows it).
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, BinaryIO

import aiohttp
import asyncpg
import pytest

from alerts.engine import AlertEngine
from alerts.rules import parse_alerts
from alerts.store import AlertStore
from proxy.keys import ENGINE_KEY
from storage.lease import Grant, LeaseKeeper
from storage.postgres.lease import PgLeaseBackend
from storage.postgres.retention import PgRetention
from storage.postgres.store import PostgresStore
from storage.records import InferenceRecord, iso_utc
from storage.retention import RetentionPolicy
from storage.sqlite import SQLiteStore
from storage.writer import Writer
from tests.alerts_helpers import Receiver, generate, get_json, webhook_receiver
from tests.fixtures.ports import free_port
from tests.fixtures.proxy import MakeProxy

# Long enough that a loaded machine's stalls (seen: over a second) do not make a healthy holder lapse.
TTL_S = 2.0
RENEW_S = 0.4
SLACK_S = 3.0  # a shared, loaded machine: how late a bound may be met
ROOT = Path(__file__).resolve().parents[1]


def keeper(url: str, name: str = "alerts", ttl_s: float = TTL_S, renew_s: float = RENEW_S) -> LeaseKeeper:
    return LeaseKeeper(PgLeaseBackend(url), name, ttl_s=ttl_s, renew_s=renew_s)


async def crash(k: LeaseKeeper) -> None:
    """The holder's process dies: it stops renewing and its connection drops, nothing is released."""
    task, k._task = k._task, None
    if task is not None:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    assert isinstance(k.backend, PgLeaseBackend)
    if k.backend._conn is not None:
        k.backend._conn.terminate()
        k.backend._conn = None


class Watch:
    """Samples both contenders' beliefs every 10 ms: two holders at once is the one thing never allowed."""

    def __init__(self, *keepers: LeaseKeeper) -> None:
        self.keepers = keepers
        self.both = 0
        self.samples = 0
        self._task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        while True:
            if sum(k.held for k in self.keepers) > 1:
                self.both += 1
            self.samples += 1
            await asyncio.sleep(0.01)

    def __enter__(self) -> Watch:
        self._task = asyncio.ensure_future(self._run())
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()


async def until(cond: Callable[[], bool], within: float, what: str) -> float:
    """Seconds until ``cond()`` held; fails after ``within``."""
    started = time.monotonic()
    while not cond():
        if time.monotonic() - started > within:
            raise AssertionError(f"{what}: not within {within} s")
        await asyncio.sleep(0.01)
    return time.monotonic() - started


async def holders(url: str) -> dict[str, tuple[str | None, int]]:
    b = PgLeaseBackend(url)
    try:
        return await b.holders()
    finally:
        await b.close()


# -- the lease itself, on PostgreSQL ------------------------------------------------------------------


async def test_two_contenders_exactly_one_holds_and_a_release_hands_over(pg_url: str) -> None:
    a, b = keeper(pg_url), keeper(pg_url)
    await asyncio.gather(a.start(), b.start())
    try:
        with Watch(a, b) as watch:
            await asyncio.sleep(4 * RENEW_S)  # several renewals on both sides
            assert [a.held, b.held].count(True) == 1
            first, second = (a, b) if a.held else (b, a)
            assert (await holders(pg_url))["alerts"] == (first.holder, 1)
            assert second.snapshot()["holder"] == first.holder and not second.snapshot()["held"]
            await first.stop()  # graceful: released, so the other needs no TTL to pass
            took = await until(lambda: second.held, RENEW_S + SLACK_S, "the release handed over")
            print(f"handover after a release: {took:.3f} s (renew every {RENEW_S} s)")
            assert (await holders(pg_url))["alerts"] == (second.holder, 2)  # a new holder, a new epoch
            assert second.acquired == 1 and first.acquired == 1
        assert watch.both == 0 and watch.samples > 50
    finally:
        await a.stop()
        await b.stop()


async def test_a_crashed_holder_is_replaced_within_ttl_and_renew_and_epochs_increase(pg_url: str) -> None:
    a, b = keeper(pg_url), keeper(pg_url)
    await a.start()
    await b.start()
    try:
        assert a.held and not b.held
        epochs = [(await holders(pg_url))["alerts"][1]]
        with Watch(a, b) as watch:
            for _ in range(2):  # a crashes, b takes over; b "restarts" as a new keeper and crashes, ...
                holder, other = (a, b) if a.held else (b, a)
                await crash(holder)
                crashed_at = time.monotonic()
                took = await until(
                    partial(getattr, other, "held"), TTL_S + RENEW_S + SLACK_S, "crash failover"
                )
                print(f"handover after a crash: {took:.3f} s (ttl {TTL_S} s, renew {RENEW_S} s)")
                # never before the crashed holder's grant ran out (it may have been renewed just before)
                assert time.monotonic() - crashed_at >= TTL_S - RENEW_S - 0.05
                epochs.append((await holders(pg_url))["alerts"][1])
                assert (await holders(pg_url))["alerts"][0] == other.holder
                await holder.start()  # it comes back, as a contender
        assert epochs == sorted(set(epochs)) and len(epochs) == 3
        assert watch.both == 0
    finally:
        await a.stop()
        await b.stop()


class HangingBackend(PgLeaseBackend):
    """Answers until ``hang`` is set, then never again (a stuck network or server for this instance)."""

    hang = False

    async def acquire(self, name: str, holder: str, ttl_s: float) -> Grant:
        if self.hang:
            await asyncio.sleep(3600)
        return await super().acquire(name, holder, ttl_s)


async def test_a_hung_holder_stops_believing_before_the_other_takes_over(pg_url: str) -> None:
    stuck = HangingBackend(pg_url)
    a = LeaseKeeper(stuck, "alerts", ttl_s=TTL_S, renew_s=RENEW_S)
    b = keeper(pg_url)
    await a.start()
    await b.start()
    try:
        assert a.held
        with Watch(a, b) as watch:
            stuck.hang = True
            lost = await until(lambda: not a.held, TTL_S + SLACK_S, "the hung holder let go")
            took = await until(lambda: b.held, TTL_S + RENEW_S + SLACK_S, "failover from a hung holder")
            print(f"hung holder: let go after {lost:.3f} s, other holds {took:.3f} s later")
        assert watch.both == 0
        await until(lambda: a.errors >= 1, TTL_S + SLACK_S, "the stuck renewal timed out")  # bounded by ttl
        assert "TimeoutError" in (a.last_error or "") and not a.held
    finally:
        stuck.hang = False
        await a.stop()
        await b.stop()


async def test_a_dropped_connection_is_reopened_and_the_lease_kept(pg_url: str) -> None:
    a, b = keeper(pg_url), keeper(pg_url)
    await a.start()
    await b.start()
    try:
        assert isinstance(a.backend, PgLeaseBackend) and a.backend._conn is not None
        pid = a.backend._conn.get_server_pid()
        admin = await asyncpg.connect(pg_url)
        try:
            assert await admin.fetchval("SELECT pg_terminate_backend($1)", pid)
        finally:
            await admin.close()
        with Watch(a, b) as watch:
            await asyncio.sleep(TTL_S + 3 * RENEW_S)  # a renewal fails, the next reconnects in time
            assert a.held and not b.held
            assert a.backend._conn is not None and a.backend._conn.get_server_pid() != pid
        assert watch.both == 0
        assert (await holders(pg_url))["alerts"] == (a.holder, 1)  # the same tenure: nothing handed over
    finally:
        await a.stop()
        await b.stop()


# -- two alert engines, one SQLite file, the lease in PostgreSQL ------------------------------------------

INTERVAL_S = 0.5
RULE: dict[str, Any] = {
    "name": "error-burst",
    "when": {"metric": "error_rate", "window": "30s", "op": ">", "threshold": 0.5, "min_requests": 6},
    "for": 0,
    "severity": "error",
    "cooldown": "1h",
    "notify": ["hook"],
}


@dataclass
class Instance:
    store: SQLiteStore
    writer: Writer
    engine: AlertEngine
    lease: LeaseKeeper

    def record(self, ok: bool, n: int = 1) -> None:
        for _ in range(n):
            self.writer.submit(
                InferenceRecord(
                    timestamp=iso_utc(time.time()),
                    request_id=uuid.uuid4().hex,
                    model_name="m",
                    success=ok,
                    response_time_ms=5.0,
                    endpoint="/api/generate",
                )
            )


@asynccontextmanager
async def instance(db: Path, pg_url: str, receiver: Receiver) -> AsyncIterator[Instance]:
    store = SQLiteStore(db)
    await store.open()
    writer = Writer(store, flush_interval_s=0.05)
    await writer.start()
    hook = {"type": "webhook", "url": receiver.url, "timeout": 1, "max_attempts": 2}
    spec = parse_alerts([RULE], {"hook": hook}, "test", env={})
    lease = keeper(pg_url, ttl_s=1.5, renew_s=0.3)
    engine = AlertEngine(spec, interval_s=INTERVAL_S, store=AlertStore(writer, store.reads), lease=lease)
    await engine.start()
    writer.add_listener(engine)
    try:
        yield Instance(store, writer, engine, lease)
    finally:
        await engine.stop()
        await writer.stop()
        await store.close()


async def kill(i: Instance) -> None:
    """The holder's process dies: no more evaluations, no release, its lease connection gone."""
    task, i.engine._task = i.engine._task, None
    if task is not None:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    await crash(i.lease)


async def test_two_engines_announce_once_and_a_killed_holder_hands_over_without_repeating(
    tmp_path: Path, pg_url: str
) -> None:
    db = tmp_path / "fleet.db"
    async with webhook_receiver() as receiver:
        async with instance(db, pg_url, receiver) as one, instance(db, pg_url, receiver) as two:
            holder, standby = (one, two) if one.lease.held else (two, one)
            assert holder.lease.held and not standby.lease.held
            # 4 failures on each instance: neither alone reaches min_requests 6, the fleet does, so the
            # holder must count the other instance's rows from the store.
            holder.record(False, 4)
            standby.record(False, 4)
            await receiver.wait_for(1, "firing", within=10 * INTERVAL_S + SLACK_S)
            await asyncio.sleep(6 * INTERVAL_S)
            assert len(receiver.events("firing")) == 1
            assert standby.engine.evaluations == 0 and standby.engine.alerts == {}
            assert holder.engine.fleet is not None and holder.engine.fleet.counted >= 4
            # each request counted once, though the holder's own come back in every read of the store
            holder.engine.requests.advance(time.time())
            assert holder.engine.requests.totals(30, None).n == 8
            assert holder.engine.fleet.read_rows > 8
            fired = receiver.events("firing")[0]["alert"]
            assert fired["values"]["error_rate"] == 1.0

            evaluations = standby.engine.evaluations
            await kill(holder)
            killed_at = time.monotonic()
            took = await until(
                lambda: standby.engine.evaluations > evaluations,
                INTERVAL_S + SLACK_S,
                "the standby evaluates",
            )
            print(f"alert failover: first evaluation on the new holder {took:.3f} s after the kill "
                  f"(interval {INTERVAL_S} s, ttl {standby.lease.ttl_s} s)")  # fmt: skip
            assert standby.lease.held
            # the firing alert carried over from the store: still firing, not announced again
            assert [a.state for a in standby.engine.alerts.values()] == ["firing"]
            assert next(iter(standby.engine.alerts.values())).id == fired["id"]
            standby.record(False, 2)
            await asyncio.sleep(6 * INTERVAL_S)
            assert len(receiver.events("firing")) == 1, receiver.events()
            assert time.monotonic() - killed_at > 6 * INTERVAL_S
            # it resolves on the new holder, announced once (the firing was announced by the old one)
            standby.record(True, 40)
            await receiver.wait_for(1, "resolved", within=10 * INTERVAL_S + SLACK_S)
            await asyncio.sleep(4 * INTERVAL_S)
            assert len(receiver.events("resolved")) == 1
            assert len(receiver.events("firing")) == 1
            assert receiver.events("resolved")[0]["alert"]["id"] == fired["id"]
            health = standby.engine.counts()["lease"]
            assert health["held"] and health["holder"] == standby.lease.holder and health["shared"]


async def test_a_stopped_holder_releases_and_the_other_takes_over_at_once(
    tmp_path: Path, pg_url: str
) -> None:
    db = tmp_path / "fleet.db"
    async with webhook_receiver() as receiver:
        async with instance(db, pg_url, receiver) as one:
            async with instance(db, pg_url, receiver) as two:
                assert one.lease.held and not two.lease.held
                assert two.engine.counts()["lease"]["holder"] == one.lease.holder
                one.record(False, 8)
                await receiver.wait_for(1, "firing", within=10 * INTERVAL_S + SLACK_S)
                await one.engine.stop()  # graceful: the lease is released
                took = await until(lambda: two.engine.evaluations > 0, INTERVAL_S + SLACK_S, "takeover")
                print(f"takeover after a graceful stop: {took:.3f} s")
                await asyncio.sleep(4 * INTERVAL_S)
                assert len(receiver.events("firing")) == 1
                assert [a.state for a in two.engine.alerts.values()] == ["firing"]


# -- maintenance: retention on one instance --------------------------------------------------------------


async def test_retention_runs_only_on_the_maintenance_lease_holder(pg_url: str) -> None:
    store = PostgresStore(pg_url)
    await store.open()
    policy = RetentionPolicy(raw_days=30, system_days=7, rollup_days=400, batch_rows=1000)
    la, lb = keeper(pg_url, "maintenance", 5.0, 1.0), keeper(pg_url, "maintenance", 5.0, 1.0)
    a, b = PgRetention(policy, store, lease=la), PgRetention(policy, store, lease=lb)
    await la.start()
    await lb.start()
    try:
        ran, skipped = await a.run_once(store), await b.run_once(store)
        assert ran.get("skipped") is None and ran["error"] is None and "inference_metrics" in ran["deleted"]
        assert skipped["deleted"] == {} and la.holder in skipped["skipped"]
        assert b.last_run is skipped
        dry = await b.run_once(store, dry_run=True)  # a dry run only counts: any instance may
        assert dry.get("skipped") is None
        await la.stop()
        await until(lambda: lb.held, 1.0 + SLACK_S, "maintenance handover")
        assert (await b.run_once(store)).get("skipped") is None
        assert (await a.run_once(store))["skipped"]
    finally:
        await la.stop()
        await lb.stop()
    # as the writer runs them: loop() takes the lease, runs (or skips) a pass, and releases it when stopped
    c = PgRetention(policy, store, lease=keeper(pg_url, "maintenance", 5.0, 1.0), first_run_s=0.0)
    d = PgRetention(policy, store, lease=keeper(pg_url, "maintenance", 5.0, 1.0), first_run_s=0.0)
    loops = [asyncio.ensure_future(r.loop(store)) for r in (c, d)]
    try:
        await until(lambda: c.last_run is not None and d.last_run is not None, SLACK_S, "both passes")
        assert c.last_run is not None and d.last_run is not None
        assert sorted(bool(r.get("skipped")) for r in (c.last_run, d.last_run)) == [False, True]
        assert (await holders(pg_url))["maintenance"][0] is not None
    finally:
        for t in loops:
            t.cancel()
        await asyncio.gather(*loops, return_exceptions=True)
        await store.close()
    assert (await holders(pg_url))["maintenance"][0] is None  # released on the way out


@pytest.mark.parametrize("ttl, renew", [(0.0, None), (1.0, 1.0), (1.0, 2.0)])
def test_bad_lease_timings_are_refused(ttl: float, renew: float | None) -> None:
    with pytest.raises(ValueError):
        LeaseKeeper(PgLeaseBackend("postgresql://x/y"), "alerts", ttl_s=ttl, renew_s=renew)


# -- the app: two proxies on one PostgreSQL database -------------------------------------------------------


async def test_two_proxies_on_one_postgres_announce_once_and_fail_over(
    pg_url: str, emulator: Any, make_proxy: MakeProxy
) -> None:
    rule = {**RULE, "when": {**RULE["when"], "min_requests": 4}}
    async with webhook_receiver() as receiver:
        config = {
            "storage__url": pg_url,
            "alerts__interval_s": INTERVAL_S,
            "alerts__lease_ttl_s": 1.5,  # not the default 0.3 s: a loaded machine stalls longer than that
            "alerts__rules": [rule],
            "alerts__channels": {"hook": {"type": "webhook", "url": receiver.url, "timeout": 1}},
        }
        one = await make_proxy(emulator.url, server__instance="one", **config)
        two = await make_proxy(emulator.url, server__instance="two", **config)
        async with aiohttp.ClientSession() as s:
            leases = [
                (await get_json(s, f"{p.url}/ollamon/health"))[1]["alerts"]["lease"] for p in (one, two)
            ]
            assert [x["held"] for x in leases].count(True) == 1
            assert leases[0]["holder"] == leases[1]["holder"] and leases[0]["holder"].startswith(
                ("one/", "two/")
            )
            holder, standby = (one, two) if leases[0]["held"] else (two, one)
            for p in (one, two):  # 2 failures through each: only the fleet reaches min_requests 4
                for _ in range(2):
                    assert (await generate(s, p.url, emulate="error_status=500"))[0] == 500
            await receiver.wait_for(1, "firing", within=10 * INTERVAL_S + SLACK_S)
            await holder.stop()  # graceful: releases the lease
            took = await until(
                lambda: standby.app[ENGINE_KEY].evaluations > 0,
                INTERVAL_S + SLACK_S,
                "the other proxy evaluates",
            )
            print(f"proxy failover after a graceful stop: {took:.3f} s")
            assert (await get_json(s, f"{standby.url}/ollamon/health"))[1]["alerts"]["lease"]["held"]
            _, rules = await get_json(s, f"{standby.url}/ollamon/api/alert-rules")
            assert rules["lease"]["holder"].startswith("one/" if standby is one else "two/")
            for _ in range(2):
                await generate(s, standby.url, emulate="error_status=500")
            await asyncio.sleep(6 * INTERVAL_S)
            assert len(receiver.events("firing")) == 1, receiver.events()
            (row,) = (await get_json(s, f"{standby.url}/ollamon/api/alerts?state=firing"))[1]["alerts"]
            assert row["id"] == receiver.events("firing")[0]["alert"]["id"]


# -- the acceptance: two `ollamon serve` processes on one PostgreSQL, the holder SIGKILLed -----------------


async def test_two_serve_processes_announce_once_and_a_killed_holder_hands_over(
    pg_url: str, emulator: Any, tmp_path: Path
) -> None:
    interval = 2.0  # the lease's TTL is the default, 0.6 x interval
    rule = {**RULE, "when": {**RULE["when"], "min_requests": 4}}
    async with webhook_receiver() as receiver, aiohttp.ClientSession() as s:
        procs: dict[str, tuple[asyncio.subprocess.Process, str]] = {}
        logs: list[BinaryIO] = []
        try:
            for name in ("one", "two"):
                port = free_port()
                config = {
                    "server": {"listen": f"127.0.0.1:{port}", "upstream": emulator.url, "instance": name},
                    "storage": {"url": pg_url},
                    "inventory": {"enabled": False},
                    "alerts": {
                        "interval_s": interval,
                        "rules": [rule],
                        "channels": {"hook": {"type": "webhook", "url": receiver.url, "timeout": 1}},
                    },
                }
                path = tmp_path / f"{name}.yaml"
                path.write_text(json.dumps(config))  # JSON is YAML
                log = (tmp_path / f"{name}.log").open("wb")
                logs.append(log)
                proc = await asyncio.create_subprocess_exec(
                    sys.executable, "-m", "proxy", "serve", "--config", str(path),
                    cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                )  # fmt: skip
                procs[name] = (proc, f"http://127.0.0.1:{port}")

            async def lease(url: str) -> dict[str, Any] | None:
                try:
                    status, body = await get_json(s, f"{url}/ollamon/health")
                except aiohttp.ClientError:
                    return None
                return body["alerts"]["lease"] if status == 200 else None

            async def leases() -> list[dict[str, Any] | None]:
                return [await lease(url) for _, url in procs.values()]

            deadline = time.monotonic() + 60
            while None in (got := await leases()):
                for name, (proc, _) in procs.items():
                    assert proc.returncode is None, (tmp_path / f"{name}.log").read_text()
                assert time.monotonic() < deadline, "the two instances did not start"
                await asyncio.sleep(0.2)
            assert [x is not None and x["held"] for x in got].count(True) == 1, got
            (holder,) = [n for n, x in zip(procs, got, strict=True) if x is not None and x["held"]]
            (standby,) = [n for n in procs if n != holder]
            for _, url in procs.values():  # 2 failures through each: only the fleet reaches 4
                for _ in range(2):
                    assert (await generate(s, url, emulate="error_status=500"))[0] == 500
            await receiver.wait_for(1, "firing", within=10 * interval + SLACK_S)

            procs[holder][0].kill()  # SIGKILL: no release, no goodbye
            killed = time.monotonic()
            await procs[holder][0].wait()
            while not ((x := await lease(procs[standby][1])) and x["held"]):
                assert time.monotonic() - killed < interval + SLACK_S, x
                await asyncio.sleep(0.05)
            took = time.monotonic() - killed
            print(f"serve processes: lease handed over {took:.3f} s after SIGKILL (interval {interval} s)")
            for _ in range(2):
                await generate(s, procs[standby][1], emulate="error_status=500")
            await asyncio.sleep(3 * interval)
            assert len(receiver.events("firing")) == 1, receiver.events()
            _, body = await get_json(s, f"{procs[standby][1]}/ollamon/api/alerts?state=firing")
            assert [a["id"] for a in body["alerts"]] == [receiver.events("firing")[0]["alert"]["id"]]
        finally:
            for proc, _ in procs.values():
                if proc.returncode is None:
                    proc.terminate()
                    try:
                        await asyncio.wait_for(proc.wait(), 30)
                    except TimeoutError:
                        proc.kill()
                        await proc.wait()
            for log in logs:
                log.close()
