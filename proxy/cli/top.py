"""``ollamon top``: a full-screen live view, like htop for Ollama, drawn with curses (the standard library's
terminal library, so no extra dependency).

Every ``--interval`` seconds it reads, and redraws:
- the last ``--window`` of requests (the summary API, exact) and its errors, to group mistyped model names:
  a model whose every request failed with Ollama's 404 ``model '...' not found`` gets no row of its own, but
  a count on one line (``3 unknown models: 17 requests``);
- the latest resource sample (``GET /ollamon/api/system`` with ``--url``; the newest ``system_metrics`` /
  ``gpu_metrics`` rows with a database file);
- whether Ollama answers: ``/ollamon/health``'s ``upstream`` with ``--url``; with a database file, top
  itself sends ``GET /`` to the config's ``server.upstream`` (1 s timeout);
- with ``--url`` only (they live in the proxy's memory): requests in flight and waiting per model
  (``GET /ollamon/api/live/models``) and the loaded models with their VRAM and expiry
  (``GET /ollamon/api/models``, the inventory).

``q`` or Esc quits. ``OLLAMON_ADMIN_TOKEN`` is sent as a Bearer token when the proxy needs one.
"""

from __future__ import annotations

import argparse
import curses
import datetime as dt
import functools
import re
import signal
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from typing import Any

from proxy.cli.terminal import size, visible
from proxy.upstream_url import Upstream
from storage.errors import StorageError
from storage.records import iso_utc

__all__ = ["lines_of", "register", "snapshot", "unknown_models"]

_NOT_FOUND = re.compile(r"^model .* not found")
_FOREVER_S = 365 * 86400.0  # Ollama's "keep loaded forever" is an expiry centuries away


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


@functools.lru_cache(maxsize=4)
def _configured_upstream(config: str | None) -> Upstream | None:
    """The config's ``server.upstream`` (read once, not every frame); None when the config is unusable."""
    from proxy.config import load_config
    from proxy.errors import CONFIG_ERRORS

    try:
        return load_config(config).server.upstream_value
    except CONFIG_ERRORS:
        return None


def _probe_local(args: argparse.Namespace) -> dict[str, Any] | None:
    """``GET /`` to the config's upstream, shaped like ``/ollamon/health``'s ``upstream`` section."""
    upstream = _configured_upstream(args.config)
    if upstream is None:
        return None
    out: dict[str, Any] = {"url": str(upstream)}
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    start = time.perf_counter()
    try:
        with opener.open(str(upstream.url_for("/", "")), timeout=1.0) as resp:
            out["reachable"], out["status_code"] = resp.status < 500, resp.status
    except urllib.error.HTTPError as exc:
        out["reachable"], out["status_code"] = exc.code < 500, exc.code
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = exc.reason if isinstance(exc, urllib.error.URLError) else exc
        out["reachable"], out["error"] = False, f"{type(reason).__name__}: {reason}"
    out["latency_ms"] = round((time.perf_counter() - start) * 1000.0, 2)
    return out


def snapshot(args: argparse.Namespace) -> dict[str, Any]:
    """One frame's data: ``summary`` (or ``error``), ``errors``, ``system``, ``upstream``, and with ``--url``
    ``in_flight``, ``live`` and ``models`` (each None when unavailable)."""
    from proxy.cli.source import CliError, fetch, http_get, http_json

    def attempt(read: Callable[[], Any]) -> Any:
        try:
            return read()
        except CliError:
            return None

    frame: dict[str, Any] = {"at": iso_utc(time.time()), "remote": bool(args.url)}
    try:
        frame["summary"] = fetch(args, "summary", {"window": args.window, "exact": "true"})
    except CliError as exc:
        frame["error"] = str(exc)
    frame["errors"] = attempt(lambda: fetch(args, "errors", {"window": args.window, "limit": "1"}))
    if args.url:
        frame["system"] = (attempt(lambda: http_get(args.url, "system", {})) or {}).get("latest")
        health = attempt(lambda: http_json(args.url, "/ollamon/health", {})) or {}
        frame["upstream"], frame["in_flight"] = health.get("upstream"), health.get("in_flight")
        frame["live"] = attempt(lambda: http_get(args.url, "live/models", {}))
        frame["models"] = attempt(lambda: http_get(args.url, "models", {}))
    else:
        frame["system"] = _system_local(args)
        frame["upstream"] = _probe_local(args)
        frame["in_flight"] = frame["live"] = frame["models"] = None
    return frame


def _num(v: Any, fmt: str = "{:.1f}", unit: str = "") -> str:
    return "n/a" if v is None else fmt.format(v) + unit


def unknown_models(frame: dict[str, Any]) -> dict[str, int]:
    """Models named in the window that Ollama does not have: every request failed with ``model ... not found``.

    Name -> requests. Errors are grouped by (type, model) with the newest message; a model counts when its
    ``upstream_status`` group says not found and covers all of its requests."""
    groups = (frame.get("errors") or {}).get("groups") or []
    not_found = {
        g["model_name"]: g["count"]
        for g in groups
        if g.get("error_type") == "upstream_status" and _NOT_FOUND.match(g.get("last_message") or "")
    }
    return {
        m["model"]: m["requests"]
        for m in (frame.get("summary") or {}).get("models", [])
        if m["model"] in not_found and m["requests"] and m["failed"] == m["requests"] == not_found[m["model"]]
    }


def lines_of(frame: dict[str, Any], source: str) -> list[tuple[str, bool]]:
    """The screen as (text, bold) lines; kept apart from curses so it is easy to read and test.

    Every line is passed through :func:`visible`: model names and errors are client-controlled."""
    return [(visible(text), bold) for text, bold in _lines(frame, source)]


def _name(text: str | None, width: int) -> str:
    # Escaped before it is cut, so the column keeps its width and no escape is cut in half unseen.
    name = visible(text or "(unknown)")
    return name if len(name) < width else name[: width - 2] + "…"


def _upstream_line(frame: dict[str, Any]) -> tuple[str, bool]:
    up = frame.get("upstream")
    where = "" if frame.get("remote") else " (probed by top)"
    if not up:
        return ("upstream n/a", False)
    if up.get("reachable"):
        return (
            f"upstream {up.get('url')} reachable{where}  {_num(up.get('latency_ms'), '{:.0f}', ' ms')}",
            False,
        )
    why = up.get("error") or f"HTTP {up.get('status_code')}"
    return (f"upstream {up.get('url')} UNREACHABLE{where}: {why}", True)


def _live_line(frame: dict[str, Any]) -> str:
    live = frame.get("live")
    if not frame.get("remote"):
        return "in_flight n/a: live counts need --url"
    if live is None:
        return "in_flight n/a"
    total = {k: sum(m[k] for m in live.values()) for k in ("generating", "waiting", "loading", "queued")}
    return (
        f"in_flight {_num(frame.get('in_flight'), '{}')}   generating {total['generating']}   "
        f"waiting {total['waiting']} (loading {total['loading']}, queued {total['queued']})"
    )


def _until(expires_at: str | None, now: float) -> str:
    if not expires_at:
        return "-"
    try:
        left = dt.datetime.fromisoformat(expires_at).timestamp() - now
    except ValueError:
        return visible(expires_at[:40])
    if left >= _FOREVER_S:
        return "forever"
    if left <= 0:
        return "now"
    minutes, seconds = divmod(int(left), 60)
    hours, minutes = divmod(minutes, 60)
    return f"in {hours}h {minutes:02d}m" if hours else f"in {minutes}m {seconds:02d}s"


def _loaded_lines(frame: dict[str, Any]) -> list[tuple[str, bool]]:
    inv = frame.get("models")
    if not frame.get("remote"):
        return [("loaded models need --url (the model inventory lives in the proxy)", False)]
    if inv is None:
        return [("loaded models n/a", False)]
    if not inv.get("enabled"):
        return [("loaded models n/a: the model inventory is off (inventory.enabled)", False)]
    loaded = [m for m in inv.get("models", []) if m.get("loaded")]
    if not loaded:
        return [("no model loaded", False)]
    now = time.time()
    out: list[tuple[str, bool]] = [(f"{'LOADED':<40}{'VRAM':>12}{'EXPIRES':>14}", True)]
    for m in loaded:
        out.append(
            (
                f"{_name(m['model_name'], 40):<40}{size(m.get('size_vram_bytes')):>12}{_until(m.get('expires_at'), now):>14}",
                False,
            )
        )
    vram = sum(m.get("size_vram_bytes") or 0 for m in loaded)
    out.append((f"{len(loaded)} loaded, {size(vram)} VRAM", False))
    return out


def _lines(frame: dict[str, Any], source: str) -> list[tuple[str, bool]]:
    out: list[tuple[str, bool]] = [(f"ollamon top  {source}  {frame['at']}   (q quits)", True)]
    out.append(_upstream_line(frame))
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
    out += [(line, False), (_live_line(frame), False), ("", False)]
    out += _model_rows(frame, s)
    out.append(("", False))
    out += _loaded_lines(frame)
    return out


def _model_rows(frame: dict[str, Any], s: dict[str, Any]) -> list[tuple[str, bool]]:
    out: list[tuple[str, bool]] = [
        (
            f"{'MODEL':<24}{'REQ/S':>8}{'TOK/S':>10}{'ttft_ms_p95':>15}{'response_time_ms_p95':>22}"
            f"{'ERRORS':>8}{'REQS':>8}{'in_flight':>11}{'waiting':>9}",
            True,
        )
    ]
    live: dict[str, Any] = frame.get("live") or {}
    unknown = unknown_models(frame)
    shown: set[str | None] = set()
    for m in s.get("models", []):
        if m["model"] in unknown:
            continue
        shown.add(m["model"])
        now = live.get(m["model"] or "") or {}
        out.append(
            (
                f"{_name(m['model'], 24):<24}{_num(m['requests_per_s'], '{:.2f}'):>8}{_num(m['tokens_per_s']):>10}"
                f"{_num(m['ttft_ms_p95'], '{:.0f}'):>15}{_num(m['response_time_ms_p95'], '{:.0f}'):>22}"
                f"{m['failed']:>8}{m['requests']:>8}{now.get('in_flight', '-'):>11}{now.get('waiting', '-'):>9}",
                False,
            )
        )
    for name, now in sorted(live.items()):
        if name not in shown and name not in unknown:  # in flight, nothing finished in the window yet
            out.append(
                (f"{_name(name, 24):<24}{'-':>8}{'-':>10}{'-':>15}{'-':>22}{'-':>8}{'-':>8}"
                 f"{now['in_flight']:>11}{now['waiting']:>9}", False)
            )  # fmt: skip
    if unknown:
        names = ", ".join(visible(n or "") for n in sorted(unknown, key=lambda n: (-unknown[n], n or "")))
        line = (
            f"{len(unknown)} unknown model{'s' if len(unknown) != 1 else ''}: {sum(unknown.values())} requests "
            f"(Ollama: model not found): {names}"
        )
        out.append((line if len(line) <= 160 else line[:159] + "…", False))
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


def _loop(scr: Any, args: argparse.Namespace, stop: list[int]) -> int:
    try:
        curses.curs_set(0)
    except curses.error:
        pass
    # getch waits at most 0.1 s at a time, so a Ctrl-C (the ``stop`` flag) ends the view within 0.1 s.
    scr.timeout(100)
    source = args.url or "database"
    next_draw = 0.0
    while not stop:
        if time.monotonic() >= next_draw:
            _draw(scr, lines_of(snapshot(args), source))
            next_draw = time.monotonic() + max(0.05, args.interval)
        if scr.getch() in (ord("q"), ord("Q"), 27):
            return 0
    return 0


def cmd_top(args: argparse.Namespace) -> int:
    if not args.url:
        from proxy.cli.source import db_path

        db_path(args)  # fail before the screen is taken over
    # Ctrl-C sets a flag rather than raising KeyboardInterrupt, which is lost when it lands in a finalizer
    # (as ``requests --follow`` does, proxy/cli/analytics.py).
    stop: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: stop.append(signum))
    try:
        return int(curses.wrapper(_loop, args, stop))
    except KeyboardInterrupt:
        return 0
    finally:
        signal.signal(signal.SIGINT, previous)


def register(
    sub: Any, source_args: Callable[[argparse.ArgumentParser], None], run: Callable[[Any], Any]
) -> None:
    p = sub.add_parser(
        "top",
        help="a full-screen live view: upstream, requests/s, tokens/s, p95 TTFT, errors, in flight and waiting "
        "per model, loaded models and VRAM, GPU/CPU",
    )
    source_args(p)
    p.add_argument("--interval", type=float, default=1.0, help="seconds between refreshes (default 1)")
    p.add_argument("--window", default="60s", help="rates and percentiles over this window (default 60s)")
    p.set_defaults(func=run(cmd_top))
