"""Ollama's model-name rule, shared by the inventory and the emulator.

``Llama3.2`` -> ``llama3.2:latest``: names are case-insensitive, the tag defaults to ``latest``, and the
default registry and namespace (``registry.ollama.ai/library/``) are dropped.
"""

from __future__ import annotations

__all__ = ["short_model_name"]

_PREFIXES = ("registry.ollama.ai/", "library/")


def short_model_name(name: str) -> str:
    """The shortest full name Ollama would print for ``name``."""
    short = name.strip().lower()
    for prefix in _PREFIXES:
        if short.startswith(prefix):
            short = short[len(prefix) :]
    if ":" not in short.rsplit("/", 1)[-1]:
        short += ":latest"
    return short
