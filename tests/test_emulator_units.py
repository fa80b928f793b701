"""Pure parts of the emulator: Go-compatible JSON, X-Emulate parsing, request rules, the scheduler."""

from __future__ import annotations

import asyncio
import json
import time

import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxy.emulator import EmulatorConfig, ModelSpec, parse_knobs
from proxy.emulator.config import KnobsError
from proxy.emulator.gojson import Float32, GoJSONError, decode, dumps, fold
from proxy.emulator.parsing import ApiError, parse_keep_alive, token_budget
from proxy.emulator.scheduler import QueueFullError, Scheduler
from proxy.emulator.state import normalize_name, valid_name
from proxy.emulator.textgen import go_time, now_rfc3339


def test_dumps_escapes_like_go_and_keeps_order() -> None:
    out = dumps({"b": "<a> & \u2028 é", "a": [1, True, None]})
    assert out == '{"b":"\\u003ca\\u003e \\u0026 \\u2028 é","a":[1,true,null]}'.encode()
    assert dumps({"x": 1}, newline=True) == b'{"x":1}\n'


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (0.1, "0.1"),
        (1e-7, "1e-7"),
        (1e21, "1e+21"),
        (1e20, "100000000000000000000"),
        (123456.789, "123456.789"),
        (0.000001, "0.000001"),
        (-2.5, "-2.5"),
        (Float32(0.1), "0.1"),
        (Float32(1 / 3), "0.33333334"),
    ],
)
def test_float_format_matches_go(value: float, expected: str) -> None:
    assert dumps(value).decode() == expected


@given(st.floats(allow_nan=False, allow_infinity=False))
def test_float_round_trips(value: float) -> None:
    assert float(json.loads(dumps(value))) == value


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"", "missing request body"),
        (b"  \n", "missing request body"),
        (b"x", "invalid character 'x' looking for beginning of value"),
        (b"{x:1}", "invalid character 'x' looking for beginning of object key string"),
        (b'{"a":1', "unexpected EOF"),
    ],
)
def test_decode_errors_read_like_go(body: bytes, message: str) -> None:
    with pytest.raises(GoJSONError) as info:
        decode(body)
    assert str(info.value) == message


def test_decode_reads_only_the_first_value_and_fold_is_case_insensitive() -> None:
    value = decode(b'{"Model":"a","MODEL":"b","other":1} trailing')
    assert fold(value, ("model",), "GenerateRequest") == {"model": "b"}


def test_knobs_parse_and_merge() -> None:
    knobs = parse_knobs("tokens=5; interval_ms=20;error_after=3; error_message=boom")
    assert (knobs.tokens, knobs.interval_s, knobs.error_after, knobs.error_message) == (5, 0.02, 3, "boom")
    merged = parse_knobs("tokens=9;stall_ms=5").merged(parse_knobs("tokens=2"))
    assert (merged.tokens, merged.stall_s) == (2, 0.005)
    assert merged.injected is None and knobs.injected == "error_after=3"


@pytest.mark.parametrize("text", ["tokens", "tokens=x", "nope=1", "error_status=200", "interval_ms=-1"])
def test_bad_knobs_are_rejected(text: str) -> None:
    with pytest.raises(KnobsError):
        parse_knobs(text)


def test_config_validates_at_startup() -> None:
    with pytest.raises(ValueError, match="num_parallel"):
        EmulatorConfig(num_parallel=0)
    with pytest.raises(KnobsError):
        EmulatorConfig(emulate="bogus=1")


@pytest.mark.parametrize(
    ("value", "seconds"), [(None, 300.0), (0, 0.0), (10, 10.0), ("5m", 300.0), ("1h30m", 5400.0), (-1, -1.0)]
)
def test_keep_alive(value: object, seconds: float) -> None:
    assert parse_keep_alive(value, 300.0) == seconds


def test_keep_alive_errors() -> None:
    with pytest.raises(ApiError, match="invalid duration"):
        parse_keep_alive("soon", 300.0)
    with pytest.raises(ApiError, match="Unsupported type: 'bool'"):
        parse_keep_alive(True, 300.0)


def test_token_budget() -> None:
    assert token_budget(None, None, 20) == (20, "stop")
    assert token_budget(5, None, 20) == (5, "length")
    assert token_budget(5, 3, 20) == (3, "stop")
    assert token_budget(3, 3, 20) == (3, "length")
    assert token_budget(-1, None, 20) == (20, "stop")


def test_names() -> None:
    assert normalize_name("llama3.2") == "llama3.2:latest"
    assert normalize_name("registry.ollama.ai/library/Qwen3:0.6b") == "qwen3:0.6b"
    assert valid_name("hf.co/user/model:Q4") and not valid_name("bad name")


def test_time_formats() -> None:
    stamp = now_rfc3339()
    assert stamp.endswith("Z") and "." in stamp and len(stamp.split(".")[1]) <= 10
    import datetime as dt

    moment = dt.datetime(2024, 6, 4, 14, 38, 31, 837530, tzinfo=dt.timezone(dt.timedelta(hours=-7)))
    assert go_time(moment) == "2024-06-04T14:38:31.83753-07:00"


async def test_scheduler_serialises_loads_and_limits_the_queue() -> None:
    config = EmulatorConfig(
        models=[ModelSpec(name="a:latest"), ModelSpec(name="b:latest")], load_s=0.05, max_queue=2
    )
    scheduler = Scheduler(config)
    for spec in config.models:
        scheduler.add(spec)
    started = time.monotonic()
    done: dict[str, float] = {}

    async def load(name: str) -> None:
        await scheduler.schedule(name, 60.0)
        done[name] = time.monotonic() - started

    async def third() -> None:
        await asyncio.sleep(0.01)
        with pytest.raises(QueueFullError):
            await scheduler.schedule("a:latest", 60.0, force_load_s=0.0)

    await asyncio.gather(load("a:latest"), load("b:latest"), third())
    assert done["a:latest"] >= 0.045 and done["b:latest"] >= 0.095  # one load at a time
    assert [view.spec.name for view in scheduler.loaded_models()] == ["b:latest", "a:latest"]
    scheduler.release("a:latest", 0)
    assert not scheduler.is_loaded("a:latest") and scheduler.is_loaded("b:latest")
