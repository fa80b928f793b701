"""The offline lexical scores, used when no guard model is set.

* ``sentiment``: VADER's compound score in [-1, 1] (``vaderSentiment``, its lexicon ships in the wheel;
  English only, tuned for short social-media text).
* ``toxicity``: the share of words, in [0, 1], found in ``TOXIC_WORDS``, a small English list of insults,
  slurs-free profanity and threats written for ollamon (documented in docs/content.md). A crude
  signal for rates and alerts, not a classifier: it misses paraphrase, other languages and context.
"""

from __future__ import annotations

import re
import threading
from typing import Any

__all__ = ["TOXIC_WORDS", "scores"]

TOXIC_WORDS = frozenset(
    """
    idiot idiots stupid moron morons dumb imbecile loser losers scum trash worthless pathetic disgusting
    hate hateful kill killing murder die stab shoot bomb destroy fuck fucking shit bullshit bitch bastard
    asshole damn crap suck sucks retard jerk freak creep ugly garbage
    """.split()
)
_WORD = re.compile(r"[a-z']+")
_lock = threading.Lock()
_analyzer: Any = None


def _vader() -> Any:
    global _analyzer
    with _lock:
        if _analyzer is None:
            from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer  # type: ignore[import-untyped]

            _analyzer = SentimentIntensityAnalyzer()
        return _analyzer


def scores(text: str) -> tuple[float | None, float | None]:
    """(toxicity, sentiment) of ``text``; (None, None) when it has no words."""
    words = _WORD.findall(text.lower())
    if not words:
        return None, None
    toxicity = sum(w in TOXIC_WORDS for w in words) / len(words)
    sentiment = float(_vader().polarity_scores(text)["compound"])
    return round(toxicity, 4), round(sentiment, 4)
