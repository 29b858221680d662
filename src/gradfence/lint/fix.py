"""Apply fixes: text edits from node positions, bottom-up, never overlapping, re-parsed."""

from __future__ import annotations

import difflib
import re
from collections.abc import Sequence

from gradfence.lint.diagnostics import Diagnostic, Edit, Fix

_LINE_END = re.compile(r"\r\n|\r|\n")


def _line_starts(source: str) -> list[int]:
    return [0, *(m.end() for m in _LINE_END.finditer(source))]


def _offset(starts: list[int], line: int, col: int) -> int:
    return starts[min(max(line, 1), len(starts)) - 1] + col


def _parses(source: str) -> bool:
    from gradfence.lint.engine import parse

    try:
        parse(source)
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return False
    return True


def apply_fixes(source: str, diagnostics: Sequence[Diagnostic]) -> tuple[str, list[Diagnostic]]:
    """Return the fixed source and the diagnostics whose fix was applied.

    Fixes are applied from the bottom of the file up so that earlier positions stay valid;
    a fix overlapping one already applied is skipped, and a fix after which the file no
    longer parses is dropped.
    """
    starts = _line_starts(source)
    spans: list[tuple[int, int, Diagnostic, Fix]] = []
    for diagnostic in diagnostics:
        fix = diagnostic.fix
        if fix is None or not fix.edits:
            continue
        offsets = [
            (_offset(starts, e.line, e.col), _offset(starts, e.end_line, e.end_col))
            for e in fix.edits
        ]
        spans.append((min(o[0] for o in offsets), max(o[1] for o in offsets), diagnostic, fix))
    spans.sort(key=lambda s: (s[0], s[1]), reverse=True)
    applied: list[Diagnostic] = []
    floor = len(source) + 1
    for start, end, diagnostic, fix in spans:
        if end > floor or (applied and start == floor):
            continue
        candidate = _apply_edits(source, starts, fix.edits)
        if not _parses(candidate):
            continue
        source = candidate
        starts = _line_starts(source)
        applied.append(diagnostic)
        floor = start
    return source, applied


def _apply_edits(source: str, starts: list[int], edits: Sequence[Edit]) -> str:
    ordered = sorted(
        edits,
        key=lambda e: (_offset(starts, e.line, e.col), _offset(starts, e.end_line, e.end_col)),
        reverse=True,
    )
    for edit in ordered:
        begin = _offset(starts, edit.line, edit.col)
        stop = _offset(starts, edit.end_line, edit.end_col)
        source = source[:begin] + edit.content + source[stop:]
    return source


def unified_diff(path: str, before: str, after: str) -> str:
    """A ``git diff``-style patch from ``before`` to ``after``."""
    return "".join(
        difflib.unified_diff(
            before.splitlines(keepends=True),
            after.splitlines(keepends=True),
            fromfile=f"a/{path}",
            tofile=f"b/{path}",
        )
    )
