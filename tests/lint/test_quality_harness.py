"""``benchmarks/lint_quality.py`` on a tiny git repository made here: a buggy commit and its fix."""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.skipif(shutil.which("git") is None, reason="needs git")

BUGGY = """\
import torch


def double(x):
    with torch.no_grad:
        return x * 2
"""
FIXED = BUGGY.replace("torch.no_grad:", "torch.no_grad():")
# a second file: one finding labelled true, one labelled false, one left unlabelled
OTHER = """\
import torch


def a(model):
    model.eval


def b(model):
    model.train


def c(model):
    model.eval
"""


def load_harness() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "lint_quality", ROOT / "benchmarks" / "lint_quality.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["lint_quality"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def git(cwd: Path, *args: str) -> str:
    done = subprocess.run(
        ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-c", "commit.gpgsign=false", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        check=True,
    )
    return done.stdout.strip()


@pytest.fixture
def dev(tmp_path: Path) -> Path:
    """mirrors/demo+proj/repo (bare), and a development set naming its two commits."""
    work = tmp_path / "work"
    (work / "pkg").mkdir(parents=True)
    git(work, "init", "-q")
    (work / "pyproject.toml").write_text("[project]\nname = 'proj'\n")
    (work / "pkg" / "evaluate.py").write_text(BUGGY)
    (work / "pkg" / "other.py").write_text(OTHER)
    git(work, "add", ".")
    git(work, "commit", "-qm", "buggy")
    (work / "pkg" / "evaluate.py").write_text(FIXED)
    git(work, "commit", "-qam", "fix: call no_grad")
    head = git(work, "rev-parse", "HEAD")
    mirrors = tmp_path / "mirrors"
    (mirrors / "demo+proj").mkdir(parents=True)
    git(tmp_path, "clone", "-q", "--bare", str(work), str(mirrors / "demo+proj" / "repo"))

    sets = tmp_path / "dev"
    sets.mkdir()
    (sets / "cases.tsv").write_text(
        "# id\tmirror\tbug_rev\tfix_rev\tpath\tcodes\tnote\n"
        f"found\tdemo+proj\t{head}^\t{head}\tpkg/evaluate.py\tGF101\tno_grad not called\n"
        f"planned\tdemo+proj\t{head}^\t{head}\tpkg/evaluate.py\tGF206\tneeds a planned rule\n"
    )
    (sets / "corpus.txt").write_text(f"demo+proj {head}\n")
    (sets / "labels.tsv").write_text(
        "# repo\tpath\tline\tcode\tverdict\treason\n"
        "demo+proj\tpkg/other.py\t5\tGF301\ttrue\tmode method not called\n"
        "demo+proj\tpkg/other.py\t9\tGF301\tfalse\tpretend it is meant\n"
    )
    return tmp_path


def run(capsys: pytest.CaptureFixture[str], root: Path, *extra: str) -> tuple[int, str, str]:
    harness = load_harness()
    status = harness.main(
        [
            "--dev",
            str(root / "dev"),
            "--mirrors",
            str(root / "mirrors"),
            "--trees",
            str(root / "trees"),
            "--quiet",
            *extra,
        ]
    )
    out, err = capsys.readouterr()
    return status, out, err


def test_recall_fix_clearing_and_labelled_precision(
    dev: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    status, out, _ = run(capsys, dev, "--json", "--linter-src", str(ROOT / "src"))
    assert status == 0
    report = json.loads(out)
    s = report["summary"]
    # the planned-code case is a miss, and recall is given with and without it
    assert (s["found"], s["cases"]) == (1, 2)
    assert (s["found_current_codes"], s["cases_current_codes"]) == (1, 1)
    assert (s["fix_cleared"], s["fix_checked"]) == (1, 1)
    found = {c["id"]: c for c in report["cases"]}["found"]
    assert found["found"] and found["cleared"] and "GF101:5" in found["fired"]
    # corpus: 3 findings, 2 labelled (1 true, 1 false), 1 unlabelled and counted
    assert (s["findings"], s["labelled"], s["labelled_true"], s["unlabelled"]) == (3, 2, 1, 1)
    assert s["precision"] == pytest.approx(0.5)
    assert s["crashes"] == 0
    assert s["corpus_lines"] == FIXED.count("\n") + OTHER.count("\n")
    # the extracted tree is a project: pyproject.toml came along, and a .git marker
    tree = next((dev / "trees").glob("demo+proj@*"))
    assert (tree / "pyproject.toml").is_file() and (tree / ".git").is_dir()


def test_text_report_lists_unlabelled_findings(
    dev: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    status, out, _ = run(capsys, dev)
    assert status == 0
    assert "recall on fix commits          1/2 (50 %)" in out
    assert "precision (labelled findings)  1/2 (50 %)" in out
    assert "demo+proj\tpkg/other.py\t13\tGF301" in out  # unlabelled, listed for labelling
    assert "false positives (1)" in out and "pretend it is meant" in out


def test_a_missing_mirror_is_one_line_saying_how_to_fetch_it(
    dev: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    shutil.rmtree(dev / "mirrors" / "demo+proj")
    status, out, err = run(capsys, dev)
    assert status == 2 and out == ""
    assert err.count("\n") == 1
    assert "fetch github:demo/proj" in err


def test_a_blob_missing_from_a_partial_mirror_is_skipped_and_counted(
    dev: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    harness = load_harness()
    git_dir = dev / "mirrors" / "demo+proj" / "repo"
    blob = git(git_dir, "rev-parse", "HEAD:pkg/other.py")
    git(git_dir, "repack", "-q", "-a", "-d")
    packs = list((git_dir / "objects" / "pack").glob("*.pack"))
    # rewrite the objects without that blob: a mirror that lacks it
    keep = [line for line in git(git_dir, "rev-list", "--objects", "--all").splitlines()]
    names = "\n".join(line.split()[0] for line in keep if not line.startswith(blob)) + "\n"
    subprocess.run(
        ["git", "pack-objects", "-q", str(git_dir / "objects" / "pack" / "pack")],
        cwd=git_dir,
        input=names,
        text=True,
        capture_output=True,
        check=True,
    )
    for pack in packs:
        pack.unlink()
        pack.with_suffix(".idx").unlink()
    head = git(git_dir, "rev-parse", "HEAD")
    tree = harness.extract(git_dir, head, dev / "trees")
    assert tree.missing == 1
    assert (tree.root / "pkg" / "evaluate.py").read_text() == FIXED
    assert not (tree.root / "pkg" / "other.py").exists()


FAKE_LINTER = """\
import json
import sys

args = sys.argv[2:]
if "--help" in args:
    print("usage: gradfence lint [--format {json}] [--jobs N] [--exit-zero] [PATH ...]")
    raise SystemExit(0)
paths = args[args.index("--") + 1 :]
for path in paths:
    if path.endswith("other.py"):
        print(f"gradfence: error: internal error on {path}: RuntimeError: boom", file=sys.stderr)
print(json.dumps([]))
raise SystemExit(2 if any(p.endswith("other.py") for p in paths) else 0)
"""


def test_internal_errors_of_the_linter_count_as_crashes(
    dev: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    fake = tmp_path / "fake-src"
    (fake / "gradfence" / "lint").mkdir(parents=True)
    (fake / "gradfence" / "__init__.py").write_text("")
    (fake / "gradfence" / "lint" / "__init__.py").write_text("")
    (fake / "gradfence" / "__main__.py").write_text(FAKE_LINTER)
    status, out, _ = run(capsys, dev, "--linter-src", str(fake))
    assert status == 0
    assert "crashes (1):" in out and "internal error on pkg/other.py" in out
    assert "  crashes                        1" in out
    assert "recall on fix commits          0/2 (0 %)" in out
