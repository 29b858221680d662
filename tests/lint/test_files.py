"""Which files ``gradfence lint`` checks: git's ignore rules, defaults and ``--exclude``."""

from __future__ import annotations

from pathlib import Path

import pytest

from gradfence.lint.files import discover


@pytest.fixture
def tree(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    for name in (
        "top.py",
        "foo/bar.py",
        "foo/a/b/bar.py",
        "foo/other.py",
        "gen/x.py",
        "gen/keep.py",
        "sub/gen/y.py",
        "sub/keep.py",
        "sub/drop.py",
        "notes/readme.txt",
        "build/out.py",
        ".venv/lib.py",
        "pkg.egg-info/x.py",
    ):
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("import torch\n")
    return tmp_path


def found(*paths: str, exclude: tuple[str, ...] = ()) -> list[str]:
    return sorted(p.replace("\\", "/") for p in discover(paths or (".",), exclude))


def test_double_star_pattern_ignores_at_every_depth(tree: Path) -> None:
    (tree / ".gitignore").write_text("foo/**/bar.py\n")
    files = found()
    assert "foo/bar.py" not in files and "foo/a/b/bar.py" not in files
    assert "foo/other.py" in files


def test_negated_pattern_re_includes_a_file(tree: Path) -> None:
    (tree / ".gitignore").write_text("gen/*.py\n!keep.py\n")
    files = found()
    assert "gen/x.py" not in files
    assert "gen/keep.py" in files


def test_a_deeper_gitignore_overrides_a_shallower_one(tree: Path) -> None:
    (tree / ".gitignore").write_text("keep.py\ndrop.py\n")
    (tree / "sub" / ".gitignore").write_text("!keep.py\n/gen/\n")
    files = found()
    assert "sub/keep.py" in files and "sub/drop.py" not in files
    assert "sub/gen/y.py" not in files, "anchored at sub/, where that .gitignore is"
    assert "gen/x.py" in files, "sub/.gitignore's /gen/ does not reach the top-level gen/"


def test_a_file_in_an_ignored_directory_cannot_be_re_included(tree: Path) -> None:
    (tree / ".gitignore").write_text("gen/\n!gen/keep.py\n")
    assert not any(path.startswith("gen/") for path in found())


def test_defaults_and_user_excludes(tree: Path) -> None:
    assert found() == [
        "foo/a/b/bar.py",
        "foo/bar.py",
        "foo/other.py",
        "gen/keep.py",
        "gen/x.py",
        "sub/drop.py",
        "sub/gen/y.py",
        "sub/keep.py",
        "top.py",
    ]
    files = found(exclude=("foo/", "/top.py", "gen"))
    assert files == ["sub/drop.py", "sub/keep.py"]


def test_named_files_are_always_checked(tree: Path) -> None:
    (tree / ".gitignore").write_text("*.py\n")
    assert found() == []
    assert found("foo/bar.py", "build/out.py") == ["build/out.py", "foo/bar.py"]


def test_a_directory_given_outside_the_base_still_skips_defaults(
    tree: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    outside = tmp_path_factory.mktemp("outside")
    (outside / "__pycache__").mkdir()
    (outside / "__pycache__" / "c.py").write_text("")
    (outside / "m.py").write_text("")
    assert found(str(outside)) == [str(outside / "m.py")]
