"""Property tests: the linter never raises, and unparseable input is exactly one GF000."""

from __future__ import annotations

import ast

import hypothesmith
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from gradfence.lint import check_source
from gradfence.lint.fix import apply_fixes

# every generated module gets a torch prelude so that it is not skipped before parsing
PRELUDE = (
    "import torch\nimport torch.nn as nn\nimport torch.nn.functional as F\n"
    "from torch import no_grad, inference_mode\n"
)
_SETTINGS = settings(
    max_examples=40, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True
)


@_SETTINGS
@given(hypothesmith.from_grammar())
def test_never_raises_on_parseable_python_from_grammar(source: str) -> None:
    code = PRELUDE + source
    try:
        ast.parse(code)
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        assume(False)
    found = check_source(code, "gen.py")
    assert all(d.code != "GF000" for d in found)
    fixed, _ = apply_fixes(code, found)
    ast.parse(fixed)


@_SETTINGS
@given(hypothesmith.from_node())
def test_never_raises_on_parseable_python_from_ast(source: str) -> None:
    code = PRELUDE + source
    found = check_source(code, "gen.py")
    assert all(d.code != "GF000" for d in found)
    fixed, _ = apply_fixes(code, found)
    ast.parse(fixed)


@_SETTINGS
@given(st.text(max_size=200))
def test_unparseable_input_is_one_gf000(text: str) -> None:
    code = "import torch\n" + text
    try:
        ast.parse(code)
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        found = check_source(code, "bad.py")
        assert [d.code for d in found] == ["GF000"]
        assert found[0].line >= 1 and found[0].col >= 1
    else:
        check_source(code, "ok.py")  # parseable text: must still not raise
