"""Header rules for a transparent proxy (RFC 9110 §7.6.1) and Ollama's Host check (ollama-api.md §12).

Upstream request: drop hop-by-hop headers (and those named in ``Connection``) and the client's framing
headers (the upstream client writes its own), set ``Host`` to the upstream's
host:port, set ``X-Forwarded-For/Proto/Host`` (extending the client's chain only when the peer is a trusted
proxy), carry ``X-Request-Id``, keep everything else byte for byte, ``Authorization`` included.
Response: drop hop-by-hop headers, keep the rest, add ``X-Request-Id``.
"""

from __future__ import annotations

import ipaddress
import random
import re
from collections.abc import Iterable

from multidict import CIMultiDict

__all__ = [
    "FRAMING",
    "HOP_BY_HOP",
    "client_ip",
    "is_trusted",
    "request_id_from",
    "response_headers",
    "upstream_headers",
]

HOP_BY_HOP = frozenset(
    {
        "connection",
        "proxy-connection",
        "keep-alive",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "proxy-authenticate",
        "proxy-authorization",
    }
)
# Handled by ollamon itself, never passed on: the server side already answered ``Expect: 100-continue``,
# and the framing of what goes upstream (Content-Length or chunked) is always written by the upstream client from
# what it really sends, so no client header (nor a ``Connection`` token naming one) can change it.
FRAMING = frozenset({"content-length", "transfer-encoding"})
_REQUEST_DROP = HOP_BY_HOP | FRAMING | {"expect", "host"}
_FORWARDED = ("x-forwarded-for", "x-forwarded-proto", "x-forwarded-host", "forwarded")
_REQUEST_ID_OK = re.compile(r"[A-Za-z0-9._:@/+=-]{1,128}")

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def _connection_tokens(headers: Iterable[tuple[str, str]]) -> set[str]:
    tokens: set[str] = set()
    for name, value in headers:
        if name.lower() == "connection":
            tokens.update(t.strip().lower() for t in value.split(",") if t.strip())
    return tokens


def is_trusted(peer: str | None, trusted: tuple[Network, ...]) -> bool:
    if not peer or not trusted:
        return False
    try:
        addr = ipaddress.ip_address(peer)
    except ValueError:
        return False
    return any(addr in net for net in trusted)


def request_id_from(client_value: str | None) -> str:
    """Reuse the client's X-Request-Id when it is a sane token, else make a new one."""
    if client_value and _REQUEST_ID_OK.fullmatch(client_value):
        return client_value
    # A CSPRNG is not needed (ids only have to be unique) and os.urandom is a syscall per request.
    return f"{random.getrandbits(128):032x}"


def client_ip(peer: str | None, raw: list[tuple[str, str]], trusted: tuple[Network, ...]) -> str | None:
    """The client's address: the peer, or the first X-Forwarded-For hop when the peer is a trusted proxy."""
    if is_trusted(peer, trusted):
        for name, value in raw:
            if name.lower() == "x-forwarded-for":
                first = value.split(",")[0].strip()
                if first:
                    return first
    return peer


def upstream_headers(
    raw: list[tuple[str, str]],
    *,
    host_header: str,
    peer: str | None,
    scheme: str,
    request_id: str,
    trusted: tuple[Network, ...],
) -> CIMultiDict[str]:
    """Headers to send upstream, in the client's order and spelling, with the rules in the module docstring."""
    drop = _REQUEST_DROP | _connection_tokens(raw)
    trusted_peer = is_trusted(peer, trusted)
    out: CIMultiDict[str] = CIMultiDict()
    out["Host"] = host_header
    prior_xff: list[str] = []
    client_host: str | None = None
    client_proto: str | None = None
    client_fwd_host: str | None = None
    for name, value in raw:
        lname = name.lower()
        if lname == "host":
            client_host = value
        if lname in drop:
            continue
        if lname in _FORWARDED:
            if trusted_peer:
                if lname == "x-forwarded-for":
                    prior_xff.append(value)
                elif lname == "x-forwarded-proto":
                    client_proto = value
                elif lname == "x-forwarded-host":
                    client_fwd_host = value
                else:
                    out.add(name, value)
            continue
        if lname == "x-request-id":
            continue
        out.add(name, value)
    chain = [*prior_xff, peer] if peer else prior_xff
    if chain:
        out["X-Forwarded-For"] = ", ".join(chain)
    out["X-Forwarded-Proto"] = client_proto or scheme
    fwd_host = client_fwd_host or client_host
    if fwd_host:
        out["X-Forwarded-Host"] = fwd_host
    out["X-Request-Id"] = request_id
    return out


def response_headers(raw: Iterable[tuple[str, str]], request_id: str) -> CIMultiDict[str]:
    """Upstream response headers minus hop-by-hop ones, plus X-Request-Id."""
    items = list(raw)
    drop = HOP_BY_HOP | _connection_tokens(items) | {"x-request-id"}
    out: CIMultiDict[str] = CIMultiDict()
    for name, value in items:
        if name.lower() not in drop:
            out.add(name, value)
    out["X-Request-Id"] = request_id
    return out
