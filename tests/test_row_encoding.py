"""The write path's per-record encoding (storage/row_encoding.py) and the cheap iso_utc and record check.

Each fast path must give exactly what the careful, field-by-field path gives (or fail the same way), so the
stored rows cannot depend on which one ran.
"""

from __future__ import annotations

import copy
import datetime as _dt
import enum
import math
import random
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from storage.build import build_all
from storage.records import ERROR_COLUMNS, ErrorRecord, InferenceRecord, iso_utc
from storage.row_encoding import (
    ERROR_ORDER,
    INFERENCE_ORDER,
    error_row,
    fit_inference,
    inference_row,
    scalar,
)
from tests.analytics_gen import make_record


def careful_inference(rec: InferenceRecord) -> tuple[Any, ...]:
    """What the write path did before it had a fast path: repair, then every column one by one."""
    fit_inference(rec)
    return tuple(scalar(c, getattr(rec, c)) for c in INFERENCE_ORDER)


def outcome(fn: Any, rec: Any) -> tuple[str, Any]:
    try:
        return "row", fn(rec)
    except (TypeError, ValueError, OverflowError) as exc:
        return "error", type(exc).__name__


def stored(row: tuple[Any, ...]) -> tuple[Any, ...]:
    """How sqlite3 binds a value: a bool as the integer 0/1."""
    return tuple(int(v) if isinstance(v, bool) else v for v in row)


def same_both_ways(rec: InferenceRecord) -> None:
    fast_rec, careful_rec = copy.deepcopy(rec), copy.deepcopy(rec)
    fast, careful = outcome(inference_row, fast_rec), outcome(careful_inference, careful_rec)
    if fast[0] == "row" and careful[0] == "row":
        assert stored(fast[1]) == stored(careful[1])
        assert fast_rec == careful_rec  # repaired the same way, so the hot view sees what was stored
    else:
        assert fast[0] == careful[0] == "error"


class Level(enum.IntEnum):
    HIGH = 3


class Tag(str):
    pass


def test_generated_records_take_the_fast_path_and_match() -> None:
    rng = random.Random(5)
    for i in range(500):
        rec = make_record(rng, 1_764_000_000 + i, i)
        rec.metadata = {"bytes_in": i, "ollama": {"eval_count": i}, "tool_calls": [{"name": "x"}]}
        rec.stop = ["\n", "END"] if i % 2 else None
        same_both_ways(rec)
        assert inference_row(copy.deepcopy(rec))[INFERENCE_ORDER.index("success")] is rec.success


@pytest.mark.parametrize(
    "field, value",
    [
        ("seed", 10**30),  # past 64 bits: moved into metadata.out_of_range
        ("seed", -(2**63) - 1),
        ("seed", 2**63 - 1),  # the largest that fits: stored as is
        ("temperature", 10**20),  # an int where a float is expected, out of range
        ("top_k", Level.HIGH),  # an int subclass
        ("user_id", Tag("alice")),  # a str subclass
        ("model_name", b"bytes"),  # cannot be stored at all
        ("metadata", {"big": 10**30}),  # orjson refuses it; the careful path writes its text
        ("metadata", {1: "int key"}),  # orjson refuses a non-str key: metadata_error
        ("metadata", {"s": {1, 2}}),  # a set cannot be JSON at all: metadata_error
        ("stop", ["a", 10**30]),
        ("stop", "not a list"),
        ("ttft_ms", math.nan),
        ("ttft_ms", math.inf),
        ("response_time_ms", [1.0]),
    ],
)
def test_unusual_values_are_stored_as_the_careful_path_stores_them(field: str, value: Any) -> None:
    rec = make_record(random.Random(1), 1_764_000_000, 1)
    setattr(rec, field, value)
    same_both_ways(rec)


values = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=8),
    st.lists(st.one_of(st.text(max_size=3), st.integers(min_value=-(2**70), max_value=2**70)), max_size=3),
    st.dictionaries(st.text(max_size=3), st.integers(min_value=-(2**70), max_value=2**70), max_size=3),
    st.binary(max_size=3),
)


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.sampled_from(INFERENCE_ORDER), values, max_size=6))
def test_any_field_values_give_the_same_row_either_way(fields: dict[str, Any]) -> None:
    rec = InferenceRecord(timestamp="2026-11-26T23:07:38.123Z", request_id="r")
    for name, value in fields.items():
        setattr(rec, name, value)
    same_both_ways(rec)


def test_error_rows_match_the_careful_path() -> None:
    plain = ErrorRecord(
        timestamp="t", request_id="r", error_type="internal", error_message="m", stack_trace="s"
    )
    assert error_row(plain) == tuple(getattr(plain, c) for c in ERROR_COLUMNS)
    odd = ErrorRecord(
        timestamp="t", request_id="r", error_type="internal", error_message="m", user_id=Tag("u")
    )
    assert error_row(odd) == tuple(scalar(c, getattr(odd, c)) for c in ERROR_ORDER)
    plain.error_message = {"not": "text"}  # type: ignore[assignment]
    with pytest.raises(TypeError):
        error_row(plain)


def reference_iso(epoch_s: float) -> str:
    dt = _dt.datetime.fromtimestamp(epoch_s, tz=_dt.UTC)
    return dt.strftime("%Y-%m-%dT%H:%M:%S.") + f"{dt.microsecond // 1000:03d}Z"


@pytest.mark.parametrize(
    "epoch",
    [0, 0.0, -0.5, -1.0000001, 1.9999995, 1.9999994999, 1e9 + 0.9999995, 1764546000.9995, 86399.9999999,
     -86400.0000004, 2**31, 253402300799.999],
)  # fmt: skip
def test_iso_utc_rounds_exactly_as_datetime_does(epoch: float) -> None:
    assert iso_utc(epoch) == reference_iso(epoch)


@settings(max_examples=2000, deadline=None)
@given(st.floats(min_value=-2e9, max_value=4e9, allow_nan=False))
def test_iso_utc_matches_datetime_for_any_time(epoch: float) -> None:
    assert iso_utc(epoch) == reference_iso(epoch)


def test_iso_utc_around_every_millisecond_edge() -> None:
    for base in (1_764_546_000, -5, 0):
        for k in range(0, 1_000_000, 4999):
            for d in (0.0, 5e-7, -5e-7, 4.9999e-7):
                epoch = base + k / 1e6 + d
                assert iso_utc(epoch) == reference_iso(epoch), epoch


class Custom:
    """A registered-style record type: anything with ``build``."""

    def build(self) -> Custom:
        return self


class NotARecord:
    pass


class Source:
    def __init__(self, result: object) -> None:
        self.result = result
        self.request_id = "rid"

    def build(self) -> Any:
        return self.result


def test_build_all_still_checks_every_result_is_a_record() -> None:
    custom = Custom()
    good = InferenceRecord(timestamp="t", request_id="a")
    records, failures = build_all([Source(good), Source(custom), Source(NotARecord()), Source(custom)])
    assert failures == 1
    assert records[0] is good and records[1] is custom and records[3] is custom
    bad = records[2]
    assert isinstance(bad, ErrorRecord) and bad.request_id == "rid"
    assert "NotARecord" in bad.error_message
    # Seen once as a non-record, still refused the next time (only record classes are remembered).
    records, failures = build_all([Source(NotARecord())])
    assert failures == 1 and isinstance(records[0], ErrorRecord)
