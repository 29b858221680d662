"""Findings cached per file, as ruff caches its results: re-linting an unchanged project
reads JSON instead of parsing.

A file's findings depend on its text, on the settings, and on the summaries of the
project modules its analysis read (cross-file effects). An entry is keyed by the first two
and records the content hashes of those modules; it is used only while each of them is
unchanged, so that editing ``utils.py`` re-lints the files that import it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from gradfence.lint.analysis.project import Project, SummaryCache
from gradfence.lint.diagnostics import Diagnostic, Edit, Fix


def _fix_data(fix: Fix | None) -> list[Any] | None:
    if fix is None:
        return None
    return [
        fix.message,
        fix.safe,
        [[e.line, e.col, e.end_line, e.end_col, e.content] for e in fix.edits],
    ]


def _fix_from(data: list[Any] | None) -> Fix | None:
    if data is None:
        return None
    message, safe, edits = data
    return Fix(message, tuple(Edit(*edit) for edit in edits), bool(safe))


def _diagnostic_data(d: Diagnostic) -> list[Any]:
    return [
        d.code,
        d.name,
        d.message,
        d.line,
        d.col,
        d.end_line,
        d.end_col,
        _fix_data(d.fix),
        d.confidence,
    ]


def _diagnostic_from(path: str, data: list[Any]) -> Diagnostic:
    code, name, message, line, col, end_line, end_col, fix, confidence = data
    return Diagnostic(
        code, name, message, path, line, col, end_line, end_col, _fix_from(fix), confidence
    )


def _stamp(path: str | Path) -> list[int] | None:
    """(modification time in ns, size) of a file; None when it does not exist."""
    try:
        info = os.stat(path)
    except OSError:
        return None
    return [info.st_mtime_ns, info.st_size]


class ResultCache:
    """Findings per (file, settings), valid while the file and the project modules its
    analysis read keep their modification time and size (checked with ``stat`` only, as
    ruff does: an unchanged project is re-linted without reading its sources)."""

    def __init__(self, project: Project, directory: str) -> None:
        self.project = project
        self.directory = Path(directory) / "results"

    def _path(self, path: str, settings: str) -> Path:
        key = SummaryCache.key(f"{settings}\0{os.path.abspath(path)}", None)
        return self.directory / key[:2] / f"{key}.json"

    def get(self, path: str, settings: str) -> list[Diagnostic] | None:
        """The cached findings of ``path``, or None when it (or a dependency) changed."""
        try:
            with open(self._path(path, settings), encoding="utf-8") as handle:
                data = json.load(handle)
            if data["stamp"] != _stamp(path):
                return None
            for module, stamp in data["deps"].items():
                where = self.project.locate(module)
                if (_stamp(where) if where is not None else None) != stamp:
                    return None  # a module it depends on changed: lint it again
            return [_diagnostic_from(path, d) for d in data["diagnostics"]]
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def put(self, path: str, settings: str, diagnostics: list[Diagnostic], deps: list[str]) -> None:
        """Remember the findings of ``path`` and the modules they depend on."""
        target = self._path(path, settings)
        stamps = {}
        for module in deps:
            where = self.project.locate(module)
            stamps[module] = _stamp(where) if where is not None else None
        data = {
            "stamp": _stamp(path),
            "deps": stamps,
            "diagnostics": [_diagnostic_data(d) for d in diagnostics],
        }
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            temporary = target.with_suffix(f".{os.getpid()}.tmp")
            with open(temporary, "w", encoding="utf-8") as handle:
                json.dump(data, handle, separators=(",", ":"))
            os.replace(temporary, target)
        except OSError:
            pass
