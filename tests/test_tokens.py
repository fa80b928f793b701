"""proxy.forward.tokens: o200k_base from the bpe-openai package, with the network provably unused.

The check runs in a fresh interpreter so that no encoding cached by another test (or by tiktoken's own
cache directory) can hide a download: sockets raise, TIKTOKEN_CACHE_DIR points at an empty directory.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from proxy.forward.tokens import encoding_name, estimate_tokens

SCRIPT = textwrap.dedent(
    """
    import json, socket, threading

    def refuse(*args, **kwargs):
        raise OSError("network access attempted")

    socket.socket.connect = refuse
    socket.socket.connect_ex = refuse
    socket.create_connection = refuse

    from proxy.forward.tokens import estimate_tokens, encoding_name

    results = []
    def work():
        results.append(estimate_tokens("Hello, world! <|endoftext|> héllo 世界"))
    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    print(json.dumps({"name": encoding_name(), "counts": results, "empty": estimate_tokens("")}))
    """
)


def test_offline_load_in_a_clean_process(tmp_path: Path) -> None:
    cache = tmp_path / "tiktoken-cache"
    cache.mkdir()
    env = {**os.environ, "TIKTOKEN_CACHE_DIR": str(cache), "PYTHONPATH": str(Path(__file__).parents[1])}
    env.pop("DATA_GYM_CACHE_DIR", None)
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=100, check=False
    )
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    assert out["name"] == "o200k_base"
    assert len(set(out["counts"])) == 1 and out["counts"][0] > 5  # four threads, one encoding, same answer
    assert out["empty"] == 0
    assert list(cache.iterdir()) == []  # nothing fetched into tiktoken's cache


def test_known_counts() -> None:
    # o200k_base reference values: "hello world" is 2 tokens; the special marker is plain text here
    assert estimate_tokens("hello world") == 2
    assert estimate_tokens("<|endoftext|>") > 1
    assert encoding_name() == "o200k_base"


def test_matches_tiktokens_own_definition_of_o200k_base(monkeypatch: pytest.MonkeyPatch) -> None:
    """Our file, split pattern and special tokens against tiktoken's own o200k_base constructor.

    tiktoken_ext.openai_public defines o200k_base with the official file's URL and sha256, its regex and its
    special tokens; its loader is replaced by one that checks our bytes against that sha256 (no network), so
    a wrong file, a wrong pattern or a wrong special token in proxy.forward.tokens makes this fail.
    """
    import hashlib

    import tiktoken
    from tiktoken_ext import openai_public

    from proxy.forward import tokens

    seen: dict[str, str] = {}

    def load_checked(url: str, expected_hash: str | None = None) -> dict[bytes, int]:
        seen["url"], seen["hash"] = url, expected_hash or ""
        return dict(tokens._get()._mergeable_ranks)

    monkeypatch.setattr(openai_public, "load_tiktoken_bpe", load_checked)
    official = tiktoken.Encoding(**openai_public.o200k_base())
    assert seen["url"].endswith("/o200k_base.tiktoken")
    path = Path(next(iter(importlib.util.find_spec("bpe_openai").submodule_search_locations or [])))  # type: ignore[union-attr]
    data = gzip.decompress((path / "data" / "o200k_base.tiktoken.gz").read_bytes())
    assert hashlib.sha256(data).hexdigest() == seen["hash"]  # the shipped file is the official one
    ours = tokens._get()
    assert ours._pat_str == official._pat_str
    assert ours._special_tokens == official._special_tokens
    text = (
        "The quick brown fox — jumps over 13 lazy dogs.\n\n日本語のテキスト. def f(x):\n    return x**2  # ok"
    )
    assert ours.encode_ordinary(text) == official.encode_ordinary(text)
    assert ours.n_vocab == official.n_vocab == 200019


def test_missing_package_gives_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    from proxy.forward import tokens

    monkeypatch.setattr(tokens.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(tokens.TokenizerUnavailable, match="bpe-openai"):
        tokens._load()
