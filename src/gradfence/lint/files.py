"""Which files a lint run checks: directories walked, skipping what git would ignore.

Excludes follow git's rules (``pathspec``'s ``GitIgnoreSpec``): the built-in
:data:`DEFAULT_EXCLUDES` and the user's ``--exclude`` / ``[tool.gradfence] exclude``
patterns, anchored at the base directory, then every ``.gitignore`` met on the way
down, anchored at its own directory. A deeper ``.gitignore`` overrides a shallower
one (``!keep.py`` re-includes a file); as in git, nothing inside an excluded directory
can be re-included, since the walk does not enter it. Files named explicitly on the
command line are always checked.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from pathspec import GitIgnoreSpec

DEFAULT_EXCLUDES = (
    ".git",
    ".hg",
    ".svn",
    ".venv",
    "venv",
    ".tox",
    ".nox",
    ".eggs",
    "*.egg-info",
    "__pycache__",
    ".mypy_cache",
    ".pytest_cache",
    ".ruff_cache",
    ".ipynb_checkpoints",
    "build",
    "dist",
    "node_modules",
    "site-packages",
)


@dataclass(frozen=True)
class Ignore:
    """Git-style patterns and the directory they are anchored at (absolute)."""

    spec: GitIgnoreSpec
    base: str

    @classmethod
    def parse(cls, lines: Iterable[str], base: str) -> Ignore | None:
        spec = GitIgnoreSpec.from_lines(list(lines))
        return cls(spec, os.path.abspath(base)) if len(spec) else None

    def decide(self, path: str, is_dir: bool, fallback: str) -> bool | None:
        """True: excluded, False: re-included (``!pattern``), None: no pattern matches.

        ``path`` is absolute; outside ``base`` it is taken relative to ``fallback``
        (the directory being walked), so unanchored patterns still apply to it.
        """
        relative = os.path.relpath(path, self.base)
        if relative == os.pardir or relative.startswith(os.pardir + os.sep):
            relative = os.path.relpath(path, fallback)
        relative = relative.replace(os.sep, "/") + ("/" if is_dir else "")
        return self.spec.check_file(relative).include


def _gitignore(directory: str) -> Ignore | None:
    path = os.path.join(directory, ".gitignore")
    try:
        with open(path, encoding="utf-8", errors="replace") as handle:
            return Ignore.parse(handle.read().splitlines(), directory)
    except OSError:
        return None


def _excluded(ignores: list[Ignore], path: str, is_dir: bool, root: str) -> bool:
    """The decision of the last (deepest) pattern source that has one."""
    for ignore in reversed(ignores):
        decision = ignore.decide(path, is_dir, root)
        if decision is not None:
            return decision
    return False


def discover(paths: Iterable[str], exclude: Iterable[str] = (), base: str = ".") -> Iterator[str]:
    """Python files under ``paths``; files named explicitly are always included."""
    fixed = Ignore.parse([*DEFAULT_EXCLUDES, *exclude], base)
    seen: set[str] = set()
    for root in paths:
        if os.path.isfile(root):
            if root not in seen:
                seen.add(root)
                yield root
            continue
        yield from _walk(root, [] if fixed is None else [fixed], seen)


def _walk(root: str, fixed: list[Ignore], seen: set[str]) -> Iterator[str]:
    walk_root = os.path.abspath(root)
    stack: list[tuple[str, list[Ignore]]] = [(root, _with_gitignore(fixed, root))]
    while stack:
        directory, ignores = stack.pop()
        try:
            entries = sorted(os.scandir(directory), key=lambda e: e.name)
        except OSError:
            continue
        subdirs: list[str] = []
        for entry in entries:
            full = entry.name if directory in {".", "./"} else os.path.join(directory, entry.name)
            is_dir = entry.is_dir(follow_symlinks=False)
            if _excluded(ignores, os.path.abspath(full), is_dir, walk_root):
                continue
            if is_dir:
                subdirs.append(full)
            elif entry.name.endswith(".py") and entry.is_file() and full not in seen:
                seen.add(full)
                yield full
        for sub in reversed(subdirs):
            stack.append((sub, _with_gitignore(ignores, sub)))


def _with_gitignore(ignores: list[Ignore], directory: str) -> list[Ignore]:
    found = _gitignore(directory)
    return ignores if found is None else [*ignores, found]
