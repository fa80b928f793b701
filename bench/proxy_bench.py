"""What ollamon adds to latency, side by side with a direct call (and nginx, when installed).

Starts the emulator and ``ollamon serve`` as subprocesses (plus nginx with ``proxy_buffering off`` if the
``nginx`` binary exists), then drives 100-token streams at several concurrencies, interleaving the targets
round by round so that they share the machine's conditions. Prints tables of TTFT and total latency
(p50/p99), the added latency versus direct (per round, then the median of rounds), the streamed requests/s
with unpaced tokens (``--tp-concurrency`` streams, targets interleaved over ``--tp-rounds``) with each
measured target's CPU (% of one core, ms per stream; nginx counts master and worker), ollamon's CPU per
paced stream and peak RSS, and last the performance targets, ollamon beside nginx, each with its bound.

    python bench/proxy_bench.py [--rounds 5] [--concurrency 1,16,64] [--interval-ms 20] [--tokens 100]
    python bench/proxy_bench.py --quick                  # 2 rounds, 3 s of throughput: a fast check
    python bench/proxy_bench.py --tree ../other-checkout  # that checkout's ollamon side by side

With ``--upstream URL`` it measures your own Ollama instead: no emulator, nginx or naive proxy, only
``ollamon serve`` in front of that server, direct vs ollamon interleaved round by round, with ``--model``
(which must be pulled there) and ``options.num_predict = --tokens``, temperature 0 and a fixed seed so that both
targets generate the same answer. The throughput table then reuses that upstream as it is (its own pacing):

    python bench/proxy_bench.py --upstream http://127.0.0.1:11434 --model llama3.2 [--concurrency 1,4]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import psutil
from proxy_targets import check_model, servers, upstream_url


@dataclass
class Samples:
    ttft: list[float] = field(default_factory=list)
    total: list[float] = field(default_factory=list)
    errors: int = 0


BODY: dict[str, object] = {"model": "llama3.2", "prompt": "benchmark"}


async def one_stream(session: aiohttp.ClientSession, url: str, out: Samples) -> None:
    body = BODY
    start = time.perf_counter()
    first = None
    try:
        async with session.post(f"{url}/api/generate", json=body) as resp:
            async for _chunk in resp.content.iter_any():
                if first is None:
                    first = time.perf_counter()
            if resp.status != 200:
                out.errors += 1
                return
    except aiohttp.ClientError:
        out.errors += 1
        return
    end = time.perf_counter()
    out.ttft.append(((first or end) - start) * 1000)
    out.total.append((end - start) * 1000)


async def batch(session: aiohttp.ClientSession, url: str, concurrency: int, out: Samples) -> None:
    await asyncio.gather(*(one_stream(session, url, out) for _ in range(concurrency)))


async def throughput(
    session: aiohttp.ClientSession, url: str, concurrency: int, seconds: float
) -> tuple[int, float]:
    """Back-to-back streams from ``concurrency`` workers for ``seconds``: (streams done, seconds taken)."""
    done = 0
    stop = time.perf_counter() + seconds
    sink = Samples()

    async def worker() -> None:
        nonlocal done
        while time.perf_counter() < stop:
            await one_stream(session, url, sink)
            done += 1

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return done, time.perf_counter() - start


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * len(ordered)) - 1))]


class Cpu:
    """CPU seconds used so far by a target's processes (nginx: its master and worker)."""

    def __init__(self, pid: int) -> None:
        root = psutil.Process(pid)
        self.procs = [root, *root.children(recursive=True)]

    def seconds(self) -> float:
        total = 0.0
        for p in self.procs:
            with contextlib.suppress(psutil.Error):
                t = p.cpu_times()
                total += t.user + t.system
        return total


def cpus(targets: dict[str, str | int], names: list[str]) -> dict[str, Cpu]:
    return {n: Cpu(int(targets[f"{n}_pid"])) for n in names if f"{n}_pid" in targets}


def added(rounds: list[Samples], direct: list[Samples], q: float, total: bool = False) -> float:
    """Median over rounds of (target's percentile - direct's percentile in the same round), in ms."""
    diffs = []
    for r, d in zip(rounds, direct, strict=True):
        a, b = (r.total, d.total) if total else (r.ttft, d.ttft)
        if a and b:
            diffs.append(pct(a, q) - pct(b, q))
    return statistics.median(diffs) if diffs else float("nan")


def pooled(rounds: list[Samples]) -> Samples:
    out = Samples()
    for r in rounds:
        out.ttft += r.ttft
        out.total += r.total
        out.errors += r.errors
    return out


@dataclass
class Phase:
    """The zero-delay throughput phase of one target."""

    done: int = 0
    elapsed_s: float = 0.0
    cpu_s: float = 0.0

    @property
    def rate(self) -> float:
        return self.done / self.elapsed_s if self.elapsed_s else float("nan")


async def paced(
    args: argparse.Namespace, targets: dict[str, str | int], names: list[str]
) -> tuple[dict[tuple[int, str], list[Samples]], dict[str, tuple[float, int]]]:
    """Paced streams at each concurrency, targets interleaved round by round; per-round samples and the
    CPU (seconds, streams) each measured target spent on them."""
    results: dict[tuple[int, str], list[Samples]] = {}
    cpu = cpus(targets, names)
    spent = {n: (0.0, 0) for n in cpu}
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=None)) as s:
        for name in names:  # warm connections and code paths
            await batch(s, str(targets[name]), 4, Samples())
        for c in args.concurrency:
            for _ in range(args.rounds):
                for name in names:
                    samples = Samples()
                    results.setdefault((c, name), []).append(samples)
                    before = cpu[name].seconds() if name in cpu else 0.0
                    await batch(s, str(targets[name]), c, samples)
                    if name in cpu:
                        sec, n = spent[name]
                        spent[name] = (sec + cpu[name].seconds() - before, n + c)
    return results, spent


async def unpaced(
    args: argparse.Namespace, targets: dict[str, str | int], names: list[str]
) -> dict[str, Phase]:
    """Back-to-back streams at ``--tp-concurrency``, targets interleaved over ``--tp-rounds`` rounds."""
    phases = {n: Phase() for n in names}
    cpu = cpus(targets, names)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as s:
        for name in names:
            await batch(s, str(targets[name]), 4, Samples())
        for _ in range(args.tp_rounds):
            for name in names:
                ph = phases[name]
                before = cpu[name].seconds() if name in cpu else 0.0
                done, elapsed = await throughput(
                    s, str(targets[name]), args.tp_concurrency, args.tp_seconds / args.tp_rounds
                )
                ph.done += done
                ph.elapsed_s += elapsed
                if name in cpu:
                    ph.cpu_s += cpu[name].seconds() - before
    return phases


def print_latency(
    args: argparse.Namespace, names: list[str], results: dict[tuple[int, str], list[Samples]]
) -> None:
    print(
        "| conc | target | TTFT p50 | TTFT p99 | total p50 | total p99 | added TTFT p50 | "
        "added TTFT p99 | added total p50 | added total p99 | errors |"
    )
    print("|---" * 11 + "|")
    for c in args.concurrency:
        direct = results[(c, "direct")]
        for name in names:
            rounds = results[(c, name)]
            r = pooled(rounds)
            extra = (
                " |  |  | "
                if name == "direct"
                else " | ".join(
                    f"{added(rounds, direct, q, tot):+.2f}"
                    for q, tot in ((0.5, False), (0.99, False), (0.5, True), (0.99, True))
                )
            )
            print(
                f"| {c} | {name} | {pct(r.ttft, 0.5):.2f} | {pct(r.ttft, 0.99):.2f} | {pct(r.total, 0.5):.1f} | "
                f"{pct(r.total, 0.99):.1f} | {extra} | {r.errors} |"
            )
    print()


def print_targets(
    args: argparse.Namespace,
    names: list[str],
    results: dict[tuple[int, str], list[Samples]],
    spent: dict[str, tuple[float, int]],
    phases: dict[str, Phase],
) -> None:
    """The performance issue's targets, ollamon beside nginx (when it ran), with the bound each must meet."""
    ref = "nginx" if "nginx" in names else None
    shown = [n for n in names if n.startswith("ollamon")] + ([ref] if ref else [])
    print(f"| figure | {' | '.join(shown)} | target | met |")
    print("|---" * (len(shown) + 3) + "|")

    def row(
        label: str, values: dict[str, float], fmt: str, bound: float | None, bound_text: str, le: bool
    ) -> None:
        cells = " | ".join(fmt.format(values[n]) for n in shown)
        met = (
            ""
            if bound is None
            else ("yes" if (values["ollamon"] <= bound if le else values["ollamon"] >= bound) else "**no**")
        )
        print(f"| {label} | {cells} | {bound_text} | {met} |")

    for c, q, tot, slack in (
        (1, 0.5, False, 0.5),
        (16, 0.5, False, 0.5),
        (64, 0.5, False, None),
        (64, 0.99, False, 5.0),
        (64, 0.99, True, 5.0),
    ):
        if c not in args.concurrency:
            continue
        direct = results[(c, "direct")]
        v = {n: added(results[(c, n)], direct, q, tot) for n in shown}
        what = "full-response" if tot else "TTFT"
        label = f"added {what} p{round(q * 100)}, {c} stream{'s' if c > 1 else ''} (ms, median of rounds)"
        bound = v[ref] + slack if ref and slack is not None else None
        row(label, v, "{:+.2f}", bound, f"≤ nginx + {slack:g} ms" if ref and slack is not None else "", True)
    rate = {n: phases[n].rate for n in shown}
    text = {n: f"{rate[n]:.0f}" + (f" ({rate[n] / rate[ref] * 100:.0f} %)" if ref else "") for n in shown}
    ok = "" if not ref else ("yes" if rate["ollamon"] >= 0.8 * rate[ref] else "**no**")
    # With --upstream the "zero-delay" phase runs at that server's own pace: no nginx, no bound.
    phase = "upstream-paced" if args.upstream else "zero-delay"
    label = f"{phase} streamed req/s, {args.tp_concurrency} streams" + (" (% of nginx)" if ref else "")
    print(f"| {label} | {' | '.join(text[n] for n in shown)} | {'≥ 80 % of nginx' if ref else ''} | {ok} |")
    v = {
        n: phases[n].cpu_s / phases[n].elapsed_s * 100 if phases[n].elapsed_s else float("nan") for n in shown
    }
    row(f"CPU, % of one core, {phase} phase", v, "{:.1f}", None, "", True)
    v = {n: phases[n].cpu_s / phases[n].done * 1000 if phases[n].done else float("nan") for n in shown}
    row(f"CPU ms per proxied stream, {phase} phase", v, "{:.2f}", None, "", True)
    v = {n: spent[n][0] / spent[n][1] * 1000 if n in spent and spent[n][1] else float("nan") for n in shown}
    comparable = not args.upstream and args.tokens == 100  # the 8.8 ms was the emulator's 100-token streams
    row(
        f"CPU ms per proxied {args.tokens}-token stream, paced runs",
        v,
        "{:.2f}",
        4.4 if comparable else None,
        "≤ 4.4 (half of 8.8)" if comparable else "",
        True,
    )
    print()


async def run(args: argparse.Namespace) -> None:
    print(f"# python bench/proxy_bench.py {' '.join(sys.argv[1:])}")
    pacing = (
        f"model {args.model} at {args.upstream}" if args.upstream else f"{args.interval_ms} ms between tokens"
    )
    print(
        f"# {args.tokens}-token streams, {pacing}, {args.rounds} rounds, targets interleaved per round; "
        f"times in ms; 'added' = median over rounds of (target - direct) in the same round\n"
    )
    with tempfile.TemporaryDirectory() as d, servers(args, Path(d)) as targets:
        trees = [f"ollamon@{Path(t).name}" for t in args.tree]
        names = [n for n in ("direct", "ollamon", *trees, "naive-aiohttp", "nginx") if n in targets]
        proc = psutil.Process(int(targets["ollamon_pid"]))
        results, spent = await paced(args, targets, names)
        peak_rss = proc.memory_info().rss
    print_latency(args, names, results)
    # Throughput with unpaced tokens needs its own emulator settings; a real upstream is used as it is.
    with tempfile.TemporaryDirectory() as d:
        tp_args = argparse.Namespace(**{**vars(args), "interval_ms": 0})
        with servers(tp_args, Path(d)) as targets:
            proc = psutil.Process(int(targets["ollamon_pid"]))
            phases = await unpaced(args, targets, names)
            peak_rss = max(peak_rss, proc.memory_info().rss)
    tp_pacing = "the upstream's own pacing" if args.upstream else "no pacing"
    print(
        f"| target | streamed req/s ({args.tokens} tokens, {tp_pacing}, {args.tp_concurrency} streams, "
        f"{args.tp_seconds:g} s in {args.tp_rounds} interleaved rounds) | CPU % of one core | CPU ms per stream |"
    )
    print("|---|---|---|---|")
    for name in names:
        ph = phases[name]
        measured = f"{name}_pid" in targets
        cpu = (
            f"{ph.cpu_s / ph.elapsed_s * 100:.1f} | {ph.cpu_s / max(1, ph.done) * 1000:.2f}"
            if measured
            else " | "
        )
        print(f"| {name} | {ph.rate:.0f} | {cpu} |")
    print()
    print("| ollamon CPU per proxied stream (paced runs) | ollamon peak RSS |")
    print("|---|---|")
    sec, n = spent["ollamon"]
    print(f"| {sec / max(1, n) * 1000:.2f} ms | {peak_rss / 2**20:.0f} MiB |")
    print()
    print_targets(args, names, results, spent, phases)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--tree", action="append", default=[], help="another checkout's ollamon to compare")
    parser.add_argument("--concurrency", type=lambda s: [int(x) for x in s.split(",")], default=[1, 16, 64])
    parser.add_argument("--interval-ms", type=float, default=20.0)
    parser.add_argument("--tokens", type=int, default=100)
    parser.add_argument("--tp-concurrency", type=int, default=32)
    parser.add_argument("--tp-seconds", type=float, default=9.0, help="per target, over all --tp-rounds")
    parser.add_argument("--tp-rounds", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="a fast check: 2 rounds, 3 s of throughput")
    parser.add_argument("--no-nginx", action="store_true")
    parser.add_argument("--upstream", metavar="URL", help="your own Ollama: direct vs ollamon only")
    parser.add_argument("--model", default="llama3.2", help="the model to stream (default llama3.2)")
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.tp_seconds, args.tp_rounds = 2, 3.0, 1
    BODY["model"] = args.model
    if args.upstream:
        if args.tree:
            parser.error("--tree is not supported with --upstream")
        args.upstream = upstream_url(args.upstream)
        check_model(args.upstream, args.model)
        BODY["options"] = {"num_predict": args.tokens, "temperature": 0, "seed": 1}
    try:
        import uvloop

        uvloop.run(run(args))
    except ImportError:
        asyncio.run(run(args))


if __name__ == "__main__":
    main()
