"""Quotas: tokens per day and month, cost per month, per API key (by name) or per team.

``QuotaBook`` keeps, in memory, what each key and team used in the current UTC day and month: seeded from
the database at startup (``seed``) and advanced with every committed batch (``offer``, a writer
listener). Its ``check(caller, model)`` is the gate check (proxy/usage/identity.py): synchronous, a few
dict lookups, no I/O. A request whose key or team has used up a ``hard`` quota is refused with 429 and a
``Retry-After`` to the next UTC day or month; a soft quota only reports. ``percent_max()`` is the alert
metric ``quota_used_percent``: the highest used/limit share of any quota, in percent (docs/usage.md,
"Quotas").

Periods are UTC calendar days and months. A request is counted once it is recorded, so requests already
in flight when a quota runs out still finish: a hard quota can be overshot by what was in flight.
"""

from __future__ import annotations

import datetime as _dt
import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from proxy.usage.identity import Caller, Refusal
from storage.records import InferenceRecord

__all__ = ["LIMITS", "Quota", "QuotaBook", "parse_quotas", "periods"]

# (config key, period, what is counted)
LIMITS: tuple[tuple[str, str, str], ...] = (
    ("tokens_per_day", "day", "tokens"),
    ("tokens_per_month", "month", "tokens"),
    ("cost_per_month_usd", "month", "cost_usd"),
)
_KEYS = {"key", "team", "hard", *(name for name, _, _ in LIMITS)}


@dataclass(frozen=True, slots=True)
class Quota:
    """One quota: ``subject`` is ``key`` (an API key's name) or ``team``; a limit of 0 is no limit."""

    subject: str
    name: str
    tokens_per_day: int = 0
    tokens_per_month: int = 0
    cost_per_month_usd: float = 0.0
    hard: bool = False


def parse_quotas(raw: Any, name: str = "usage.quotas") -> tuple[Quota, ...]:
    """Quotas from config (``[{key: NAME | team: NAME, tokens_per_day, tokens_per_month,
    cost_per_month_usd, hard}, ...]``); raises ``ValueError`` naming the entry and key at fault."""
    if raw is None:
        return ()
    if not isinstance(raw, list):
        raise ValueError(f"{name}: must be a list of {{key or team, limits, hard}}")
    out: list[Quota] = []
    seen: set[tuple[str, str]] = set()
    for i, entry in enumerate(raw):
        where = f"{name}[{i}]"
        if not isinstance(entry, dict):
            raise ValueError(f"{where}: must be a mapping")
        unknown = set(entry) - _KEYS
        if unknown:
            raise ValueError(f"{where}: unknown key(s) {', '.join(sorted(map(str, unknown)))}")
        subjects = [s for s in ("key", "team") if s in entry]
        if len(subjects) != 1:
            raise ValueError(f"{where}: give exactly one of key (an API key's name) or team")
        subject = subjects[0]
        who = entry[subject]
        if not isinstance(who, str) or not who.strip():
            raise ValueError(f"{where}.{subject}: must be a non-empty name")
        if (subject, who) in seen:
            raise ValueError(f"{where}: a second quota for {subject} {who!r}")
        seen.add((subject, who))
        limits: dict[str, Any] = {}
        for key, _, counted in LIMITS:
            value = entry.get(key, 0)
            ok_type = int if counted == "tokens" else (int, float)
            if isinstance(value, bool) or not isinstance(value, ok_type) or value < 0:
                kind = "an integer" if counted == "tokens" else "a number"
                raise ValueError(f"{where}.{key}: must be {kind} >= 0 (0: no limit), got {value!r}")
            if not math.isfinite(value):
                raise ValueError(f"{where}.{key}: must be finite")
            limits[key] = value
        hard = entry.get("hard", False)
        if not isinstance(hard, bool):
            raise ValueError(f"{where}.hard: must be true or false")
        if not any(limits.values()):
            raise ValueError(f"{where}: sets no limit (tokens_per_day, tokens_per_month, cost_per_month_usd)")
        out.append(Quota(subject, who, hard=hard, **limits))
    return tuple(out)


def periods(epoch_s: float) -> tuple[str, str, float, float]:
    """(day, month, seconds to the next UTC day, seconds to the next UTC month) at ``epoch_s``."""
    dt = _dt.datetime.fromtimestamp(epoch_s, tz=_dt.UTC)
    day0 = dt.replace(hour=0, minute=0, second=0, microsecond=0)
    next_day = day0 + _dt.timedelta(days=1)
    next_month = (day0.replace(day=1) + _dt.timedelta(days=32)).replace(day=1)
    return (
        dt.strftime("%Y-%m-%d"),
        dt.strftime("%Y-%m"),
        (next_day - dt).total_seconds(),
        (next_month - dt).total_seconds(),
    )


def period_starts(epoch_s: float) -> tuple[float, float]:
    """Unix times of the start of the UTC day and month holding ``epoch_s``."""
    dt = _dt.datetime.fromtimestamp(epoch_s, tz=_dt.UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    return dt.timestamp(), dt.replace(day=1).timestamp()


class QuotaBook:
    """Usage of the current day and month per key id and team, against the configured quotas."""

    def __init__(self, quotas: Sequence[Quota], clock: Any = None) -> None:
        self.quotas = tuple(quotas)
        self.clock = clock or time.time
        self._by_key = {q.name: q for q in self.quotas if q.subject == "key"}
        self._by_team = {q.name: q for q in self.quotas if q.subject == "team"}
        # (subject, id, period) -> [tokens, cost_usd]; id is the key's id for keys, the name for teams.
        self._used: dict[tuple[str, str, str], list[float]] = {}
        self._key_ids: dict[str, set[str]] = {}  # key name -> ids seen with it (a rotated key keeps its name)
        self._periods = ("", "")
        self._day_span = (0.0, 0.0)  # [start, end) of the UTC day ``_periods`` names
        # key id -> the key's name, when the keys are known (the gate's key ring); ids seen through
        # ``check`` or the api_keys table are learned without it.
        self.resolver: Callable[[str], str | None] | None = None

    # -- feeding -----------------------------------------------------------------------------------

    def learn(self, key_id: str) -> None:
        """Ask the resolver for ``key_id``'s name, once."""
        if self.resolver is not None and not any(key_id in ids for ids in self._key_ids.values()):
            name = self.resolver(key_id)
            if name:
                self.name_key(key_id, name)

    def name_key(self, key_id: str, name: str) -> None:
        """Remember that ``key_id`` is the key called ``name``."""
        ids = self._key_ids.get(name)
        if ids is None:
            self._key_ids[name] = {key_id}
        elif key_id not in ids:
            ids.add(key_id)

    def _roll(self, now: float) -> tuple[str, str]:
        if self._day_span[0] <= now < self._day_span[1]:
            return self._periods  # the same UTC day: no date arithmetic on the gate's path
        day, month, to_day, _ = periods(now)
        self._day_span = (now + to_day - 86400.0, now + to_day)
        if (day, month) != self._periods:
            self._periods = (day, month)
            self._used = {k: v for k, v in self._used.items() if k[2] in (day, month)}
        return day, month

    def add(self, subject: str, who: str, tokens: float, cost_usd: float, at: float | None = None) -> None:
        """Count ``tokens`` and ``cost_usd`` for ``who`` in the day and month of ``at`` (default now)."""
        now = self.clock()
        day, month = self._roll(now)
        rday, rmonth, _, _ = periods(now if at is None else at)
        for period in (rday, rmonth):
            if period in (day, month):
                cell = self._used.setdefault((subject, who, period), [0.0, 0.0])
                cell[0] += tokens
                cell[1] += cost_usd

    def seed(self, subject: str, rows: Iterable[tuple[str, str, float, float]]) -> None:
        """Set used figures read from the database: (id, period, tokens, cost_usd) per row."""
        self._roll(self.clock())
        for who, period, tokens, cost in rows:
            if subject == "key":
                self.learn(who)
            self._used[(subject, who, period)] = [float(tokens), float(cost)]

    def offer(self, records: Sequence[Any]) -> None:
        """Writer listener: count every committed inference record (on the event loop; never raises)."""
        for rec in records:
            if not isinstance(rec, InferenceRecord) or rec.done_reason in ("load", "unload"):
                continue
            if rec.status_code == 429:
                continue  # refused, never served: its prompt estimate is not usage
            tokens = (rec.prompt_tokens or 0) + (rec.completion_tokens or 0)
            cost = rec.cost_usd or 0.0
            if not tokens and not cost:
                continue
            at = _epoch(rec.timestamp)
            if rec.api_key_id:
                self.learn(rec.api_key_id)
                self.add("key", rec.api_key_id, tokens, cost, at)
            if rec.team:
                self.add("team", rec.team, tokens, cost, at)

    # -- reading -----------------------------------------------------------------------------------

    def _used_of(self, q: Quota, period: str) -> tuple[float, float]:
        ids = self._key_ids.get(q.name, set()) if q.subject == "key" else {q.name}
        tokens = cost = 0.0
        for who in ids:
            cell = self._used.get((q.subject, who, period))
            if cell is not None:
                tokens += cell[0]
                cost += cell[1]
        return tokens, cost

    def status(self, q: Quota) -> list[dict[str, Any]]:
        """Each limit ``q`` sets: ``{limit, period, used, max, percent, remaining}``."""
        day, month = self._roll(self.clock())
        out = []
        for key, period, counted in LIMITS:
            limit = getattr(q, key)
            if not limit:
                continue
            tokens, cost = self._used_of(q, day if period == "day" else month)
            used = tokens if counted == "tokens" else cost
            out.append(
                {
                    "limit": key,
                    "used": used,
                    "max": limit,
                    "percent": used / limit * 100.0,
                    "remaining": max(limit - used, 0),
                }
            )
        return out

    def name_of(self, key_id: str) -> str | None:
        """The name of the key with id ``key_id``, when the book knows it."""
        self.learn(key_id)
        return next((n for n, ids in self._key_ids.items() if key_id in ids), None)

    def limits_of(self, subject: str, who: str, key_name: str | None = None) -> list[dict[str, Any]]:
        """The limits' use of the quota on team ``who``, or on the key with id ``who`` (named ``key_name``,
        else by the name the book has seen it with); empty when there is none."""
        if subject == "team":
            q = self._by_team.get(who)
        else:
            self.learn(who)
            name = key_name or next((n for n, ids in self._key_ids.items() if who in ids), None)
            if key_name:
                self.name_key(who, key_name)
            q = self._by_key.get(name or "")
        return self.status(q) if q is not None else []

    def report(self) -> list[dict[str, Any]]:
        """Every quota with its limits' use: what ``/ollamon/api/usage`` shows as ``quotas``."""
        return [
            {"subject": q.subject, "name": q.name, "hard": q.hard, "limits": self.status(q)}
            for q in self.quotas
        ]

    def percent_max(self) -> float | None:
        """The highest used share of any limit of any quota, in percent (None without quotas)."""
        shares = [s["percent"] for q in self.quotas for s in self.status(q)]
        return max(shares, default=None)

    def check(self, caller: Caller, model: str | None) -> Refusal | None:
        """Gate check: 429 when the caller's key or team has used up a hard quota. Only requests that name
        a model are refused (listing models, ``/api/version`` and the like stay open)."""
        if caller.key_id and caller.name:
            self.name_key(caller.key_id, caller.name)
        if model is None:
            return None
        for q in (self._by_key.get(caller.name or ""), self._by_team.get(caller.team or "")):
            if q is None or not q.hard or (not caller.key_id and q.subject == "key"):
                continue
            for s in self.status(q):
                if s["used"] >= s["max"]:
                    _, _, to_day, to_month = periods(self.clock())
                    wait = to_day if s["limit"] == "tokens_per_day" else to_month
                    wait_s = math.ceil(wait)
                    return Refusal(
                        429,
                        f"ollamon: quota exceeded: {q.subject} {q.name!r} used {s['used']:g} of "
                        f"{s['limit']} {s['max']:g}; it resets in {wait_s} s",
                        "quota_exceeded",
                        retry_after_s=wait_s,
                        headers=(("Retry-After", str(wait_s)),),
                    )
        return None


def _epoch(ts: str) -> float | None:
    try:
        return _dt.datetime.fromisoformat(ts.replace("Z", "+00:00")).timestamp()
    except (ValueError, AttributeError):
        return None
