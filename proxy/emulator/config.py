"""Emulator configuration: the model catalogue, timing defaults and failure-injection knobs.

The emulator stands in for Ollama in tests, benchmarks and ``ollamon emulate``. Everything that shapes its
timing is here so a test can make it fast and a benchmark can make it realistic.

``EmulatorConfig`` fields (process-wide defaults):

* ``models``: the catalogue (``ModelSpec`` list); the default has ``llama3.2:latest`` (completion, tools),
  ``qwen3:0.6b`` (completion, thinking) and ``all-minilm:latest`` (embedding).
* ``default_tokens``: tokens generated when neither ``num_predict``/``max_tokens`` nor ``X-Emulate: tokens``
  says otherwise (``done_reason`` is then ``stop``).
* ``token_interval_s``: real time between two generated tokens.
* ``prompt_eval_s``: real time between getting a parallel slot and producing the first token.
* ``prompt_rate``: 0 (the default) or prompt tokens evaluated per second: then ``/api/chat`` keeps a prefix
  cache per loaded model (one prompt per parallel slot, matched message by message, the answer included) and
  its prompt evaluation takes ``prompt_eval_s`` + new tokens / ``prompt_rate``; the ground truth
  ``prompt_cached_count`` says how many of ``prompt_eval_count`` came from the cache (ollama-api.md §3.3).
* ``load_s``: real cold-load time of a model (``ModelSpec.load_s`` overrides it per model).
* ``num_parallel``: parallel slots per loaded model (``OLLAMA_NUM_PARALLEL``; ``ModelSpec.num_parallel``
  overrides it; embedding models always get 1).
* ``max_queue``: requests that may wait for a model load at once (``OLLAMA_MAX_QUEUE``); more get 503. As in
  Ollama, requests for an already loaded model bypass this queue.
* ``start_loaded``: models start loaded (no cold load on the first request).
* ``keep_alive_s``: default keep-alive (Ollama's 5 minutes).
* ``host_check``: reject non-local ``Host`` headers with an empty 403, as Ollama does on a loopback bind.
* ``emulate``: a default ``X-Emulate`` string applied to every request (a request's header overrides it
  key by key).
* ``pull_step_s``: delay between two ``/api/pull`` / ``/api/push`` / ``/api/create`` progress lines.
* ``log_size``: how many ground-truth log entries are kept (oldest dropped first).
* ``version``: what ``/api/version`` reports.

Per-request failure injection: the ``X-Emulate`` request header holds ``key=value`` pairs separated by
``;`` (e.g. ``X-Emulate: tokens=5; interval_ms=20; error_after=3``). Keys:

* ``tokens=N``: the model "wants" to emit N tokens (``num_predict`` still caps it, giving ``length``).
* ``interval_ms=F``: token pacing for this request.
* ``prompt_eval_ms=F``: prompt evaluation time for this request.
* ``load_ms=F``: force a (re)load taking F ms, even when the model is already loaded.
* ``stall_ms=F``: sleep F ms at handler entry, before scheduling; it shows in ``load_duration`` (the time
  from handler entry to the model being scheduled), so ``total - load - prompt_eval - eval`` still equals
  the slot wait. Use it for proxy timeout tests.
* ``error_status=CODE``: fail before the first byte with HTTP CODE and ``{"error": msg}`` (after
  ``stall_ms``, before scheduling).
* ``error_message=TEXT``: the message for ``error_status`` / ``error_after`` (default
  ``an error was encountered while running the model``). It cannot contain ``;``.
* ``error_after=N``: send N tokens, then ``{"error":"..."}\\n`` on a 200 stream with no done line. On
  ``/v1`` streams, as Ollama does, the error turns into one empty content chunk and the stream ends without
  a finish chunk and without ``data: [DONE]``. Non-streamed requests get a 500 ``{"error":...}``.
* ``close_after=N``: send N tokens, then abort the TCP connection (no done line, no error).
* ``truncate_after=N``: send N tokens, then end the stream cleanly (chunked terminator) with no final line or
  terminal event and no error: what a client of Ollama's ``/v1`` streams sees after a mid-stream model error.
* ``tool_calls=N``: after its text, the model calls N tools (``/v1/messages`` and ``/v1/responses`` only:
  ``tool_use`` blocks with an ``input_json_delta``, ``function_call`` items with
  ``function_call_arguments.delta``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

__all__ = [
    "DEFAULT_ERROR_MESSAGE",
    "EmulatorConfig",
    "Knobs",
    "KnobsError",
    "ModelSpec",
    "default_models",
    "parse_knobs",
]

DEFAULT_ERROR_MESSAGE = "an error was encountered while running the model"


@dataclass(frozen=True, slots=True)
class ModelSpec:
    """One model the emulator can serve; sizes and names only feed the management routes."""

    name: str
    digest: str = "a80c4f17acd55265feec403c7aef86be0c25983ab279d83f3bcd3abbcb5b8b72"
    family: str = "llama"
    parameter_size: str = "3.2B"
    quantization_level: str = "Q4_K_M"
    size: int = 2019393189
    capabilities: tuple[str, ...] = ("completion",)
    num_parallel: int | None = None
    load_s: float | None = None
    context_length: int = 4096
    embedding_length: int = 384

    @property
    def is_embedding(self) -> bool:
        return "embedding" in self.capabilities and "completion" not in self.capabilities


def default_models() -> list[ModelSpec]:
    """The catalogue used when a config names none: one chat model, one thinking model, one embedder."""
    return [
        ModelSpec(
            name="llama3.2:latest",
            capabilities=("completion", "tools"),
            context_length=131072,
            embedding_length=3072,
        ),
        ModelSpec(
            name="qwen3:0.6b",
            digest="7df6b6e09427a769808717c0a93cadc4ae99ed4eb8bf5ca557c90846becea435",
            family="qwen3",
            parameter_size="751.63M",
            size=522653767,
            capabilities=("completion", "tools", "thinking"),
            context_length=40960,
            embedding_length=1024,
        ),
        ModelSpec(
            name="all-minilm:latest",
            digest="1b226e2802dbb772b5fc32a58f103ca1804ef7501331012de126ab22f67475ef",
            family="bert",
            parameter_size="23M",
            quantization_level="F16",
            size=45960996,
            capabilities=("embedding",),
            context_length=512,
            embedding_length=384,
        ),
    ]


@dataclass(slots=True)
class EmulatorConfig:
    """Process-wide emulator settings; see the module docstring for what each one does."""

    models: list[ModelSpec] = field(default_factory=default_models)
    default_tokens: int = 20
    token_interval_s: float = 0.01
    prompt_eval_s: float = 0.005
    prompt_rate: float = 0.0
    load_s: float = 0.2
    num_parallel: int = 1
    max_queue: int = 512
    start_loaded: bool = False
    keep_alive_s: float = 300.0
    host_check: bool = True
    emulate: str = ""
    pull_step_s: float = 0.005
    log_size: int = 10000
    version: str = "0.12.6"

    def __post_init__(self) -> None:
        if self.default_tokens < 0:
            raise ValueError(f"default_tokens must be >= 0, got {self.default_tokens}")
        for name in ("token_interval_s", "prompt_eval_s", "prompt_rate", "load_s", "pull_step_s"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.num_parallel < 1:
            raise ValueError(f"num_parallel must be >= 1, got {self.num_parallel}")
        if self.max_queue < 0:
            raise ValueError(f"max_queue must be >= 0, got {self.max_queue}")
        parse_knobs(self.emulate)  # fail at startup, not on the first request


class KnobsError(ValueError):
    """An ``X-Emulate`` value that cannot be parsed; the request gets a 400."""


@dataclass(frozen=True, slots=True)
class Knobs:
    """Per-request overrides parsed from ``X-Emulate``; ``None`` means "use the config"."""

    tokens: int | None = None
    interval_s: float | None = None
    prompt_eval_s: float | None = None
    load_s: float | None = None
    stall_s: float | None = None
    error_status: int | None = None
    error_message: str | None = None
    error_after: int | None = None
    close_after: int | None = None
    tool_calls: int | None = None
    truncate_after: int | None = None

    def merged(self, override: Knobs) -> Knobs:
        """Return these knobs with every value ``override`` sets replacing ours."""
        changes = {
            f.name: getattr(override, f.name)
            for f in dataclasses.fields(override)
            if getattr(override, f.name) is not None
        }
        return dataclasses.replace(self, **changes)

    @property
    def injected(self) -> str | None:
        """The failure this request was asked to show, for the ground-truth log."""
        if self.error_status is not None:
            return f"error_status={self.error_status}"
        if self.error_after is not None:
            return f"error_after={self.error_after}"
        if self.close_after is not None:
            return f"close_after={self.close_after}"
        if self.truncate_after is not None:
            return f"truncate_after={self.truncate_after}"
        return None


_INT_KEYS = {"tokens", "error_status", "error_after", "close_after", "tool_calls", "truncate_after"}
_MS_KEYS = {
    "interval_ms": "interval_s",
    "prompt_eval_ms": "prompt_eval_s",
    "load_ms": "load_s",
    "stall_ms": "stall_s",
}


def parse_knobs(text: str) -> Knobs:
    """Parse ``key=value; key=value`` into ``Knobs``; raise ``KnobsError`` naming the bad part."""
    values: dict[str, object] = {}
    for part in text.split(";"):
        part = part.strip()
        if not part:
            continue
        key, sep, raw = part.partition("=")
        key, raw = key.strip().lower(), raw.strip()
        if not sep:
            raise KnobsError(f"X-Emulate: expected key=value, got {part!r}")
        try:
            if key in _INT_KEYS:
                number = int(raw)
                if number < 0:
                    raise ValueError("negative")
                values[key] = number
            elif key in _MS_KEYS:
                ms = float(raw)
                if not ms >= 0:
                    raise ValueError("negative")
                values[_MS_KEYS[key]] = ms / 1000.0
            elif key == "error_message":
                values["error_message"] = raw
            else:
                raise KnobsError(f"X-Emulate: unknown key {key!r} (see docs/emulator.md)")
        except ValueError as exc:
            if isinstance(exc, KnobsError):
                raise
            raise KnobsError(f"X-Emulate: bad value for {key}: {raw!r}") from exc
    status = values.get("error_status")
    if isinstance(status, int) and not 400 <= status <= 599:
        raise KnobsError(f"X-Emulate: error_status must be 400..599, got {status}")
    return Knobs(**values)  # type: ignore[arg-type]
