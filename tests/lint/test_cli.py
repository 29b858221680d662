"""``gradfence lint`` / ``gradfence rules``: exit codes, formats, options, config, flake8."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from gradfence.cli import main
from gradfence.lint.docgen import render_page
from gradfence.lint.rules import RULES

BAD = "import torch\n\n\ndef f(model):\n    model.eval\n    torch.no_grad()\n"
FIXTURES = Path(__file__).parent / "fixtures" / "rules"


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "pyproject.toml").write_text("[project]\nname = 'demo'\n")
    (tmp_path / "bad.py").write_text(BAD)
    (tmp_path / "clean.py").write_text("import torch\n\nwith torch.no_grad():\n    pass\n")
    return tmp_path


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    status = main(["lint", *argv])
    out, err = capsys.readouterr()
    return status, out, err


def test_exit_codes(project: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(capsys, "clean.py")[0] == 0
    status, out, _ = run(capsys, "bad.py")
    assert status == 1
    assert out.splitlines() == [
        "bad.py:5:5: GF301 [*] `model.eval` is not called: the mode does not change",
        "bad.py:6:5: GF102 `torch.no_grad()` does nothing unless entered: use `with`",
        "Found 2 findings (1 fixable with --fix).",
    ]
    assert run(capsys, "bad.py", "--exit-zero")[0] == 0
    status, out, err = run(capsys, "missing.py")
    assert (
        status == 2
        and out == ""
        and err.strip() == "gradfence: error: no such file or directory: missing.py"
    )
    status, _, err = run(capsys, "bad.py", "--select", "GF999")
    assert status == 2 and "unknown rule code or prefix 'GF999'" in err and "Traceback" not in err


def test_internal_error_is_exit_2_one_line(
    project: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from gradfence.lint.rules.registry import Rule

    def explode(model: object) -> object:
        raise KeyError("boom")

    original = RULES["GF301"]
    broken = Rule(original.code, original.name, original.summary, False, explode)  # type: ignore[arg-type]
    monkeypatch.setitem(RULES, "GF301", broken)
    status, out, err = run(capsys, "bad.py", "clean.py", "--jobs", "1")
    assert status == 2
    lines = err.strip().splitlines()
    assert lines == [  # one line per file, no traceback
        "gradfence: error: internal error on bad.py: KeyError: 'boom'",
        "gradfence: error: internal error on clean.py: KeyError: 'boom'",
    ]
    assert "Traceback" not in out + err


def test_select_and_ignore(project: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _, out, _ = run(capsys, "bad.py", "--select", "GF1")
    assert "GF102" in out and "GF301" not in out
    _, out, _ = run(capsys, "bad.py", "--ignore", "GF102,GF3")
    assert out == ""
    assert run(capsys, "bad.py", "--ignore", "GF102,GF3")[0] == 0


def test_json_format(project: Path, capsys: pytest.CaptureFixture[str]) -> None:
    status, out, _ = run(capsys, "bad.py", "--format", "json")
    assert status == 1
    data = json.loads(out)
    assert [d["code"] for d in data] == ["GF301", "GF102"]
    first = data[0]
    assert {k: first[k] for k in ("name", "path", "line", "col", "end_line", "end_col")} == {
        "name": "mode-method-not-called",
        "path": "bad.py",
        "line": 5,
        "col": 5,
        "end_line": 5,
        "end_col": 15,
    }
    assert first["fix"]["edits"] == [
        {"line": 5, "col": 15, "end_line": 5, "end_col": 15, "content": "()"}
    ]
    assert "fix" not in data[1]
    status, out, _ = run(capsys, "clean.py", "--format", "json")
    assert status == 0 and json.loads(out) == []


def test_sarif_format(project: Path, capsys: pytest.CaptureFixture[str]) -> None:
    status, out, _ = run(capsys, "bad.py", "--format", "sarif")
    assert status == 1
    log = json.loads(out)
    assert log["version"] == "2.1.0"
    assert log["$schema"].endswith("sarif-2.1.0.json")
    driver = log["runs"][0]["tool"]["driver"]
    assert driver["name"] == "gradfence"
    rule_ids = [r["id"] for r in driver["rules"]]
    assert rule_ids == sorted(RULES)
    assert all(r["shortDescription"]["text"] and r["help"]["markdown"] for r in driver["rules"])
    results = log["runs"][0]["results"]
    assert [r["ruleId"] for r in results] == ["GF301", "GF102"]
    for result in results:
        assert driver["rules"][result["ruleIndex"]]["id"] == result["ruleId"]
        assert result["message"]["text"]
        location = result["locations"][0]["physicalLocation"]
        assert location["artifactLocation"]["uri"] == "bad.py"
        assert location["region"]["startLine"] >= 1 and location["region"]["startColumn"] >= 1


def test_sarif_uris(
    project: Path, tmp_path_factory: pytest.TempPathFactory, capsys: pytest.CaptureFixture[str]
) -> None:
    """Relative URIs are percent-encoded under %SRCROOT%; a file outside the working
    directory gets an absolute file: URI, which must not name a base (SARIF 3.10.3)."""
    (project / "my dir").mkdir()
    (project / "my dir" / "a#1.py").write_text(BAD)
    outside = tmp_path_factory.mktemp("outside") / "o.py"
    outside.write_text(BAD)
    _, out, _ = run(capsys, "my dir/a#1.py", str(outside), "--format", "sarif")
    locations = [
        r["locations"][0]["physicalLocation"]["artifactLocation"]
        for r in json.loads(out)["runs"][0]["results"]
    ]
    assert locations[0] == {"uri": "my%20dir/a%231.py", "uriBaseId": "%SRCROOT%"}
    assert locations[-1] == {"uri": outside.resolve().as_uri()}


def test_github_format(project: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _, out, _ = run(capsys, "bad.py", "--format", "github")
    assert out.splitlines()[0] == (
        "::warning file=bad.py,line=5,col=5,endLine=5,endColumn=15,"
        "title=GF301 mode-method-not-called::"
        "GF301 `model.eval` is not called: the mode does not change"
    )


def test_statistics(project: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (project / "more.py").write_text("import torch\nm.eval\nm.train\n")
    status, out, _ = run(capsys, ".", "--statistics")
    assert status == 1
    assert out.splitlines() == [
        "3  GF301  [*] mode-method-not-called",
        "1  GF102      discarded-grad-context",
    ]


def test_fix_rewrites_and_reports_rest(project: Path, capsys: pytest.CaptureFixture[str]) -> None:
    status, out, err = run(capsys, "bad.py", "--fix")
    assert status == 1  # GF102 has no fix
    assert (project / "bad.py").read_text() == BAD.replace("model.eval\n", "model.eval()\n")
    assert "GF301" not in out and "GF102" in out
    assert "Fixed 1 finding in 1 file(s)." in err


def test_diff_changes_nothing(project: Path, capsys: pytest.CaptureFixture[str]) -> None:
    status, out, _ = run(capsys, "bad.py", "--diff")
    assert status == 1
    assert (project / "bad.py").read_text() == BAD
    assert "-    model.eval\n+    model.eval()\n" in out
    assert run(capsys, "clean.py", "--diff")[0] == 0


def test_jobs_gives_same_output(project: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for fixture in FIXTURES.glob("GF3*.py"):
        shutil.copy(fixture, project / fixture.name)
    one = run(capsys, ".", "--jobs", "1")
    two = run(capsys, ".", "--jobs", "2")
    assert one == two and one[0] == 1 and one[1].count("\n") > 20
    assert run(capsys, ".", "--jobs", "0")[0] == 2


def test_config_from_pyproject(project: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (project / "pyproject.toml").write_text(
        textwrap.dedent(
            """
            [tool.gradfence]
            ignore = ["GF102"]
            target-torch = "2.0"
            exclude = ["generated/"]
            [tool.gradfence.per-file-ignores]
            "legacy/*" = ["GF3"]
            """
        )
    )
    (project / "old.py").write_text("import torch\n\n@torch.no_grad\ndef f():\n    pass\n")
    for folder in ("generated", "legacy"):
        (project / folder).mkdir()
        (project / folder / "x.py").write_text(BAD)
    status, out, _ = run(capsys, ".")
    assert status == 1
    codes = sorted(line.split()[1] + " " + line.split(":")[0] for line in out.splitlines()[:-1])
    assert codes == ["GF106 old.py", "GF301 bad.py"]
    # the command line overrides the config's select
    _, out, _ = run(capsys, ".", "--select", "GF102")
    assert "GF102" not in out  # still ignored by the config


def test_bad_config_is_exit_2(project: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (project / "pyproject.toml").write_text("[tool.gradfence]\ntarget-torch = 'two'\n")
    status, _, err = run(capsys, ".")
    assert status == 2 and "target-torch must look like X.Y" in err
    (project / "pyproject.toml").write_text("[tool.gradfence]\nselct = ['GF']\n")
    status, _, err = run(capsys, ".")
    assert status == 2 and "unknown [tool.gradfence] key 'selct'" in err


def test_directory_walk_honours_excludes(project: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for folder in (".venv/lib", "build", "node_modules/pkg", "ignored_by_git", "src/pkg"):
        (project / folder).mkdir(parents=True)
        (project / folder / "m.py").write_text(BAD)
    (project / ".gitignore").write_text("# comment\nignored_by_git/\n*.gen.py\n")
    (project / "src" / "pkg" / "x.gen.py").write_text(BAD)
    _, out, _ = run(capsys, ".", "--select", "GF301")
    paths = sorted({line.split(":")[0] for line in out.splitlines()[:-1]})
    assert paths == ["bad.py", "src/pkg/m.py"]
    # a file named explicitly is linted even inside an excluded directory
    assert run(capsys, "build/m.py")[0] == 1


def test_rules_table_and_page(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["rules"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["CODE", "NAME", "FIX", "SUMMARY"]
    assert [line.split()[0] for line in lines[1:]] == sorted(RULES)
    row = next(line for line in lines if line.startswith("GF301"))
    assert row.split()[1:3] == ["mode-method-not-called", "[*]"]
    assert main(["rules", "gf302"]) == 0
    page = capsys.readouterr().out
    assert page == render_page(RULES["GF302"], generated_note=False)
    assert "<!--" not in page and page.startswith("# GF302 eval-mode-leak\n\n")
    assert main(["rules", "GF999"]) == 2
    err = capsys.readouterr().err
    assert err.strip() == "gradfence: error: unknown rule 'GF999' (see `gradfence rules`)"


def test_console_entry_point_subprocess(project: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "gradfence", "lint", "bad.py", "--format", "json"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 1, result.stderr
    assert [d["code"] for d in json.loads(result.stdout)] == ["GF301", "GF102"]


def test_flake8_plugin(project: Path) -> None:
    flake8 = Path(sys.executable).with_name("flake8")
    command = [str(flake8)] if flake8.exists() else [sys.executable, "-m", "flake8"]
    result = subprocess.run(
        [*command, "--select", "GF", "bad.py", "clean.py"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 1, result.stderr
    assert result.stdout.splitlines() == [
        "bad.py:5:5: GF301 `model.eval` is not called: the mode does not change",
        "bad.py:6:5: GF102 `torch.no_grad()` does nothing unless entered: use `with`",
    ]
    (project / "bad.py").write_text(BAD.replace("model.eval\n", "model.eval  # noqa: GF301\n"))
    result = subprocess.run(
        [*command, "--select", "GF3", "bad.py"], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0 and result.stdout == ""


def test_fix_keeps_the_file_encoding(project: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (project / "bom.py").write_bytes(b"\xef\xbb\xbfimport torch\r\nmodel.eval\r\n")
    (project / "latin.py").write_bytes(
        b"# -*- coding: latin-1 -*-\nimport torch\nx = '\xe9'\nm.eval\n"
    )
    assert run(capsys, "bom.py", "latin.py", "--fix")[0] == 0
    assert (project / "bom.py").read_bytes() == b"\xef\xbb\xbfimport torch\r\nmodel.eval()\r\n"
    assert (project / "latin.py").read_bytes().endswith(b"x = '\xe9'\nm.eval()\n")


def test_undecodable_file_is_checked_but_not_fixed(
    project: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (project / "bad_utf8.py").write_bytes(b"import torch\nx = '\xff'\nmodel.eval\n")
    status, out, err = run(capsys, "bad_utf8.py", "--fix")
    assert status == 2 and "GF301" in out
    assert err.splitlines() == [
        "Fixed 0 findings in 0 file(s).",
        "gradfence: error: cannot fix bad_utf8.py: it is not valid in its encoding",
    ]
    assert (project / "bad_utf8.py").read_bytes() == b"import torch\nx = '\xff'\nmodel.eval\n"
