"""Ollama's model-name rule, shared by the recorder, the filters, the inventory and the emulator.

``Llama3.2`` -> ``llama3.2:latest``: names are case-insensitive, the tag defaults to ``latest``, and the
default registry and namespace (``registry.ollama.ai/library/``) are dropped (Ollama's ``model.ParseName``;
``/api/tags`` lists ``llama3.2:latest``). Rows store this canonical name in ``model_name`` so that ``--model llama3.2`` and
``--model llama3.2:latest`` find the same requests, and the same ones the inventory lists.

``is_cloud_model`` is Ollama's explicit-cloud-source rule (``types/modelref``, spec §2): a name whose last
``:`` part is ``cloud`` (``glm-4.6:cloud``, ``gpt-oss:20b:cloud``) or ends in ``-cloud``
(``gpt-oss:20b-cloud``) is raw-proxied by Ollama to ollama.com instead of run locally.
"""

from __future__ import annotations

import fnmatch
import re

__all__ = [
    "canonical_model_name",
    "canonical_model_pattern",
    "is_cloud_model",
    "model_matches",
    "short_model_name",
]

_PREFIXES = ("registry.ollama.ai/", "library/")
_LATEST = ":latest"
# What Ollama's name parser accepts, approximately (the emulator's ``valid_name`` is the same rule). A name
# outside it (empty, spaces, control characters) is kept as sent: Ollama refused it, there is nothing to
# resolve it to.
_VALID = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-/]*(:[A-Za-z0-9_][A-Za-z0-9_.\-]*)?$")
_GLOB_CHARS = frozenset("*?[")


def short_model_name(name: str) -> str:
    """The shortest full name Ollama would print for ``name``."""
    short = name.strip().lower()
    for prefix in _PREFIXES:
        if short.startswith(prefix):
            short = short[len(prefix) :]
    if ":" not in short.rsplit("/", 1)[-1]:
        short += _LATEST
    return short


def canonical_model_name(name: str | None) -> str | None:
    """The name Ollama resolves ``name`` to (``llama3.2`` -> ``llama3.2:latest``); a name Ollama would reject
    as invalid, and None, come back unchanged."""
    if name is None:
        return None
    stripped = name.strip()
    if len(stripped) > 350 or not _VALID.match(stripped):
        return name
    return short_model_name(stripped)


def canonical_model_pattern(pattern: str) -> str:
    """An alert rule's ``model``: an exact name is resolved as above; a glob (``Llama3*``) is lowercased and
    loses the default registry prefix, and ``model_matches`` lets it match with or without ``:latest``."""
    if not _GLOB_CHARS & set(pattern):
        return canonical_model_name(pattern) or pattern
    out = pattern.strip().lower()
    for prefix in _PREFIXES:
        if out.startswith(prefix):
            out = out[len(prefix) :]
    return out


def model_matches(name: str, pattern: str) -> bool:
    """Whether canonical ``name`` matches canonical ``pattern`` (a name or a glob), the client's spelling
    without ``:latest`` included: ``llama3.?`` matches ``llama3.2:latest`` as it matches ``llama3.2``."""
    if fnmatch.fnmatchcase(name, pattern):
        return True
    return name.endswith(_LATEST) and fnmatch.fnmatchcase(name[: -len(_LATEST)], pattern)


def _source_suffix(name: str) -> tuple[str, str | None]:
    """``name`` without its explicit source, and that source (``cloud`` / ``local``) or None (modelref's
    ``parseSourceSuffix``: only the part after the last ``:`` is looked at)."""
    idx = name.rfind(":")
    if idx < 0:
        return name, None
    suffix_raw = name[idx + 1 :].strip()
    suffix = suffix_raw.lower()
    if suffix in ("cloud", "local"):
        return name[:idx], suffix
    if "/" not in suffix_raw and suffix.endswith("-cloud"):
        return name[: idx + 1] + suffix_raw[: -len("-cloud")], "cloud"
    return name, None


def is_cloud_model(name: str | None) -> bool:
    """Whether Ollama sends a request for ``name`` to ollama.com: an explicit cloud source (``…:cloud``,
    ``…-cloud`` tag). A name with two sources (``x:local:cloud``) is one Ollama refuses: not cloud."""
    if name is None or not name.strip():
        return False
    base, source = _source_suffix(name.strip())
    return source == "cloud" and _source_suffix(base)[1] is None
