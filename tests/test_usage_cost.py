"""Cost: price tables by model glob (first match wins), hand-computed figures, and what the proxy stores.

The end-to-end tests run the real proxy in front of the emulator; the token counts charged are the
emulator's ground truth (``prompt_eval_count``, ``eval_count``), and every expected figure is computed here
by hand from the prices, never read back from the code under test.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from proxy.config import load_config
from proxy.errors import ConfigError
from proxy.usage.cost import Price, Pricing, apply_cost, parse_prices
from storage.records import InferenceRecord
from tests.fixtures.emulator import RunningEmulator
from tests.fixtures.proxy import MakeProxy

PRICES: list[dict[str, Any]] = [
    {"model": "llama3.2:latest", "input_per_1m": 0.40, "output_per_1m": 1.60},
    {"model": "llama3*", "input_per_1m": 9.0, "output_per_1m": 9.0},
    {"model": "*-cloud", "input_per_1m": 2.0, "output_per_1m": 8.0},
]
REFERENCE = [{"model": "llama3*", "input_per_1m": 2.50, "output_per_1m": 10.0}]


def test_first_matching_glob_wins_and_unpriced_models_cost_nothing() -> None:
    p = Pricing(parse_prices(PRICES, "usage.prices"), parse_prices(REFERENCE, "r"), 0.30)
    # 1000 prompt tokens at $0.40/1M + 500 completion at $1.60/1M = 0.0004 + 0.0008
    cost, equiv, energy = p.figures("llama3.2:latest", 1000, 500, None)
    assert cost == pytest.approx(0.0012) and equiv == pytest.approx(0.0075) and energy is None
    # the second entry: llama3.1 does not match the first glob
    cost, equiv, _ = p.figures("llama3.1:8b", 1_000_000, 0, None)
    assert cost == pytest.approx(9.0) and equiv == pytest.approx(2.5)
    # a cloud model priced by its glob
    assert p.figures("gpt-oss:120b-cloud", 2_000_000, 1_000_000, None)[0] == pytest.approx(4.0 + 8.0)
    # a local model no entry matches: 0, and no hosted-API equivalent
    assert p.figures("qwen3:0.6b", 1000, 1000, None)[:2] == (0.0, None)
    # unknown counts are charged as 0; a missing model matches nothing
    assert p.figures("llama3.2:latest", None, 250, None)[0] == pytest.approx(0.0004)
    assert p.figures(None, 1000, 1000, None)[0] == 0.0
    # globs are case-sensitive and must match the whole name
    assert p.price_of("LLAMA3.2:latest") is None and p.price_of("my-llama3") is None


def test_energy_cost_is_joules_over_3_6e6_times_the_kwh_price() -> None:
    p = Pricing(energy_price_per_kwh=0.25)
    # 7.2 MJ = 2 kWh at $0.25 = $0.50; 360 J = 0.0001 kWh = $0.000025
    assert p.figures("x", 0, 0, 7.2e6)[2] == pytest.approx(0.50)
    assert p.figures("x", 0, 0, 360.0)[2] == pytest.approx(0.000025)
    assert p.figures("x", 0, 0, None)[2] is None
    assert Pricing().figures("x", 0, 0, 100.0)[2] == 0.0


def test_apply_cost_sets_the_three_columns_and_nothing_without_pricing() -> None:
    rec = InferenceRecord(timestamp="2026-11-30T00:00:00.000Z", request_id="r", model_name="llama3.2:latest")
    rec.prompt_tokens, rec.completion_tokens, rec.energy_j = 100, 10, 3600.0
    apply_cost(rec, None)
    assert (rec.cost_usd, rec.cloud_equiv_usd, rec.energy_cost_usd) == (None, None, None)
    apply_cost(rec, Pricing((Price("llama*", 10.0, 100.0),), (), 1.0))
    # 100 * 10 / 1e6 + 10 * 100 / 1e6 = 0.001 + 0.001; 3600 J = 0.001 kWh
    assert rec.cost_usd == pytest.approx(0.002) and rec.cloud_equiv_usd is None
    assert rec.energy_cost_usd == pytest.approx(0.001)


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"model": "x"}, "must be a list"),
        (["llama3"], "usage.prices[0]: must be a mapping"),
        ([{"model": "", "input_per_1m": 1}], "usage.prices[0].model"),
        ([{"model": "a", "input_per_1m": -1}], "usage.prices[0].input_per_1m: must be a number >= 0"),
        ([{"model": "a", "output_per_1m": "cheap"}], "usage.prices[0].output_per_1m"),
        ([{"model": "a", "output_per_1m": float("nan")}], "usage.prices[0].output_per_1m"),
        ([{"model": "a"}, {"model": "b", "per_1m": 1}], "usage.prices[1]: unknown key(s) per_1m"),
    ],
)
def test_bad_price_lists_are_refused_naming_entry_and_key(raw: Any, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        parse_prices(raw, "usage.prices")


def test_config_errors_name_the_file_and_key(tmp_path: Path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text("usage:\n  reference_prices:\n    - {model: 'x*', input_per_1m: -2}\n")
    with pytest.raises(ConfigError) as err:
        load_config(cfg, env={})
    assert str(cfg) in str(err.value) and "usage.reference_prices" in str(err.value)
    cfg.write_text("usage:\n  energy_price_per_kwh: -0.1\n")
    with pytest.raises(ConfigError, match="energy_price_per_kwh"):
        load_config(cfg, env={})
    cfg.write_text("usage:\n  prices:\n    - {model: 'llama3*', input_per_1m: 1.5, output_per_1m: 3}\n")
    assert load_config(cfg, env={}).usage.prices == [
        {"model": "llama3*", "input_per_1m": 1.5, "output_per_1m": 3}
    ]


async def _generate(url: str, model: str, tokens: int) -> str:
    body = {"model": model, "prompt": "price this, please", "stream": False}
    async with (
        aiohttp.ClientSession() as s,
        s.post(f"{url}/api/generate", json=body, headers={"X-Emulate": f"tokens={tokens}"}) as resp,
    ):
        assert resp.status == 200, await resp.text()
        await resp.read()
        return resp.headers["X-Request-Id"]


async def test_the_proxy_stores_each_rows_charge_and_new_prices_never_rewrite_it(
    emulator: RunningEmulator, make_proxy: MakeProxy, tmp_path: Path
) -> None:
    db = tmp_path / "cost.db"
    proxy = await make_proxy(
        emulator.url,
        db=db,
        usage__prices=PRICES,
        usage__reference_prices=REFERENCE,
        usage__energy_price_per_kwh=0.3,
    )
    rid_llama = await _generate(proxy.url, "llama3.2", 30)
    rid_qwen = await _generate(proxy.url, "qwen3:0.6b", 12)
    rows = {r["request_id"]: r for r in await proxy.wait_rows(2)}
    gt = emulator.emu.entry(rid_llama)
    pt = gt.prompt_eval_count
    assert gt.eval_count == 30 and pt is not None and pt > 0
    llama = rows[rid_llama]
    assert (llama["prompt_tokens"], llama["completion_tokens"]) == (pt, 30)
    assert llama["cost_usd"] == pytest.approx((pt * 0.40 + 30 * 1.60) / 1e6)
    assert llama["cloud_equiv_usd"] == pytest.approx((pt * 2.50 + 30 * 10.0) / 1e6)
    assert llama["energy_cost_usd"] is None  # no GPU here: energy unknown, so its cost too
    qwen = rows[rid_qwen]
    assert qwen["cost_usd"] == 0.0 and qwen["cloud_equiv_usd"] is None  # a local model with no price
    await proxy.stop()

    # The same database under new prices: the old row keeps what it was charged.
    doubled = [
        {**p, "input_per_1m": p["input_per_1m"] * 2, "output_per_1m": p["output_per_1m"] * 2} for p in PRICES
    ]
    again = await make_proxy(emulator.url, db=db, usage__prices=doubled)
    rid2 = await _generate(again.url, "llama3.2", 30)
    rows = {r["request_id"]: r for r in await again.wait_rows(3)}
    pt2 = emulator.emu.entry(rid2).prompt_eval_count
    assert pt2 is not None
    assert rows[rid_llama]["cost_usd"] == pytest.approx((pt * 0.40 + 30 * 1.60) / 1e6)
    assert rows[rid2]["cost_usd"] == pytest.approx((pt2 * 0.80 + 30 * 3.20) / 1e6)
