"""flake8 plugin: ``flake8 --select GF`` runs the gradfence rules on flake8's parsed tree.

Registered in pyproject.toml as ``[project.entry-points."flake8.extension"] GF = ...``.
flake8 applies its own ``--select``/``--ignore`` and ``# noqa`` handling to the results.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator, Sequence
from typing import Any

from gradfence import __version__
from gradfence.lint.engine import check_tree


class Flake8Plugin:
    """A flake8 AST plugin yielding ``(line, col, "GFxxx message", type)``."""

    name = "gradfence"
    version = __version__

    def __init__(self, tree: ast.AST, lines: Sequence[str] = (), filename: str = "stdin") -> None:
        self.tree = tree
        self.lines = lines
        self.filename = filename

    def run(self) -> Iterator[tuple[int, int, str, type[Any]]]:
        """Yield one flake8 result per finding (column 0-based, as flake8 expects)."""
        source = "".join(self.lines)
        if "torch" not in source or not isinstance(self.tree, ast.Module):
            return
        for diagnostic in check_tree(self.tree, source, self.filename):
            yield (
                diagnostic.line,
                diagnostic.col - 1,
                f"{diagnostic.code} {diagnostic.message}",
                type(self),
            )
