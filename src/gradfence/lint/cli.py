"""``gradfence lint`` and ``gradfence rules``: the static checker's command line."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

EXIT_CLEAN, EXIT_FINDINGS, EXIT_ERROR = 0, 1, 2


def emit(text: str, end: str = "\n") -> None:
    """Print to stdout; a reader that went away (``| head``) silences the rest, no traceback."""
    try:
        sys.stdout.write(text + end)
        sys.stdout.flush()
    except BrokenPipeError:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())


def register(subparsers: Any) -> None:
    """Add the ``lint`` and ``rules`` subcommands."""
    lint = subparsers.add_parser(
        "lint",
        help="check Python files for grad-mode and train/eval pitfalls (GF rules)",
        description=(
            "Statically check Python files for PyTorch grad-mode and train/eval pitfalls. "
            "Exit status: 0 clean, 1 findings, 2 usage or internal error."
        ),
    )
    lint.add_argument(
        "paths", nargs="*", default=["."], metavar="PATH", help="files or directories"
    )
    lint.add_argument(
        "--select", metavar="CODES", help="comma-separated codes or prefixes to check"
    )
    lint.add_argument("--ignore", metavar="CODES", help="comma-separated codes or prefixes to skip")
    lint.add_argument(
        "--format",
        choices=("text", "json", "sarif", "github"),
        default="text",
        help="report format",
    )
    lint.add_argument("--fix", action="store_true", help="apply safe fixes in place")
    lint.add_argument(
        "--unsafe-fixes",
        action="store_true",
        help="with --fix/--diff, also apply fixes that may change behaviour",
    )
    lint.add_argument(
        "--preview",
        action="store_true",
        help="also report findings of low confidence (thin evidence)",
    )
    lint.add_argument(
        "--no-cache", action="store_true", help="do not read or write the summary cache"
    )
    lint.add_argument(
        "--cache-dir",
        metavar="DIR",
        help="summary cache directory (default: .gradfence_cache in the project root)",
    )
    lint.add_argument(
        "--diff", action="store_true", help="print the fixes as a diff, change nothing"
    )
    lint.add_argument("--target-torch", metavar="X.Y", help="oldest torch version to support")
    lint.add_argument(
        "--jobs", "-j", type=int, metavar="N", help="worker processes (default: all cores)"
    )
    lint.add_argument("--exit-zero", action="store_true", help="exit 0 even when findings remain")
    lint.add_argument("--statistics", action="store_true", help="count findings per rule instead")
    lint.set_defaults(handler=run_lint)

    rules = subparsers.add_parser(
        "rules",
        help="list the lint rules, or show one rule's documentation",
        description="Without CODE: a table of every rule. With CODE: that rule's full page.",
    )
    rules.add_argument("code", nargs="?", metavar="CODE", help="a rule code such as GF302")
    rules.set_defaults(handler=run_rules)


def run_rules(args: argparse.Namespace) -> int:
    """``gradfence rules [CODE]``."""
    from gradfence.errors import UsageError
    from gradfence.lint.docgen import render_page, render_table
    from gradfence.lint.rules import RULES

    if args.code is None:
        emit(render_table())
        return EXIT_CLEAN
    rule = RULES.get(args.code.strip().upper())
    if rule is None:
        raise UsageError(f"unknown rule {args.code!r} (see `gradfence rules`)")
    emit(render_page(rule, generated_note=False), end="")
    return EXIT_CLEAN


def _split_codes(text: str | None, option: str) -> tuple[str, ...] | None:
    from gradfence.errors import UsageError
    from gradfence.lint.rules import RULES

    if text is None:
        return None
    codes = tuple(c.strip().upper() for c in text.split(",") if c.strip())
    for code in codes:
        if not any(known.startswith(code) for known in RULES):
            raise UsageError(f"{option}: unknown rule code or prefix {code!r}")
    return codes


def run_lint(args: argparse.Namespace) -> int:
    """``gradfence lint``: lint, optionally fix, report; return the exit status."""
    from gradfence import __version__
    from gradfence.errors import UsageError
    from gradfence.lint.config import (
        ConfigError,
        declared_torch,
        find_pyproject,
        load_config,
        parse_torch_version,
    )
    from gradfence.lint.engine import Settings, lint_paths
    from gradfence.lint.files import discover
    from gradfence.lint.selection import Selection

    for path in args.paths:
        if not os.path.exists(path):
            raise UsageError(f"no such file or directory: {path}")
    if args.jobs is not None and args.jobs < 1:
        raise UsageError("--jobs must be at least 1")
    try:
        first = Path(args.paths[0]) if args.paths else Path.cwd()
        config = load_config(find_pyproject(first if first.exists() else Path.cwd()))
        target = (
            parse_torch_version(args.target_torch) if args.target_torch else config.target_torch
        )
    except ConfigError as exc:
        raise UsageError(str(exc)) from None
    select = _split_codes(args.select, "--select") or config.select or ("GF",)
    ignore = (*config.ignore, *(_split_codes(args.ignore, "--ignore") or ()))
    root = config.root
    selection = Selection(
        select=select,
        ignore=ignore,
        per_file_ignores=config.per_file_ignores,
        root=str(root) if root is not None else None,
    )
    project = _project(args, first if first.exists() else Path.cwd())
    if target is None and project is not None:
        target = declared_torch(Path(project.root))  # what the project says it supports
    settings = Settings(
        selection=selection,
        target_torch=target,
        preview=args.preview,
        project=project,
    )
    base = str(root) if root is not None else "."
    files = list(discover(args.paths, config.exclude, base=base))
    results = lint_paths(files, settings, jobs=args.jobs, keep_source=args.fix or args.diff)

    errors = [r.error for r in results if r.error is not None]
    if args.fix or args.diff:
        return _fix(results, settings, args, errors)
    diagnostics = [d for r in results for d in r.diagnostics]
    _report(diagnostics, args, __version__)
    return _status(diagnostics, errors, args)


def _project(args: argparse.Namespace, start: Path) -> Any:
    """The project the linted paths belong to, and where its summaries are cached."""
    from gradfence.lint.analysis.project import CACHE_DIR_NAME, ProjectConfig, find_root

    root = find_root(start)
    if root is None:
        return None
    cache: str | None = None
    if not args.no_cache:
        cache = args.cache_dir or str(root / CACHE_DIR_NAME)
    return ProjectConfig(str(root), cache)


def _applicable(diagnostics: list[Any], unsafe: bool) -> list[Any]:
    """The findings whose fix ``--fix`` may apply: safe ones, and unsafe ones on request."""
    return [d for d in diagnostics if d.fix is not None and (unsafe or d.fix.safe)]


def _report(diagnostics: list[Any], args: argparse.Namespace, version: str) -> None:
    from gradfence.lint.output import format_statistics, render

    if args.statistics:
        if diagnostics:
            emit(format_statistics(diagnostics))
        return
    text = render(diagnostics, args.format, version)
    if text or args.format in {"json", "sarif"}:
        emit(text)
    if args.format == "text" and diagnostics:
        fixable = sum(d.fix is not None and d.fix.safe for d in diagnostics)
        unsafe = sum(d.fix is not None and not d.fix.safe for d in diagnostics)
        noun = "finding" if len(diagnostics) == 1 else "findings"
        extra = f" ({fixable} fixable with --fix)" if fixable else ""
        emit(f"Found {len(diagnostics)} {noun}{extra}.")
        if unsafe:
            emit(f"{unsafe} more fixable with --fix --unsafe-fixes (they may change behaviour).")


def _status(diagnostics: list[Any], errors: list[str], args: argparse.Namespace) -> int:
    for error in errors:
        print(f"gradfence: error: {error}", file=sys.stderr)
    if errors:
        return EXIT_ERROR
    if diagnostics and not args.exit_zero:
        return EXIT_FINDINGS
    return EXIT_CLEAN


def _fix(results: list[Any], settings: Any, args: argparse.Namespace, errors: list[str]) -> int:
    from gradfence import __version__
    from gradfence.lint.engine import check_source, source_encoding
    from gradfence.lint.fix import apply_fixes, unified_diff

    remaining = []
    fixed_count = 0
    changed_files = 0
    for result in results:
        source = result.source
        if source is None or not any(d.fix for d in result.diagnostics):
            remaining.extend(result.diagnostics)
            continue
        new_source, applied = apply_fixes(
            source, _applicable(result.diagnostics, args.unsafe_fixes)
        )
        if not applied:
            remaining.extend(result.diagnostics)
            continue
        if args.diff:
            fixed_count += len(applied)
            changed_files += 1
            emit(unified_diff(result.path, source, new_source), end="")
            continue
        try:
            with open(result.path, "rb") as handle:
                encoding = source_encoding(handle.read())
            if encoding is None:  # read with replacement characters: writing would corrupt it
                remaining.extend(result.diagnostics)
                errors.append(f"cannot fix {result.path}: it is not valid in its encoding")
                continue
            with open(result.path, "w", encoding=encoding, newline="") as handle:
                handle.write(new_source)
        except OSError as exc:
            remaining.extend(result.diagnostics)
            errors.append(f"cannot write {result.path}: {exc.strerror or exc}")
            continue
        fixed_count += len(applied)
        changed_files += 1
        try:
            remaining.extend(check_source(new_source, result.path, settings))
        except Exception as exc:  # same contract as lint_file: one line, no traceback
            errors.append(f"internal error on {result.path}: {type(exc).__name__}: {exc}")
    if args.diff:
        for error in errors:
            print(f"gradfence: error: {error}", file=sys.stderr)
        if errors:
            return EXIT_ERROR
        noun = "fix" if fixed_count == 1 else "fixes"
        print(f"Would apply {fixed_count} {noun} in {changed_files} file(s).", file=sys.stderr)
        return EXIT_FINDINGS if fixed_count and not args.exit_zero else EXIT_CLEAN
    _report(remaining, args, __version__)
    noun = "finding" if fixed_count == 1 else "findings"
    print(f"Fixed {fixed_count} {noun} in {changed_files} file(s).", file=sys.stderr)
    return _status(remaining, errors, args)


__all__ = ["register", "run_lint", "run_rules"]
