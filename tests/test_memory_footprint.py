"""What the serving process holds for nothing (issue 15, docs/benchmarks.md *RSS at 1,000 open slow streams*).

The 150 MB target at 1,000 streams was met by not holding what the shipped config never uses: tiktoken's
Python copy of the ranks (27 MiB), numpy and webbrowser behind uplot-python's ``__init__`` (~10 MiB), and
phonenumbers while content analysis is off. These tests keep each of them out, in a fresh interpreter so
that nothing another test imported can hide a regression.
"""

from __future__ import annotations

import importlib.resources
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

from proxy.dashboard.routes import ASSETS, load_assets
from proxy.forward import tokens

ROOT = Path(__file__).parents[1]

IMPORTS = """
import json, sys
import proxy.app
from proxy.dashboard.routes import load_assets
from proxy.forward.tokens import estimate_tokens
assets = load_assets()
count = estimate_tokens("hello world")
print(json.dumps({"loaded": sorted(m for m in sys.modules if m.split(".")[0] in WATCH), "count": count}))
"""
# Packages the shipped config never calls on the serving path (content analysis off, no plotting).
WATCH = ("numpy", "uplot", "webbrowser", "phonenumbers", "redis", "opentelemetry")


def test_serving_imports_leave_out_what_the_shipped_config_never_uses() -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-c", f"WATCH = {WATCH!r}\n{IMPORTS}"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    assert out["loaded"] == []
    assert out["count"] == 2  # the tokenizer loaded and works without them


def test_encoding_holds_no_python_copy_of_its_ranks() -> None:
    enc = tokens._get()
    assert "_mergeable_ranks" not in vars(enc)  # the 27 MiB dict is not kept on the instance
    ranks = enc._mergeable_ranks  # read again from the file when asked
    assert len(ranks) == 199_998 and ranks[b"hello"] == enc.encode_single_token(b"hello")
    assert "_mergeable_ranks" not in vars(enc)
    text = "Memory matters — 1,000 streams, 日本語, émoji 🎉"
    clone = pickle.loads(pickle.dumps(enc))
    assert clone.encode_ordinary(text) == enc.encode_ordinary(text)


def test_assets_are_the_installed_files() -> None:
    """Located without importing their package, the bytes are still those the package ships."""
    assets = load_assets()
    for url_name, (package, name, _) in ASSETS.items():
        expected = importlib.resources.files(package).joinpath(name).read_bytes()
        assert assets[url_name].body == expected, url_name
