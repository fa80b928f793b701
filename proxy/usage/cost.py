"""What a request costs: price tables matched by model glob, applied once when the record is built.

Three figures land on every inference row (docs/usage.md, "Cost"):

* ``cost_usd``: the ``usage.prices`` entry matching the model, per 1M prompt (input) and completion (output)
  tokens; a model no entry matches costs 0 (a local model runs on your own hardware);
* ``cloud_equiv_usd``: the same arithmetic with ``usage.reference_prices`` ("what a hosted API would have
  charged"); NULL when no reference entry matches;
* ``energy_cost_usd``: ``energy_j / 3.6e6 * usage.energy_price_per_kwh``; NULL when the energy is unknown.

Matching: the first entry (in the order written) whose glob matches the model name, case-sensitively, as
``fnmatch.fnmatchcase`` does (``*``, ``?``, ``[...]``), on the name rows store (``llama3.2:latest``). So
specific globs go first and a catch-all ``*`` last. The figures are computed on the writer's thread
(``Capture.build``) and stored; a price changed later never rewrites a row already written.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import Any

from storage.records import InferenceRecord

__all__ = ["J_PER_KWH", "Price", "Pricing", "apply_cost", "parse_prices"]

J_PER_KWH = 3.6e6
TOKENS_PER_PRICE = 1_000_000
_PRICE_KEYS = {"model", "input_per_1m", "output_per_1m"}


@dataclass(frozen=True, slots=True)
class Price:
    """USD per 1M prompt (input) and completion (output) tokens for the models ``model`` (a glob) matches."""

    model: str
    input_per_1m: float = 0.0
    output_per_1m: float = 0.0

    def cost(self, prompt_tokens: int | None, completion_tokens: int | None) -> float:
        """USD for these tokens; an unknown count is charged as 0."""
        return (
            (prompt_tokens or 0) * self.input_per_1m + (completion_tokens or 0) * self.output_per_1m
        ) / TOKENS_PER_PRICE


def _first(table: tuple[Price, ...], model: str | None) -> Price | None:
    if not model:
        return None
    for price in table:
        if fnmatchcase(model, price.model):
            return price
    return None


@dataclass(frozen=True, slots=True)
class Pricing:
    """The three price settings of ``usage``, ready to apply."""

    prices: tuple[Price, ...] = ()
    reference_prices: tuple[Price, ...] = ()
    energy_price_per_kwh: float = 0.0

    def price_of(self, model: str | None) -> Price | None:
        """The ``prices`` entry charged for ``model``: the first whose glob matches."""
        return _first(self.prices, model)

    def reference_of(self, model: str | None) -> Price | None:
        return _first(self.reference_prices, model)

    def figures(
        self,
        model: str | None,
        prompt_tokens: int | None,
        completion_tokens: int | None,
        energy_j: float | None,
    ) -> tuple[float, float | None, float | None]:
        """(cost_usd, cloud_equiv_usd, energy_cost_usd) of one request."""
        price = self.price_of(model)
        cost = price.cost(prompt_tokens, completion_tokens) if price is not None else 0.0
        ref = self.reference_of(model)
        equiv = ref.cost(prompt_tokens, completion_tokens) if ref is not None else None
        energy = None if energy_j is None else energy_j / J_PER_KWH * self.energy_price_per_kwh
        return cost, equiv, energy


def apply_cost(rec: InferenceRecord, pricing: Pricing | None) -> None:
    """Charge ``rec`` (built, tokens and energy known) at today's prices; without pricing nothing is set."""
    if pricing is None:
        return
    if rec.status_code == 429:
        # refused by a rate limit or a quota before Ollama saw it: nothing was served
        rec.cost_usd, rec.cloud_equiv_usd, rec.energy_cost_usd = 0.0, None, None
        return
    rec.cost_usd, rec.cloud_equiv_usd, rec.energy_cost_usd = pricing.figures(
        rec.model_name, rec.prompt_tokens, rec.completion_tokens, rec.energy_j
    )


def _number(entry: dict[str, Any], key: str, where: str) -> float:
    value = entry.get(key, 0)
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{where}.{key}: must be a number >= 0, got {value!r}")
    return float(value)


def parse_prices(raw: Any, name: str) -> tuple[Price, ...]:
    """A price list from config (``[{model: GLOB, input_per_1m: N, output_per_1m: N}, ...]``); raises
    ``ValueError`` naming the entry and key at fault. ``None`` is an empty list."""
    if raw is None:
        return ()
    if not isinstance(raw, list):
        raise ValueError(f"{name}: must be a list of {{model, input_per_1m, output_per_1m}}")
    out: list[Price] = []
    for i, entry in enumerate(raw):
        where = f"{name}[{i}]"
        if not isinstance(entry, dict):
            raise ValueError(f"{where}: must be a mapping with model, input_per_1m, output_per_1m")
        unknown = set(entry) - _PRICE_KEYS
        if unknown:
            raise ValueError(f"{where}: unknown key(s) {', '.join(sorted(map(str, unknown)))}")
        model = entry.get("model")
        if not isinstance(model, str) or not model.strip():
            raise ValueError(f"{where}.model: must be a model name or glob such as 'llama3*'")
        out.append(
            Price(model, _number(entry, "input_per_1m", where), _number(entry, "output_per_1m", where))
        )
    return tuple(out)
