"""Accuracy of the language detector on the multilingual sample (tests/language_sample.py).

    python bench/language_eval.py

Prints the markdown table docs/content.md carries.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from proxy.content.language import detect
from tests.language_sample import SAMPLE, accuracy


def main() -> None:
    detect("warm the model up before timing")
    started = time.perf_counter()
    result = accuracy(detect)
    elapsed = time.perf_counter() - started
    print("| language | right / sentences | mean confidence |")
    print("|---|---:|---:|")
    for lang, (right, total, conf) in result.items():
        print(f"| {lang} | {right} / {total} | {conf:.3f} |")
    right = sum(r for r, _, _ in result.values())
    total = sum(t for _, t, _ in result.values())
    print(f"\noverall: {right} / {total} = {right / total:.3f}")
    per_us = elapsed / sum(len(s) for s in SAMPLE.values()) * 1e6
    print(f"speed: {per_us:.0f} µs per sentence (model loaded)")


if __name__ == "__main__":
    main()
