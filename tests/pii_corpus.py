"""A labelled PII corpus written for the tests: texts with the kinds and counts they hold.

Positives put each kind in a sentence, in the formats people type; near-misses are what a careless
detector counts: card-like numbers failing Luhn, IBANs with a bad checksum or length, dotted numbers
that are not addresses, half-shaped keys, JWT-looking strings whose header is not a JWT header.
Numbers are generated from a fixed seed, so the corpus is the same on every run.
``examples()`` returns [(text, {kind: count})]; ``score(find_counts)`` gives precision/recall per kind.
"""

from __future__ import annotations

import base64
import json
import random
import string
from collections.abc import Callable

__all__ = ["KINDS", "examples", "score"]

KINDS = ("email", "phone", "card", "iban", "ip", "api_key", "jwt")
Example = tuple[str, dict[str, int]]


def _luhn_digit(body: str) -> str:
    total = 0
    for i, ch in enumerate(reversed(body)):
        d = int(ch)
        if i % 2 == 0:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return str((10 - total % 10) % 10)


def _card(rng: random.Random, prefix: str, length: int) -> str:
    body = prefix + "".join(rng.choice(string.digits) for _ in range(length - len(prefix) - 1))
    return body + _luhn_digit(body)


def _group(number: str, sep: str) -> str:
    return sep.join(number[i : i + 4] for i in range(0, len(number), 4))


def _iban(country: str, bban: str) -> str:
    moved = bban + country + "00"
    check = 98 - int("".join(str(int(c, 36)) for c in moved)) % 97
    return f"{country}{check:02d}{bban}"


def _b64(obj: dict[str, object]) -> str:
    return base64.urlsafe_b64encode(json.dumps(obj).encode()).decode().rstrip("=")


def _cards(rng: random.Random) -> list[Example]:
    out: list[Example] = []
    specs = [("4", 16), ("51", 16), ("55", 16), ("2221", 16), ("34", 15), ("37", 15), ("6011", 16), ("4", 13)]
    templates = ["Charge card {} please.", "my visa is {}", "Card number: {} exp 04/29", "{}"]
    for i in range(24):
        prefix, length = specs[i % len(specs)]
        number = _card(rng, prefix, length)
        shown = [number, _group(number, " "), _group(number, "-")][i % 3]
        out.append((templates[i % len(templates)].format(shown), {"card": 1}))
    for i in range(16):  # near-misses: one digit off (Luhn fails), or a Luhn-valid number no card uses
        prefix, length = specs[i % len(specs)]
        number = _card(rng, prefix, length)
        if i % 4 == 3:
            body = "9" + number[1:-1]
            number = body + _luhn_digit(body)
        else:
            number = number[:-1] + str((int(number[-1]) + 1 + i % 8) % 10)
        shown = [number, _group(number, " ")][i % 2]
        out.append((f"order reference {shown} shipped", {}))
    return out


def _ibans(rng: random.Random) -> list[Example]:
    out: list[Example] = []
    makers: list[Callable[[], str]] = [
        lambda: _iban("DE", "".join(rng.choice(string.digits) for _ in range(18))),
        lambda: _iban("FR", "".join(rng.choice(string.digits) for _ in range(23))),
        lambda: _iban("NL", "ABNA" + "".join(rng.choice(string.digits) for _ in range(10))),
        lambda: _iban("GB", "NWBK" + "".join(rng.choice(string.digits) for _ in range(14))),
        lambda: _iban("ES", "".join(rng.choice(string.digits) for _ in range(20))),
        lambda: _iban("IT", "X" + "".join(rng.choice(string.digits) for _ in range(22))),
    ]
    for i in range(22):
        iban = makers[i % len(makers)]()
        shown = iban if i % 2 else _group(iban, " ")
        out.append((f"Please wire it to IBAN {shown}, thanks", {"iban": 1}))
    out.append(("Known example: DE89 3704 0044 0532 0130 00.", {"iban": 1}))
    out.append(("GB82WEST12345698765432 is the account", {"iban": 1}))
    for i in range(12):  # near-misses: check digits off by one, or a digit dropped (wrong length)
        iban = makers[i % len(makers)]()
        if i % 2:
            bad = iban[:2] + f"{(int(iban[2:4]) + 1) % 100:02d}" + iban[4:]
        else:
            bad = iban[:-1]
        out.append((f"account {bad if i % 3 else _group(bad, ' ')} (typo)", {}))
    return out


def _emails() -> list[Example]:
    good = [
        "alice@example.com", "bob.smith@mail.example.org", "carol+news@sub.example.co.uk",
        "d_e-f@example.io", "x@example.de", "first.last@university.edu", "o'brien@example.ie",
        "UPPER@EXAMPLE.COM", "support@ollamon.dev", "n1234@example.net", "jo@exa-mple.com",
        "team.lead@corp.example.travel", "a.b.c.d@example.fr", "user%tag@example.com",
        "info@xn--bcher-kva.example", "z@z9.example.com", "mary@example.museum", "hi@example.ai",
        "person@mail.example.com.au", "root@example.org",
    ]  # fmt: skip
    out: list[Example] = []
    for i, e in enumerate(good):
        text = [f"Contact me at {e}.", f"<{e}>", f"email: {e}, phone later", f"cc {e} and the team"][i % 4]
        out.append((text, {"email": 1}))
    out.append(("Send to a@example.com and b@example.org", {"email": 2}))
    bad = [
        "user@localhost", "name at example dot com", "@handle on social", "foo@bar", "a@b.c",
        "email@.example.com", "me@example..com", "this is user @ example.com", "x@-example.com",
        "just an @ sign",
    ]  # fmt: skip
    out += [(f"not an address: {b}", {}) for b in bad]
    return out


def _phones() -> list[Example]:
    good = [
        "(650) 253-0000", "650-253-0000", "+1 650 253 0000", "+1-212-555-0187", "212.555.0142",
        "+44 20 7946 0958", "+49 30 901820", "+33 1 42 68 53 00", "+81 3-3224-5000", "+61 2 9374 4000",
        "+34 912 34 56 78", "+39 06 6982 0000", "+91 98765 43210", "+55 11 3456-7890", "(415) 555-2671",
        "+1 (202) 456-1111", "+31 20 555 1234", "+46 8 123 456 78", "+353 1 234 5678", "1-800-555-0199",
    ]  # fmt: skip
    out: list[Example] = []
    for i, p in enumerate(good):
        text = [f"Call me on {p} tomorrow", f"phone: {p}", f"{p} is my cell", f"ring {p}."][i % 4]
        out.append((text, {"phone": 1}))
    bad = [
        "order 12345 shipped", "on 2024-01-15 at noon", "version 3.11.7", "room 404", "ISBN 978-3-16",
        "123-456-7890", "call 555-01", "pi is 3.14159265", "year 1999 and 2000", "zip 94043",
        "+1 000 000 0000", "1234567", "the score was 21-14", "batch 0000000000",
    ]  # fmt: skip
    out += [(b, {}) for b in bad]
    return out


def _ips() -> list[Example]:
    good = [
        "10.0.0.1", "192.168.1.254", "8.8.8.8", "172.16.254.1", "255.255.255.255", "127.0.0.1",
        "203.0.113.7", "1.1.1.1", "::1", "2001:db8::1", "fe80::1ff:fe23:4567:890a",
        "2001:0db8:85a3:0000:0000:8a2e:0370:7334", "::ffff:192.0.2.128", "2606:4700:4700::1111",
        "100.64.0.10", "198.51.100.42", "fd00::a:b", "0.0.0.0", "2001:db8:0:0:1:0:0:1", "169.254.0.5",
    ]  # fmt: skip
    out: list[Example] = []
    for i, a in enumerate(good):
        text = [f"server at {a}.", f"ssh root@{a}", f"ip={a} port 22", f"from {a}, blocked"][i % 4]
        expect = {"ip": 1}
        if text.startswith("ssh root@"):
            text = f"ssh to {a} as root"
        out.append((text, expect))
    bad = [
        "999.1.1.1", "version 1.2.3", "1.2.3.4.5 is a version", "at 12:30:45", "2001:db8:::1",
        "256.256.256.256", "ratio 3:2", "file a::b in C++", "10.0.0", "gggg::1",
    ]  # fmt: skip
    out += [(f"not an ip: {b}", {}) for b in bad]
    return out


def _api_keys(rng: random.Random) -> list[Example]:
    alnum = string.ascii_letters + string.digits

    def r(n: int, chars: str = alnum) -> str:
        return "".join(rng.choice(chars) for _ in range(n))

    keys = [
        "sk-" + r(48), "sk-proj-" + r(40), "sk-ant-api03-" + r(60, alnum + "-_"), "ghp_" + r(36),
        "gho_" + r(36), "github_pat_" + r(22) + "_" + r(59), "AKIA" + r(16, string.ascii_uppercase + string.digits),
        "ASIA" + r(16, string.ascii_uppercase + string.digits), "xoxb-" + r(12, string.digits) + "-" + r(24),
        "AIza" + r(35, alnum + "-_"), "olm_" + r(43), "ghs_" + r(36),
    ]  # fmt: skip
    out: list[Example] = []
    for i, k in enumerate([*keys, f"sk-{r(32)}", f"olm_{r(43)}", f"ghp_{r(36)}", "AKIAIOSFODNN7EXAMPLE"]):
        text = [f"export KEY={k}", f"my token is {k} don't share", f'{{"api_key": "{k}"}}', f"use {k}."][
            i % 4
        ]
        out.append((text, {"api_key": 1}))
    bad = [
        "sk-short", "ghp_abc123", "AKIA1234", "task-list-item-number-twelve", "olm_tooshort", "the ask-for is",
        "skeleton-key-" + r(20), "xoxb", "AIzaShort", "ghp-" + r(36), "AKIA" + r(16, string.ascii_lowercase),
    ]  # fmt: skip
    out += [(f"not a key: {b}", {}) for b in bad]
    return out


def _jwts(rng: random.Random) -> list[Example]:
    out: list[Example] = []
    for i in range(16):
        header = _b64({"alg": ["HS256", "RS256", "ES256", "none"][i % 4], "typ": "JWT"})
        payload = _b64({"sub": str(rng.randrange(10**6)), "iat": 1700000000 + i})
        sig = "".join(rng.choice(string.ascii_letters + string.digits + "-_") for _ in range(43))
        token = f"{header}.{payload}.{sig}"
        text = [f"Authorization: Bearer {token}", f"token={token}", f"{token}", f"cookie jwt {token} set"][
            i % 4
        ]
        out.append((text, {"jwt": 1}))
    no_alg = _b64({"typ": "JWT", "kid": "x"}) + "." + _b64({"sub": "1"}) + ".abcdefgh"
    bad = [
        "eyJhbGciOi", no_alg, "eyJzzzzzzzz.yyyyyyyyyy.zzzzzzzzzz", "header.payload.signature",
        "eyJ" + "a" * 10 + ".b", "ey.J.x",
    ]  # fmt: skip
    out += [(f"not a jwt: {b}", {}) for b in bad]
    return out


def _known_misses() -> list[Example]:
    """Real PII in forms the detector is documented to miss (docs/content.md): they count against recall."""
    return [
        ("UK office: 020 7946 0958", {"phone": 1}),  # national format outside the US numbering plan
        ("my mobile is 07700 900123", {"phone": 1}),
        ("write to alice [at] example.com", {"email": 1}),  # obfuscated
        ("john(dot)doe@example(dot)com", {"email": 1}),
        ("card 4111.1111.1111.1111", {"card": 1}),  # dots between the groups
        ("iban de89370400440532013000", {"iban": 1}),  # lower case
        (
            "aws_secret_access_key = wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",
            {"api_key": 1},
        ),  # no fixed shape
    ]


def _clean() -> list[Example]:
    texts = [
        "Write a haiku about autumn leaves.", "What is the capital of France?", "Explain TCP slow start.",
        "Summarise this article in three bullet points.", "def add(a, b):\n    return a + b",
        "The meeting is at 10:30 on Friday.", "Translate 'good morning' into German.", "x = [1, 2, 3, 4, 5]",
        "Rate this movie from 1 to 10.", "Pi to 5 places is 3.14159.", "How do I make a sourdough starter?",
        "List the planets in order from the sun.", "SELECT * FROM users WHERE id = 42;",
        "The quick brown fox jumps over the lazy dog.", "Total: $1,234.56 for 3 items",
        "Use git commit -m 'fix' then push.", "Chapter 12, section 4.2, paragraph 3",
        "Temperature 21.5 C, humidity 40%", "https://example.com/docs/page?id=7", "Version 2.0.1 released",
    ]  # fmt: skip
    return [(t, {}) for t in texts]


def examples() -> list[Example]:
    """The whole corpus, in a fixed order."""
    rng = random.Random(20261130)
    return (
        _cards(rng)
        + _ibans(rng)
        + _emails()
        + _phones()
        + _ips()
        + _api_keys(rng)
        + _jwts(rng)
        + _known_misses()
        + _clean()
    )


def score(find_counts: Callable[[str], dict[str, int]]) -> dict[str, dict[str, float | int]]:
    """Per kind: tp, fp, fn, precision, recall (counts matched per example, kind by kind)."""
    tally = {k: {"tp": 0, "fp": 0, "fn": 0} for k in KINDS}
    for text, expected in examples():
        found = find_counts(text)
        for kind in KINDS:
            want, got = expected.get(kind, 0), found.get(kind, 0)
            tally[kind]["tp"] += min(want, got)
            tally[kind]["fp"] += max(got - want, 0)
            tally[kind]["fn"] += max(want - got, 0)
    out: dict[str, dict[str, float | int]] = {}
    for kind, t in tally.items():
        tp, fp, fn = t["tp"], t["fp"], t["fn"]
        out[kind] = {
            "tp": tp,
            "fp": fp,
            "fn": fn,
            "precision": tp / (tp + fp) if tp + fp else 1.0,
            "recall": tp / (tp + fn) if tp + fn else 1.0,
        }
    return out
