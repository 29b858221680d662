"""How right is ``gradfence lint`` on real code it was not written against?

Two measurements on a development set of public repositories (``benchmarks/lint_dev/``):

* **Recall on real bug-fix commits** (``cases.tsv``): each case is one commit that fixes a
  grad-mode or train/eval bug. The buggy file is linted *inside its repository tree at the
  buggy revision* (so the linter sees the project's other modules and its pyproject/setup.py);
  the case is found when that file has a finding with one of the case's codes. A found case
  whose fix revision has fewer such findings counts as cleared by the fix.
* **Precision on a corpus** (``corpus.txt``): whole repositories at pinned revisions. Every
  finding is matched against the hand labels in ``labels.tsv`` (true/false, with a reason);
  precision is over labelled findings, and unlabelled findings are listed and counted, never
  dropped. Also: findings per 1,000 lines, crashes (internal errors), and the lint's CPU time
  against a bare single-process ``ast.parse`` of the same files.

Repositories come as bare git mirrors (``/work/.mirror/OWNER+NAME/...``, from the fetch tool:
``github:OWNER/NAME``); trees are extracted with ``git ls-tree`` + ``git cat-file --batch``,
so blobs missing from a partial mirror are skipped with a counted warning. The linter runs
as a subprocess (``python -m gradfence lint --format json --jobs 1``, with ``--no-cache`` where the
linter has a summary cache, so every run is cold), so ``--linter-src PATH`` (or ``PYTHONPATH``) can
point at another checkout's ``src/``. Crashes are the linter's "internal error" lines and any run
that dies or prints no JSON.

    python benchmarks/lint_quality.py                      # cases + corpus, this checkout
    python benchmarks/lint_quality.py --preview --json     # include preview findings, JSON out
    python benchmarks/lint_quality.py --linter-src ../wt-lint-core/src --cases-only
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
DEV = HERE / "lint_dev"
DEFAULT_MIRRORS = Path(os.environ.get("GF_LINT_MIRRORS", "/work/.mirror"))
DEFAULT_TREES = Path(tempfile.gettempdir()) / "gradfence-lint-quality"
# codes planned by issue 11: cases that need them count as misses until a rule emits them
PLANNED = frozenset({"GF108", "GF206", "GF207", "GF309", "GF310", "GF404"})
SYNTAX_ERROR = "GF000"
# what a tree needs besides Python files for the linter's project context
CONTEXT_FILES = ("pyproject.toml", "setup.py", "setup.cfg", ".gitignore")
SKIP_DIRS = frozenset(
    {
        ".git",
        ".gradfence_cache",
        "__pycache__",
        "build",
        "dist",
        "node_modules",
        "site-packages",
        ".venv",
        "venv",
    }
)


class HarnessError(Exception):
    """Bad input to the harness: reported as one line, exit status 2."""


# ---------------------------------------------------------------------------------------
# the development set


@dataclass(frozen=True)
class Case:
    id: str
    repo: str
    bug_rev: str
    fix_rev: str  # "-" when the bug is still at the pinned revision
    path: str
    codes: tuple[str, ...]
    note: str = ""


@dataclass(frozen=True)
class CorpusRepo:
    repo: str
    rev: str


@dataclass(frozen=True)
class Label:
    verdict: bool
    reason: str


def _rows(path: Path) -> Iterator[list[str]]:
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip() or line.startswith("#"):
                continue
            yield [f"{path.name}:{number}", *line.rstrip("\n").split("\t")]


def read_cases(path: Path) -> list[Case]:
    cases = []
    for where, *cols in _rows(path):
        if len(cols) < 6:
            raise HarnessError(f"{where}: expected 6 tab-separated columns, got {len(cols)}")
        codes = tuple(c.strip() for c in cols[5].split(",") if c.strip())
        note = cols[6] if len(cols) > 6 else ""
        cases.append(Case(cols[0], cols[1], cols[2], cols[3], cols[4], codes, note))
    return cases


def read_corpus(path: Path) -> list[CorpusRepo]:
    repos = []
    for where, *cols in _rows(path):
        parts = cols[0].split()
        if len(parts) != 2:
            raise HarnessError(f"{where}: expected 'OWNER+NAME REVISION'")
        repos.append(CorpusRepo(parts[0], parts[1]))
    return repos


LabelKey = tuple[str, str, int, str]


def read_labels(path: Path) -> dict[LabelKey, Label]:
    labels: dict[LabelKey, Label] = {}
    if not path.exists():
        return labels
    for where, *cols in _rows(path):
        if len(cols) < 6 or cols[4] not in ("true", "false"):
            raise HarnessError(f"{where}: expected repo, path, line, code, true|false, reason")
        labels[(cols[0], cols[1], int(cols[2]), cols[3])] = Label(cols[4] == "true", cols[5])
    return labels


# ---------------------------------------------------------------------------------------
# repositories


def find_mirror(mirrors: Path, repo: str) -> Path | None:
    """The bare git directory the fetch tool left for ``OWNER+NAME`` (or a plain clone)."""
    for candidate in (mirrors / repo / "repo" / ".git", mirrors / repo / "repo", mirrors / repo):
        if (candidate / "HEAD").is_file() and (candidate / "objects").is_dir():
            return candidate
    return None


def git(git_dir: Path, *args: str, stdin: bytes | None = None) -> bytes:
    done = subprocess.run(
        ["git", f"--git-dir={git_dir}", *args], input=stdin, capture_output=True, check=False
    )
    if done.returncode != 0:
        message = done.stderr.decode(errors="replace").strip().splitlines()
        raise HarnessError(f"git {' '.join(args[:2])}: {message[-1] if message else 'failed'}")
    return done.stdout


def resolve(git_dir: Path, rev: str) -> str:
    return git(git_dir, "rev-parse", "--verify", "--quiet", f"{rev}^{{commit}}").decode().strip()


def wanted(path: str) -> bool:
    name = path.rsplit("/", 1)[-1]
    if name.endswith(".py") or name in CONTEXT_FILES:
        return True
    return name.startswith("requirements") and name.endswith(".txt")


@dataclass
class Tree:
    root: Path
    sha: str
    missing: int  # blobs the mirror lacks: skipped, counted


def extract(git_dir: Path, rev: str, trees: Path) -> Tree:
    """Python files and project files of ``rev``, extracted once into ``trees``."""
    sha = resolve(git_dir, rev)
    root = trees / f"{git_dir_name(git_dir)}@{sha[:12]}"
    marker = root / ".gf-extracted"
    if marker.is_file():
        return Tree(root, sha, int(marker.read_text() or 0))
    shutil.rmtree(root, ignore_errors=True)
    listing = git(git_dir, "ls-tree", "-r", "-z", "--full-tree", sha).split(b"\0")
    blobs: list[tuple[str, str]] = []
    for entry in listing:
        if not entry:
            continue
        meta, _, name = entry.partition(b"\t")
        mode, kind, blob = meta.decode().split()
        path = name.decode(errors="surrogateescape")
        if kind == "blob" and mode != "120000" and wanted(path):
            blobs.append((blob, path))
    missing = 0
    if blobs:
        out = git(
            git_dir, "cat-file", "--batch", stdin="".join(f"{b}\n" for b, _ in blobs).encode()
        )
        offset = 0
        for _, path in blobs:
            end = out.index(b"\n", offset)
            header = out[offset:end].split()
            offset = end + 1
            if len(header) < 3 or header[1] != b"blob":  # "<sha> missing"
                missing += 1
                continue
            size = int(header[2])
            target = root / path
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(out[offset : offset + size])
            offset += size + 1
    root.mkdir(parents=True, exist_ok=True)
    (root / ".git").mkdir(exist_ok=True)  # it was a repository: the linter's project root
    marker.write_text(str(missing))
    return Tree(root, sha, missing)


def git_dir_name(git_dir: Path) -> str:
    for part in reversed(git_dir.parts):
        if "+" in part:
            return part
    return git_dir.name


def python_files(root: Path) -> list[str]:
    """Every ``.py`` file under ``root``, relative, sorted (the same list is linted and parsed)."""
    found = []
    for directory, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d not in SKIP_DIRS and not d.endswith(".egg-info"))
        for name in files:
            if name.endswith(".py"):
                found.append(os.path.relpath(os.path.join(directory, name), root))
    return sorted(found)


# ---------------------------------------------------------------------------------------
# the linter, as a subprocess


@dataclass
class Finding:
    path: str
    line: int
    code: str
    message: str


@dataclass
class LintRun:
    findings: list[Finding]
    crashes: list[str]
    cpu: float  # CPU seconds of the lint process


class Linter:
    """``python -m gradfence lint`` from ``src`` (or whatever ``gradfence`` this Python has)."""

    def __init__(self, src: str | None, preview: bool) -> None:
        self.env = dict(os.environ)
        if src:
            if not (Path(src) / "gradfence" / "lint").is_dir():
                raise HarnessError(f"--linter-src {src}: no gradfence/lint package there")
            self.env["PYTHONPATH"] = os.pathsep.join(
                [str(Path(src).resolve()), *filter(None, [os.environ.get("PYTHONPATH")])]
            )
        self.env.pop("GRADFENCE_LINT_CACHE", None)
        self.src = src
        self.preview = preview
        usage = self._help()
        if preview and "--preview" not in usage:
            raise HarnessError("--preview: this linter has no --preview option")
        # every run cold: no summary cache read from (or left in) the extracted trees, so a
        # cache written by another linter version can never leak into the figures
        self.options = ["--no-cache"] if "--no-cache" in usage else []
        if preview:
            self.options.append("--preview")
        self.startup = 0.0
        self.startup = min(self.run(Path(tempfile.gettempdir()), []).cpu for _ in range(2))

    def _help(self) -> str:
        done = subprocess.run(
            [sys.executable, "-m", "gradfence", "lint", "--help"],
            env=self.env,
            capture_output=True,
            text=True,
            check=False,
        )
        if done.returncode != 0:
            last = (done.stderr.strip().splitlines() or ["failed"])[-1]
            raise HarnessError(f"the linter does not start ({self.src or 'installed'}): {last}")
        return done.stdout

    def version(self) -> str:
        where = Path(self.src) if self.src else HERE.parent / "src"
        with contextlib.suppress(subprocess.CalledProcessError, OSError):
            subprocess.run(
                ["git", "-C", str(where), "rev-parse", "--show-toplevel"],
                capture_output=True,
                check=True,
            )
            head = subprocess.run(
                ["git", "-C", str(where), "describe", "--always", "--dirty"],
                capture_output=True,
                text=True,
                check=True,
            )
            return head.stdout.strip()
        return f"not a git checkout: {where}"

    def run(self, cwd: Path, paths: Sequence[str]) -> LintRun:
        if not paths:
            paths = [str(Path(tempfile.gettempdir()) / "gf-empty-for-startup.py")]
            Path(paths[0]).write_text("")
        argv = [sys.executable, "-m", "gradfence", "lint", "--format", "json", "--exit-zero"]
        argv += ["--jobs", "1", *self.options, "--", *paths]
        before = os.times()
        done = subprocess.run(argv, cwd=cwd, env=self.env, capture_output=True, text=True)
        after = os.times()
        cpu = (after.children_user - before.children_user) + (
            after.children_system - before.children_system
        )
        # the CLI reports a file it failed on as "gradfence: error: internal error on PATH: ..."
        crashes = [line for line in done.stderr.splitlines() if "internal error" in line]
        try:
            raw = json.loads(done.stdout or "[]")
        except json.JSONDecodeError:
            raw = []
            tail = (done.stderr.strip().splitlines() or [f"exit {done.returncode}"])[-1]
            crashes.append(f"linter failed in {cwd}: {tail}")
        if done.returncode not in (0, 1, 2) or "Traceback" in done.stderr:
            crashes.append(f"linter died in {cwd} (exit {done.returncode})")
        findings = [
            Finding(_relative(d["path"], cwd), int(d["line"]), d["code"], d["message"]) for d in raw
        ]
        return LintRun(findings, crashes, max(0.0, cpu - self.startup))


def _relative(path: str, root: Path) -> str:
    full = Path(path) if os.path.isabs(path) else root / path
    return os.path.relpath(full, root)


# ---------------------------------------------------------------------------------------
# the two measurements


@dataclass
class CaseResult:
    id: str
    repo: str
    path: str
    codes: list[str]
    planned_only: bool
    found: bool
    fired: list[str]  # codes on the buggy file (all of them, for the reader)
    cleared: bool | None  # None: no fix revision, or the case was not found
    error: str | None = None
    crashes: list[str] = field(default_factory=list)


def run_case(case: Case, linter: Linter, mirrors: Path, trees: Path) -> CaseResult:
    planned_only = all(code in PLANNED for code in case.codes)
    result = CaseResult(
        case.id, case.repo, case.path, list(case.codes), planned_only, False, [], None
    )
    git_dir = find_mirror(mirrors, case.repo)
    assert git_dir is not None  # checked up front
    try:
        bug = extract(git_dir, case.bug_rev, trees)
    except HarnessError as exc:
        result.error = str(exc)
        return result
    if not (bug.root / case.path).is_file():
        result.error = f"{case.path} is not in {case.bug_rev} (or its blob is missing)"
        return result
    run = linter.run(bug.root, [case.path])
    result.crashes = run.crashes
    result.fired = sorted({f"{f.code}:{f.line}" for f in run.findings})
    hits = [f for f in run.findings if f.code in case.codes]
    result.found = bool(hits)
    if result.found and case.fix_rev != "-":
        try:
            fix = extract(git_dir, case.fix_rev, trees)
        except HarnessError as exc:
            result.error = str(exc)
            return result
        if not (fix.root / case.path).is_file():
            result.error = f"{case.path} is not in the fix revision: cannot check that it clears"
            return result
        fixed = linter.run(fix.root, [case.path])
        result.crashes += fixed.crashes
        after = [f for f in fixed.findings if f.code in case.codes]
        result.cleared = len(after) < len(hits)
    return result


@dataclass
class CorpusResult:
    repo: str
    rev: str
    files: int
    lines: int
    missing_blobs: int
    findings: list[dict[str, Any]]  # finding + label
    syntax_errors: int
    crashes: list[str]
    lint_cpu: float
    parse_cpu: float


def bare_parse_cpu(root: Path, files: Sequence[str]) -> tuple[float, int]:
    """CPU seconds to read + ``ast.parse`` every file in this process, and the line count."""
    lines = 0
    start = time.process_time()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name in files:
            raw = (root / name).read_bytes()
            lines += raw.count(b"\n")
            with contextlib.suppress(SyntaxError, ValueError, RecursionError, MemoryError):
                ast.parse(raw, filename=name)
    return time.process_time() - start, lines


def run_corpus(
    repo: CorpusRepo, linter: Linter, mirrors: Path, trees: Path, labels: dict[LabelKey, Label]
) -> CorpusResult:
    git_dir = find_mirror(mirrors, repo.repo)
    assert git_dir is not None
    tree = extract(git_dir, repo.rev, trees)
    files = python_files(tree.root)
    parse_cpu, lines = bare_parse_cpu(tree.root, files)
    run = linter.run(tree.root, files)
    findings = []
    syntax = 0
    for f in sorted(run.findings, key=lambda f: (f.path, f.line, f.code)):
        if f.code == SYNTAX_ERROR:
            syntax += 1
            continue
        label = labels.get((repo.repo, f.path, f.line, f.code))
        findings.append(
            {
                **asdict(f),
                "label": None if label is None else label.verdict,
                "reason": None if label is None else label.reason,
            }
        )
    return CorpusResult(
        repo.repo, repo.rev, len(files), lines, tree.missing, findings, syntax, run.crashes,
        run.cpu, parse_cpu,
    )  # fmt: skip


# ---------------------------------------------------------------------------------------
# report


def ratio(part: int, whole: int) -> str:
    return f"{part}/{whole} ({100 * part / whole:.0f} %)" if whole else f"{part}/0 (-)"


def summarise(cases: list[CaseResult], corpus: list[CorpusResult]) -> dict[str, Any]:
    current = [c for c in cases if not c.planned_only]
    found = [c for c in cases if c.found]
    with_fix = [c for c in found if c.cleared is not None]
    labelled = [f for r in corpus for f in r.findings if f["label"] is not None]
    true = sum(1 for f in labelled if f["label"])
    lines = sum(r.lines for r in corpus)
    total = sum(len(r.findings) for r in corpus)
    lint_cpu, parse_cpu = sum(r.lint_cpu for r in corpus), sum(r.parse_cpu for r in corpus)
    by_code: dict[str, list[int]] = {}
    for c in cases:
        for code in c.codes:
            tally = by_code.setdefault(code, [0, 0])
            tally[0] += c.found
            tally[1] += 1
    return {
        "cases": len(cases),
        "recall_by_code": dict(sorted(by_code.items())),
        "found": len(found),
        "recall": len(found) / len(cases) if cases else None,
        "cases_current_codes": len(current),
        "found_current_codes": sum(1 for c in current if c.found),
        "recall_current_codes": (sum(c.found for c in current) / len(current)) if current else None,
        "fix_cleared": sum(1 for c in with_fix if c.cleared),
        "fix_checked": len(with_fix),
        "case_errors": sum(1 for c in cases if c.error),
        "corpus_repos": len(corpus),
        "corpus_files": sum(r.files for r in corpus),
        "corpus_lines": lines,
        "findings": total,
        "findings_per_kloc": 1000 * total / lines if lines else None,
        "labelled": len(labelled),
        "labelled_true": true,
        "precision": true / len(labelled) if labelled else None,
        "unlabelled": total - len(labelled),
        "syntax_errors": sum(r.syntax_errors for r in corpus),
        "missing_blobs": sum(r.missing_blobs for r in corpus),
        "crashes": sum(len(c.crashes) for c in cases) + sum(len(r.crashes) for r in corpus),
        "lint_cpu_s": lint_cpu,
        "parse_cpu_s": parse_cpu,
        "lint_vs_parse": lint_cpu / parse_cpu if parse_cpu else None,
    }


def print_report(
    linter: Linter, cases: list[CaseResult], corpus: list[CorpusResult], s: dict[str, Any]
) -> None:
    print(f"linter: {linter.src or 'installed gradfence'} ({linter.version()})"
          f"{', --preview' if linter.preview else ''}")  # fmt: skip
    if cases:
        print(f"\nfix commits ({len(cases)}):")
        for c in cases:
            mark = "found" if c.found else ("ERROR" if c.error else "miss ")
            after = {True: "fix clears it", False: "FIX DOES NOT CLEAR IT", None: ""}[c.cleared]
            extra = c.error or after or f"fired: {', '.join(c.fired) or 'nothing'}"
            planned = " (planned code)" if c.planned_only else ""
            print(f"  {mark}  {c.id:<22} {','.join(c.codes):<12}{planned} {extra}")
    if corpus:
        print(f"\ncorpus ({len(corpus)} repositories):")
        for r in corpus:
            counts = Counter(f["label"] for f in r.findings)
            print(
                f"  {r.repo:<42} {r.files:5d} files {r.lines:8,d} lines  {len(r.findings):3d}"
                f" findings (true {counts[True]}, false {counts[False]}, unlabelled {counts[None]})"
                f"  lint/parse {r.lint_cpu / r.parse_cpu if r.parse_cpu else 0:.2f}"
            )
        unlabelled = [(r.repo, f) for r in corpus for f in r.findings if f["label"] is None]
        if unlabelled:
            print(f"\nunlabelled findings ({len(unlabelled)}; add them to labels.tsv):")
            for repo, f in unlabelled:
                print(f"  {repo}\t{f['path']}\t{f['line']}\t{f['code']}\t{f['message']}")
        wrong = [(r.repo, f) for r in corpus for f in r.findings if f["label"] is False]
        if wrong:
            print(f"\nfalse positives ({len(wrong)}):")
            for repo, f in wrong:
                print(f"  {repo} {f['path']}:{f['line']} {f['code']}: {f['reason']}")
    crashes = [x for c in cases for x in c.crashes] + [x for r in corpus for x in r.crashes]
    if crashes:
        print(f"\ncrashes ({len(crashes)}):")
        for line in crashes:
            print(f"  {line}")
    print("\nsummary:")
    if cases:
        print(f"  recall on fix commits          {ratio(s['found'], s['cases'])}")
        print(
            f"  recall, current codes only     "
            f"{ratio(s['found_current_codes'], s['cases_current_codes'])}"
            f"  (without cases that need issue 11's planned codes)"
        )
        print(f"  found cases the fix clears     {ratio(s['fix_cleared'], s['fix_checked'])}")
        per_code = ", ".join(
            f"{code} {n}/{total}" for code, (n, total) in s["recall_by_code"].items()
        )
        print(f"  found per code (any-of codes)  {per_code}")
        if s["case_errors"]:
            print(f"  cases not run (errors)         {s['case_errors']}")
    if corpus:
        print(f"  precision (labelled findings)  {ratio(s['labelled_true'], s['labelled'])}")
        print(f"  unlabelled findings            {s['unlabelled']}")
        print(
            f"  findings per 1,000 lines       {s['findings_per_kloc']:.3f}"
            f"  ({s['findings']} in {s['corpus_lines']:,} lines, {s['corpus_files']:,} files)"
        )
        print(f"  syntax errors (GF000, apart)   {s['syntax_errors']}")
        if s["missing_blobs"]:
            print(f"  files skipped: blobs missing   {s['missing_blobs']}")
        print(
            f"  lint CPU vs bare ast.parse     {s['lint_cpu_s']:.1f} s vs {s['parse_cpu_s']:.1f} s"
            f" = {s['lint_vs_parse']:.2f}x (lint --jobs 1, process start-up subtracted)"
        )
    print(f"  crashes                        {s['crashes']}")
    load = os.getloadavg()
    print(f"  machine: {os.cpu_count()} CPUs, load {load[0]:.1f} {load[1]:.1f} {load[2]:.1f}")


def progress(items: Sequence[Any], desc: str, quiet: bool) -> Iterable[Any]:
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover - tqdm is a dependency
        return items
    return tqdm(items, desc=desc, file=sys.stderr, disable=quiet, leave=False)  # type: ignore[no-any-return]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dev", type=Path, default=DEV, help="development set directory")
    parser.add_argument("--mirrors", type=Path, default=DEFAULT_MIRRORS, help="git mirrors")
    parser.add_argument("--trees", type=Path, default=DEFAULT_TREES, help="extracted trees cache")
    parser.add_argument("--linter-src", help="a checkout's src/ to lint with (default: installed)")
    parser.add_argument("--preview", action="store_true", help="include preview findings")
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    parser.add_argument("--cases-only", action="store_true", help="only the fix commits")
    parser.add_argument("--corpus-only", action="store_true", help="only the corpus")
    parser.add_argument("--only", help="comma-separated case ids / corpus repos to run")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    try:
        return _main(args)
    except HarnessError as exc:
        print(f"lint_quality: {exc}", file=sys.stderr)
        return 2


def _main(args: argparse.Namespace) -> int:
    if not (args.dev / "cases.tsv").is_file():
        raise HarnessError(f"no development set: {args.dev / 'cases.tsv'} is missing")
    cases = [] if args.corpus_only else read_cases(args.dev / "cases.tsv")
    corpus = [] if args.cases_only else read_corpus(args.dev / "corpus.txt")
    if args.only:
        keep = set(args.only.split(","))
        cases = [c for c in cases if c.id in keep or c.repo in keep]
        corpus = [r for r in corpus if r.repo in keep]
    labels = read_labels(args.dev / "labels.tsv")
    missing = sorted(
        {r for r in [*(c.repo for c in cases), *(r.repo for r in corpus)]
         if find_mirror(args.mirrors, r) is None}
    )  # fmt: skip
    if missing:
        how = ", ".join(f"github:{r.replace('+', '/', 1)}" for r in missing)
        raise HarnessError(
            f"{len(missing)} mirror(s) missing under {args.mirrors}: fetch {how} "
            f"(or point --mirrors at them)"
        )
    linter = Linter(args.linter_src, args.preview)
    args.trees.mkdir(parents=True, exist_ok=True)
    case_results = [
        run_case(c, linter, args.mirrors, args.trees)
        for c in progress(cases, "fix commits", args.quiet)
    ]
    corpus_results = [
        run_corpus(r, linter, args.mirrors, args.trees, labels)
        for r in progress(corpus, "corpus", args.quiet)
    ]
    summary = summarise(case_results, corpus_results)
    if args.json:
        out = {
            "linter": {"src": linter.src, "version": linter.version(), "preview": linter.preview},
            "summary": summary,
            "cases": [asdict(c) for c in case_results],
            "corpus": [asdict(r) for r in corpus_results],
            "load": os.getloadavg(),
        }
        json.dump(out, sys.stdout, indent=1)
        print()
    else:
        print_report(linter, case_results, corpus_results, summary)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
