"""Language identification with ``py3langid`` (langid.py's model, 97 languages, shipped in the wheel).

The model (about 4 MB) loads once, lazily, on the first call: on the analyzer's worker thread, never at
import time or on the request path. Probabilities are normalised, so ``confidence`` is in [0, 1].
"""

from __future__ import annotations

import threading
from typing import Any

__all__ = ["MIN_LETTERS", "detect"]

MIN_LETTERS = 12  # below this the guess is noise: no language is reported

_lock = threading.Lock()
_identifier: Any = None


def _model() -> Any:
    global _identifier
    with _lock:
        if _identifier is None:
            from py3langid.langid import MODEL_FILE, LanguageIdentifier  # type: ignore[import-untyped]

            _identifier = LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True)
        return _identifier


def detect(text: str) -> tuple[str, float] | None:
    """(ISO 639-1 code, confidence) of ``text``, or None when it has too few letters to tell."""
    if sum(c.isalpha() for c in text) < MIN_LETTERS:
        return None
    lang, prob = _model().classify(text)
    return str(lang), round(float(prob), 4)
