"""What the dashboard's live snapshot costs at 100 requests/s with pages open (issue 15: < 5 ms of CPU a second).

Starts the emulator and ``ollamon serve`` (the shipped config: dashboard on, one frame a second) as
subprocesses, sends ``--rate`` streamed ``/api/generate`` requests a second through ollamon (open loop, a
few models), and runs phases of ``--phase-s`` seconds in turn: no page open, then ``--pages`` live readers
(``GET /ollamon/api/live``), repeated ``--rounds`` times so that machine noise hits every phase alike.

Two measures per phase:

- **In the server**: ollamon runs under a small wrapper that times, with the event-loop thread's CPU clock
  (``time.thread_time``), every ``LiveHub.make_frame`` (``build_frame`` plus the one orjson
  serialisation for all pages) and every ``LiveFigures.offer`` (the per-batch upkeep of the figures, which
  runs whether or not a page is open). The server is otherwise unchanged; SIGUSR1 makes the wrapper write
  its running totals to a file.
- **The whole process**: ollamon's CPU (psutil, user + system) per second of wall time, with and without
  pages. The difference also holds the SSE writes, but on a busy machine it is noisier than the figure it
  bounds: read it as a check, the in-server figure as the measure.

    python bench/snapshot_bench.py [--rate 100] [--pages 1,10] [--phase-s 10] [--rounds 3] [--root DIR]
    python bench/snapshot_bench.py --inproc [--root DIR]   # LiveFigures alone, vs another checkout's
    python bench/snapshot_bench.py --profile make_frame    # cProfile inside the server, top 40
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import importlib.util
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
import psutil
from common import free_port, stop_processes, wait_http

ROOT = Path(__file__).resolve().parent.parent
MODELS = ("llama3.2", "qwen2.5", "mistral")

# Runs ``python -m proxy serve ...`` with make_frame and offer timed; SIGUSR1 writes totals to $SNAP_OUT.
_WRAPPER = """
import cProfile, gc, io, json, os, pstats, runpy, signal, sys, time
from proxy.dashboard import figures, live
acc = {"make_frame": [0.0, 0], "offer": [0.0, 0], "frame_bytes": [0, 0], "gc_make_frame": [0.0, 0],
       "gc_offer": [0.0, 0], "gc_all": [0.0, 0]}
inside = [None]  # the timed call running now, for the garbage collections it triggers
gc_start = [0.0]
def on_gc(phase, info):
    if phase == "start":
        gc_start[0] = time.thread_time()
        return
    spent = time.thread_time() - gc_start[0]
    acc["gc_all"][0] += spent
    acc["gc_all"][1] += 1
    if inside[0] is not None:
        acc["gc_" + inside[0]][0] += spent
        acc["gc_" + inside[0]][1] += 1
gc.callbacks.append(on_gc)
profiled = os.environ.get("SNAP_PROFILE", "").split(",")
prof = cProfile.Profile() if profiled != [""] else None
frames = []  # CPU of each make_frame: the median leaves out the frames a garbage collection landed in
def timed(cls, name, key):
    orig = getattr(cls, name)
    on = prof is not None and key in profiled
    def wrapper(self, *args, **kwargs):
        if on:
            prof.enable()
        inside[0] = key
        t = time.thread_time()
        try:
            out = orig(self, *args, **kwargs)
        finally:
            acc[key][0] += time.thread_time() - t
            acc[key][1] += 1
            inside[0] = None
            if on:
                prof.disable()
        if key == "make_frame":
            acc["frame_bytes"][0] += len(out)
            acc["frame_bytes"][1] += 1
            frames.append(time.thread_time() - t)
        return out
    setattr(cls, name, wrapper)
timed(live.LiveHub, "make_frame", "make_frame")
timed(figures.LiveFigures, "offer", "offer")
def dump(*_):
    tmp = os.environ["SNAP_OUT"] + ".tmp"
    with open(tmp, "w") as f:
        json.dump({**acc, "frames": frames[-1000:]}, f)
    os.replace(tmp, os.environ["SNAP_OUT"])
def dump_profile(*_):
    text = io.StringIO()
    pstats.Stats(prof, stream=text).sort_stats(os.environ.get("SNAP_SORT", "cumulative")).print_stats(40)
    with open(os.environ["SNAP_OUT"] + ".prof.txt", "w") as f:
        f.write(text.getvalue())
signal.signal(signal.SIGUSR1, dump)
signal.signal(signal.SIGUSR2, dump_profile)
sys.argv = ["proxy", *sys.argv[1:]]
runpy.run_module("proxy", run_name="__main__", alter_sys=True)
"""


def cpu_s(proc: psutil.Process) -> float:
    t = proc.cpu_times()
    return float(t.user + t.system)


def _stamp(path: Path) -> int:
    return path.stat().st_mtime_ns if path.exists() else 0


async def read_totals(proc: psutil.Process, out: Path) -> dict[str, Any]:
    """Ask the wrapper for its totals and wait for the new file (a tiny local file: read in place)."""
    before = _stamp(out)
    proc.send_signal(signal.SIGUSR1)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if _stamp(out) != before:
            return dict(json.loads(_read_text(out)))
        await asyncio.sleep(0.02)
    raise RuntimeError("the server did not write its totals within 10 s")


def _read_text(path: Path) -> str:
    return path.read_text()


class Load:
    """Open-loop traffic: one streamed request every 1/rate s, whatever the answers do."""

    def __init__(self, session: aiohttp.ClientSession, url: str, rate: float) -> None:
        self.session, self.url, self.rate = session, url, rate
        self.sent = self.done = self.failed = 0
        self.errors: collections.Counter[str] = collections.Counter()
        self.tasks: set[asyncio.Task[None]] = set()

    async def one(self, i: int) -> None:
        body = {"model": MODELS[i % len(MODELS)], "prompt": f"snapshot bench {i}"}
        try:
            async with self.session.post(f"{self.url}/api/generate", json=body) as resp:
                async for _ in resp.content.iter_any():
                    pass
                if resp.status == 200:
                    self.done += 1
                else:
                    self.failed += 1
                    self.errors[f"HTTP {resp.status}"] += 1
        except aiohttp.ClientError as exc:
            self.failed += 1
            self.errors[type(exc).__name__] += 1

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        start = loop.time()
        while True:
            task = asyncio.ensure_future(self.one(self.sent))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)
            self.sent += 1
            await asyncio.sleep(max(0.0, start + self.sent / self.rate - loop.time()))


async def page(session: aiohttp.ClientSession, url: str, frames: list[int]) -> None:
    """One open dashboard: reads the live stream and counts its frames."""
    async with session.get(f"{url}/ollamon/api/live") as resp:
        if resp.status != 200:
            raise RuntimeError(f"/ollamon/api/live: HTTP {resp.status}")
        async for line in resp.content:
            if line.startswith(b"data: "):
                frames[0] += 1


async def phases(url: str, proc: psutil.Process, out: Path, args: argparse.Namespace) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=None)) as s:
        load = Load(s, url, args.rate)
        load_task = asyncio.ensure_future(load.run())
        try:
            await _phases(load, rows, proc, out, url, s, args)
        finally:
            if args.profile:
                proc.send_signal(signal.SIGUSR2)
                await asyncio.sleep(3.0)
            load_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await load_task
            for t in list(load.tasks):
                t.cancel()
            await asyncio.gather(*load.tasks, return_exceptions=True)
        if load.failed:
            print(f"failed requests: {load.failed} of {load.sent}: {dict(load.errors)}", file=sys.stderr)
    return rows


async def _phases(
    load: Load,
    rows: list[dict[str, Any]],
    proc: psutil.Process,
    out: Path,
    url: str,
    s: aiohttp.ClientSession,
    args: argparse.Namespace,
) -> None:
    """The warm-up, then each phase of the plan: pages opened, both measures taken, pages closed."""
    await asyncio.sleep(args.warmup_s)  # the figures' windows fill, the writer settles
    plan = [0, *args.pages] * args.rounds
    for n_pages in plan:
        frames = [0]
        readers = [asyncio.ensure_future(page(s, url, frames)) for _ in range(n_pages)]
        await asyncio.sleep(1.5 if n_pages else 0.5)  # first frames out, so the phase is steady
        t0, c0, a0, d0 = time.monotonic(), cpu_s(proc), await read_totals(proc, out), load.done
        f0 = frames[0]
        await asyncio.sleep(args.phase_s)
        t1, c1, a1, d1 = time.monotonic(), cpu_s(proc), await read_totals(proc, out), load.done
        f1 = frames[0]
        for r in readers:
            r.cancel()
        await asyncio.gather(*readers, return_exceptions=True)
        wall = t1 - t0
        made = a1["make_frame"][1] - a0["make_frame"][1]
        frame_cpu = a1["make_frame"][0] - a0["make_frame"][0]
        per_frame = a1["frames"][max(0, len(a1["frames"]) - made) :] if made else []
        size = a1["frame_bytes"][0] - a0["frame_bytes"][0]
        rows.append(
            {
                "pages": n_pages,
                "req_s": (d1 - d0) / wall,
                "proc_ms_s": (c1 - c0) * 1000 / wall,
                "frame_ms_s": frame_cpu * 1000 / wall,
                "frame_ms": statistics.median(per_frame) * 1000 if per_frame else None,
                "frame_max_ms": max(per_frame) * 1000 if per_frame else None,
                "frame_kib": size / made / 1024 if made else None,
                "frames_read_s": (f1 - f0) / wall,
                "offer_ms_s": (a1["offer"][0] - a0["offer"][0]) * 1000 / wall,
                "gc_in_ms_s": (
                    a1["gc_make_frame"][0] - a0["gc_make_frame"][0] + a1["gc_offer"][0] - a0["gc_offer"][0]
                )
                * 1000
                / wall,
                "gc_all_ms_s": (a1["gc_all"][0] - a0["gc_all"][0]) * 1000 / wall,
            }
        )
        print(f"  phase {len(rows)}/{len(plan)}: {rows[-1]}", file=sys.stderr)


def _med(rows: list[dict[str, Any]], key: str) -> float | None:
    vals = [r[key] for r in rows if r[key] is not None]
    return statistics.median(vals) if vals else None


def _fmt(v: float | None, digits: int = 2) -> str:
    return "—" if v is None else f"{v:.{digits}f}"


def _load_figures(root: Path, name: str) -> Any:
    """``proxy/dashboard/figures.py`` of a checkout as its own module (alerts/ and storage/ from this one)."""
    spec = importlib.util.spec_from_file_location(name, root / "proxy" / "dashboard" / "figures.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def inproc(args: argparse.Namespace) -> None:
    """``LiveFigures`` of this checkout and of ``--root`` fed the same records, interleaved second by second.

    Synthetic traffic at ``--rate`` records a second (three models, lognormal latencies, 2 % failures) on a
    simulated clock: 300 s fill the five-minute window, then each simulated second times ``offer`` of that
    second's batch and the figures a frame reads (``tiles``, ``minute_points``, ``rows_after``) with the
    thread's CPU clock. Both must give the same figures; the order alternates so that noise hits both alike.
    """
    sys.path.insert(0, str(ROOT))
    from storage.records import InferenceRecord, iso_utc

    rng = random.Random(1)
    rate = int(args.rate)
    t0 = 1_800_000_000.0

    def batch(sec: int) -> list[InferenceRecord]:
        return [
            InferenceRecord(
                timestamp=iso_utc(t0 + sec - rng.random() * 2),
                request_id=f"r{sec}-{i}",
                model_name=MODELS[i % len(MODELS)],
                endpoint="/api/generate",
                completion_tokens=rng.randint(5, 200),
                ttft_ms=rng.lognormvariate(5, 0.6),
                response_time_ms=rng.lognormvariate(7, 0.5),
                queue_time_ms=rng.lognormvariate(2, 1),
                tokens_per_second=rng.uniform(20, 80),
                success=rng.random() > 0.02,
            )
            for i in range(rate)
        ]

    mods = {"this checkout": _load_figures(ROOT, "figures_here")}
    if args.root.resolve() != ROOT.resolve():
        mods[f"--root {args.root}"] = _load_figures(args.root, "figures_root")
    clocks = {name: [t0] for name in mods}
    figs = {name: mod.LiveFigures(lambda c=clocks[name]: c[0]) for name, mod in mods.items()}
    offer_us: dict[str, list[float]] = {name: [] for name in mods}
    frame_us: dict[str, list[float]] = {name: [] for name in mods}
    warm, measured = 300, max(60, int(args.phase_s * args.rounds * 3))
    for sec in range(warm + measured):
        records = batch(sec)
        order = list(mods) if sec % 2 else list(reversed(mods))
        for name in order:
            f, clock = figs[name], clocks[name]
            clock[0] = t0 + sec
            t = time.thread_time()
            f.offer(records)
            t1 = time.thread_time()
            f.tiles(clock[0])
            f.minute_points(clock[0])
            f.rows_after(f.seq - rate)
            t2 = time.thread_time()
            if sec >= warm:
                offer_us[name].append((t1 - t) / rate * 1e6)
                frame_us[name].append((t2 - t1) * 1e6)
    outs = [(f.tiles(t0 + warm + measured), f.minute_points(t0 + warm + measured)) for f in figs.values()]
    assert all(o == outs[0] for o in outs), "the checkouts' figures differ"
    cmd = " ".join(["python", "bench/snapshot_bench.py", *sys.argv[1:]])
    print(
        f"# `{cmd}`: {rate} records/s simulated, {measured} s measured after {warm} s, medians; same figures\n"
    )
    print("| figures.py of | offer, CPU per record (µs) | a frame's figures, CPU (µs) |")
    print("|---|---|---|")
    for name in mods:
        print(
            f"| {name} | {statistics.median(offer_us[name]):.1f} | {statistics.median(frame_us[name]):.0f} |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rate", type=float, default=100.0, help="requests a second through ollamon")
    parser.add_argument("--pages", default="1,10", help="comma list: live readers in the page phases")
    parser.add_argument("--phase-s", type=float, default=10.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--warmup-s", type=float, default=10.0)
    parser.add_argument("--tokens", type=int, default=20, help="tokens per emulated answer")
    parser.add_argument("--token-interval-ms", type=float, default=5.0)
    parser.add_argument(
        "--profile",
        choices=["make_frame", "offer", "make_frame,offer"],
        metavar="make_frame|offer|make_frame,offer",
        help="also cProfile these in the server (slows them; prints the top 40 by cumulative time)",
    )
    parser.add_argument(
        "--inproc",
        action="store_true",
        help="no servers: time LiveFigures in this process on simulated traffic (vs --root's, interleaved)",
    )
    parser.add_argument(
        "--root",
        type=Path,
        default=ROOT,
        help="run ollamon from this checkout (e.g. a `git worktree` of an older commit, for before/after)",
    )
    args = parser.parse_args()
    args.pages = [int(p) for p in args.pages.split(",") if p.strip()]
    if args.inproc:
        inproc(args)
        return

    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        out = tmp / "snapshot.json"
        env = {**os.environ, "SNAP_OUT": str(out)}
        if args.profile:
            env["SNAP_PROFILE"] = args.profile
        emu_port, port = free_port(), free_port()
        py = sys.executable
        emu = [py, "-m", "proxy", "emulate", "--listen", f"127.0.0.1:{emu_port}", "--start-loaded"]
        emu += ["--models", ",".join(MODELS), "--parallel", "64", "--prompt-eval-ms", "2"]
        emu += ["--tokens", str(args.tokens), "--token-interval-ms", f"{args.token_interval_ms:g}"]
        serve = ["serve", "--listen", f"127.0.0.1:{port}", "--upstream", f"127.0.0.1:{emu_port}"]
        serve += ["--db", str(tmp / "bench.db"), "--no-redis", "--log-level", "error"]
        quiet = {"cwd": args.root, "env": env, "stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
        procs = [subprocess.Popen(emu, **quiet)]  # type: ignore[call-overload]
        try:
            wait_http(f"http://127.0.0.1:{emu_port}/")
            procs.append(subprocess.Popen([py, "-c", _WRAPPER, *serve], **quiet))  # type: ignore[call-overload]
            wait_http(f"http://127.0.0.1:{port}/ollamon/health", timeout=60)
            proc = psutil.Process(procs[-1].pid)
            rows = asyncio.run(phases(f"http://127.0.0.1:{port}", proc, out, args))
        finally:
            stop_processes(procs)
        profile = Path(f"{out}.prof.txt")
        if args.profile and profile.exists():
            print(profile.read_text())

    cmd = " ".join(["python", "bench/snapshot_bench.py", *sys.argv[1:]])
    print(
        f"# `{cmd}`: {args.rate:g} req/s target, {args.phase_s:g} s phases, {args.rounds} rounds, "
        "medians of rounds; CPU in ms per second of wall time\n"
    )
    print(
        "| pages | req/s | frames read/s (all pages) | make_frame CPU (ms/s) | per frame, median / max (ms) "
        "| frame (KiB) "
        "| figures upkeep, offer (ms/s) | of both, garbage collection (ms/s) | all GC in ollamon (ms/s) "
        "| ollamon process CPU (ms/s) | vs no page (ms/s) |"
    )
    print("|---" * 11 + "|")
    base = _med([r for r in rows if r["pages"] == 0], "proc_ms_s")
    for n in [0, *args.pages]:
        sel = [r for r in rows if r["pages"] == n]
        proc_ms = _med(sel, "proc_ms_s")
        delta = None if n == 0 or proc_ms is None or base is None else proc_ms - base
        print(
            f"| {n} | {_fmt(_med(sel, 'req_s'), 1)} | {_fmt(_med(sel, 'frames_read_s'), 1)} "
            f"| {_fmt(_med(sel, 'frame_ms_s'))} | {_fmt(_med(sel, 'frame_ms'))} / {_fmt(_med(sel, 'frame_max_ms'))} "
            f"| {_fmt(_med(sel, 'frame_kib'), 1)} "
            f"| {_fmt(_med(sel, 'offer_ms_s'))} | {_fmt(_med(sel, 'gc_in_ms_s'))} "
            f"| {_fmt(_med(sel, 'gc_all_ms_s'))} | {_fmt(proc_ms, 0)} | {'—' if delta is None else f'{delta:+.0f}'} |"
        )


if __name__ == "__main__":
    main()
