"""Which rules run on a file: ``select`` / ``ignore`` prefixes and ``# noqa`` comments."""

from __future__ import annotations

import fnmatch
import functools
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

_NOQA = re.compile(r"#\s*noqa(?::[\s]*(?P<codes>[A-Z]+[0-9]+(?:[\s,]+[A-Z]+[0-9]+)*))?", re.I)


def _matches(code: str, prefixes: Iterable[str]) -> int:
    """Length of the longest prefix matching ``code`` (0 when none does)."""
    return max((len(p) for p in prefixes if code.startswith(p)), default=0)


@dataclass(frozen=True)
class Selection:
    """Codes selected and ignored (by prefix: ``GF3`` selects GF301-GF308)."""

    select: tuple[str, ...] = ("GF",)
    ignore: tuple[str, ...] = ()
    per_file_ignores: tuple[tuple[str, tuple[str, ...]], ...] = field(default=())
    root: str | None = None  # per-file-ignores patterns are relative to this directory

    def enabled(self, code: str, path: str = "") -> bool:
        """Whether ``code`` is reported for ``path``: the most specific prefix wins."""
        selected = _matches(code, self.select)
        ignored = _matches(code, self.ignore)
        for pattern, codes in self.per_file_ignores:
            if _path_matches(_relative(path, self.root), pattern):
                ignored = max(ignored, _matches(code, codes))
        return selected > 0 and selected > ignored

    def enabled_codes(self, codes: Sequence[str], path: str = "") -> list[str]:
        """The subset of ``codes`` enabled for ``path``."""
        return [c for c in codes if self.enabled(c, path)]


@functools.lru_cache(maxsize=4096)
def _relative(path: str, root: str | None) -> str:
    if root is None:
        return path.replace(os.sep, "/")
    relative = os.path.relpath(os.path.abspath(path), root)
    if relative.startswith(".."):
        return path.replace(os.sep, "/")
    return relative.replace(os.sep, "/")


def _path_matches(path: str, pattern: str) -> bool:
    path = path.replace("\\", "/")
    if fnmatch.fnmatch(path, pattern):
        return True
    # patterns without a directory part match the file name anywhere, like flake8's
    return "/" not in pattern and fnmatch.fnmatch(path.rsplit("/", 1)[-1], pattern)


def noqa_codes(line: str) -> frozenset[str] | None:
    """Codes suppressed by a ``# noqa`` comment on ``line``: empty set = all, None = no comment."""
    if "noqa" not in line and "NOQA" not in line.upper():
        return None
    match = _NOQA.search(line)
    if match is None:
        return None
    codes = match.group("codes")
    if not codes:
        return frozenset()
    return frozenset(c.upper() for c in re.split(r"[\s,]+", codes) if c)
