"""Query-string parsing for /ollamon/api/*: every bad value becomes ``BadParameter`` naming the parameter.

Shared by the API and the CLI, so ``--since 1h`` and ``?since=1h`` mean the same thing.
"""

from __future__ import annotations

import datetime as _dt
import math
import re
from collections.abc import Iterable, Mapping

from multidict import MultiMapping

from proxy.answers import BadParameter
from storage.model_names import canonical_model_name

__all__ = [
    "check_known",
    "parse_bool",
    "parse_duration",
    "parse_int",
    "parse_model",
    "parse_string",
    "parse_time",
    "parse_window",
]

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d|w)\s*$")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "w": 604800.0}
MAX_SPAN_S = 10 * 366 * 86400.0


def check_known(query: MultiMapping[str], known: Iterable[str]) -> None:
    """Refuse parameters this endpoint does not take (a typo must not silently widen a query) and repeats."""
    allowed = set(known)
    for name in set(query.keys()):
        if name not in allowed:
            raise BadParameter(name, f"unknown parameter; this endpoint takes {', '.join(sorted(allowed))}")
        if len(query.getall(name)) > 1:
            raise BadParameter(name, "given more than once")


def parse_duration(name: str, text: str) -> float:
    """``90s``, ``15m``, ``1h``, ``7d``, ``2w``, ``250ms`` -> seconds (> 0, at most ten years)."""
    m = _DURATION.match(text)
    if not m:
        raise BadParameter(name, f"{text!r} is not a duration like 30s, 15m, 1h, 7d")
    seconds = float(m.group(1)) * _UNITS[m.group(2)]
    if not 0 < seconds <= MAX_SPAN_S:
        raise BadParameter(name, f"{text!r} must be more than 0 and at most ten years")
    return seconds


def parse_time(name: str, text: str, now: float) -> float:
    """An instant: ISO-8601 (``2026-11-26T10:00:00Z``; no zone means UTC), Unix seconds, or a duration
    meaning that long ago (``1h`` = an hour before now)."""
    t = text.strip()
    if _DURATION.match(t):
        return now - parse_duration(name, t)
    try:
        value = float(t)
    except ValueError:
        pass
    else:
        if not math.isfinite(value) or not 0 <= value < 1e11:
            raise BadParameter(name, f"{text!r} is not a plausible Unix time")
        return value
    try:
        dt = _dt.datetime.fromisoformat(t.replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError:
        raise BadParameter(
            name,
            f"{text!r} is not a time: use ISO-8601 (2026-11-26T10:00:00Z), Unix seconds or a duration (1h)",
        ) from None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=_dt.UTC)
    return dt.timestamp()


def parse_window(query: Mapping[str, str], now: float, default_s: float) -> tuple[float, float]:
    """(since, until) from ``window`` or ``since``/``until`` (``until`` defaults to now)."""
    if "window" in query and "since" in query:
        raise BadParameter("window", "give window or since, not both")
    until = parse_time("until", query["until"], now) if "until" in query else now
    if "since" in query:
        since = parse_time("since", query["since"], now)
    else:
        since = until - (parse_duration("window", query["window"]) if "window" in query else default_s)
    if since >= until:
        raise BadParameter("since" if "since" in query else "until", "since must be before until")
    if until - since > MAX_SPAN_S:
        raise BadParameter("since", "the window is longer than ten years")
    return since, until


def parse_int(name: str, text: str | None, default: int, lo: int, hi: int) -> int:
    if text is None:
        return default
    try:
        value = int(text)
    except ValueError:
        raise BadParameter(name, f"{text!r} is not an integer") from None
    if not lo <= value <= hi:
        raise BadParameter(name, f"{value} is out of range {lo}..{hi}")
    return value


def parse_bool(name: str, text: str | None) -> bool | None:
    if text is None:
        return None
    t = text.strip().lower()
    if t in ("1", "true", "yes"):
        return True
    if t in ("0", "false", "no"):
        return False
    raise BadParameter(name, f"{text!r} is not true or false")


def parse_string(name: str, text: str | None, max_len: int = 256) -> str | None:
    """A printable string; ``model`` is resolved as Ollama resolves it (``parse_model``)."""
    if text is None:
        return None
    if not text or len(text) > max_len or any(ord(ch) < 32 for ch in text):
        raise BadParameter(name, f"must be 1..{max_len} printable characters")
    return canonical_model_name(text) if name == "model" else text


def parse_model(text: str | None) -> str | None:
    """``?model=``: ``llama3.2`` and ``llama3.2:latest`` both mean ``llama3.2:latest``, the name rows store
    (storage/model_names.py), so every ``model`` filter finds a model under either spelling."""
    return parse_string("model", text)
