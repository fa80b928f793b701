"""Alert rules and channels: parsed from the raw ``alerts.rules`` / ``alerts.channels`` YAML and validated.

Validation happens once, before anything starts. Every mistake raises ``RuleError`` naming the file, the
rule (by index and name) and the field, e.g.
``config.yaml: alerts.rules[2] (high-error-rate).when.all[1].window: expected a duration like 30s, 5m, 1h``.
docs/alerts.md documents the syntax; ``ollamon alerts check`` runs this without starting anything.
"""

from __future__ import annotations

import math
import os
import re
import string
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from alerts.errors import RuleError
from alerts.metrics import METRICS, MetricKind, suggest
from storage.model_names import canonical_model_pattern

__all__ = [
    "AlertsSpec",
    "ChannelSpec",
    "Condition",
    "Rule",
    "parse_alerts",
    "parse_duration",
]

Op = Literal[">", ">=", "<", "<="]
OPS: tuple[str, ...] = (">", ">=", "<", "<=")
SEVERITIES: tuple[str, ...] = ("info", "warning", "error", "critical")
AGGS: tuple[str, ...] = ("avg", "max", "min", "last")
CHANNEL_TYPES: tuple[str, ...] = ("webhook", "slack", "log")
MAX_WINDOW_S = 86400
DEFAULT_WINDOW_S = {
    MetricKind.REQUESTS: 300,
    MetricKind.GAUGE: 60,
    MetricKind.PROBE: 60,
    MetricKind.COUNTER: 300,
}
DEFAULT_MIN_REQUESTS = 10
# Names a description template may use, with sample values used to check a template at startup.
TEMPLATE_FIELDS: dict[str, Any] = {
    "rule": "r",
    "severity": "error",
    "value": 1.0,
    "threshold": 1.0,
    "metric": "error_rate",
    "op": ">",
    "window": "5m",
    "model": "m",
    "labels": {},
    "values": {},
}
_NAME = re.compile(r"^[A-Za-z0-9_.:-]+$")
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}


@dataclass(frozen=True, slots=True)
class Condition:
    """``metric op threshold`` over the last ``window_s`` seconds (one-second resolution)."""

    metric: str
    op: Op
    threshold: float
    window_s: int
    model: str | None = None  # exact name or glob (canonical: storage/model_names.py), request metrics only
    min_requests: int = 0  # request metrics only
    agg: str = "avg"  # resource metrics: avg | max | min | last
    window_text: str = ""

    @property
    def kind(self) -> MetricKind:
        return METRICS[self.metric].kind

    def holds(self, value: float) -> bool:
        if self.op == ">":
            return value > self.threshold
        if self.op == ">=":
            return value >= self.threshold
        if self.op == "<":
            return value < self.threshold
        return value <= self.threshold

    def describe(self) -> str:
        where = f"{{model={self.model}}}" if self.model else ""
        return f"{self.metric}{where}[{self.window_text}] {self.op} {self.threshold:g}"


@dataclass(frozen=True, slots=True)
class Rule:
    name: str
    conditions: tuple[Condition, ...]
    mode: Literal["all", "any"] = "all"
    for_s: float = 0.0
    severity: str = "warning"
    cooldown_s: float = 3600.0
    repeat: bool = True
    resolve_delay_s: float | None = None  # None: alerts.resolve_delay_s
    group_by: tuple[str, ...] = ()
    labels: Mapping[str, str] = field(default_factory=dict)
    description: str | None = None
    notify: tuple[str, ...] = ()

    @property
    def max_window_s(self) -> int:
        return max(c.window_s for c in self.conditions)

    def describe(self) -> str:
        return f" {self.mode} ".join(c.describe() for c in self.conditions) if self.conditions else ""


@dataclass(frozen=True, slots=True)
class ChannelSpec:
    name: str
    type: str
    url: str = ""
    secret: str | None = None
    headers: Mapping[str, str] = field(default_factory=dict)
    timeout_s: float = 5.0
    max_attempts: int = 5
    backoff_initial_s: float = 1.0
    backoff_max_s: float = 60.0
    level: str = "warning"  # log channel only


@dataclass(frozen=True, slots=True)
class AlertsSpec:
    rules: tuple[Rule, ...]
    channels: Mapping[str, ChannelSpec]

    def windows(self, kind: MetricKind) -> set[int]:
        """Every distinct window length the rules use for metrics of ``kind``."""
        return {c.window_s for r in self.rules for c in r.conditions if c.kind is kind}


def parse_duration(value: Any) -> float:
    """``30s``, ``5m``, ``1.5h``, ``1d``, ``250ms`` or a number of seconds; ``ValueError`` otherwise."""
    if isinstance(value, bool):
        raise ValueError(f"expected a duration like 30s, 5m, 1h, got {value!r}")
    if isinstance(value, int | float):
        if value < 0 or not math.isfinite(value):
            raise ValueError(f"must be a finite duration >= 0, got {value!r}")
        return float(value)
    if isinstance(value, str):
        m = _DURATION.match(value)
        if m:
            return float(m.group(1)) * _UNITS[m.group(2)]
    raise ValueError(f"expected a duration like 30s, 5m, 1h, got {value!r}")


class _Ctx:
    """Where we are in the file, for error messages."""

    def __init__(self, source: str, key: str) -> None:
        self.source = source
        self.key = key

    def at(self, sub: str) -> _Ctx:
        return _Ctx(self.source, f"{self.key}.{sub}" if not sub.startswith("[") else f"{self.key}{sub}")

    def fail(self, reason: str) -> RuleError:
        return RuleError(self.source, self.key, reason)


def _mapping(raw: Any, ctx: _Ctx, known: set[str]) -> dict[str, Any]:
    if not isinstance(raw, dict):
        raise ctx.fail(f"must be a mapping, got {raw!r}")
    for key in raw:
        if key not in known:
            raise ctx.at(str(key)).fail(f"unknown key (known: {', '.join(sorted(known))})")
    return raw


def _number(raw: Any, ctx: _Ctx) -> float:
    if isinstance(raw, bool) or not isinstance(raw, int | float) or not math.isfinite(raw):
        raise ctx.fail(f"expected a number, got {raw!r}")
    return float(raw)


def _duration(raw: Any, ctx: _Ctx) -> float:
    try:
        return parse_duration(raw)
    except ValueError as exc:
        raise ctx.fail(str(exc)) from None


def _choice(raw: Any, ctx: _Ctx, choices: tuple[str, ...]) -> str:
    if not isinstance(raw, str) or raw not in choices:
        raise ctx.fail(f"must be one of {', '.join(choices)}, got {raw!r}")
    return raw


def _string_map(raw: Any, ctx: _Ctx) -> dict[str, str]:
    if raw is None:
        return {}
    if not isinstance(raw, dict) or not all(isinstance(k, str) for k in raw):
        raise ctx.fail(f"must be a mapping of names to strings, got {raw!r}")
    out: dict[str, str] = {}
    for k, v in raw.items():
        if isinstance(v, bool) or not isinstance(v, str | int | float):
            raise ctx.at(k).fail(f"expected a string, got {v!r}")
        out[k] = str(v)
    return out


_CONDITION_KEYS = {"metric", "window", "op", "threshold", "model", "min_requests", "agg"}


def _condition(raw: Any, ctx: _Ctx) -> Condition:
    body = _mapping(raw, ctx, _CONDITION_KEYS)
    if "metric" not in body:
        raise ctx.at("metric").fail("missing (every condition names a metric)")
    metric = body["metric"]
    if not isinstance(metric, str) or metric not in METRICS:
        guess = suggest(metric) if isinstance(metric, str) else None
        if guess is not None:
            raise ctx.at("metric").fail(f"unknown metric {metric!r}: did you mean {guess!r}?")
        raise ctx.at("metric").fail(f"unknown metric {metric!r} (known: {', '.join(METRICS)})")
    kind = METRICS[metric].kind
    op = _choice(body.get("op", ">"), ctx.at("op"), OPS)
    if "threshold" not in body:
        raise ctx.at("threshold").fail("missing (a number to compare the metric with)")
    threshold = _number(body["threshold"], ctx.at("threshold"))
    window_raw = body.get("window", DEFAULT_WINDOW_S[kind])
    window = _duration(window_raw, ctx.at("window"))
    if window < 1 or window > MAX_WINDOW_S or window != int(window):
        raise ctx.at("window").fail(f"must be whole seconds from 1s to 1d, got {window_raw!r}")
    window_text = window_raw if isinstance(window_raw, str) else f"{int(window)}s"
    model = body.get("model")
    min_requests = DEFAULT_MIN_REQUESTS if kind is MetricKind.REQUESTS else 0
    if kind is not MetricKind.REQUESTS:
        for key in ("model", "min_requests"):
            if key in body:
                raise ctx.at(key).fail(f"only request metrics take {key}; {metric} is a {kind.value} metric")
    else:
        if model is not None:
            if not isinstance(model, str) or not model.strip():
                raise ctx.at("model").fail(f"expected a model name or glob, got {model!r}")
            # Rows hold the name Ollama resolves (llama3.2:latest): match it whichever spelling the rule uses.
            model = canonical_model_pattern(model)
        if metric == "requests_per_s":
            min_requests = 0  # a rate of 0 is a real value (traffic stopped), not missing data
            if "min_requests" in body:
                raise ctx.at("min_requests").fail(
                    "requests_per_s takes no min_requests (no traffic is a rate of 0)"
                )
        elif "min_requests" in body:
            mr = body["min_requests"]
            if isinstance(mr, bool) or not isinstance(mr, int) or mr < 0:
                raise ctx.at("min_requests").fail(f"expected an integer >= 0, got {mr!r}")
            min_requests = mr
    agg = METRICS[metric].default_agg
    if "agg" in body:
        if kind not in (MetricKind.GAUGE, MetricKind.PROBE):
            raise ctx.at("agg").fail(f"only resource metrics take agg; {metric} is a {kind.value} metric")
        agg = _choice(body["agg"], ctx.at("agg"), AGGS)
    return Condition(
        metric=metric,
        op=op,  # type: ignore[arg-type]
        threshold=threshold,
        window_s=int(window),
        model=model,
        min_requests=min_requests,
        agg=agg,
        window_text=window_text,
    )


_RULE_KEYS = {
    "name",
    "when",
    "for",
    "severity",
    "cooldown",
    "repeat",
    "resolve_delay",
    "group_by",
    "labels",
    "description",
    "notify",
}


def _rule(raw: Any, ctx: _Ctx, channels: Mapping[str, ChannelSpec]) -> Rule:
    if not isinstance(raw, dict):
        raise ctx.fail(f"must be a mapping, got {raw!r}")
    name = raw.get("name")
    if not isinstance(name, str) or not _NAME.match(name):
        raise ctx.at("name").fail(f"expected a name of letters, digits and _.:- , got {name!r}")
    ctx = _Ctx(ctx.source, f"{ctx.key} ({name})")
    body = _mapping(raw, ctx, _RULE_KEYS)
    if "when" not in body:
        raise ctx.at("when").fail("missing (a condition, or all:/any: with a list of conditions)")
    when = body["when"]
    mode: Literal["all", "any"] = "all"
    wctx = ctx.at("when")
    if isinstance(when, dict) and ("all" in when or "any" in when):
        if len(when) != 1:
            raise wctx.fail("use either all: or any: with a list of conditions, nothing beside it")
        mode = "all" if "all" in when else "any"
        items = when[mode]
        if not isinstance(items, list) or not items:
            raise wctx.at(mode).fail("expected a non-empty list of conditions")
        conditions = tuple(_condition(c, wctx.at(mode).at(f"[{i}]")) for i, c in enumerate(items))
    else:
        conditions = (_condition(when, wctx),)
    severity = _choice(body.get("severity", "warning"), ctx.at("severity"), SEVERITIES)
    group_raw = body.get("group_by", [])
    group_by = (group_raw,) if isinstance(group_raw, str) else group_raw
    if not isinstance(group_by, list | tuple) or any(g != "model" for g in group_by):
        raise ctx.at("group_by").fail(f"the only label to group by is model, got {group_raw!r}")
    if group_by and not any(c.kind is MetricKind.REQUESTS for c in conditions):
        raise ctx.at("group_by").fail("grouping by model needs at least one request metric in when")
    repeat = body.get("repeat", True)
    if not isinstance(repeat, bool):
        raise ctx.at("repeat").fail(f"expected true or false, got {repeat!r}")
    notify_raw = body.get("notify", list(channels))
    notify = [notify_raw] if isinstance(notify_raw, str) else notify_raw
    if not isinstance(notify, list) or not all(isinstance(n, str) for n in notify):
        raise ctx.at("notify").fail(f"expected a list of channel names, got {notify_raw!r}")
    for n in notify:
        if n not in channels:
            known = ", ".join(channels) or "none are configured"
            raise ctx.at("notify").fail(f"unknown channel {n!r} (channels: {known})")
    description = body.get("description")
    if description is not None:
        if not isinstance(description, str):
            raise ctx.at("description").fail(f"expected a string, got {description!r}")
        try:
            string.Formatter().vformat(description, (), TEMPLATE_FIELDS)
        except (KeyError, IndexError, ValueError, AttributeError) as exc:
            names = ", ".join("{" + k + "}" for k in TEMPLATE_FIELDS)
            raise ctx.at("description").fail(f"bad template ({exc!r}); it may use {names}") from None
    resolve_delay = body.get("resolve_delay")
    return Rule(
        name=name,
        conditions=conditions,
        mode=mode,
        for_s=_duration(body.get("for", 0), ctx.at("for")),
        severity=severity,
        cooldown_s=_duration(body.get("cooldown", "1h"), ctx.at("cooldown")),
        repeat=repeat,
        resolve_delay_s=None if resolve_delay is None else _duration(resolve_delay, ctx.at("resolve_delay")),
        group_by=tuple(group_by),
        labels=_string_map(body.get("labels"), ctx.at("labels")),
        description=description,
        notify=tuple(dict.fromkeys(notify)),
    )


_CHANNEL_KEYS = {
    "type",
    "url",
    "secret",
    "secret_env",
    "headers",
    "timeout",
    "max_attempts",
    "backoff_initial",
    "backoff_max",
    "level",
}


def _channel(name: str, raw: Any, ctx: _Ctx, env: Mapping[str, str]) -> ChannelSpec:
    body = _mapping(raw if raw is not None else {"type": name}, ctx, _CHANNEL_KEYS)
    ctype = _choice(body.get("type", name if name in CHANNEL_TYPES else None), ctx.at("type"), CHANNEL_TYPES)
    url = body.get("url", "")
    if ctype in ("webhook", "slack"):
        if not isinstance(url, str) or not url.startswith(("http://", "https://")):
            raise ctx.at("url").fail(f"a {ctype} channel needs an http:// or https:// url, got {url!r}")
    elif "url" in body:
        raise ctx.at("url").fail("a log channel takes no url")
    secret = body.get("secret")
    if "secret_env" in body:
        var = body["secret_env"]
        if not isinstance(var, str) or var not in env:
            raise ctx.at("secret_env").fail(f"environment variable {var!r} is not set")
        secret = env[var]
    if secret is not None and (ctype != "webhook" or not isinstance(secret, str) or not secret):
        raise ctx.at("secret").fail("only webhook channels take a secret, a non-empty string")
    timeout = _duration(body.get("timeout", 5), ctx.at("timeout"))
    if timeout <= 0:
        raise ctx.at("timeout").fail("must be > 0")
    attempts = body.get("max_attempts", 5)
    if isinstance(attempts, bool) or not isinstance(attempts, int) or not 1 <= attempts <= 100:
        raise ctx.at("max_attempts").fail(f"expected an integer from 1 to 100, got {attempts!r}")
    initial = _duration(body.get("backoff_initial", 1), ctx.at("backoff_initial"))
    cap = _duration(body.get("backoff_max", 60), ctx.at("backoff_max"))
    if initial <= 0 or cap < initial:
        raise ctx.at("backoff_max").fail("need 0 < backoff_initial <= backoff_max")
    level = _choice(body.get("level", "warning"), ctx.at("level"), ("info", "warning", "error"))
    return ChannelSpec(
        name=name,
        type=ctype,
        url=url if isinstance(url, str) else "",
        secret=secret,
        headers=_string_map(body.get("headers"), ctx.at("headers")),
        timeout_s=timeout,
        max_attempts=attempts,
        backoff_initial_s=initial,
        backoff_max_s=cap,
        level=level,
    )


def parse_alerts(rules: Any, channels: Any, source: str, env: Mapping[str, str] | None = None) -> AlertsSpec:
    """Validate the raw ``alerts.rules`` list and ``alerts.channels`` mapping from ``source``."""
    env = os.environ if env is None else env
    chans: dict[str, ChannelSpec] = {}
    if channels is not None:
        if not isinstance(channels, dict):
            raise RuleError(
                source, "alerts.channels", f"must be a mapping of channel names, got {channels!r}"
            )
        for name, raw in channels.items():
            ctx = _Ctx(source, f"alerts.channels.{name}")
            if not isinstance(name, str) or not _NAME.match(name):
                raise ctx.fail("a channel name is letters, digits and _.:-")
            chans[name] = _channel(name, raw, ctx, env)
    parsed: list[Rule] = []
    if rules is not None:
        if not isinstance(rules, list):
            raise RuleError(source, "alerts.rules", f"must be a list of rules, got {rules!r}")
        seen: dict[str, int] = {}
        for i, raw in enumerate(rules):
            rule = _rule(raw, _Ctx(source, f"alerts.rules[{i}]"), chans)
            if rule.name in seen:
                raise RuleError(
                    source,
                    f"alerts.rules[{i}] ({rule.name}).name",
                    f"duplicate rule name (also alerts.rules[{seen[rule.name]}])",
                )
            seen[rule.name] = i
            parsed.append(rule)
    return AlertsSpec(rules=tuple(parsed), channels=chans)
