"""Writing a study's tables: CSV for programs (exact values) and Markdown for readers (formatted values).

CSV cells are the raw values, so nothing is lost when a table is read back (losses at full
precision, bytes as bytes, None as an empty cell, a diverged loss as `inf`). Markdown cells are
formatted for reading: losses with 4 decimals ("diverged" for +inf), bytes in MiB, FLOPs in
scientific notation, tokens/s as an integer, config values compactly ("1e-3", "3.16e-3", "0.95").
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from data.files import write_bytes_atomic

MIB = 2**20


def fmt_value(value: Any) -> str:
    """A config value as a reader writes it: 1e-3, 3.16e-3, 0.01, 0.95, 256, true."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        if value == 0 or not math.isfinite(value):
            return str(value)
        if 1e-2 <= abs(value) < 1e4:
            return f"{value:.4g}"
        # Scientific with 3 significant digits and no padding: 3.16e-3, 1e-3 (a grid's usual spelling).
        mantissa, exponent = f"{value:.2e}".split("e")
        mantissa = mantissa.rstrip("0").rstrip(".")
        return f"{mantissa}e{int(exponent)}"
    return str(value)


def fmt_loss(value: float | None) -> str:
    if value is None:
        return ""
    if value == math.inf:
        return "diverged"
    return f"{value:.4f}"


def fmt_mib(value: float | None) -> str:
    return "" if value is None else f"{value / MIB:.2f}"


def fmt_flops(value: float | None) -> str:
    return "" if value is None else f"{value:.3e}"


def fmt_int(value: float | None) -> str:
    return "" if value is None else f"{round(value)}"


def fmt_plain(value: Any) -> str:
    """Anything else: None as empty, booleans as yes / no, numbers as fmt_value."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "yes" if value else "no"
    return fmt_value(value)


Formatter = Callable[[Any], str]


def write_csv(path: Path, header: Sequence[str], rows: Sequence[Sequence[Any]]) -> Path:
    """Written whole or not at all (as the figures): a --collect cut short leaves the previous table."""
    text = io.StringIO(newline="")
    writer = csv.writer(text)
    writer.writerow(header)
    writer.writerows(rows)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_bytes_atomic(path, text.getvalue().encode())
    return path


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A GitHub-flavoured Markdown table: the header line, the separator line, one line per row."""

    def cell(text: str) -> str:  # a | or a newline inside a cell would break the table
        return text.replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(cell(h) for h in header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def write_markdown(path: Path, title: str, header: Sequence[str], rows: Sequence[Sequence[str]]) -> Path:
    """`# title`, a blank line, then the table; written whole or not at all, as write_csv."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_bytes_atomic(path, (f"# {title}\n\n" + markdown_table(header, rows)).encode())
    return path
