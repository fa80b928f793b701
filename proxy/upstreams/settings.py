"""The configured hosts as values: parsed once at startup from the raw ``upstreams`` YAML, hostile-proof.

Each entry is ``{url, weight?, models?, name?}`` (a bare URL string is accepted too). Errors raise
UpstreamsConfigError naming the key (``upstreams.hosts[2].url``) and the reason; proxy/config.py adds the
file. Names default to the URL's ``host:port[/path]`` and must be unique, so two entries cannot silently
point at the same Ollama.
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from proxy.errors import UpstreamError
from proxy.upstream_url import Upstream
from proxy.upstreams.errors import UpstreamsConfigError
from storage.model_names import canonical_model_name, canonical_model_pattern, model_matches

__all__ = ["ALL_HOSTS", "HostSpec", "PoolSettings", "canonical_model", "parse_hosts", "parse_management"]

ALL_HOSTS = "all"
MAX_HOSTS = 256
MAX_WEIGHT = 1_000_000.0
_NAME = re.compile(r"[A-Za-z0-9_.:/\[\]-]{1,100}")
_ENTRY_KEYS = ("url", "weight", "models", "name")


@dataclass(frozen=True, slots=True)
class HostSpec:
    """One Ollama host: where it is, its share of the load, and the models it may serve (``()``: any)."""

    name: str
    upstream: Upstream
    weight: float = 1.0
    models: tuple[str, ...] = ()  # canonical names or globs (storage.model_names)

    def serves(self, model: str | None) -> bool:
        """Whether a request for canonical ``model`` may go here (no model, or no list: yes)."""
        if model is None or not self.models:
            return True
        return _matches_any(model, self.models)


@functools.lru_cache(maxsize=8192)
def _matches_any(model: str, patterns: tuple[str, ...]) -> bool:
    # Cached: routing calls this per host per request, and fnmatch is the costly part of choose().
    return any(model_matches(model, p) for p in patterns)


@dataclass(frozen=True, slots=True)
class PoolSettings:
    """Everything the pool needs; built by ``UpstreamsConfig.settings()`` or directly in tests."""

    hosts: tuple[HostSpec, ...]
    management: str = ALL_HOSTS  # "all", or the name of the one host management calls go to
    check_interval_s: float = 5.0  # /api/version and /api/ps per host
    tags_interval_s: float = 30.0  # /api/tags per host
    check_timeout_s: float = 2.0  # per health request
    eject_after: int = 3  # consecutive failed requests before a passive ejection
    eject_cooldown_s: float = 30.0  # then half-open: one trial request decides
    max_answer_bytes: int = 8 << 20  # a host's /api/tags or /api/ps answer is cut off past this
    retry: bool = True  # retry once on another host before the first byte (retry.py)

    @classmethod
    def single(cls, upstream: Upstream, **kwargs: Any) -> PoolSettings:
        """The pool of one that ``server.upstream`` alone means."""
        return cls(hosts=(HostSpec(_default_name(upstream), upstream),), **kwargs)


def _default_name(upstream: Upstream) -> str:
    return upstream.host_header + upstream.base_path


def parse_hosts(raw: Any, key: str = "upstreams.hosts") -> tuple[HostSpec, ...]:
    """The host list from raw YAML; ``()`` for none (then ``server.upstream`` is the pool of one)."""
    if raw is None:
        return ()
    if not isinstance(raw, list):
        raise UpstreamsConfigError(key, f"expected a list of hosts, got {type(raw).__name__}")
    if len(raw) > MAX_HOSTS:
        raise UpstreamsConfigError(key, f"at most {MAX_HOSTS} hosts, got {len(raw)}")
    specs: list[HostSpec] = []
    seen: dict[str, int] = {}
    for i, entry in enumerate(raw):
        at = f"{key}[{i}]"
        spec = _parse_entry(entry, at)
        if spec.name in seen:
            raise UpstreamsConfigError(
                f"{at}.name", f"{spec.name!r} is already the name of {key}[{seen[spec.name]}]"
            )
        seen[spec.name] = i
        specs.append(spec)
    return tuple(specs)


def _parse_entry(entry: Any, at: str) -> HostSpec:
    if isinstance(entry, str):
        entry = {"url": entry}
    if not isinstance(entry, dict):
        raise UpstreamsConfigError(at, f"expected a mapping with url, got {type(entry).__name__}")
    for k in entry:
        if k not in _ENTRY_KEYS:
            raise UpstreamsConfigError(f"{at}.{k}", f"unknown key (known: {', '.join(_ENTRY_KEYS)})")
    url = entry.get("url")
    if not isinstance(url, str) or not url.strip():
        raise UpstreamsConfigError(f"{at}.url", "required: the host's URL, e.g. http://10.0.0.5:11434")
    try:
        upstream = Upstream.parse(url)
    except UpstreamError as exc:
        raise UpstreamsConfigError(f"{at}.url", str(exc)) from exc
    weight = _weight(entry.get("weight", 1), f"{at}.weight")
    models = _models(entry.get("models"), f"{at}.models")
    name = entry.get("name")
    if name is None:
        name = _default_name(upstream)
    elif not isinstance(name, str) or not _NAME.fullmatch(name) or name == ALL_HOSTS:
        raise UpstreamsConfigError(
            f"{at}.name", f"expected 1-100 letters, digits or _.:/-, not {ALL_HOSTS!r}; got {name!r}"
        )
    return HostSpec(name=name, upstream=upstream, weight=weight, models=models)


def _weight(raw: Any, at: str) -> float:
    if isinstance(raw, bool) or not isinstance(raw, int | float):
        raise UpstreamsConfigError(at, f"expected a number > 0, got {raw!r}")
    value = float(raw)
    if not (0 < value <= MAX_WEIGHT) or math.isnan(value):
        raise UpstreamsConfigError(at, f"must be > 0 and <= {MAX_WEIGHT:g}, got {raw!r}")
    return value


def _models(raw: Any, at: str) -> tuple[str, ...]:
    if raw is None:
        return ()
    if isinstance(raw, str):
        raw = [raw]
    if not isinstance(raw, list) or not raw:
        raise UpstreamsConfigError(at, "expected a non-empty list of model names or globs")
    out: list[str] = []
    for j, item in enumerate(raw):
        if not isinstance(item, str) or not item.strip() or len(item) > 350:
            raise UpstreamsConfigError(f"{at}[{j}]", f"expected a model name or glob, got {item!r}")
        out.append(canonical_model_pattern(item.strip()))
    return tuple(out)


def parse_management(raw: Any, hosts: Sequence[HostSpec], key: str = "upstreams.management") -> str:
    """``all`` or the name of a configured host."""
    if not isinstance(raw, str) or not raw.strip():
        raise UpstreamsConfigError(key, f"expected {ALL_HOSTS!r} or a host name, got {raw!r}")
    value = raw.strip()
    if value == ALL_HOSTS:
        return value
    names = [h.name for h in hosts]
    if value not in names:
        raise UpstreamsConfigError(
            key, f"{value!r} is not a host name (names: {', '.join(names) or 'none'}; or {ALL_HOSTS!r})"
        )
    return value


def canonical_model(model: str | None) -> str | None:
    """The model name routing compares: Ollama's canonical form (``Llama3.2`` -> ``llama3.2:latest``)."""
    if model is None or not model:
        return None
    return _canonical(model)


@functools.lru_cache(maxsize=4096)
def _canonical(model: str) -> str:
    # Cached: a deployment uses a handful of model names, and the request path asks for each on every call.
    return canonical_model_name(model) or model
