"""The PII detectors on the labelled corpus (tests/pii_corpus.py), plus checksums and redaction."""

from __future__ import annotations

import pytest

from proxy.content import pii
from proxy.content.redact import redact
from tests import pii_corpus

# Floors per kind; docs/content.md has the measured figures (bench/pii_eval.py prints them).
PRECISION_FLOOR = 0.95
RECALL_FLOOR = 0.9


def test_corpus_is_big_enough_and_balanced() -> None:
    examples = pii_corpus.examples()
    assert len(examples) >= 200
    positives = [e for _, e in examples if e]
    assert len(positives) >= 100 and len(examples) - len(positives) >= 80
    for kind in pii_corpus.KINDS:
        assert sum(e.get(kind, 0) for _, e in examples) >= 15, kind


@pytest.mark.parametrize("kind", pii_corpus.KINDS)
def test_precision_and_recall_per_kind(kind: str) -> None:
    figures = pii_corpus.score(pii.counts)[kind]
    assert figures["precision"] >= PRECISION_FLOOR, figures
    assert figures["recall"] >= RECALL_FLOOR, figures


def test_score_counts_misses_and_false_alarms() -> None:
    """The scorer itself: a detector that finds nothing has recall 0, one that finds everything low precision."""
    nothing = pii_corpus.score(lambda _t: {})
    assert all(f["recall"] == 0.0 for f in nothing.values())
    everything = pii_corpus.score(lambda _t: dict.fromkeys(pii_corpus.KINDS, 1))
    assert all(f["precision"] < 0.5 for f in everything.values())


def test_luhn_and_iban_checks() -> None:
    assert pii.luhn_ok("4111111111111111") and not pii.luhn_ok("4111111111111112")
    assert pii.iban_ok("DE89 3704 0044 0532 0130 00") and not pii.iban_ok("DE88 3704 0044 0532 0130 00")
    assert not pii.iban_ok("DE89 3704 0044 0532 0130 0")  # one digit short of Germany's 22


def test_counts_never_carry_values() -> None:
    text = "mail bob@example.com, card 4111 1111 1111 1111, key AKIAIOSFODNN7EXAMPLE"
    found = pii.counts(text)
    assert found == {"email": 1, "card": 1, "api_key": 1}
    assert all(isinstance(k, str) and isinstance(v, int) for k, v in found.items())


def test_overlaps_count_once() -> None:
    """The digits of a card are not also a phone number; an e-mail's digits are not an IP."""
    assert pii.counts("4111-1111-1111-1111") == {"card": 1}
    assert pii.counts("write to ops.10.0.0.1@example.com") == {"email": 1}


def test_redaction_replaces_each_span_by_its_kind() -> None:
    text = "Mail bob@example.com or +1 650 253 0000; IBAN DE89370400440532013000; token sk-" + "a" * 30 + "."
    assert redact(text) == "Mail <EMAIL> or <PHONE>; IBAN <IBAN>; token <API_KEY>."
    assert redact("nothing here") == "nothing here"


def test_hostile_input_is_bounded() -> None:
    """Long runs of digits, colons, dots and at-signs finish quickly and find nothing odd."""
    for text in ("1" * 20000, ":" * 20000, "." * 20000, "@" * 20000, "a@" * 5000, "1." * 10000):
        assert sum(pii.counts(text).values()) <= 1
