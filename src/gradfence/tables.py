"""Aligned plain-text tables: the one printer behind every table a command shows."""

from __future__ import annotations

from collections.abc import Container, Sequence


def aligned(
    rows: Sequence[Sequence[str]], *, right: Container[int] = (), header: bool = False
) -> list[str]:
    """The rows as lines, each column as wide as its widest cell, two spaces apart.

    Columns whose index is in ``right`` are right-aligned (numbers), the others left;
    trailing spaces are dropped. With ``header=True`` the first row is the header and
    is followed by a rule of dashes.

    >>> print("\\n".join(aligned([("mode", "ms"), ("grad", "4.0"), ("no_grad", "12.5")],
    ...                          right={1}, header=True)))
    mode       ms
    -------  ----
    grad      4.0
    no_grad  12.5
    """
    if not rows:
        return []
    widths = [max(len(row[column]) for row in rows) for column in range(len(rows[0]))]
    lines = []
    for row in rows:
        cells = [
            cell.rjust(width) if column in right else cell.ljust(width)
            for column, (cell, width) in enumerate(zip(row, widths, strict=True))
        ]
        lines.append("  ".join(cells).rstrip())
    if header:
        lines.insert(1, "  ".join("-" * width for width in widths))
    return lines
