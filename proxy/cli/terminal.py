"""Text for a person at a terminal: stored values made harmless, numbers and sizes for humans, tables.

Model names, user ids, user agents, endpoints, error messages and alert labels are client-controlled and
reach the database verbatim. Printed raw, ``ESC]0;...BEL`` retitles the terminal, ``ESC[2J`` clears it,
a C1 ``CSI`` (U+009B) does the same on terminals that honour 8-bit controls, and U+202E reverses the rest
of the line. Every human-readable line the CLI prints goes through :func:`visible`; JSON goes through
:func:`json_text`, which escapes the same characters the JSON way, so the data read back is unchanged.

Backslashes are left alone (a Windows path stays readable), so a stored literal ``\\x1b`` prints like an
escaped ESC: ambiguous to the eye, harmless to the terminal. ``--json`` or ``export`` give the exact value.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

import orjson

__all__ = ["Table", "cell", "format_table", "json_text", "number", "size", "visible"]

# C0 and DEL and C1 (category Cc), the bidi embeddings, overrides, isolates and marks, the line and
# paragraph separators, and lone surrogates (which would make print() raise).
_BIDI_AND_SEPARATORS = "\u061c\u200e\u200f\u2028\u2029\u202a-\u202e\u2066-\u2069"
_UNSAFE = re.compile(f"[\x00-\x1f\x7f-\x9f{_BIDI_AND_SEPARATORS}\ud800-\udfff]")
# What is still raw in orjson's output: it escapes C0 itself, and refuses surrogates.
_JSON_UNSAFE = re.compile(f"[\x7f-\x9f{_BIDI_AND_SEPARATORS}]")
_SHORT = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape(m: re.Match[str]) -> str:
    c = m.group()
    code = ord(c)
    return _SHORT.get(c) or (f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}")


def visible(text: str) -> str:
    """``text`` with every control, bidi and separator character shown as an escape: ``\\x1b``, ``\\u202e``."""
    return _UNSAFE.sub(_escape, text)


def json_text(data: Any, indent: bool = False) -> str:
    """``data`` as JSON that is safe to print: it parses back to exactly ``data``."""
    text = orjson.dumps(data, option=orjson.OPT_INDENT_2 if indent else 0).decode()
    # Outside strings JSON is plain ASCII, so these characters can only be inside strings.
    return _JSON_UNSAFE.sub(lambda m: f"\\u{ord(m.group()):04x}", text)


def number(value: float) -> str:
    """A number for humans, never in scientific notation: ``1,234``, ``12.35``, ``0.00342``."""
    if isinstance(value, int):
        return f"{value:,}"
    if not math.isfinite(value):
        return str(value)
    magnitude = abs(value)
    if magnitude >= 1e6:
        return f"{value:,.0f}"
    if magnitude >= 0.01 or value == 0:
        return f"{value:,.2f}"
    # Small values keep three significant digits, written out: 0.00342, 0.00000123.
    return format(Decimal(f"{value:.3g}"), "f")


def size(n_bytes: int | None) -> str:
    """A byte count in binary units: ``512 B``, ``12.3 KiB``, ``4.0 MiB``."""
    if n_bytes is None:
        return "-"
    value = float(n_bytes)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(value) < 1024 or unit == "GiB":
            return f"{n_bytes:,} B" if unit == "B" else f"{value:,.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def cell(value: Any) -> str:
    """One table cell: ``-`` for none, ``yes``/``no``, a number for humans, or escaped text."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int | float):
        return number(value)
    return visible(value if isinstance(value, str) else str(value))


def _is_number(value: Any) -> bool:
    return value is None or (isinstance(value, int | float) and not isinstance(value, bool))


@dataclass(frozen=True, slots=True)
class Table:
    """Column widths and alignment fixed once, so rows printed later (``--follow``) line up with the head."""

    headers: tuple[str, ...]
    widths: tuple[int, ...]
    numeric: tuple[bool, ...]

    @classmethod
    def fit(
        cls,
        headers: Sequence[str],
        rows: Sequence[Sequence[Any]],
        minimum: Sequence[int] = (),
        numeric: Sequence[bool] | None = None,
    ) -> Table:
        """Widths from the header, ``rows`` and ``minimum``; numbers right-aligned (given or guessed)."""
        heads = tuple(visible(h) for h in headers)
        cells = [[cell(v) for v in row] for row in rows]
        floor = [*minimum, *([0] * (len(heads) - len(minimum)))]
        widths = tuple(max([len(h), floor[i], *(len(r[i]) for r in cells)]) for i, h in enumerate(heads))
        if numeric is None:
            numeric = [bool(rows) and all(_is_number(row[i]) for row in rows) for i in range(len(heads))]
        return cls(heads, widths, tuple(numeric))

    def head(self) -> str:
        """The header line and its underline."""
        names = self._line(self.headers)
        return names + "\n" + "  ".join("-" * w for w in self.widths)

    def row(self, values: Sequence[Any]) -> str:
        """One row; text wider than its column is cut with ``…`` (but not in the last column)."""
        return self._line([cell(v) for v in values])

    def render(self, rows: Sequence[Sequence[Any]]) -> str:
        return "\n".join([self.head(), *(self.row(r) for r in rows)])

    def _line(self, texts: Sequence[str]) -> str:
        out = []
        last = len(texts) - 1
        for i, (text, width, num) in enumerate(zip(texts, self.widths, self.numeric, strict=True)):
            if len(text) > width and i != last and not num:
                text = text[: width - 1] + "…"
            out.append(text.rjust(width) if num else text.ljust(width))
        return "  ".join(out).rstrip()


def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A plain aligned table: numbers right-aligned, every text cell escaped (:func:`visible`)."""
    return Table.fit(headers, rows).render(rows)
