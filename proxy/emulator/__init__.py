"""An in-process Ollama look-alike: the upstream of ollamon's tests and benchmarks, and ``ollamon emulate``.

It speaks the API of ``shared/ollama-api.md`` byte for byte where a proxy can tell the difference, with real
waits (cold loads, parallel slots, prompt evaluation, token pacing), failure injection through the
``X-Emulate`` request header, and a ground-truth log of what each request really waited for and sent.

Usage in tests::

    app = create_app(EmulatorConfig(token_interval_s=0.001))
    emu = app[EMULATOR_KEY]        # .log, .wait_idle(), .reset()

See ``proxy.emulator.config`` and ``docs/emulator.md`` for every knob.
"""

from __future__ import annotations

from .app import create_app
from .config import EmulatorConfig, Knobs, ModelSpec, default_models, parse_knobs
from .groundtruth import LogEntry
from .state import EMULATOR_KEY, Emulator

__all__ = [
    "EMULATOR_KEY",
    "Emulator",
    "EmulatorConfig",
    "Knobs",
    "LogEntry",
    "ModelSpec",
    "create_app",
    "default_models",
    "parse_knobs",
]
