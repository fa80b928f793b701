"""Which host takes a request: pure, O(hosts), no I/O (bench/routing_bench.py measures it).

1. **Allowed**: hosts not excluded whose ``models`` admit the model. A model that no host lists goes to the
   hosts without a ``models`` list, and if every host has one, to any host (Ollama then answers with its own
   404, byte for byte).
2. **Usable**: of those, hosts the health checks and the passive circuit let take requests now. If none is,
   the allowed host whose ejection ends soonest takes it anyway (config order on ties): a pool of one then
   always picks its host, exactly as ollamon did before pools, and a request is never refused for health
   bookkeeping alone.
3. **Model-aware tier**: hosts with the model loaded (``/api/ps``), else with it installed (``/api/tags``),
   else every usable host.
4. **Least outstanding, weighted**: the lowest ``outstanding / weight`` wins (nginx's least_conn); ties go
   by smooth weighted round-robin (nginx's), so idle hosts share sequential requests in weight proportion.
   Deterministic: the same state and calls give the same choices.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence

from proxy.upstreams.errors import NoUpstreamError
from proxy.upstreams.host import Host

__all__ = ["pick"]


def pick(hosts: Sequence[Host], model: str | None, exclude: Collection[Host], now: float) -> Host:
    """The host for canonical ``model`` (None: the request names none); see the module docstring."""
    if len(hosts) == 1 and not exclude:
        return hosts[0]  # what the rules below give a pool of one, without the lists
    allowed = [h for h in hosts if h not in exclude and h.spec.serves(model)]
    if not allowed and model is not None:
        rest = [h for h in hosts if h not in exclude]
        allowed = [h for h in rest if not h.spec.models] or rest
    if not allowed:
        raise NoUpstreamError(
            "no upstream left to try" if exclude else "no upstream is configured for this request"
        )
    usable = [h for h in allowed if h.available(now)]
    if not usable:
        return min(allowed, key=lambda h: (h.ejected_until, h.index))
    if model is not None:
        tier = [h for h in usable if model in h.loaded] or [h for h in usable if model in h.installed]
        if tier:
            usable = tier
    if len(usable) == 1:
        return usable[0]
    return _least_outstanding(usable)


def _least_outstanding(hosts: list[Host]) -> Host:
    best = hosts[0]
    ties = [best]
    for h in hosts[1:]:
        # outstanding/weight compared without division: a*wb < b*wa.
        lhs, rhs = h.outstanding * best.spec.weight, best.outstanding * h.spec.weight
        if lhs < rhs:
            best, ties = h, [h]
        elif lhs == rhs:
            ties.append(h)
    if len(ties) == 1:
        return best
    total = 0.0
    chosen = ties[0]
    for h in ties:
        h.swrr += h.spec.weight
        total += h.spec.weight
        if h.swrr > chosen.swrr:
            chosen = h
    chosen.swrr -= total
    return chosen
