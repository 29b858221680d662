"""The report formats of ``gradfence lint``: exact SARIF regions and levels, escaped GitHub
annotations, and the flake8 plugin's columns and options."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from gradfence.cli import main
from gradfence.lint.diagnostics import Diagnostic
from gradfence.lint.output import format_github, level, to_sarif

# `model.eval` (not called) after a non-BMP character: 😀 is one code point, two UTF-16
# code units and four UTF-8 bytes, so each way of counting columns gives another number.
SOURCE = 'import torch\n\n\ndef f(model):\n    s = "😀"; model.eval\n    return s\n'
# 0-based code points: `model` at 13, `eval` ends at 23 -> SARIF 1-based 14, exclusive 24
START, END = 14, 24


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "emoji.py").write_text(SOURCE, encoding="utf-8")
    return tmp_path


def lint(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    main(["lint", *argv])
    return capsys.readouterr().out


def diagnostic(**changes: Any) -> Diagnostic:
    fields: dict[str, Any] = {
        "code": "GF301",
        "name": "mode-method-not-called",
        "message": "m",
        "path": "a.py",
        "line": 3,
        "col": 7,
        "end_line": 3,
        "end_col": 12,
    }
    fields.update(changes)
    return Diagnostic(**fields)


def test_sarif_regions_are_exact_1_based_code_point_columns(
    project: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    log = json.loads(lint(capsys, "emoji.py", "--format", "sarif"))
    run = log["runs"][0]
    assert run["columnKind"] == "unicodeCodePoints"
    (result,) = run["results"]
    assert result["ruleId"] == "GF301"
    region = result["locations"][0]["physicalLocation"]["region"]
    assert region == {"startLine": 5, "startColumn": START, "endLine": 5, "endColumn": END}
    # the region names exactly `model.eval` when counted the declared way
    line = SOURCE.splitlines()[4]
    assert line[region["startColumn"] - 1 : region["endColumn"] - 1] == "model.eval"


def test_text_and_github_columns_agree_with_sarif(
    project: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert lint(capsys, "emoji.py").startswith(f"emoji.py:5:{START}: GF301 ")
    github = lint(capsys, "emoji.py", "--format", "github")
    assert f",line=5,col={START},endLine=5,endColumn={END}," in github


def test_sarif_and_github_report_the_same_level(
    project: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (project / "broken.py").write_text("import torch\ndef f(:\n")
    log = json.loads(lint(capsys, "emoji.py", "broken.py", "--format", "sarif"))
    sarif = {r["ruleId"]: r["level"] for r in log["runs"][0]["results"]}
    github = lint(capsys, "emoji.py", "broken.py", "--format", "github").splitlines()
    commands = {line.split("title=")[1].split()[0]: line.split()[0] for line in github}
    assert sarif == {"GF000": "error", "GF301": "warning"}
    assert commands == {"GF000": "::error", "GF301": "::warning"}
    rules = {r["id"]: r for r in log["runs"][0]["tool"]["driver"]["rules"]}
    assert rules["GF301"]["defaultConfiguration"]["level"] == level("GF301") == "warning"


def test_github_annotations_escape_data_and_properties() -> None:
    finding = diagnostic(path="dir,1/a:b%.py", name="x", message="100% wrong\r\nsecond: line, here")
    (line,) = format_github([finding]).splitlines()
    assert line == (
        "::warning file=dir%2C1/a%3Ab%25.py,line=3,col=7,endLine=3,endColumn=12,"
        "title=GF301 x::GF301 100%25 wrong%0D%0Asecond: line, here"
    )


def test_sarif_uses_the_finding_columns_unchanged() -> None:
    log = to_sarif([diagnostic(col=1, end_col=2)], "0")
    region = log["runs"][0]["results"][0]["locations"][0]["physicalLocation"]["region"]
    assert (region["startColumn"], region["endColumn"]) == (1, 2)


def _flake8(tmp_path: Path, source: str, *options: str) -> list[str]:
    (tmp_path / "t.py").write_text(source)
    done = subprocess.run(
        [sys.executable, "-m", "flake8", "--select", "GF", *options, "t.py"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        check=False,
    )
    assert done.returncode in (0, 1), done.stderr
    return done.stdout.splitlines()


BARE_DECORATOR = textwrap.dedent(
    """
    import torch


    @torch.no_grad
    def double(x):
        return x * 2
    """
)


def test_flake8_reports_1_based_columns_like_gradfence(tmp_path: Path) -> None:
    lines = _flake8(tmp_path, SOURCE)
    assert [line.split(" ")[0] for line in lines] == [f"t.py:5:{START}:"]


def test_flake8_runs_gf106_with_target_torch(tmp_path: Path) -> None:
    assert _flake8(tmp_path, BARE_DECORATOR) == []
    found = _flake8(tmp_path, BARE_DECORATOR, "--gf-target-torch", "2.0")
    assert [line.split(" ")[1] for line in found] == ["GF106"]
    assert _flake8(tmp_path, BARE_DECORATOR, "--gf-target-torch", "2.1") == []


def test_flake8_reads_target_torch_from_pyproject(tmp_path: Path) -> None:
    (tmp_path / "pyproject.toml").write_text('[tool.gradfence]\ntarget-torch = "2.0"\n')
    found = _flake8(tmp_path, BARE_DECORATOR)
    assert [line.split(" ")[1] for line in found] == ["GF106"]


def test_flake8_plugin_rejects_a_bad_target_torch(tmp_path: Path) -> None:
    (tmp_path / "t.py").write_text(BARE_DECORATOR)
    done = subprocess.run(
        [sys.executable, "-m", "flake8", "--select", "GF", "--gf-target-torch", "two", "t.py"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        check=False,
    )
    assert done.returncode != 0
    assert "target-torch must look like X.Y (e.g. 2.0), got 'two'" in done.stderr


def test_plugin_class_runs_on_a_tree_directly() -> None:
    from gradfence.lint.flake8_plugin import Flake8Plugin

    lines = SOURCE.splitlines(keepends=True)
    results = list(Flake8Plugin(ast.parse(SOURCE), lines, "x.py").run())
    assert [(line, col, text.split()[0]) for line, col, text, _ in results] == [
        (5, START - 1, "GF301")
    ]
