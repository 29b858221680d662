"""Rule documentation: every page complete, and docs/rules/ generated from the docstrings."""

from __future__ import annotations

from pathlib import Path

import pytest

from gradfence.lint.docgen import pages
from gradfence.lint.rules import RULES

DOCS = Path(__file__).resolve().parents[2] / "docs" / "rules"
SECTIONS = [
    "## What it does",
    "## Evidence",
    "## Why is this a problem?",
    "## Example",
    "## Use instead",
    "## References",
]


@pytest.mark.parametrize("code", sorted(RULES))
def test_rule_page_has_every_section_in_order(code: str) -> None:
    doc = RULES[code].doc
    positions = [doc.find(section) for section in SECTIONS]
    assert all(p >= 0 for p in positions), f"{code} misses a section"
    assert positions == sorted(positions)
    assert "**Hidden detail.**" in doc
    assert doc.count("```python") >= 2  # an example and what to use instead


def test_codes_and_names_are_unique_and_well_formed() -> None:
    names = [rule.name for rule in RULES.values()]
    assert len(set(names)) == len(names)
    assert all(code[:2] == "GF" and len(code) == 5 and code[2:].isdigit() for code in RULES)
    expected = {"GF000", *(f"GF10{i}" for i in range(1, 8)), *(f"GF20{i}" for i in range(1, 6))}
    expected |= {*(f"GF30{i}" for i in range(1, 9)), "GF401", "GF402", "GF403"}
    expected |= {"GF108", "GF206", "GF207", "GF309", "GF310", "GF404"}
    assert set(RULES) == expected


def test_committed_rule_pages_are_up_to_date() -> None:
    generated = pages()
    committed = {p.name: p.read_text(encoding="utf-8") for p in DOCS.glob("*.md")}
    stale = sorted(name for name in generated if committed.get(name) != generated[name])
    extra = sorted(set(committed) - set(generated))
    assert not stale and not extra, (
        f"docs/rules is out of date ({stale or extra}): run `python -m gradfence.lint.docgen`"
    )


PRELUDE = (
    "import torch\nimport torch.nn as nn\nimport torch.nn.functional as F\nimport gradfence\n"
    "from concurrent.futures import ThreadPoolExecutor\n"
)


def _block_after(doc: str, heading: str) -> str:
    section = doc.split(heading, 1)[1]
    return section.split("```python\n", 1)[1].split("```", 1)[0]


@pytest.mark.parametrize("code", sorted(RULES))
def test_page_example_is_flagged_and_fix_is_not(code: str) -> None:
    """Each page's Example triggers its rule; its Use instead does not."""
    from gradfence.lint import Selection, Settings, check_source

    doc = RULES[code].doc
    settings = Settings(Selection(select=(code,)), target_torch=(2, 0))
    example = _block_after(doc, "## Example")
    source = example if code == "GF000" else PRELUDE + example
    assert code in {d.code for d in check_source(source, "example.py", settings)}
    fixed = PRELUDE + _block_after(doc, "## Use instead")
    assert [d.code for d in check_source(fixed, "fixed.py", settings)] == []
