"""Precision and recall of the PII detectors on the labelled corpus (tests/pii_corpus.py).

    python bench/pii_eval.py

Prints the markdown table docs/content.md carries, and the detector's speed on the corpus.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from proxy.content import pii
from tests import pii_corpus


def main() -> None:
    examples = pii_corpus.examples()
    figures = pii_corpus.score(pii.counts)
    positives = sum(1 for _, e in examples if e)
    print(f"corpus: {len(examples)} texts, {positives} with PII, {len(examples) - positives} without\n")
    print("| kind | items | found (TP) | false alarms (FP) | missed (FN) | precision | recall |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for kind, f in figures.items():
        items = int(f["tp"]) + int(f["fn"])
        print(
            f"| {kind} | {items} | {f['tp']} | {f['fp']} | {f['fn']} | {f['precision']:.3f} | {f['recall']:.3f} |"
        )
    started = time.perf_counter()
    rounds = 20
    for _ in range(rounds):
        for text, _ in examples:
            pii.counts(text)
    per_text_us = (time.perf_counter() - started) / (rounds * len(examples)) * 1e6
    print(f"\nspeed: {per_text_us:.0f} µs per corpus text (mean over {rounds} passes)")


if __name__ == "__main__":
    main()
