"""Plain-text tables for terminals and logs: the callback's parameter table, ``inspect``'s report."""

from __future__ import annotations

import re
from collections.abc import Sequence


def repeated_block(name: str) -> str:
    """``encoder.layer.3.query`` → ``encoder.layer.*.query``: the key that groups a weight with
    its copies in the other blocks of a stack."""
    return re.sub(r"\.\d+\.", ".*.", name)


def natural_key(name: str) -> list[int | str]:
    """Sort key that puts ``layer.2`` before ``layer.10``."""
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)]


def render_table(rows: Sequence[Sequence[str]], rule: bool = False) -> list[str]:
    """Lines of ``rows`` (the first one the header) in aligned columns: the first column left-,
    the others right-aligned; with ``rule``, a line of dashes under the header."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = [
        "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True)))
        for row in rows
    ]
    if rule:
        lines.insert(1, "-" * len(lines[0]))
    return lines
