"""`ollamon conversations` (being written)."""

from __future__ import annotations

import argparse
from typing import Any

__all__ = ["register"]


def register(sub: Any) -> None:
    """Add this command's parsers to the ``ollamon`` subcommands."""
    _ = argparse
