"""The lint engine: check one source text, one file, or many files in parallel.

``check_source`` is the whole pipeline for one file: files without ``torch`` in their text
are skipped before parsing; the file is parsed once (a parse failure is one ``GF000``
finding); :func:`gradfence.lint.model.build_model` walks the tree once; the selected rules
query the recorded events; ``# noqa`` comments filter the findings.
"""

from __future__ import annotations

import ast
import contextlib
import gc
import io
import os
import re
import sys
import threading
import tokenize
import warnings
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from multiprocessing.context import BaseContext
from typing import TYPE_CHECKING

from gradfence.lint.analysis.project import ProjectConfig

if TYPE_CHECKING:
    from gradfence.lint.analysis.results import ResultCache
from gradfence.lint.diagnostics import HIGH, Diagnostic, Fix, split_lines
from gradfence.lint.model import build_model
from gradfence.lint.rules import RULES
from gradfence.lint.rules.syntax import SYNTAX_ERROR
from gradfence.lint.selection import Selection, noqa_codes

# Below this many files, starting worker processes costs more than it saves.
PARALLEL_MIN_FILES = 8


@dataclass(frozen=True)
class Settings:
    """Everything that changes what the linter reports."""

    selection: Selection = field(default_factory=Selection)
    target_torch: tuple[int, int] | None = None
    # also report findings of low confidence (``--preview``)
    preview: bool = False
    # the project the files belong to: summaries of its modules reach across files
    project: ProjectConfig | None = None


@dataclass
class FileResult:
    """Findings for one file, or the one-line reason it could not be checked."""

    path: str
    diagnostics: list[Diagnostic]
    error: str | None = None
    source: str | None = None


def check_source(
    source: str, path: str = "<string>", settings: Settings | None = None
) -> list[Diagnostic]:
    """Lint Python source text and return the findings, sorted by position.

    >>> [d.code for d in check_source("import torch\\nwith torch.no_grad:\\n    pass\\n")]
    ['GF101']
    """
    settings = settings or Settings()
    if "torch" not in source:
        return []
    try:
        tree = parse(source, path)
    except (SyntaxError, ValueError, RecursionError, MemoryError) as exc:
        if not settings.selection.enabled(SYNTAX_ERROR, path):
            return []
        return [_syntax_error(exc, path)]
    return check_tree(tree, source, path, settings)


def check_tree(
    tree: ast.Module, source: str, path: str = "<string>", settings: Settings | None = None
) -> list[Diagnostic]:
    """Lint an already parsed module (the flake8 plugin hands over its tree)."""
    settings = settings or Settings()
    selection = settings.selection
    model = build_model(path, source, tree, settings.target_torch, settings.project)
    found: list[Diagnostic] = []
    try:
        for code, rule in RULES.items():
            if code == SYNTAX_ERROR or not selection.enabled(code, path):
                continue
            for hit in rule.check(model):
                node, message, fix = hit[0], hit[1], hit[2]
                confidence = hit[3] if len(hit) == 4 else HIGH
                if confidence != HIGH and not settings.preview:
                    continue
                text = model.text
                (line, col), (end_line, end_col) = text.start(node), text.end(node)
                found.append(
                    Diagnostic(
                        code,
                        rule.name,
                        message,
                        path,
                        line,
                        col + 1,
                        end_line,
                        end_col + 1,
                        fix,
                        confidence,
                    )
                )
    finally:
        model.release()
    if not found:
        return found
    return sorted(_without_noqa(found, model.lines), key=lambda d: d.sort_key)


def parse(source: str, path: str = "<string>") -> ast.Module:
    """``ast.parse`` without the SyntaxWarnings the compiler prints for odd literals."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return ast.parse(source, filename=path)


def _syntax_error(exc: BaseException, path: str) -> Diagnostic:
    if isinstance(exc, SyntaxError):
        message = exc.msg or "invalid syntax"
        line = exc.lineno or 1
        col = exc.offset or 1
    else:
        message = str(exc) or type(exc).__name__
        if isinstance(exc, RecursionError | MemoryError):
            message = "too deeply nested to parse"
        line, col = 1, 1
    name = RULES[SYNTAX_ERROR].name
    return Diagnostic(SYNTAX_ERROR, name, message, path, line, max(col, 1), line, max(col, 1))


def _without_noqa(found: list[Diagnostic], lines: list[str]) -> Iterable[Diagnostic]:
    for diagnostic in found:
        line = lines[diagnostic.line - 1] if diagnostic.line <= len(lines) else ""
        codes = noqa_codes(line)
        if codes is None or (codes and diagnostic.code not in codes):
            yield diagnostic


def decode_source(raw: bytes) -> tuple[str, str | None]:
    """Decode as Python would (BOM, coding cookie, else UTF-8): the text and the encoding,
    or text with U+FFFD replacements and ``None`` when the bytes do not decode."""
    try:
        encoding, _ = tokenize.detect_encoding(io.BytesIO(raw).readline)
        return raw.decode(encoding), encoding
    except (SyntaxError, LookupError, UnicodeDecodeError):
        return raw.decode("utf-8", errors="replace"), None


def source_encoding(raw: bytes) -> str | None:
    """The encoding Python reads ``raw`` with; None when the bytes do not decode with it."""
    return decode_source(raw)[1]


def read_source(path: str) -> str:
    """Read a Python file as the interpreter would (UTF-8 unless a coding cookie says else).

    Undecodable bytes become U+FFFD, so that the rest of the file is still checked.
    """
    with open(path, "rb") as handle:
        return decode_source(handle.read())[0]


def lint_file(path: str, settings: Settings, keep_source: bool = False) -> FileResult:
    """Lint one file; never raises (an internal failure becomes ``FileResult.error``)."""
    cache = None if keep_source else _result_cache(settings)
    if cache is not None:
        found = cache.get(path, repr(settings))
        if found is not None:
            return FileResult(path, found)
    try:
        source = read_source(path)
    except OSError as exc:
        return FileResult(path, [], f"cannot read {path}: {exc.strerror or exc}")
    try:
        if cache is not None:
            cache.project.touched = {}
        diagnostics = check_source(source, path, settings)
    except RecursionError:
        return FileResult(path, [], f"internal error on {path}: nesting too deep to analyse")
    except Exception as exc:  # the contract: one line per file, never a traceback
        return FileResult(path, [], f"internal error on {path}: {type(exc).__name__}: {exc}")
    if cache is not None and "torch" in source:
        cache.put(path, repr(settings), diagnostics, list(cache.project.touched))
    return FileResult(path, diagnostics, None, source if keep_source else None)


def _result_cache(settings: Settings) -> ResultCache | None:
    """The project's cache of findings, when linting inside a project with a cache."""
    config = settings.project
    if config is None or config.cache_dir is None:
        return None
    from gradfence.lint.analysis.project import project_for
    from gradfence.lint.analysis.results import ResultCache

    return ResultCache(project_for(config), config.cache_dir)


# Collect young objects every 50,000 allocations instead of every 700 while linting.
GC_GEN0_THRESHOLD = 50_000


@contextlib.contextmanager
def _rare_collections() -> Iterator[None]:
    """Let the cyclic garbage collector run rarely while files are linted.

    Parsing allocates an AST of many thousands of small container objects in one go, and
    none of it is garbage until the file is done; with the default thresholds the
    collector keeps re-scanning those live trees (about 15% of the whole lint's time on
    torch's own sources). The model breaks its reference cycles itself (``release()``),
    so little is left for the collector to find anyway.
    """
    old = gc.get_threshold()
    gc.set_threshold(max(old[0], GC_GEN0_THRESHOLD), *old[1:])
    try:
        yield
    finally:
        gc.set_threshold(*old)


def _lint_chunk(paths: Sequence[str], settings: Settings, keep_source: bool) -> list[FileResult]:
    with _rare_collections():
        return [lint_file(p, settings, keep_source) for p in paths]


def default_jobs() -> int:
    """All cores this process may use."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


def lint_paths(
    paths: Sequence[str], settings: Settings, jobs: int | None = None, keep_source: bool = False
) -> list[FileResult]:
    """Lint files, in worker processes when ``jobs`` > 1 and there are enough files."""
    jobs = default_jobs() if jobs is None or jobs <= 0 else jobs
    order = {p: i for i, p in enumerate(paths)}  # results come back in the order given
    if settings.project is not None:
        paths = _imports_first(paths)  # a module's summary is ready before its importers
    if jobs == 1 or len(paths) < PARALLEL_MIN_FILES:
        alone = _lint_chunk(paths, settings, keep_source)
        alone.sort(key=lambda r: order.get(r.path, 0))
        return alone
    # big chunks keep inter-process traffic low; interleaving balances file sizes
    chunks = [list(paths[i :: jobs * 4]) for i in range(jobs * 4)]
    results: list[FileResult] = []
    try:
        with ProcessPoolExecutor(max_workers=jobs, mp_context=_context()) as pool:
            arguments = ([settings] * len(chunks), [keep_source] * len(chunks))
            for chunk in pool.map(_lint_chunk, chunks, *arguments):
                results.extend(chunk)
    except (BrokenProcessPool, OSError):
        # a worker died (killed, out of memory) or processes are unavailable: finish here
        results = _lint_chunk(paths, settings, keep_source)
    results.sort(key=lambda r: order.get(r.path, 0))
    return results


_IMPORT_LINE = re.compile(r"^\s*(?:from\s+(\.*[\w.]*)\s+import|import\s+([\w.]+))", re.M)


def _imports_first(paths: Sequence[str]) -> list[str]:
    """``paths`` reordered so that a module comes before the files importing it (by the
    last part of the imported name, read from the text: cheap, and only an ordering)."""
    by_stem: dict[str, list[str]] = {}
    for path in paths:
        stem = os.path.splitext(os.path.basename(path))[0]
        if stem == "__init__":
            stem = os.path.basename(os.path.dirname(path))
        by_stem.setdefault(stem, []).append(path)
    ordered: list[str] = []
    state: dict[str, int] = {}  # 1: in progress, 2: done

    def visit(path: str) -> None:
        stack = [(path, iter(_imported_stems(path)))]
        state[path] = 1
        while stack:
            current, pending = stack[-1]
            for stem in pending:
                for other in by_stem.get(stem, ()):
                    if state.get(other, 0) == 0:
                        state[other] = 1
                        stack.append((other, iter(_imported_stems(other))))
                        break
                else:
                    continue
                break
            else:
                stack.pop()
                state[current] = 2
                ordered.append(current)

    for path in paths:
        if state.get(path, 0) == 0:
            visit(path)
    return ordered


def _imported_stems(path: str) -> list[str]:
    try:
        with open(path, encoding="utf-8", errors="replace") as handle:
            text = handle.read()
    except OSError:
        return []
    if "torch" not in text:
        return []
    stems = []
    for relative, absolute in _IMPORT_LINE.findall(text):
        name = (relative or absolute).strip(".")
        if name:
            stems.append(name.rsplit(".", 1)[-1])
    return stems


def _context() -> BaseContext:
    """How the lint's worker processes start: ``fork`` (cheapest) on Linux in a process
    running one thread; ``forkserver`` on Linux when other threads run (a thread holding
    a lock at the fork leaves it held in the child for ever, and Python 3.12+ warns about
    it; the lint used as a library, or in a test run, shares its process with others);
    elsewhere the platform's default."""
    import multiprocessing

    if sys.platform.startswith("linux"):
        return multiprocessing.get_context("fork" if _threads() == 1 else "forkserver")
    return multiprocessing.get_context()


def _threads() -> int:
    """Threads of this process, native ones (a BLAS pool, say) included."""
    try:
        return len(os.listdir("/proc/self/task"))
    except OSError:
        return threading.active_count()


__all__ = [
    "Diagnostic",
    "FileResult",
    "Fix",
    "Settings",
    "check_source",
    "check_tree",
    "default_jobs",
    "lint_file",
    "lint_paths",
    "split_lines",
]
