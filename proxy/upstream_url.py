"""The upstream Ollama as a value: where requests go, and the Host header it expects.

Accepts the forms ``OLLAMA_HOST`` accepts (ollama-api.md §11.1): ``host``, ``host:port``, ``:port``,
``http(s)://host[:port][/prefix]``, bracketed or bare IPv6. The target of a forwarded request is always
``base + request path + query``; nothing in the client's request can change scheme, host or port.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from yarl import URL

from proxy.errors import UpstreamError

__all__ = ["Upstream"]

DEFAULT_PORT = 11434


@dataclass(frozen=True, slots=True)
class Upstream:
    scheme: str
    host: str
    port: int
    base_path: str = ""  # no trailing slash; "" or "/prefix"

    @classmethod
    def parse(cls, text: str) -> Upstream:
        """Parse an ``OLLAMA_HOST``-style value; raise UpstreamError with the reason."""
        raw = text.strip().strip("\"'")
        if not raw:
            raise UpstreamError("empty upstream")
        if "://" not in raw:
            scheme, rest = "http", raw
            default_port = DEFAULT_PORT
        else:
            scheme, rest = raw.split("://", 1)
            scheme = scheme.lower()
            if scheme not in ("http", "https"):
                raise UpstreamError(f"unsupported scheme {scheme!r} (use http or https)")
            default_port = 443 if scheme == "https" else 80
        hostport, _, path = rest.partition("/")
        if "@" in hostport or "?" in rest or "#" in rest:
            raise UpstreamError(
                f"upstream {text!r} must be scheme://host[:port][/path], without credentials or query"
            )
        host, port = _split_hostport(hostport, default_port, text)
        base_path = ("/" + path).rstrip("/") if path else ""
        return cls(scheme, host or "127.0.0.1", port, base_path)

    @property
    def host_header(self) -> str:
        """``host:port`` as the upstream expects in ``Host`` (IPv6 bracketed)."""
        return f"{self._host_literal}:{self.port}"

    @property
    def _host_literal(self) -> str:
        return f"[{self.host}]" if ":" in self.host else self.host

    @property
    def base_url(self) -> str:
        return f"{self.scheme}://{self._host_literal}:{self.port}{self.base_path}"

    def url_for(self, raw_path: str, raw_query: str) -> URL:
        """The upstream URL for a request's already-encoded path and query, kept byte for byte."""
        target = f"{self.base_url}{raw_path}"
        if raw_query:
            target += f"?{raw_query}"
        return URL(target, encoded=True)

    def __str__(self) -> str:
        return self.base_url


def _split_hostport(hostport: str, default_port: int, original: str) -> tuple[str, int]:
    if hostport.startswith("["):
        end = hostport.find("]")
        if end < 0:
            raise UpstreamError(f"unclosed '[' in {original!r}")
        host, rest = hostport[1:end], hostport[end + 1 :]
        port_text = rest[1:] if rest.startswith(":") else ""
        if rest and not rest.startswith(":"):
            raise UpstreamError(f"unexpected {rest!r} after IPv6 address in {original!r}")
    elif hostport.count(":") > 1:
        try:
            ipaddress.IPv6Address(hostport)
        except ValueError as exc:
            raise UpstreamError(f"cannot parse host {hostport!r} in {original!r}") from exc
        host, port_text = hostport, ""
    else:
        host, _, port_text = hostport.partition(":")
    if not port_text:
        return host, default_port
    try:
        port = int(port_text)
    except ValueError as exc:
        raise UpstreamError(f"port {port_text!r} in {original!r} is not a number") from exc
    if not 0 < port < 65536:
        raise UpstreamError(f"port {port} in {original!r} is out of range")
    return host, port
