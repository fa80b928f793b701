"""Language identification (py3langid) on a small multilingual sample written for the tests."""

from __future__ import annotations

from proxy.content.language import MIN_LETTERS, detect
from tests.language_sample import SAMPLE, accuracy

ACCURACY_FLOOR = 0.9  # overall; docs/content.md has the measured table (bench/language_eval.py)


def test_sample_covers_ten_languages() -> None:
    assert len(SAMPLE) >= 10 and all(len(s) >= 3 for s in SAMPLE.values())


def test_accuracy_on_the_sample() -> None:
    result = accuracy(detect)
    right = sum(r for r, _, _ in result.values())
    total = sum(t for _, t, _ in result.values())
    assert right / total >= ACCURACY_FLOOR, result
    assert all(r >= t - 1 for r, t, _ in result.values()), result  # no language mostly wrong


def test_confidence_is_a_probability() -> None:
    for sentences in SAMPLE.values():
        found = detect(sentences[0])
        assert found is not None and 0.0 <= found[1] <= 1.0


def test_too_little_text_gives_no_language() -> None:
    assert detect("") is None
    assert detect("ok 12345 !!") is None
    assert detect("x" * (MIN_LETTERS - 1)) is None
    assert detect("1234567890 " * 50) is None  # digits are not letters
