"""PII and secret detection: kinds and counts, never values.

``find(text)`` returns the spans of what it recognises, ``counts(text)`` only ``{kind: count}``. Each kind
pairs a pattern with a check, so a near-miss is not counted:

* ``email``: ``local@domain.tld`` (RFC 5322 subset: dotted atoms, a TLD of letters);
* ``phone``: Google's libphonenumber (``phonenumbers``), leniency VALID: international ``+CC`` numbers of
  any country, national numbers in the ``PHONE_REGION`` (US) numbering plan;
* ``card``: 13 to 19 digits (spaces or dashes between), a known card prefix, and the Luhn checksum;
* ``iban``: a country code, two check digits, the country's IBAN length and the ISO 13616 mod-97 check;
* ``ip``: IPv4 dotted quads and IPv6 addresses, parsed by ``ipaddress``;
* ``api_key``: the fixed shapes of OpenAI (``sk-``), GitHub (``ghp_``/``gho_``/``ghu_``/``ghs_``/``ghr_``,
  ``github_pat_``), AWS access key ids (``AKIA``/``ASIA``), Slack (``xox?-``), Google (``AIza``),
  Anthropic (``sk-ant-``) and ollamon's own keys (``olm_``);
* ``jwt``: three base64url parts whose first decodes to a JSON header with ``alg``.

Overlaps are resolved by that order of trust (a JWT is not also counted as digits of a phone number).
Pure functions with no I/O; docs/content.md lists what each one misses.
"""

from __future__ import annotations

import base64
import bisect
import ipaddress
import json
import re
from dataclasses import dataclass

__all__ = ["KINDS", "PHONE_REGION", "Span", "counts", "find", "iban_ok", "luhn_ok"]

KINDS = ("jwt", "api_key", "email", "iban", "card", "ip", "phone")
PHONE_REGION = "US"


@dataclass(frozen=True, slots=True)
class Span:
    """``text[start:end]`` is a ``kind``."""

    kind: str
    start: int
    end: int


_EMAIL = re.compile(
    r"(?<![\w.+-])[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(?:\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*"
    r"@(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)+[A-Za-z]{2,24}(?![\w-])"
)
_CARD = re.compile(r"(?<![\d-])\d(?:[ -]?\d){12,18}(?![\d-])")
_CARD_PREFIX = re.compile(r"4|5[1-5]|2[2-7]|3[47]|3(?:0[0-5]|[689])|6(?:011|5|4[4-9]|22)|35|62")
_IBAN = re.compile(r"(?<![A-Za-z0-9])[A-Z]{2}\d{2}(?: ?[A-Z0-9]{4}){2,7}(?: ?[A-Z0-9]{1,3})?(?![A-Za-z0-9])")
_IPV4 = re.compile(r"(?<![\d.])(?:\d{1,3}\.){3}\d{1,3}(?!\d|\.\d)")
_IPV6 = re.compile(r"(?<![\w:.])[0-9A-Fa-f:]*:[0-9A-Fa-f:]*:[0-9A-Fa-f:.]*(?![\w:])")
_API_KEY = re.compile(
    r"(?<![A-Za-z0-9_-])(?:"
    r"sk-ant-[A-Za-z0-9_-]{20,}"
    r"|sk-(?:proj-|svcacct-)?[A-Za-z0-9_-]{20,}"
    r"|gh[pousr]_[A-Za-z0-9]{36,255}"
    r"|github_pat_[A-Za-z0-9_]{22,255}"
    r"|(?:AKIA|ASIA)[0-9A-Z]{16}"
    r"|xox[abposr]-[A-Za-z0-9-]{10,}"
    r"|AIza[0-9A-Za-z_-]{35}"
    r"|olm_[0-9A-Za-z]{43}"
    r")(?![A-Za-z0-9_-])"
)
_JWT = re.compile(
    r"(?<![A-Za-z0-9_-])eyJ[A-Za-z0-9_-]{5,}\.[A-Za-z0-9_-]{5,}\.[A-Za-z0-9_-]{5,}(?![A-Za-z0-9_.-])"
)

# ISO 13616 lengths of the countries that issue IBANs (SWIFT registry).
_IBAN_LENGTH = {
    "AD": 24, "AE": 23, "AL": 28, "AT": 20, "AZ": 28, "BA": 20, "BE": 16, "BG": 22, "BH": 22, "BR": 29,
    "BY": 28, "CH": 21, "CR": 22, "CY": 28, "CZ": 24, "DE": 22, "DK": 18, "DO": 28, "EE": 20, "EG": 29,
    "ES": 24, "FI": 18, "FO": 18, "FR": 27, "GB": 22, "GE": 22, "GI": 23, "GL": 18, "GR": 27, "GT": 28,
    "HR": 21, "HU": 28, "IE": 22, "IL": 23, "IQ": 23, "IS": 26, "IT": 27, "JO": 30, "KW": 30, "KZ": 20,
    "LB": 28, "LC": 32, "LI": 21, "LT": 20, "LU": 20, "LV": 21, "MC": 27, "MD": 24, "ME": 22, "MK": 19,
    "MR": 27, "MT": 31, "MU": 30, "NL": 18, "NO": 15, "PK": 24, "PL": 28, "PS": 29, "PT": 25, "QA": 29,
    "RO": 24, "RS": 22, "SA": 24, "SC": 31, "SE": 24, "SI": 19, "SK": 24, "SM": 27, "ST": 25, "SV": 28,
    "TL": 23, "TN": 24, "TR": 26, "UA": 29, "VA": 22, "VG": 24, "XK": 20,
}  # fmt: skip


def luhn_ok(digits: str) -> bool:
    """The Luhn (mod 10) checksum of a string of digits."""
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = ord(ch) - 48
        if i % 2:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def iban_ok(candidate: str) -> bool:
    """An IBAN (spaces allowed) with its country's length and a valid mod-97 check."""
    iban = candidate.replace(" ", "")
    if _IBAN_LENGTH.get(iban[:2]) != len(iban) or not iban.isalnum():
        return False
    moved = iban[4:] + iban[:4]
    return int("".join(str(int(c, 36)) for c in moved)) % 97 == 1


def _jwt_ok(token: str) -> bool:
    head = token.split(".", 1)[0]
    try:
        header = json.loads(base64.urlsafe_b64decode(head + "=" * (-len(head) % 4)))
    except (ValueError, UnicodeDecodeError):
        return False
    return isinstance(header, dict) and "alg" in header


def _ip_ok(candidate: str, v6: bool) -> bool:
    try:
        (ipaddress.IPv6Address if v6 else ipaddress.IPv4Address)(candidate)
    except ValueError:
        return False
    return True


def _regex_spans(text: str) -> list[Span]:
    spans: list[Span] = []
    for m in _JWT.finditer(text):
        if _jwt_ok(m.group()):
            spans.append(Span("jwt", m.start(), m.end()))
    spans += [Span("api_key", m.start(), m.end()) for m in _API_KEY.finditer(text)]
    spans += [Span("email", m.start(), m.end()) for m in _EMAIL.finditer(text)]
    spans += [Span("iban", m.start(), m.end()) for m in _IBAN.finditer(text) if iban_ok(m.group())]
    for m in _CARD.finditer(text):
        digits = re.sub(r"[ -]", "", m.group())
        if _CARD_PREFIX.match(digits) and luhn_ok(digits):
            spans.append(Span("card", m.start(), m.end()))
    spans += [Span("ip", m.start(), m.end()) for m in _IPV4.finditer(text) if _ip_ok(m.group(), False)]
    for m in _IPV6.finditer(text):
        candidate = m.group().rstrip(".")  # a full stop ending the sentence
        # A digit is required: "a::b" (C++ scope) parses as an address but is not one in practice.
        if candidate.count(":") >= 2 and any(c.isdigit() for c in candidate) and _ip_ok(candidate, True):
            spans.append(Span("ip", m.start(), m.start() + len(candidate)))
    return spans


def _phone_spans(text: str) -> list[Span]:
    if sum(c.isdigit() for c in text) < 7:  # libphonenumber is the slow part: skip text with no number
        return []
    # Imported on first use: the capture path imports this module (redaction), and content analysis is
    # off in the shipped config; phonenumbers would hold ~1 MiB there for nothing.
    import phonenumbers

    matcher = phonenumbers.PhoneNumberMatcher(text, PHONE_REGION, leniency=phonenumbers.Leniency.VALID)
    return [Span("phone", m.start, m.end) for m in matcher]


def find(text: str) -> list[Span]:
    """Every PII span in ``text``, in text order, without overlaps (the more trusted kind wins)."""
    starts: list[int] = []  # the kept spans, sorted by start; they never overlap each other
    kept: list[Span] = []
    for span in _regex_spans(text) + _phone_spans(text):  # already in order of trust
        i = bisect.bisect_left(starts, span.start)
        if i > 0 and kept[i - 1].end > span.start:
            continue
        if i < len(kept) and kept[i].start < span.end:
            continue
        starts.insert(i, span.start)
        kept.insert(i, span)
    return kept


def counts(text: str) -> dict[str, int]:
    """``{kind: count}`` of the PII in ``text`` (kinds with none left out)."""
    out: dict[str, int] = {}
    for span in find(text):
        out[span.kind] = out.get(span.kind, 0) + 1
    return out
