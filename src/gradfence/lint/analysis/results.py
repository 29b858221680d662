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


class ResultCache:
    """Findings by (content, settings), valid while the modules they depend on are unchanged."""

    def __init__(self, project: Project, directory: str) -> None:
        self.project = project
        self.directory = Path(directory) / "results"

    def _path(self, key: str) -> Path:
        return self.directory / key[:2] / f"{key}.json"

    def key(self, source: str, path: str, settings: str) -> str:
        return SummaryCache.key(f"{settings}\0{path}\0{source}", None)

    def get(self, key: str, path: str) -> list[Diagnostic] | None:
        try:
            with open(self._path(key), encoding="utf-8") as handle:
                data = json.load(handle)
            for module, expected in data["deps"].items():
                if self.project.module_key(module) != expected:
                    return None  # a module it depends on changed: lint it again
            return [_diagnostic_from(path, d) for d in data["diagnostics"]]
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def put(self, key: str, diagnostics: list[Diagnostic], deps: dict[str, str | None]) -> None:
        path = self._path(key)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            temporary = path.with_suffix(f".{os.getpid()}.tmp")
            with open(temporary, "w", encoding="utf-8") as handle:
                json.dump(
                    {"deps": deps, "diagnostics": [_diagnostic_data(d) for d in diagnostics]},
                    handle,
                    separators=(",", ":"),
                )
            os.replace(temporary, path)
        except OSError:
            pass
