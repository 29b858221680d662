"""Fixes: fixture files ``*.in.py`` -> ``*.out.py``, bottom-up, non-overlapping, re-parsed."""

from __future__ import annotations

from pathlib import Path

import pytest

from gradfence.lint import Diagnostic, Edit, Fix, Selection, Settings, check_source
from gradfence.lint.fix import apply_fixes, unified_diff

FIX_FIXTURES = Path(__file__).parent / "fixtures" / "fixes"
CASES = sorted(p.name[: -len(".in.py")] for p in FIX_FIXTURES.glob("*.in.py"))
TARGET_TORCH = {"GF106": (2, 0)}


def _settings(code: str) -> Settings:
    return Settings(Selection(select=(code,)), target_torch=TARGET_TORCH.get(code))


def test_every_fixable_rule_has_a_fix_fixture() -> None:
    from gradfence.lint.rules import RULES

    assert sorted(code for code, rule in RULES.items() if rule.fixable) == CASES


@pytest.mark.parametrize("code", CASES)
def test_fix_fixture(code: str) -> None:
    before = (FIX_FIXTURES / f"{code}.in.py").read_text(encoding="utf-8")
    expected = (FIX_FIXTURES / f"{code}.out.py").read_text(encoding="utf-8")
    found = check_source(before, f"{code}.py", _settings(code))
    assert any(d.fix for d in found)
    after, applied = apply_fixes(before, found)
    assert after == expected
    assert applied and all(d.fix for d in applied)
    # the fixed findings are gone; a second pass changes nothing
    remaining = check_source(after, f"{code}.py", _settings(code))
    assert not any(d.fix for d in remaining)
    assert apply_fixes(after, remaining)[0] == after


def _diag(line: int, col: int, end_col: int, content: str) -> Diagnostic:
    edit = Edit(line, col, line, end_col, content)
    return Diagnostic("GF301", "x", "m", "p", line, col + 1, line, end_col + 1, Fix("f", (edit,)))


def test_overlapping_fixes_apply_only_one() -> None:
    source = "import torch\nmodel.eval\n"
    first = _diag(2, 0, 10, "model.eval()")
    second = _diag(2, 6, 10, "train")
    after, applied = apply_fixes(source, [first, second])
    assert len(applied) == 1
    assert after in {"import torch\nmodel.eval()\n", "import torch\nmodel.train\n"}


def test_fix_that_breaks_parsing_is_dropped() -> None:
    source = "import torch\nmodel.eval\nmodel.train\n"
    broken = _diag(2, 0, 10, "model.eval(")
    good = _diag(3, 11, 11, "()")
    after, applied = apply_fixes(source, [broken, good])
    assert after == "import torch\nmodel.eval\nmodel.train()\n"
    assert applied == [good]


def test_fixes_are_applied_bottom_up_on_the_same_line() -> None:
    source = "import torch\nwith torch.no_grad, torch.enable_grad:\n    pass\n"
    found = check_source(source, "a.py")
    after, applied = apply_fixes(source, found)
    assert after == "import torch\nwith torch.no_grad(), torch.enable_grad():\n    pass\n"
    assert len(applied) == 2


def test_fix_positions_count_characters_not_bytes() -> None:
    source = 'import torch\nx = "é"; model.eval\n'
    after, _ = apply_fixes(source, check_source(source, "a.py"))
    assert after == 'import torch\nx = "é"; model.eval()\n'


def test_unified_diff_names_both_sides() -> None:
    diff = unified_diff("a.py", "x\n", "y\n")
    assert diff.splitlines()[:2] == ["--- a/a.py", "+++ b/a.py"]
    assert "-x" in diff and "+y" in diff
