"""Which files a lint run checks: directories walked with .gitignore-like excludes."""

from __future__ import annotations

import fnmatch
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

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
class Pattern:
    """One .gitignore-style pattern, anchored to ``base`` when it contains a slash."""

    text: str
    base: str
    directory_only: bool
    anchored: bool

    @classmethod
    def parse(cls, line: str, base: str) -> Pattern | None:
        line = line.strip()
        if not line or line.startswith("#") or line.startswith("!"):
            return None  # negation is not supported: keeping a file is the safe default
        directory_only = line.endswith("/")
        line = line.rstrip("/")
        anchored = "/" in line
        return cls(line.lstrip("/"), base, directory_only, anchored)

    def matches(self, path: str, is_dir: bool) -> bool:
        """Whether ``path`` (absolute, or relative to the working directory) is excluded."""
        if self.directory_only and not is_dir:
            return False
        if not self.anchored:
            return fnmatch.fnmatch(os.path.basename(path), self.text)
        relative = os.path.relpath(path, self.base).replace(os.sep, "/")
        if relative.startswith("../"):
            return False
        return fnmatch.fnmatch(relative, self.text) or fnmatch.fnmatch(relative, self.text + "/*")


def _patterns(lines: Iterable[str], base: str) -> list[Pattern]:
    return [p for p in (Pattern.parse(line, base) for line in lines) if p is not None]


def _gitignore(directory: str) -> list[Pattern]:
    path = os.path.join(directory, ".gitignore")
    try:
        with open(path, encoding="utf-8", errors="replace") as handle:
            return _patterns(handle, directory)
    except OSError:
        return []


def discover(paths: Iterable[str], exclude: Iterable[str] = (), base: str = ".") -> Iterator[str]:
    """Python files under ``paths``; files named explicitly are always included."""
    fixed = _patterns([*DEFAULT_EXCLUDES, *exclude], os.path.abspath(base))
    seen: set[str] = set()
    for root in paths:
        if os.path.isfile(root):
            if root not in seen:
                seen.add(root)
                yield root
            continue
        yield from _walk(root, fixed, seen)


def _walk(root: str, fixed: list[Pattern], seen: set[str]) -> Iterator[str]:
    stack: list[tuple[str, list[Pattern]]] = [(root, fixed + _gitignore(root))]
    while stack:
        directory, patterns = stack.pop()
        try:
            entries = sorted(os.scandir(directory), key=lambda e: e.name)
        except OSError:
            continue
        subdirs: list[str] = []
        for entry in entries:
            full = entry.name if directory in {".", "./"} else os.path.join(directory, entry.name)
            is_dir = entry.is_dir(follow_symlinks=False)
            absolute = os.path.abspath(full)
            if any(p.matches(absolute, is_dir) for p in patterns):
                continue
            if is_dir:
                subdirs.append(full)
            elif entry.name.endswith(".py") and entry.is_file() and full not in seen:
                seen.add(full)
                yield full
        for sub in reversed(subdirs):
            stack.append((sub, patterns + _gitignore(sub)))
