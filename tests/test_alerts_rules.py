"""Alert rule and channel validation: each mistake names the file, the rule and the field."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from alerts.errors import RuleError
from alerts.rules import parse_alerts, parse_duration
from proxy.cli.main import main
from proxy.config import load_config
from proxy.errors import CONFIG_ERRORS

GOOD_RULE: dict[str, Any] = {
    "name": "high-error-rate",
    "when": {"metric": "error_rate", "window": "5m", "op": ">", "threshold": 0.05, "min_requests": 20},
    "for": "1m",
    "severity": "error",
    "cooldown": "30m",
    "notify": ["ops"],
}
CHANNELS: dict[str, Any] = {
    "ops": {"type": "webhook", "url": "http://127.0.0.1:9/hook"},
    "log": {"type": "log"},
}


def write_config(tmp_path: Path, rules: Any, channels: Any = CHANNELS) -> Path:
    path = tmp_path / "alerts-config.yaml"
    path.write_text(yaml.safe_dump({"alerts": {"rules": rules, "channels": channels}}))
    return path


def rule(**changes: Any) -> dict[str, Any]:
    out = {**GOOD_RULE, **changes}
    return {k: v for k, v in out.items() if v is not None}


def cond(**changes: Any) -> dict[str, Any]:
    out = {**GOOD_RULE["when"], **changes}
    return {k: v for k, v in out.items() if v is not None}


BAD_RULES = [
    # (description, rules list, expected key, fragment of the reason)
    ("unknown metric", [rule(when=cond(metric="error_ratio"))], "alerts.rules[0] (high-error-rate).when.metric", "unknown metric 'error_ratio'"),
    ("bad window", [rule(when=cond(window="5 parsecs"))], "alerts.rules[0] (high-error-rate).when.window", "duration"),
    ("sub-second window", [rule(when=cond(window="500ms"))], "alerts.rules[0] (high-error-rate).when.window", "whole seconds"),
    ("window too long", [rule(when=cond(window="2d"))], "alerts.rules[0] (high-error-rate).when.window", "1s to 1d"),
    ("missing threshold", [rule(when=cond(threshold=None))], "alerts.rules[0] (high-error-rate).when.threshold", "missing"),
    ("threshold not a number", [rule(when=cond(threshold="high"))], "alerts.rules[0] (high-error-rate).when.threshold", "expected a number"),
    ("bad op", [rule(when=cond(op="=>"))], "alerts.rules[0] (high-error-rate).when.op", "must be one of >, >=, <, <="),
    ("unknown channel", [rule(notify=["pager"])], "alerts.rules[0] (high-error-rate).notify", "unknown channel 'pager'"),
    ("bad severity", [rule(severity="urgent")], "alerts.rules[0] (high-error-rate).severity", "info, warning, error, critical"),
    ("bad for", [rule(**{"for": "soon"})], "alerts.rules[0] (high-error-rate).for", "duration"),
    ("bad cooldown", [rule(cooldown=-5)], "alerts.rules[0] (high-error-rate).cooldown", ">= 0"),
    ("missing name", [{k: v for k, v in GOOD_RULE.items() if k != "name"}], "alerts.rules[0].name", "expected a name"),
    ("duplicate name", [rule(), rule()], "alerts.rules[1] (high-error-rate).name", "duplicate rule name"),
    ("unknown rule key", [rule(treshold=3)], "alerts.rules[0] (high-error-rate).treshold", "unknown key"),
    ("missing when", [rule(when=None)], "alerts.rules[0] (high-error-rate).when", "missing"),
    ("missing metric", [rule(when=cond(metric=None))], "alerts.rules[0] (high-error-rate).when.metric", "missing"),
    ("min_requests on a resource metric", [rule(when={"metric": "cpu_percent", "threshold": 90, "min_requests": 5})], "alerts.rules[0] (high-error-rate).when.min_requests", "only request metrics"),
    ("model on a resource metric", [rule(when={"metric": "gpu_power_w", "threshold": 300, "model": "x"})], "alerts.rules[0] (high-error-rate).when.model", "only request metrics"),
    ("agg on a request metric", [rule(when=cond(agg="max"))], "alerts.rules[0] (high-error-rate).when.agg", "only resource metrics"),
    ("bad agg", [rule(when={"metric": "cpu_percent", "threshold": 90, "agg": "median"})], "alerts.rules[0] (high-error-rate).when.agg", "avg, max, min, last"),
    ("negative min_requests", [rule(when=cond(min_requests=-1))], "alerts.rules[0] (high-error-rate).when.min_requests", ">= 0"),
    ("min_requests on requests_per_s", [rule(when={"metric": "requests_per_s", "threshold": 1, "min_requests": 3})], "alerts.rules[0] (high-error-rate).when.min_requests", "requests_per_s takes no min_requests"),
    ("old-style metric name", [rule(when=cond(metric="p95_ttft_ms"))], "alerts.rules[0] (high-error-rate).when.metric", "unknown metric 'p95_ttft_ms': did you mean 'ttft_ms_p95'?"),
    ("old-style rate name", [rule(when={"metric": "request_rate", "threshold": 1})], "alerts.rules[0] (high-error-rate).when.metric", "unknown metric 'request_rate': did you mean 'requests_per_s'?"),
    ("bad condition in all", [rule(when={"all": [cond(), {"metric": "gpu_temperature_c", "threshold": 80, "window": "x"}]})], "alerts.rules[0] (high-error-rate).when.all[1].window", "duration"),
    ("empty any", [rule(when={"any": []})], "alerts.rules[0] (high-error-rate).when.any", "non-empty list"),
    ("all beside a metric", [rule(when={"all": [cond()], "metric": "error_rate"})], "alerts.rules[0] (high-error-rate).when", "either all: or any:"),
    ("group by something else", [rule(group_by=["endpoint"])], "alerts.rules[0] (high-error-rate).group_by", "only label to group by is model"),
    ("group by without a request metric", [rule(when={"metric": "cpu_percent", "threshold": 1}, group_by="model")], "alerts.rules[0] (high-error-rate).group_by", "needs at least one request metric"),
    ("bad template", [rule(description="{value} above {limit}")], "alerts.rules[0] (high-error-rate).description", "bad template"),
    ("labels not strings", [rule(labels={"team": ["a"]})], "alerts.rules[0] (high-error-rate).labels.team", "expected a string"),
    ("rules not a list", {"name": "x"}, "alerts.rules", "must be a list"),
]  # fmt: skip


@pytest.mark.parametrize(("what", "rules", "key", "reason"), BAD_RULES, ids=[b[0] for b in BAD_RULES])
def test_bad_rule_names_file_rule_and_field(
    tmp_path: Path, what: str, rules: Any, key: str, reason: str
) -> None:
    path = write_config(tmp_path, rules)
    config = load_config(path, env={})
    with pytest.raises(RuleError) as info:
        parse_alerts(config.alerts.rules, config.alerts.channels, config.source, env={})
    err = info.value
    assert err.source == str(path)
    assert err.key == key
    assert reason in err.reason
    assert str(err).startswith(f"{path}: {key}: ")
    assert isinstance(err, CONFIG_ERRORS)  # so `ollamon serve` reports it as a config error (exit 2)


BAD_CHANNELS = [
    ("webhook without url", {"ops": {"type": "webhook"}}, "alerts.channels.ops.url", "needs an http:// or https:// url"),
    ("unknown type", {"ops": {"type": "pagerduty", "url": "http://x"}}, "alerts.channels.ops.type", "webhook, slack, log"),
    ("secret on slack", {"ops": {"type": "slack", "url": "https://x", "secret": "s"}}, "alerts.channels.ops.secret", "only webhook"),
    ("unset secret_env", {"ops": {"type": "webhook", "url": "http://x", "secret_env": "NOPE_NOT_SET"}}, "alerts.channels.ops.secret_env", "not set"),
    ("zero attempts", {"ops": {"type": "webhook", "url": "http://x", "max_attempts": 0}}, "alerts.channels.ops.max_attempts", "1 to 100"),
    ("backoff cap below start", {"ops": {"type": "webhook", "url": "http://x", "backoff_initial": "10s", "backoff_max": "1s"}}, "alerts.channels.ops.backoff_max", "backoff_initial <= backoff_max"),
    ("unknown channel key", {"ops": {"type": "webhook", "url": "http://x", "retries": 3}}, "alerts.channels.ops.retries", "unknown key"),
    ("url on log", {"ops": {"type": "log", "url": "http://x"}}, "alerts.channels.ops.url", "takes no url"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("what", "channels", "key", "reason"), BAD_CHANNELS, ids=[b[0] for b in BAD_CHANNELS]
)
def test_bad_channel_names_file_and_field(
    tmp_path: Path, what: str, channels: Any, key: str, reason: str
) -> None:
    path = write_config(tmp_path, [], channels)
    config = load_config(path, env={})
    with pytest.raises(RuleError) as info:
        parse_alerts(config.alerts.rules, config.alerts.channels, config.source, env={})
    assert (info.value.source, info.value.key) == (str(path), key)
    assert reason in info.value.reason


def test_good_rules_parse_with_defaults(tmp_path: Path) -> None:
    rules = [
        rule(),
        {
            "name": "hot-and-slow",
            "when": {
                "all": [
                    {
                        "metric": "gpu_temperature_c",
                        "window": "1m",
                        "agg": "max",
                        "op": ">=",
                        "threshold": 85,
                    },
                    {"metric": "response_time_ms_p95", "model": "llama*", "threshold": 5000},
                ]
            },
            "group_by": "model",
            "labels": {"team": "ml", "tier": 1},
            "description": "{model}: {metric} {value:.0f} > {threshold}",
        },
    ]
    channels = {**CHANNELS, "signed": {"type": "webhook", "url": "https://x", "secret_env": "HOOK_SECRET"}}
    path = write_config(tmp_path, rules, channels)
    config = load_config(path, env={})
    spec = parse_alerts(config.alerts.rules, config.alerts.channels, config.source, env={"HOOK_SECRET": "k"})
    first, second = spec.rules
    assert first.for_s == 60 and first.cooldown_s == 1800 and first.notify == ("ops",)
    assert first.conditions[0].window_s == 300 and first.conditions[0].min_requests == 20
    assert second.mode == "all" and second.group_by == ("model",)
    temp, latency = second.conditions
    assert (temp.agg, temp.window_s, temp.op, temp.threshold) == ("max", 60, ">=", 85.0)
    assert (latency.window_s, latency.min_requests, latency.op, latency.model) == (300, 10, ">", "llama*")
    assert set(second.notify) == {"ops", "log", "signed"}  # no notify: every channel
    assert second.labels == {"team": "ml", "tier": "1"}
    assert second.cooldown_s == 3600 and second.severity == "warning"
    assert spec.channels["signed"].secret == "k"
    assert spec.channels["ops"].max_attempts == 5


def test_durations() -> None:
    assert parse_duration("250ms") == 0.25
    assert parse_duration("30s") == 30 and parse_duration("5m") == 300
    assert parse_duration("1.5h") == 5400 and parse_duration("1d") == 86400
    assert parse_duration(12) == 12.0 and parse_duration("7") == 7.0
    for bad in ("", "5 minutes", "-1s", True, None, -3):
        with pytest.raises(ValueError):
            parse_duration(bad)


def test_shipped_config_is_valid() -> None:
    root = Path(__file__).resolve().parents[1]
    config = load_config(root / "config.yaml", env={})
    spec = parse_alerts(config.alerts.rules, config.alerts.channels, config.source, env={})
    assert {r.name for r in spec.rules} >= {"high-error-rate", "upstream-down", "records-dropped"}
    assert "log" in spec.channels


def test_cli_check_good_and_bad(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    good = write_config(tmp_path, [rule(), rule(name="slow-burn", **{"for": "14d"})])
    assert main(["alerts", "check", "--config", str(good)]) == 0
    out = capsys.readouterr().out
    assert "2 rule(s), 2 channel(s): ok" in out and "high-error-rate" in out
    assert "for 60 s" in out and "for 1209600 s" in out  # seconds written out, not 1.2096e+06s
    bad = write_config(tmp_path, [rule(when=cond(window="fortnight"))])
    assert main(["alerts", "check", "--config", str(bad)]) == 2
    err = capsys.readouterr().err
    assert f"{bad}: alerts.rules[0] (high-error-rate).when.window:" in err


def test_serve_with_a_bad_rule_exits_2_with_the_message(tmp_path: Path) -> None:
    bad = write_config(tmp_path, [rule(when=cond(metric="latency"))])
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run(
        [sys.executable, "-m", "proxy", "serve", "--config", str(bad), "--listen", "127.0.0.1:0", "--db", str(tmp_path / "x.db")],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=60,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    assert f"{bad}: alerts.rules[0] (high-error-rate).when.metric: unknown metric 'latency'" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "x.db").exists()  # nothing started
