"""Quotas: the book's arithmetic over UTC days and months, the gate check (429 + Retry-After on a hard quota,
never on a soft one), and the whole path through the real proxy with a configured API key."""

from __future__ import annotations

import datetime as dt
import functools
import re
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from proxy.usage.identity import Caller
from proxy.usage.keys import hash_key, new_key
from proxy.usage.quota import Quota, QuotaBook, parse_quotas
from storage.records import InferenceRecord, iso_utc
from tests.fixtures.emulator import RunningEmulator
from tests.fixtures.proxy import MakeProxy
from tests.polling import until

T0 = dt.datetime(2026, 11, 30, 22, 0, tzinfo=dt.UTC).timestamp()  # two hours before a new day and month


class Clock:
    def __init__(self, t: float) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def _rec(at: float, key: str | None, team: str | None, tokens: int, cost: float = 0.0) -> InferenceRecord:
    return InferenceRecord(
        timestamp=iso_utc(at),
        request_id="r",
        prompt_tokens=tokens // 2,
        completion_tokens=tokens - tokens // 2,
        api_key_id=key,
        team=team,
        cost_usd=cost,
    )


CI = Caller(key_id="cfg-ci", name="ci", team="red")


def test_hard_quota_refuses_at_its_limit_with_retry_after_to_the_next_utc_day() -> None:
    clock = Clock(T0)
    book = QuotaBook([Quota("key", "ci", tokens_per_day=100, hard=True)], clock=clock)
    assert book.check(CI, "llama3.2:latest") is None  # learns that cfg-ci is "ci"
    book.offer([_rec(T0, "cfg-ci", "red", 60), _rec(T0, "other", "red", 500), _rec(T0, None, None, 999)])
    assert book.status(book.quotas[0]) == [
        {"limit": "tokens_per_day", "used": 60.0, "max": 100, "percent": 60.0, "remaining": 40.0}
    ]
    assert book.check(CI, "llama3.2:latest") is None
    book.offer([_rec(T0 + 1, "cfg-ci", None, 40)])
    refusal = book.check(CI, "llama3.2:latest")
    assert refusal is not None and refusal.status == 429 and refusal.error_type == "quota_exceeded"
    assert refusal.retry_after_s == 7200 and dict(refusal.headers) == {"Retry-After": "7200"}
    assert "key 'ci' used 100 of tokens_per_day 100" in refusal.message
    assert book.check(CI, None) is None  # a request naming no model (listing models) is never refused
    assert book.check(Caller(key_id="cfg-x", name="x", team="red"), "m") is None  # another key
    assert book.percent_max() == 100.0
    # A new UTC day: the day's use starts again.
    clock.t = T0 + 7200
    assert book.check(CI, "llama3.2:latest") is None and book.percent_max() == 0.0


def test_month_limits_soft_quotas_and_cost() -> None:
    clock = Clock(T0 - 3 * 86400)
    book = QuotaBook(
        [
            Quota("team", "red", tokens_per_month=1000, cost_per_month_usd=2.0, hard=True),
            Quota("team", "blue", tokens_per_day=10),  # soft: reports only
        ],
        clock=clock,
    )
    blue = Caller(key_id="k9", name="n9", team="blue")
    red = Caller(key_id="k1", name="n1", team="red")
    book.offer([_rec(clock.t - 86400, "k1", "red", 300, cost=1.5), _rec(clock.t, "k9", "blue", 50)])
    (tokens, cost) = book.status(book.quotas[0])
    assert (tokens["used"], cost["used"]) == (300.0, 1.5) and cost["percent"] == pytest.approx(75.0)
    assert book.status(book.quotas[1])[0]["percent"] == 500.0
    assert book.check(blue, "m") is None  # over its limit, but soft
    assert book.check(red, "m") is None
    book.offer([_rec(clock.t, "k2", "red", 10, cost=0.5)])  # the cost limit is reached first
    refusal = book.check(red, "m")
    assert refusal is not None and "cost_per_month_usd 2" in refusal.message
    assert refusal.retry_after_s == 3 * 86400 + 7200  # to 2026-12-01T00:00Z
    # Records of last month do not count; a new month starts from zero.
    book.offer([_rec(T0 - 40 * 86400, "k1", "red", 10_000)])
    assert book.status(book.quotas[0])[0]["used"] == 310.0
    clock.t = T0 + 7200
    assert book.check(red, "m") is None and book.status(book.quotas[0])[0]["used"] == 0.0


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"key": "a"}, "must be a list"),
        ([{"tokens_per_day": 5}], "usage.quotas[0]: give exactly one of key"),
        ([{"key": "a", "team": "b", "tokens_per_day": 5}], "exactly one of key"),
        ([{"key": "a"}], "sets no limit"),
        ([{"key": "a", "tokens_per_day": -1}], "usage.quotas[0].tokens_per_day: must be an integer >= 0"),
        ([{"key": "a", "tokens_per_day": 1.5}], "tokens_per_day: must be an integer"),
        ([{"team": "a", "cost_per_month_usd": "lots"}], "cost_per_month_usd: must be a number"),
        ([{"team": "a", "tokens_per_month": 5, "hard": "yes"}], "usage.quotas[0].hard"),
        ([{"team": "a", "tokens_per_month": 5, "soft": True}], "unknown key(s) soft"),
        (
            [{"team": "a", "tokens_per_month": 5}, {"team": "a", "tokens_per_day": 1}],
            "usage.quotas[1]: a second",
        ),
    ],
)
def test_bad_quotas_are_refused_naming_entry_and_key(raw: Any, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        parse_quotas(raw)


def _day_used_is(book: QuotaBook, value: float) -> bool:
    return bool(book.status(book.quotas[0])[0]["used"] == value)


async def _chat(s: aiohttp.ClientSession, url: str, key: str | None) -> aiohttp.ClientResponse:
    body = {"model": "llama3.2", "messages": [{"role": "user", "content": "count me"}], "stream": False}
    headers = {"X-Emulate": "tokens=20"}
    if key is not None:
        headers["Authorization"] = f"Bearer {key}"
    async with s.post(f"{url}/api/chat", json=body, headers=headers) as resp:
        await resp.read()
        return resp


async def test_a_hard_quota_turns_the_key_away_with_429_through_the_gate(
    emulator: RunningEmulator, make_proxy: MakeProxy, tmp_path: Path
) -> None:
    key = new_key()
    db = tmp_path / "quota.db"
    limit = 60
    config: dict[str, Any] = {
        "auth__mode": "optional",
        "auth__keys": [{"name": "ci", "hash": hash_key(key), "team": "red"}],
        "usage__quotas": [
            {"key": "ci", "tokens_per_day": limit, "hard": True},
            {"team": "red", "tokens_per_month": 10_000},
        ],
    }
    proxy = await make_proxy(emulator.url, db=db, **config)
    from proxy.api.usage import QUOTA_KEY

    book = proxy.app[QUOTA_KEY]
    used = 0.0
    async with aiohttp.ClientSession() as s:
        for n in range(1, 10):
            resp = await _chat(s, proxy.url, key)
            if used >= limit:
                break
            # every request admitted started under the limit
            assert resp.status == 200, (n, used)
            rows = await proxy.wait_rows(n)
            used += rows[-1]["total_tokens"]
            await until(functools.partial(_day_used_is, book, used), what="the book counts it")
        assert resp.status == 429 and int(resp.headers["Retry-After"]) > 0
        assert "quota exceeded" in (await resp.json())["error"]
        # The refusal is recorded too (status 429, the key's id): the report counts it as rate_limited.
        await until(lambda: any(r["status_code"] == 429 for r in proxy.rows()), what="the 429 is recorded")
        refused = next(r for r in proxy.rows() if r["status_code"] == 429)
        assert refused["api_key_id"] == "cfg-ci" and refused["team"] == "red"
        # Without the key (auth optional) the request passes: the quota is the key's.
        assert (await _chat(s, proxy.url, None)).status == 200
        async with s.get(f"{proxy.url}/ollamon/api/usage", params={"by": "key", "window": "1d"}) as r:
            report = await r.json()
        async with s.get(f"{proxy.url}/ollamon/health") as r:
            health = await r.json()
    row = next(r for r in report["rows"] if r["key"] == "cfg-ci")
    assert row["key_name"] == "ci"
    assert row["total_tokens"] == used and row["rate_limited"] == 1
    assert row["quota"][0]["max"] == limit and row["quota_used_percent"] == pytest.approx(used / limit * 100)
    team = next(q for q in report["quotas"] if q["subject"] == "team")
    assert team["limits"][0]["used"] == used  # the anonymous request has no team
    assert health["usage"]["quota_used_percent"] == pytest.approx(used / limit * 100)
    await proxy.stop()

    # A restart reads the day's use back from the database: still refused at once.
    again = await make_proxy(emulator.url, db=db, **config)
    async with aiohttp.ClientSession() as s:
        assert (await _chat(s, again.url, key)).status == 429
