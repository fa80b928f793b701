"""Per-model calibration of token estimates, learned from the exact counts Ollama reports on other requests.

An estimate (``token_source = estimate``) counts the prompt's text with tiktoken's ``o200k_base``; Ollama counts
the *rendered* prompt with the model's own tokenizer, chat template included (``prompt_eval_count``, spec
§3.3): a role header and end marker per message, a BOS, a generation prompt. So a one-word chat message is
1 estimated token where Ollama counts 7. Every record that carries an exact count (native ``done`` lines,
``/v1`` ``usage``, Messages/Responses usage) is a free sample of that relation for its model:

    exact_prompt ≈ ratio * estimate + per_turn * turns + constant

``turns`` is the number of messages the template wraps (1 for a generate prompt). The three numbers are a
least-squares fit over the model's last ``WINDOW`` samples, gently pulled toward (1, 0, 0) so that samples
that all have the same number of turns (where per-turn and constant cannot be told apart) still give a
usable fit; samples more than 3 MADs off the first fit (an image, a tool schema in the template) are dropped
and the fit is redone once. Completion estimates get a ratio only (``Σ exact / Σ estimate`` over the
window): there is no template on the output side.

Learning runs where the estimate's inputs exist, in ``Capture.build`` on the writer's worker thread (the
prompt text is not stored, so a writer listener could not see it), never on the request path. It costs one
tokenizer pass per sample, so a model whose window is full learns from one request in ``SAMPLE_EVERY``, and
prompts over ``MAX_LEARN_CHARS`` are not used. Memory is bounded: ``WINDOW`` samples per model,
``max_models`` models (least recently used evicted), model names over 256 characters ignored. Everything
happens under one lock; the fit is cached until the next sample.
"""

from __future__ import annotations

import threading
from collections import OrderedDict, deque
from dataclasses import dataclass
from functools import reduce
from operator import add, mul

__all__ = ["MIN_SAMPLES", "WINDOW", "Calibration", "PromptFit"]

WINDOW = 64
MIN_SAMPLES = 4
SAMPLE_EVERY = 8
MAX_LEARN_CHARS = 32 << 10
_MAX_NAME = 256
# Pull toward (1, 0, 0), per sample: enough to split per_turn and constant when every sample has the same
# number of turns, too little to bias a well-determined fit (the ratio's weight is scaled to its feature).
_RIDGE = 0.01
_RIDGE_RATIO = 0.0001
_RATIO_RANGE = (0.2, 5.0)


@dataclass(frozen=True, slots=True)
class PromptFit:
    """A model's learned prompt relation and how many samples back it."""

    ratio: float
    per_turn: float
    constant: float
    samples: int

    def apply(self, estimate: int, turns: int) -> int:
        return max(0, round(self.ratio * estimate + self.per_turn * turns + self.constant))


def _solve3(a: list[list[float]], b: list[float]) -> list[float] | None:
    """Gaussian elimination with partial pivoting for a 3x3 system; None when singular."""
    m = [[*row, b[i]] for i, row in enumerate(a)]
    for col in range(3):
        pivot = max(range(col, 3), key=lambda r: abs(m[r][col]))
        if abs(m[pivot][col]) < 1e-12:
            return None
        m[col], m[pivot] = m[pivot], m[col]
        for r in range(3):
            if r != col:
                f = m[r][col] / m[col][col]
                for c in range(col, 4):
                    m[r][c] -= f * m[col][c]
    return [m[i][3] / m[i][i] for i in range(3)]


def _fit(samples: list[tuple[int, int, int]]) -> tuple[float, float, float] | None:
    n = len(samples)
    ests = [e for e, _, _ in samples]
    mean_sq = sum(map(mul, ests, ests)) / n or 1.0
    weights = (_RIDGE_RATIO * n * mean_sq, _RIDGE * n, _RIDGE * n)
    prior = (1.0, 0.0, 0.0)
    # The normal equations, in C (map and reduce), yet the same floats as adding x[i] * x[j] and
    # x[i] * exact sample by sample with x = (est, turns, 1.0): the same products, added in the same order.
    # a is symmetric (a product does not depend on its order), and a product by the 1.0 column is the other
    # factor unchanged, so only five sums need products. A refit follows each new sample that an estimate
    # then asks for, in the writer's build; this made it about twice as cheap (docs/benchmarks.md).
    e = [float(v) for v in ests]
    t = [float(s[1]) for s in samples]
    exact = [s[2] for s in samples]
    a01 = reduce(add, map(mul, e, t), 0.0)
    a02 = reduce(add, e, 0.0)
    a12 = reduce(add, t, 0.0)
    a = [
        [reduce(add, map(mul, e, e), 0.0), a01, a02],
        [a01, reduce(add, map(mul, t, t), 0.0), a12],
        [a02, a12, float(n)],  # n times 1.0 * 1.0: exact
    ]
    b = [
        reduce(add, map(mul, e, exact), 0.0),
        reduce(add, map(mul, t, exact), 0.0),
        reduce(add, map(float, exact), 0.0),  # 1.0 * exact is exact converted to a float
    ]
    for i in range(3):
        a[i][i] += weights[i]
        b[i] += weights[i] * prior[i]
    beta = _solve3(a, b)
    return None if beta is None else (beta[0], beta[1], beta[2])


def _median(values: list[float]) -> float:
    s = sorted(values)
    mid = len(s) // 2
    return s[mid] if len(s) % 2 else (s[mid - 1] + s[mid]) / 2


class _Model:
    __slots__ = ("completion", "completion_sums", "fit", "prompt", "seen")

    def __init__(self) -> None:
        self.prompt: deque[tuple[int, int, int]] = deque(maxlen=WINDOW)
        self.completion: deque[tuple[int, int]] = deque(maxlen=WINDOW)
        self.completion_sums = [0, 0]  # Σ estimate, Σ exact over ``completion``: integers, so always exact
        self.fit: PromptFit | None = None
        self.seen = 0

    def add_completion(self, sample: tuple[int, int]) -> None:
        sums = self.completion_sums
        if len(self.completion) == WINDOW:  # the deque is about to let its oldest sample go
            old_est, old_exact = self.completion[0]
            sums[0] -= old_est
            sums[1] -= old_exact
        self.completion.append(sample)
        sums[0] += sample[0]
        sums[1] += sample[1]


class Calibration:
    """The learned state for every model; thread-safe, bounded (see the module docstring)."""

    def __init__(self, max_models: int = 256) -> None:
        self.max_models = max_models
        self._models: OrderedDict[str, _Model] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._models)

    def samples(self, model: str) -> int:
        """Prompt samples held for ``model`` (at most ``WINDOW``)."""
        with self._lock:
            state = self._models.get(model)
            return len(state.prompt) if state is not None else 0

    def wants(self, model: str | None, prompt_chars: int) -> bool:
        """Whether a record with exact counts should be learned from (worth a tokenizer pass)."""
        if not model or len(model) > _MAX_NAME or prompt_chars > MAX_LEARN_CHARS:
            return False
        with self._lock:
            state = self._models.get(model)
            if state is None or len(state.prompt) < WINDOW:
                return True
            state.seen += 1
            return state.seen % SAMPLE_EVERY == 0

    def _state(self, model: str) -> _Model:
        state = self._models.get(model)
        if state is None:
            state = self._models[model] = _Model()
            while len(self._models) > self.max_models:
                self._models.popitem(last=False)
        else:
            self._models.move_to_end(model)
        return state

    def observe(
        self, model: str, *, estimate: int, turns: int, exact: int, completion: tuple[int, int] | None = None
    ) -> None:
        """One record's estimate and Ollama's exact count (``completion``: (estimate, exact) of the output)."""
        if len(model) > _MAX_NAME or estimate < 0 or exact < 0:
            return
        with self._lock:
            state = self._state(model)
            state.prompt.append((estimate, turns, exact))
            state.fit = None
            if completion is not None and completion[0] > 0:
                state.add_completion(completion)

    def prompt_fit(self, model: str | None) -> PromptFit | None:
        """The model's fit, or None with fewer than ``MIN_SAMPLES`` samples or an implausible fit."""
        if not model:
            return None
        with self._lock:
            state = self._models.get(model)
            if state is None or len(state.prompt) < MIN_SAMPLES:
                return None
            if state.fit is None:
                state.fit = self._refit(list(state.prompt))
            return state.fit if state.fit.samples else None

    @staticmethod
    def _refit(samples: list[tuple[int, int, int]]) -> PromptFit:
        beta = _fit(samples)
        if beta is not None:
            residuals = [abs(x - (beta[0] * e + beta[1] * t + beta[2])) for e, t, x in samples]
            spread = 3 * _median(residuals) + 2
            kept = [s for s, r in zip(samples, residuals, strict=True) if r <= spread]
            if len(kept) >= MIN_SAMPLES and len(kept) < len(samples):
                beta = _fit(kept) or beta
                samples = kept
        if beta is None or not _RATIO_RANGE[0] <= beta[0] <= _RATIO_RANGE[1]:
            return PromptFit(1.0, 0.0, 0.0, 0)
        return PromptFit(beta[0], beta[1], beta[2], len(samples))

    def completion_ratio(self, model: str | None) -> tuple[float, int] | None:
        """``Σ exact / Σ estimate`` of the output over the window, and the samples; None when too few."""
        if not model:
            return None
        with self._lock:
            state = self._models.get(model)
            if state is None or len(state.completion) < MIN_SAMPLES:
                return None
            est, exact = state.completion_sums  # kept as samples come and go: no pass over the window
            ratio = exact / est
            if not _RATIO_RANGE[0] <= ratio <= _RATIO_RANGE[1]:
                return None
            return ratio, len(state.completion)
