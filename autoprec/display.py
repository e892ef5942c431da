"""Plain-text tables for the terminal."""

from __future__ import annotations

import math
import numbers
import unicodedata
from collections.abc import Sequence
from typing import Any

_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def printable(value: object) -> str:
    """`value` as text safe to print: control characters (terminal escape codes, newlines, carriage
    returns, bidirectional overrides, line separators) are written as escapes (`\\x1b`, `\\n`), so text
    from a store or a file cannot clear a screen or forge a table row."""
    text = str(value)
    if text.isprintable():
        return text
    out = []
    for ch in text:
        if ch.isprintable() or ch == " ":
            out.append(ch)
        elif ch in _ESCAPES:
            out.append(_ESCAPES[ch])
        elif unicodedata.category(ch) in ("Zs",):  # other spaces show as they are
            out.append(ch)
        else:
            code = ord(ch)
            out.append(f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}")
    return "".join(out)


def number_text(value: object, fmt: str, suffix: str = "", missing: str = "-") -> str:
    """A number formatted with `fmt`; `missing` for None, "n/a" for anything not a finite number
    (a NaN or infinity from a store, a string where a number belongs)."""
    if value is None:
        return missing
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return "n/a"
    try:
        if not math.isfinite(value):
            return "n/a"
        return f"{value:{fmt}}{suffix}"
    except (OverflowError, ValueError, TypeError):
        return "n/a"


def format_bytes(n: float | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def threads_text(count: object) -> str:
    """'1 thread', '2 threads' (the count may come from a stored string)."""
    return f"{count} thread" if str(count) == "1" else f"{count} threads"


def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    cells = [[printable(h) for h in headers]] + [["-" if v is None else printable(v) for v in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]

    def numeric(text: str) -> bool:
        return text.replace(".", "", 1).replace("x", "").replace("-", "").replace(",", "").strip().isdigit()

    lines = []
    for r, row in enumerate(cells):
        parts = [c.rjust(w) if r and numeric(c) else c.ljust(w) for c, w in zip(row, widths)]
        lines.append("  ".join(parts).rstrip())
        if r == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)
