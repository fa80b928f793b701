"""Estimate error per route, before and after calibration, against the emulator's ground truth.

Runs the emulator and ollamon in-process on loopback. For each route whose rows fall back to an estimate
(``/v1/chat/completions`` and ``/v1/completions`` streams without ``include_usage``, ``/v1/messages`` and
``/v1/responses`` streams cut before their usage event), it sends ``--requests`` requests for a fresh model
(no calibration data: the "before" column), then ``--train`` native ``/api/chat`` and ``/api/generate``
requests that carry Ollama's exact counts, then ``--requests`` new requests per route ("after"). Prompts are
random English-like text with punctuation, numbers and markup, 1-6 messages, sometimes a system prompt.
Error = recorded count - the emulator's ``prompt_eval_count`` / ``eval_count`` (what it really counted and
sent). Prints a Markdown table (the one in docs/metrics.md).

    python bench/estimate_error.py [--requests 30] [--train 40] [--seed 1]
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import random
import sqlite3
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from proxy.app import create_app, make_runner
from proxy.config import load_config
from proxy.emulator.app import create_app as create_emulator
from proxy.emulator.config import EmulatorConfig, ModelSpec, default_models
from proxy.emulator.state import EMULATOR_KEY

MODEL = "bench-calibration:1b"
VOCAB = (
    "the model answers questions about data code and science it reads long prompts and writes short "
    "answers one token at a time while the scheduler loads weights into memory and keeps them warm for "
    "the next request users ask why the sky is blue how tokenizers work and what a context window holds "
    "Ollama's server, llama.cpp's runner: 4.7GB, 128k context, q4_K_M. Why? Because x>y & <b>bold</b>!"
).split()
CUT = "truncate_after=4"  # /v1/messages and /v1/responses: end the stream before its usage event


def text(rng: random.Random, lo: int, hi: int) -> str:
    return " ".join(rng.choice(VOCAB) for _ in range(rng.randint(lo, hi)))


def messages(rng: random.Random) -> tuple[list[dict[str, str]], str]:
    msgs = [
        {"role": "user" if i % 2 == 0 else "assistant", "content": text(rng, 3, 120)}
        for i in range(rng.choice((1, 1, 2, 3, 4, 6)))
    ]
    if msgs[-1]["role"] != "user":
        msgs.append({"role": "user", "content": text(rng, 3, 60)})
    system = text(rng, 5, 40) if rng.random() < 0.3 else ""
    return msgs, system


def request_for(route: str, rng: random.Random) -> tuple[str, dict[str, Any], str]:
    """(path, body, X-Emulate) of one estimate-path request."""
    msgs, system = messages(rng)
    if route == "/v1/chat/completions":
        full = ([{"role": "system", "content": system}] if system else []) + msgs
        return route, {"model": MODEL, "messages": full, "stream": True}, ""
    if route == "/v1/completions":
        return route, {"model": MODEL, "prompt": text(rng, 3, 200), "stream": True}, ""
    if route == "/v1/messages":
        body: dict[str, Any] = {"model": MODEL, "messages": msgs, "max_tokens": 500, "stream": True}
        if system:
            body["system"] = system
        return route, body, CUT
    body = {"model": MODEL, "input": msgs, "stream": True}
    if system:
        body["instructions"] = system
    return route, body, CUT


def training_request(rng: random.Random, i: int) -> tuple[str, dict[str, Any]]:
    if i % 4 == 3:
        return "/api/generate", {"model": MODEL, "prompt": text(rng, 3, 200), "stream": False}
    msgs, system = messages(rng)
    full = ([{"role": "system", "content": system}] if system else []) + msgs
    return "/api/chat", {"model": MODEL, "messages": full, "stream": False}


ROUTES = ("/v1/chat/completions", "/v1/completions", "/v1/messages", "/v1/responses")


async def send(
    session: aiohttp.ClientSession, url: str, path: str, body: dict[str, Any], rid: str, emu: str
) -> None:
    headers = {"X-Request-Id": rid}
    if emu:
        headers["X-Emulate"] = emu
    async with session.post(url + path, json=body, headers=headers) as r:
        await r.read()


def rows(db: Path) -> dict[str, dict[str, Any]]:
    con = sqlite3.connect(db)
    con.row_factory = sqlite3.Row
    try:
        return {r["request_id"]: dict(r) for r in con.execute("SELECT * FROM inference_metrics")}
    finally:
        con.close()


async def wait_rows(db: Path, ids: list[str]) -> dict[str, dict[str, Any]]:
    for _ in range(400):
        got = rows(db)
        if all(i in got for i in ids):
            return got
        await asyncio.sleep(0.05)
    raise SystemExit(f"rows missing: {[i for i in ids if i not in rows(db)][:5]}")


def errors(
    got: dict[str, dict[str, Any]], emu: Any, ids: list[str]
) -> tuple[list[int], list[float], list[int]]:
    prompt_abs, prompt_rel, completion = [], [], []
    for rid in ids:
        row, gt = got[rid], emu.entry(rid)
        if gt.prompt_eval_count is None:
            raise SystemExit(f"{rid}: status {gt.status}, {gt.error_message}")
        assert row["token_source"] == "estimate", (rid, row["token_source"])
        prompt_abs.append(row["prompt_tokens"] - gt.prompt_eval_count)
        prompt_rel.append(abs(row["prompt_tokens"] - gt.prompt_eval_count) / gt.prompt_eval_count)
        completion.append(row["completion_tokens"] - (gt.eval_count or 0))
    return prompt_abs, prompt_rel, completion


async def run(n_requests: int, n_train: int, seed: int) -> str:
    rng = random.Random(seed)
    emu_app = create_emulator(
        EmulatorConfig(
            models=[*default_models(), ModelSpec(name=MODEL)],
            token_interval_s=0.0005,
            prompt_eval_s=0.0005,
            load_s=0.01,
            default_tokens=16,
        )
    )
    emu_runner = web.AppRunner(emu_app, handler_cancellation=True)
    await emu_runner.setup()
    await web.TCPSite(emu_runner, "127.0.0.1", 0).start()
    emu_url = f"http://127.0.0.1:{emu_runner.addresses[0][1]}"
    emu = emu_app[EMULATOR_KEY]
    tmp = Path(tempfile.mkdtemp(prefix="ollamon-bench-"))
    db = tmp / "bench.db"
    config = load_config(
        None,
        env={},
        overrides={
            ("server", "listen"): "127.0.0.1:0",
            ("server", "upstream"): emu_url,
            ("storage", "db"): str(db),
            ("inventory", "enabled"): False,
        },
    )
    runner = make_runner(create_app(config), config)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    url = f"http://127.0.0.1:{runner.addresses[0][1]}"
    results: dict[str, dict[str, tuple[list[int], list[float], list[int]]]] = {}
    try:
        async with aiohttp.ClientSession() as session:
            for phase in ("before", "after"):
                if phase == "after":
                    train_ids = []
                    for i in range(n_train):
                        path, body = training_request(rng, i)
                        rid = f"train-{i}"
                        await send(session, url, path, body, rid, "")
                        train_ids.append(rid)
                    await wait_rows(db, train_ids)
                for route in ROUTES:
                    ids = []
                    for i in range(n_requests):
                        path, body, knob = request_for(route, rng)
                        rid = f"{phase}-{route}-{i}"
                        await send(session, url, path, body, rid, knob)
                        ids.append(rid)
                    got = await wait_rows(db, ids)
                    results.setdefault(route, {})[phase] = errors(got, emu, ids)
    finally:
        await runner.cleanup()
        await emu_runner.cleanup()
    return table(results, n_requests, n_train)


def _mae(values: list[int]) -> str:
    return f"{statistics.fmean(abs(v) for v in values):.1f}"


def _bias(values: list[int]) -> str:
    return f"{statistics.fmean(values):+.1f}"


def _rel(values: list[float]) -> str:
    rel = sorted(values)
    p95 = rel[min(len(rel) - 1, round(0.95 * (len(rel) - 1)))]
    return f"{statistics.median(rel) * 100:.0f}% / {p95 * 100:.0f}%"


def table(results: dict[str, dict[str, tuple[list[int], list[float], list[int]]]], n: int, train: int) -> str:
    lines = [
        f"Estimate error per route: {n} requests per route and phase; 'after' follows {train} exact-count "
        "requests (native /api/chat and /api/generate) for the same model.",
        "",
        "| route | prompt MAE before → after | prompt bias before → after | prompt relative error p50 / p95 before "
        "→ after | completion MAE before → after |",
        "|---|---|---|---|---|",
    ]
    for route, phases in results.items():
        b_abs, b_rel, b_comp = phases["before"]
        a_abs, a_rel, a_comp = phases["after"]
        lines.append(
            f"| `{route}` | {_mae(b_abs)} → {_mae(a_abs)} tokens | {_bias(b_abs)} → {_bias(a_abs)} "
            f"| {_rel(b_rel)} → {_rel(a_rel)} | {_mae(b_comp)} → {_mae(a_comp)} tokens |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=30)
    parser.add_argument("--train", type=int, default=40)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    print(asyncio.run(run(args.requests, args.train, args.seed)))


if __name__ == "__main__":
    main()
