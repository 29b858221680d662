"""Report formats: text, json, sarif (2.1.0, for GitHub code scanning) and github annotations."""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from urllib.parse import quote

from gradfence.lint.diagnostics import Diagnostic, Fix
from gradfence.lint.rules import RULES

FORMATS = ("text", "json", "sarif", "github")
SYNTAX_ERROR = "GF000"
SARIF_SCHEMA = "https://json.schemastore.org/sarif-2.1.0.json"
INFORMATION_URI = "https://github.com/gradfence/gradfence/blob/main/docs/lint.md"


def level(code: str) -> str:
    """How severe a finding of ``code`` is, the same in SARIF and in GitHub annotations:
    ``error`` for a file that does not parse, ``warning`` for every rule."""
    return "error" if code == SYNTAX_ERROR else "warning"


def format_text(diagnostics: Sequence[Diagnostic]) -> str:
    """``path:line:col: CODE [*] message`` lines (``[*]`` = fixable with ``--fix``)."""
    lines = []
    for d in diagnostics:
        mark = " [*]" if d.fix is not None and d.fix.safe else ""
        lines.append(f"{d.path}:{d.line}:{d.col}: {d.code}{mark} {d.message}")
    return "\n".join(lines)


def _fix_json(fix: Fix) -> dict[str, Any]:
    return {
        "message": fix.message,
        "applicability": "safe" if fix.safe else "unsafe",
        "edits": [
            {
                "line": e.line,
                "col": e.col + 1,
                "end_line": e.end_line,
                "end_col": e.end_col + 1,
                "content": e.content,
            }
            for e in fix.edits
        ],
    }


def to_json(diagnostics: Sequence[Diagnostic]) -> list[dict[str, Any]]:
    """The JSON report: one object per finding (``fix`` only on fixable ones)."""
    out = []
    for d in diagnostics:
        item: dict[str, Any] = {
            "code": d.code,
            "name": d.name,
            "message": d.message,
            "path": d.path,
            "line": d.line,
            "col": d.col,
            "end_line": d.end_line,
            "end_col": d.end_col,
            "confidence": d.confidence,
        }
        if d.fix is not None:
            item["fix"] = _fix_json(d.fix)
        out.append(item)
    return out


def format_json(diagnostics: Sequence[Diagnostic]) -> str:
    """The JSON report as text."""
    return json.dumps(to_json(diagnostics), indent=2)


def _artifact_location(path: str) -> dict[str, str]:
    """A relative, percent-encoded URI under ``%SRCROOT%`` (the working directory), or an
    absolute ``file:`` URI (which must not name a base) for a file outside it."""
    try:
        relative = os.path.relpath(path)
    except ValueError:  # another drive on Windows
        return {"uri": Path(path).resolve().as_uri()}
    if relative.startswith(".."):
        return {"uri": Path(path).resolve().as_uri()}
    return {"uri": quote(Path(relative).as_posix()), "uriBaseId": "%SRCROOT%"}


def to_sarif(diagnostics: Sequence[Diagnostic], version: str) -> dict[str, Any]:
    """A SARIF 2.1.0 log with every rule described and one result per finding."""
    codes = sorted(RULES)
    index = {code: i for i, code in enumerate(codes)}
    rules = []
    for code in codes:
        rule = RULES[code]
        rules.append(
            {
                "id": code,
                "name": rule.name,
                "shortDescription": {"text": rule.summary},
                "fullDescription": {"text": rule.summary},
                "help": {"text": rule.doc, "markdown": rule.doc},
                "helpUri": f"https://github.com/gradfence/gradfence/blob/main/docs/rules/{code}.md",
                "defaultConfiguration": {"level": level(code)},
                "properties": {"fixable": rule.fixable},
            }
        )
    results = []
    for d in diagnostics:
        results.append(
            {
                "ruleId": d.code,
                "ruleIndex": index.get(d.code, 0),
                "level": level(d.code),
                "message": {"text": d.message},
                "properties": {"confidence": d.confidence},
                "locations": [
                    {
                        "physicalLocation": {
                            "artifactLocation": _artifact_location(d.path),
                            "region": {
                                "startLine": d.line,
                                "startColumn": d.col,
                                "endLine": d.end_line,
                                "endColumn": d.end_col,
                            },
                        }
                    }
                ],
            }
        )
    return {
        "$schema": SARIF_SCHEMA,
        "version": "2.1.0",
        "runs": [
            {
                "tool": {
                    "driver": {
                        "name": "gradfence",
                        "version": version,
                        "informationUri": INFORMATION_URI,
                        "rules": rules,
                    }
                },
                # columns count characters (code points), as in the text report,
                # not SARIF's default UTF-16 code units
                "columnKind": "unicodeCodePoints",
                "results": results,
            }
        ],
    }


def format_sarif(diagnostics: Sequence[Diagnostic], version: str) -> str:
    """The SARIF log as text."""
    return json.dumps(to_sarif(diagnostics, version), indent=2)


def escape_data(text: str) -> str:
    """The message of a GitHub workflow command: ``%``, CR and LF percent-encoded."""
    return text.replace("%", "%25").replace("\r", "%0D").replace("\n", "%0A")


def escape_property(text: str) -> str:
    """A property value of a GitHub workflow command: also ``:`` and ``,`` encoded."""
    return escape_data(text).replace(":", "%3A").replace(",", "%2C")


def format_github(diagnostics: Sequence[Diagnostic]) -> str:
    """GitHub Actions workflow commands: one annotation per finding, at :func:`level`."""
    lines = []
    for d in diagnostics:
        props = (
            f"file={escape_property(d.path)},line={d.line},col={d.col},"
            f"endLine={d.end_line},endColumn={d.end_col},"
            f"title={escape_property(f'{d.code} {d.name}')}"
        )
        lines.append(f"::{level(d.code)} {props}::{escape_data(f'{d.code} {d.message}')}")
    return "\n".join(lines)


def format_statistics(diagnostics: Sequence[Diagnostic]) -> str:
    """Count per code, most frequent first: ``  3  GF301  [*] mode-method-not-called``."""
    counts = Counter(d.code for d in diagnostics)
    fixable = {d.code for d in diagnostics if d.fix is not None}
    width = max((len(str(n)) for n in counts.values()), default=1)
    lines = []
    for code, count in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])):
        mark = "[*]" if code in fixable else "   "
        lines.append(f"{count:>{width}}  {code}  {mark} {RULES[code].name}")
    return "\n".join(lines)


def render(diagnostics: Sequence[Diagnostic], fmt: str, version: str) -> str:
    """Render findings in one of :data:`FORMATS`."""
    if fmt == "json":
        return format_json(diagnostics)
    if fmt == "sarif":
        return format_sarif(diagnostics, version)
    if fmt == "github":
        return format_github(diagnostics)
    return format_text(diagnostics)
