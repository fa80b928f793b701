"""``ollamon top``: a full-screen live view, like htop for Ollama, drawn with curses (the standard library's
terminal library, so no extra dependency).

Every ``--interval`` seconds it reads the last ``--window`` of requests (the summary API, exact) and the
latest resource sample (``GET /ollamon/api/system`` with ``--url``; the newest ``system_metrics`` /
``gpu_metrics`` rows with a database file), and redraws. ``q`` or Esc quits.
"""

from __future__ import annotations

import argparse
import curses
import time
from collections.abc import Callable
from typing import Any

from proxy.cli.terminal import visible
from storage.errors import StorageError
from storage.records import iso_utc

__all__ = ["register", "snapshot"]


def _system_local(args: argparse.Namespace) -> dict[str, Any] | None:
    from proxy.cli.source import reads

    try:
        row = reads(args).latest_system()
    except StorageError:
        return None
    if row is None:
        return None
    gpus = [
        {
            "index": g["gpu_index"],
            "utilization_percent": g["utilization_percent"],
            "memory_percent": g["memory_percent"],
            "temperature_c": g["temperature_c"],
            "power_w": g["power_w"],
        }
        for g in row["gpus"]
    ]
    return {"cpu_percent": row["cpu_percent"], "memory_percent": row["memory_percent"], "gpus": gpus}


def snapshot(args: argparse.Namespace) -> dict[str, Any]:
    """One frame's data: ``summary`` (or ``error``) and ``system`` (None when unavailable)."""
    from proxy.cli.source import CliError, fetch, http_get

    frame: dict[str, Any] = {"at": iso_utc(time.time())}
    try:
        frame["summary"] = fetch(args, "summary", {"window": args.window, "exact": "true"})
    except CliError as exc:
        frame["error"] = str(exc)
    try:
        if args.url:
            frame["system"] = (http_get(args.url, "system", {}) or {}).get("latest")
        else:
            frame["system"] = _system_local(args)
    except CliError:
        frame["system"] = None
    return frame


def _num(v: Any, fmt: str = "{:.1f}", unit: str = "") -> str:
    return "n/a" if v is None else fmt.format(v) + unit


def lines_of(frame: dict[str, Any], source: str) -> list[tuple[str, bool]]:
    """The screen as (text, bold) lines; kept apart from curses so it is easy to read and test.

    Every line is passed through :func:`visible`: model names and errors are client-controlled."""
    return [(visible(text), bold) for text, bold in _lines(frame, source)]


def _lines(frame: dict[str, Any], source: str) -> list[tuple[str, bool]]:
    out: list[tuple[str, bool]] = [(f"ollamon top  {source}  {frame['at']}   (q quits)", True)]
    if "error" in frame:
        return [*out, ("", False), (f"error: {frame['error']}", True)]
    s = frame["summary"]
    o = s["overall"]
    secs = s["window"]["seconds"]
    out.append(
        (
            f"requests/s {_num(o['requests_per_s'], '{:.2f}')}   tokens/s {_num(o['tokens_per_s'])}   "
            f"p95 TTFT {_num(o['ttft_ms_p95'], '{:.0f}', ' ms')}   errors {o['failed']} "
            f"({_num(o['error_rate'] and o['error_rate'] * 100, '{:.1f}', '%')})   "
            f"requests {o['requests']} in the last {secs:.0f} s",
            False,
        )
    )
    sysinfo = frame.get("system")
    if sysinfo:
        line = f"CPU {_num(sysinfo.get('cpu_percent'), '{:.0f}', '%')}   MEM {_num(sysinfo.get('memory_percent'), '{:.0f}', '%')}"
        gpus = sysinfo.get("gpus") or []
        for g in gpus:
            line += (
                f"   GPU{g.get('index')} {_num(g.get('utilization_percent'), '{:.0f}', '%')} "
                f"mem {_num(g.get('memory_percent'), '{:.0f}', '%')} {_num(g.get('temperature_c'), '{:.0f}', 'C')} "
                f"{_num(g.get('power_w'), '{:.0f}', 'W')}"
            )
        if not gpus:
            line += "   GPU n/a"
    else:
        line = "CPU n/a   MEM n/a   GPU n/a"
    out += [(line, False), ("", False)]
    out.append(
        (
            f"{'MODEL':<24}{'REQ/S':>8}{'TOK/S':>10}{'ttft_ms_p95':>15}{'response_time_ms_p95':>22}"
            f"{'ERRORS':>8}{'REQS':>8}",
            True,
        )
    )
    for m in s.get("models", []):
        # Escaped before it is cut, so the column keeps its width and no escape is cut in half unseen.
        name = visible(m["model"] or "(unknown)")
        name = name if len(name) <= 23 else name[:22] + "…"
        out.append(
            (
                f"{name:<24}{_num(m['requests_per_s'], '{:.2f}'):>8}{_num(m['tokens_per_s']):>10}"
                f"{_num(m['ttft_ms_p95'], '{:.0f}'):>15}{_num(m['response_time_ms_p95'], '{:.0f}'):>22}"
                f"{m['failed']:>8}{m['requests']:>8}",
                False,
            )
        )
    return out


def _draw(scr: Any, lines: list[tuple[str, bool]]) -> None:
    scr.erase()
    height, width = scr.getmaxyx()
    for y, (text, bold) in enumerate(lines[: max(0, height - 1)]):
        try:
            scr.addnstr(y, 0, text, max(0, width - 1), curses.A_BOLD if bold else curses.A_NORMAL)
        except curses.error:
            pass  # a terminal too small for a line: show what fits
    scr.refresh()


def _loop(scr: Any, args: argparse.Namespace) -> int:
    try:
        curses.curs_set(0)
    except curses.error:
        pass
    scr.timeout(max(50, int(args.interval * 1000)))
    source = args.url or "database"
    while True:
        _draw(scr, lines_of(snapshot(args), source))
        ch = scr.getch()
        if ch in (ord("q"), ord("Q"), 27):
            return 0


def cmd_top(args: argparse.Namespace) -> int:
    if not args.url:
        from proxy.cli.source import db_path

        db_path(args)  # fail before the screen is taken over
    try:
        return int(curses.wrapper(_loop, args))
    except KeyboardInterrupt:
        return 0


def register(
    sub: Any, source_args: Callable[[argparse.ArgumentParser], None], run: Callable[[Any], Any]
) -> None:
    p = sub.add_parser("top", help="a full-screen live view: requests/s, tokens/s, p95 TTFT, errors, GPU/CPU")
    source_args(p)
    p.add_argument("--interval", type=float, default=1.0, help="seconds between refreshes (default 1)")
    p.add_argument("--window", default="60s", help="rates and percentiles over this window (default 60s)")
    p.set_defaults(func=run(cmd_top))
