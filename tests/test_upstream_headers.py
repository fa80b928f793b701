"""The upstream value and the header rules (pure functions)."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxy.errors import UpstreamError
from proxy.forward.headers import client_ip, request_id_from, response_headers, upstream_headers
from proxy.upstream_url import Upstream


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", None),
        ("1.2.3.4", ("http", "1.2.3.4", 11434, "")),
        (":1234", ("http", "127.0.0.1", 1234, "")),
        ("example.com:1234", ("http", "example.com", 1234, "")),
        ("http://1.2.3.4", ("http", "1.2.3.4", 80, "")),
        ("https://1.2.3.4", ("https", "1.2.3.4", 443, "")),
        ("https://example.com/ollama/", ("https", "example.com", 443, "/ollama")),
        ("0.0.0.0", ("http", "0.0.0.0", 11434, "")),
        ("[::1]", ("http", "::1", 11434, "")),
        ("::1", ("http", "::1", 11434, "")),
        ("[::1]:8080", ("http", "::1", 8080, "")),
        ('"localhost:11434"', ("http", "localhost", 11434, "")),
    ],
)
def test_parse_ollama_host_forms(text: str, expected: tuple[str, str, int, str] | None) -> None:
    if expected is None:
        with pytest.raises(UpstreamError):
            Upstream.parse(text)
        return
    up = Upstream.parse(text)
    assert (up.scheme, up.host, up.port, up.base_path) == expected


def test_host_header_and_url() -> None:
    up = Upstream.parse("[::1]:8080")
    assert up.host_header == "[::1]:8080"
    assert str(up.url_for("/api/tags", "a=1&b=%20")) == "http://[::1]:8080/api/tags?a=1&b=%20"
    up = Upstream.parse("https://example.com/ollama")
    assert str(up.url_for("/api/chat", "")) == "https://example.com/ollama/api/chat"


@pytest.mark.parametrize("bad", ["ftp://x", "http://h:0", "http://h:70000", "http://u:p@h", "h:port", "[::1"])
def test_parse_rejects(bad: str) -> None:
    with pytest.raises(UpstreamError):
        Upstream.parse(bad)


@given(st.text(min_size=1, max_size=60))
def test_url_for_never_leaves_the_upstream(path: str) -> None:
    up = Upstream.parse("127.0.0.1:11434")
    raw = "/" + path.replace("?", "").replace("#", "").encode("utf-8", "surrogatepass").hex()
    url = up.url_for(raw, "")
    assert (url.scheme, url.host, url.port) == ("http", "127.0.0.1", 11434)


TRUSTED = (ipaddress.ip_network("10.0.0.0/8"),)


def test_upstream_headers_rules() -> None:
    raw = [
        ("Host", "evil.example.com"),
        ("Connection", "keep-alive, X-Secret-Hop"),
        ("X-Secret-Hop", "1"),
        ("Keep-Alive", "timeout=5"),
        ("Transfer-Encoding", "chunked"),
        ("TE", "trailers"),
        ("Upgrade", "h2c"),
        ("Proxy-Authorization", "Basic x"),
        ("Expect", "100-continue"),
        ("Authorization", "Bearer k"),
        ("X-Forwarded-For", "6.6.6.6"),
        ("X-Forwarded-Host", "spoofed"),
        ("X-Forwarded-Proto", "https"),
        ("Forwarded", "for=6.6.6.6"),
        ("X-Custom", "a"),
        ("X-Custom", "b"),
        ("X-Request-Id", "client-id"),
    ]
    out = upstream_headers(
        raw, host_header="127.0.0.1:11434", peer="192.0.2.7", scheme="http", request_id="rid", trusted=TRUSTED
    )
    assert out["Host"] == "127.0.0.1:11434"
    for gone in (
        "Connection",
        "X-Secret-Hop",
        "Keep-Alive",
        "Transfer-Encoding",
        "TE",
        "Upgrade",
        "Proxy-Authorization",
        "Expect",
        "Forwarded",
    ):
        assert gone not in out, gone
    assert out["Authorization"] == "Bearer k"
    assert out.getall("X-Custom") == ["a", "b"]
    assert out["X-Forwarded-For"] == "192.0.2.7"
    assert out["X-Forwarded-Host"] == "evil.example.com"
    assert out["X-Forwarded-Proto"] == "http"
    assert out["X-Request-Id"] == "rid"


def test_trusted_proxy_chain_is_extended() -> None:
    raw = [
        ("Host", "proxy.example"),
        ("X-Forwarded-For", "203.0.113.9"),
        ("X-Forwarded-Proto", "https"),
        ("X-Forwarded-Host", "public.example"),
    ]
    out = upstream_headers(
        raw, host_header="h:1", peer="10.1.2.3", scheme="http", request_id="r", trusted=TRUSTED
    )
    assert out["X-Forwarded-For"] == "203.0.113.9, 10.1.2.3"
    assert out["X-Forwarded-Proto"] == "https"
    assert out["X-Forwarded-Host"] == "public.example"
    assert client_ip("10.1.2.3", raw, TRUSTED) == "203.0.113.9"
    assert client_ip("192.0.2.1", raw, TRUSTED) == "192.0.2.1"


def test_response_headers_drop_hop_by_hop_and_add_request_id() -> None:
    raw = [
        ("Content-Type", "application/x-ndjson"),
        ("Transfer-Encoding", "chunked"),
        ("Date", "x"),
        ("Connection", "close, X-Hop"),
        ("X-Hop", "1"),
        ("Vary", "Origin"),
    ]
    out = response_headers(raw, "rid")
    assert list(out.items()) == [
        ("Content-Type", "application/x-ndjson"),
        ("Date", "x"),
        ("Vary", "Origin"),
        ("X-Request-Id", "rid"),
    ]


def test_request_id_reuse_and_generation() -> None:
    assert request_id_from("abc-123") == "abc-123"
    fresh = request_id_from("bad id with spaces\r\n")
    assert len(fresh) == 32 and fresh != request_id_from(None)
