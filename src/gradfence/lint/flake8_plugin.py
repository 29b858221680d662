"""flake8 plugin: ``flake8 --select GF`` runs the gradfence rules on flake8's parsed tree.

Registered in pyproject.toml as ``[project.entry-points."flake8.extension"] GF = ...``.
flake8 applies its own ``--select``/``--ignore`` and ``# noqa`` handling to the results.

The oldest torch to support (which enables GF106) comes from ``--gf-target-torch X.Y``
(also ``gf-target-torch = X.Y`` in flake8's own config), else from ``target-torch`` in
``[tool.gradfence]`` of the nearest pyproject.toml, as for ``gradfence lint``.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from gradfence import __version__
from gradfence.lint.config import ConfigError, find_pyproject, load_config, parse_torch_version
from gradfence.lint.engine import Settings, check_tree


class Flake8Plugin:
    """A flake8 AST plugin yielding ``(line, col, "GFxxx message", type)``."""

    name = "gradfence"
    version = __version__
    settings = Settings()

    def __init__(self, tree: ast.AST, lines: Sequence[str] = (), filename: str = "stdin") -> None:
        self.tree = tree
        self.lines = lines
        self.filename = filename

    @classmethod
    def add_options(cls, option_manager: Any) -> None:
        """Register ``--gf-target-torch`` with flake8 (command line and config file)."""
        option_manager.add_option(
            "--gf-target-torch",
            metavar="X.Y",
            default=None,
            parse_from_config=True,
            help="gradfence: oldest torch version to support (enables GF106); default: "
            "target-torch in [tool.gradfence] of pyproject.toml",
        )

    @classmethod
    def parse_options(cls, options: Any) -> None:
        """Settle the target torch once per flake8 run; a bad one ends the run in one line."""
        target: tuple[int, int] | None
        try:
            text = getattr(options, "gf_target_torch", None)
            if text:
                target = parse_torch_version(str(text))
            else:
                target = load_config(find_pyproject(Path.cwd())).target_torch
        except ConfigError as exc:
            raise SystemExit(f"flake8: gradfence: {exc}") from None
        cls.settings = Settings(target_torch=target)

    def run(self) -> Iterator[tuple[int, int, str, type[Any]]]:
        """Yield one flake8 result per finding (column 0-based, as flake8 expects)."""
        source = "".join(self.lines)
        if "torch" not in source or not isinstance(self.tree, ast.Module):
            return
        for diagnostic in check_tree(self.tree, source, self.filename, self.settings):
            yield (
                diagnostic.line,
                diagnostic.col - 1,
                f"{diagnostic.code} {diagnostic.message}",
                type(self),
            )
