"""Every rule against its fixture: exact findings on the bad cases, silence on look-alikes."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from gradfence.lint import Selection, Settings, check_source
from gradfence.lint.rules import RULES

RULE_FIXTURES = Path(__file__).parent / "fixtures" / "rules"
# fixtures that need settings other than the defaults
TARGET_TORCH = {"GF106": (2, 0)}

CODES = sorted(code for code in RULES if code != "GF000")


def _lint(code: str, path: Path) -> list[str]:
    settings = Settings(Selection(select=(code,)), target_torch=TARGET_TORCH.get(code))
    found = check_source(path.read_text(encoding="utf-8"), str(path), settings)
    return [f"{d.line}:{d.col} {d.code}" for d in found]


def test_every_rule_has_a_fixture() -> None:
    assert sorted(p.stem for p in RULE_FIXTURES.glob("GF*.py")) == CODES


@pytest.mark.parametrize("code", CODES)
def test_rule_fixture_exact_findings(code: str) -> None:
    path = RULE_FIXTURES / f"{code}.py"
    expected = (RULE_FIXTURES / f"{code}.expected").read_text(encoding="utf-8").split()
    expected_lines = [" ".join(pair) for pair in zip(expected[::2], expected[1::2], strict=True)]
    assert _lint(code, path) == expected_lines


@pytest.mark.parametrize("code", CODES)
def test_expected_lines_are_the_marked_bad_cases(code: str) -> None:
    """The .expected file and the ``# bad`` markers agree: each bad case found, nothing else."""
    source = (RULE_FIXTURES / f"{code}.py").read_text(encoding="utf-8").splitlines()
    marked = {i for i, line in enumerate(source, 1) if re.search(r"#\s*bad\b", line)}
    expected = (RULE_FIXTURES / f"{code}.expected").read_text(encoding="utf-8").split()
    assert marked, f"{code} fixture has no bad case"
    assert {int(pos.split(":")[0]) for pos in expected[::2]} == marked


@pytest.mark.parametrize("code", CODES)
def test_rule_silent_once_bad_lines_removed(code: str) -> None:
    """Dropping the marked bad statements leaves only look-alikes: the rule must be silent."""
    path = RULE_FIXTURES / f"{code}.py"
    lines = path.read_text(encoding="utf-8").splitlines()
    kept = [
        re.sub(r"^(\s*)\S.*$", r"\1pass", line) if re.search(r"#\s*bad\b", line) else line
        for line in lines
    ]
    source = "\n".join(kept) + "\n"
    # a bad decorator line becomes ``pass`` which no longer parses: drop it instead
    source = re.sub(r"^pass\n(?=(async )?def )", "", source, flags=re.M)
    settings = Settings(Selection(select=(code,)), target_torch=TARGET_TORCH.get(code))
    found = check_source(source, str(path), settings)
    assert [(d.line, d.code) for d in found] == []


def test_gf106_silent_without_target_torch() -> None:
    source = (RULE_FIXTURES / "GF106.py").read_text(encoding="utf-8")
    assert check_source(source, "x.py", Settings(Selection(select=("GF106",)))) == []
    modern = Settings(Selection(select=("GF106",)), target_torch=(2, 1))
    assert check_source(source, "x.py", modern) == []


def test_syntax_error_is_one_gf000_finding() -> None:
    found = check_source("import torch\nwith torch.no_grad()\n    pass\n", "broken.py")
    assert [(d.code, d.name, d.line) for d in found] == [("GF000", "syntax-error", 2)]
    assert "expected ':'" in found[0].message


def test_file_without_torch_text_is_skipped_even_if_broken() -> None:
    assert check_source("model.eval\nwith x:\n", "a.py") == []
    assert [d.code for d in check_source("import torch\nmodel.eval\n", "a.py")] == ["GF301"]


def test_null_bytes_are_gf000_not_a_crash() -> None:
    found = check_source("import torch\x00\n", "nul.py")
    assert [d.code for d in found] == ["GF000"]
