"""Who is calling: the ``Caller`` a request resolves to, and the ``Refusal`` a check answers with.

These two plain types are the interface between the gate (proxy/usage/gate.py: keys, access, rate
limits) and any extra check registered with ``Gate.add_check`` (quotas). A check is
``fn(caller, model) -> Refusal | None``: synchronous, in memory, microseconds; it never does I/O.
"""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["Caller", "KeyLimits", "Refusal"]


@dataclass(frozen=True, slots=True)
class KeyLimits:
    """Per-key rate limits; 0 means no limit of that kind."""

    rpm: int = 0
    tpm: int = 0
    concurrency: int = 0


@dataclass(frozen=True, slots=True)
class Caller:
    """The identity of one request.

    ``key_id`` is the API key's id (never the key itself), ``None`` when the request carried no known key;
    ``user_id`` is the key's owner, else the configured user header, else the client address.
    ``models`` are the key's allowed model globs (empty: any model).
    """

    key_id: str | None = None
    name: str | None = None
    user_id: str | None = None
    team: str | None = None
    admin: bool = False
    models: tuple[str, ...] = ()
    limits: KeyLimits = field(default_factory=KeyLimits)


@dataclass(frozen=True, slots=True)
class Refusal:
    """A request the gate turns away: status, Ollama-shaped message, and what it is recorded as."""

    status: int
    message: str
    error_type: str
    retry_after_s: float | None = None
    headers: tuple[tuple[str, str], ...] = ()
