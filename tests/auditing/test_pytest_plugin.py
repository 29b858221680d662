"""The pytest plugin, driven through pytest's own ``pytester`` (runs pytest in-process)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

pytest_plugins = ["pytester"]

MODEL_FIXTURE = """
import pytest
import torch
from torch import nn
import gradfence as gf

@pytest.fixture
def model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Dropout(0.2))
"""


@pytest.fixture(autouse=True)
def _keep_grad_mode() -> Iterator[None]:
    # In-process runs share this thread's grad mode; some of them leak it on purpose.
    before = torch.is_grad_enabled()
    yield
    torch.set_grad_enabled(before)


def test_plugin_is_registered(pytester: pytest.Pytester) -> None:
    result = pytester.runpytest("--markers")
    result.stdout.fnmatch_lines(["@pytest.mark.gradfence_eval(fixture_name*"])
    result = pytester.runpytest("--help")
    result.stdout.fnmatch_lines(["*--gradfence-leaks*"])


def test_fixture_fails_the_test_with_the_findings(pytester: pytest.Pytester) -> None:
    pytester.makeconftest(MODEL_FIXTURE)
    pytester.makepyfile(
        """
        import torch
        import gradfence as gf

        def evaluate(model, x):
            model.eval()                       # never switched back
            with torch.no_grad():
                return model(x)

        def evaluate_scoped(model, x):
            with gf.inference(model):
                return model(x)

        def test_leaky_helper(model, gradfence_audit):
            with gradfence_audit(model):
                evaluate(model, torch.randn(3, 4))

        def test_scoped_helper(model, gradfence_audit):
            with gradfence_audit(model):
                evaluate_scoped(model, torch.randn(3, 4))
        """
    )
    result = pytester.runpytest("-p", "no:cacheprovider")
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(
        ["*AuditError*", "*GFR002 the audited Sequential: train -> eval*", "*FAILED*leaky*"]
    )


def test_fixture_passes_options(pytester: pytest.Pytester) -> None:
    pytester.makeconftest(MODEL_FIXTURE)
    pytester.makepyfile(
        """
        def test_ignored(model, gradfence_audit):
            with gradfence_audit(model, ignore=["GFR002"]):
                model.eval()
        """
    )
    pytester.runpytest("-p", "no:cacheprovider").assert_outcomes(passed=1)


def test_marker_audits_the_test_body(pytester: pytest.Pytester) -> None:
    pytester.makeconftest(MODEL_FIXTURE)
    pytester.makepyfile(
        """
        import pytest
        import torch
        import gradfence as gf

        @pytest.mark.gradfence_eval("model")
        def test_validation_in_train_mode(model):
            with torch.no_grad():              # BatchNorm still updates its statistics
                model(torch.randn(3, 4))

        @pytest.mark.gradfence_eval("model")
        def test_validation_scoped(model):
            with gf.inference(model):
                model(torch.randn(3, 4))

        @pytest.mark.gradfence_eval("model", ignore=["GFR004", "GFR005", "GFR006"])
        def test_validation_with_ignored_codes(model):
            with torch.no_grad():
                model(torch.randn(3, 4))

        @pytest.mark.gradfence_eval("model")
        def test_fixture_not_requested():      # the marker resolves the fixture itself
            pass
        """
    )
    result = pytester.runpytest("-p", "no:cacheprovider", "-v")
    result.assert_outcomes(passed=3, failed=1)
    result.stdout.fnmatch_lines(["*GFR006 1 (BatchNorm1d) ran in training mode*"])
    result.stdout.fnmatch_lines(["*test_validation_in_train_mode FAILED*"])


def test_marker_keeps_the_tests_own_failure(pytester: pytest.Pytester) -> None:
    pytester.makeconftest(MODEL_FIXTURE)
    pytester.makepyfile(
        """
        import pytest

        @pytest.mark.gradfence_eval("model")
        def test_fails_by_itself(model):
            model.eval()
            assert 1 == 2, "the test's own assertion"
        """
    )
    result = pytester.runpytest("-p", "no:cacheprovider")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*the test's own assertion*", "*GFR002*"])


def test_marker_needs_one_fixture_name(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        import pytest

        @pytest.mark.gradfence_eval
        def test_no_name():
            pass
        """
    )
    result = pytester.runpytest("-p", "no:cacheprovider")
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*gradfence_eval takes one fixture name*"])
    assert "Traceback" not in result.stdout.str()


def test_marker_misuse_is_one_line_at_setup(pytester: pytest.Pytester) -> None:
    pytester.makeconftest(MODEL_FIXTURE)
    pytester.makepyfile(
        """
        import pytest
        from torch import nn

        @pytest.fixture
        def model_and_tokenizer(model):
            return model, "tokenizer"

        @pytest.mark.gradfence_eval("model_and_tokenizer")
        def test_not_a_module():
            pass

        @pytest.mark.gradfence_eval("model", raise_on_exit=False)
        def test_other_option():
            pass

        @pytest.mark.gradfence_eval("model", ignore=["GFR05"])
        def test_unknown_code():
            pass
        """
    )
    result = pytester.runpytest("-p", "no:cacheprovider")
    result.assert_outcomes(errors=3)
    result.stdout.fnmatch_lines(
        [
            "*fixture 'model_and_tokenizer' returned tuple, not an nn.Module*",
            "*unknown option(s) raise_on_exit; it takes ignore= and strict=*",
            "*unknown finding code(s) GFR05 in ignore=*",
        ],
        consecutive=False,
    )
    assert "Traceback" not in result.stdout.str()
    assert "auditor.py" not in result.stdout.str()


LEAKY_TESTS = """
import pytest
import torch

@pytest.fixture
def grad_off_forever():
    torch.set_grad_enabled(False)
    yield

@pytest.fixture
def grad_off_scoped():
    with torch.no_grad():
        yield

def test_leaks_set_grad_enabled():
    torch.set_grad_enabled(False)       # "inference setup" at test level

def test_next_test_needs_gradients():
    assert torch.is_grad_enabled()

def test_scoped_fixture_is_fine(grad_off_scoped):
    assert not torch.is_grad_enabled()

def test_leaky_fixture(grad_off_forever):
    pass
"""


def test_leaks_option_fails_the_leaking_test(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(LEAKY_TESTS)
    result = pytester.runpytest("-p", "no:cacheprovider", "--gradfence-leaks", "-v")
    result.assert_outcomes(passed=3, failed=1, errors=1)
    result.stdout.fnmatch_lines(
        [
            "*test_leaks_set_grad_enabled FAILED*",
            "*test_next_test_needs_gradients PASSED*",
            "*test_scoped_fixture_is_fine PASSED*",
            "*test_leaky_fixture PASSED*",
            "*test_leaky_fixture ERROR*",
        ]
    )
    result.stdout.fnmatch_lines(
        ["*GFR001 grad mode leaked by the test *test_leaks_set_grad_enabled*grad disabled*"]
    )
    result.stdout.fnmatch_lines(["*grad mode leaked by a fixture of *test_leaky_fixture*"])
    assert torch.is_grad_enabled()  # restored: nothing leaked into this process either


def test_leaks_option_and_fixtures_that_hold_a_mode_across_tests(
    pytester: pytest.Pytester,
) -> None:
    pytester.makepyfile(
        test_held="""
        import pytest
        import torch

        @pytest.fixture(scope="module")
        def frozen():                          # balanced: no_grad for the whole module
            with torch.no_grad():
                yield

        def test_one(frozen):
            assert not torch.is_grad_enabled()

        def test_two(frozen):
            assert not torch.is_grad_enabled()
        """,
        test_leaky_module="""
        import pytest
        import torch

        @pytest.fixture(scope="module")
        def leaky():
            torch.set_grad_enabled(False)
            yield

        def test_uses(leaky):
            assert not torch.is_grad_enabled()
        """,
        test_z_after="""
        import torch

        def test_after():
            assert torch.is_grad_enabled()
        """,
    )
    result = pytester.runpytest("-p", "no:cacheprovider", "--gradfence-leaks", "-v")
    result.assert_outcomes(passed=4, errors=1)
    result.stdout.fnmatch_lines(
        [
            "*test_held.py::test_one PASSED*",
            "*test_held.py::test_two PASSED*",
            "*test_leaky_module.py::test_uses ERROR*",
            "*test_z_after.py::test_after PASSED*",
            "*GFR001 grad mode leaked by the module-scoped fixture 'leaky'*",
        ]
    )


def test_without_the_option_the_leak_reaches_the_next_test(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(LEAKY_TESTS)
    try:
        result = pytester.runpytest("-p", "no:cacheprovider", "-v")
    finally:
        torch.set_grad_enabled(True)  # the in-process run leaked into this thread
    result.assert_outcomes(passed=3, failed=1)
    result.stdout.fnmatch_lines(["*test_next_test_needs_gradients FAILED*"])


def test_leaks_option_reports_inference_mode(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        import torch

        GUARD = torch.inference_mode()

        def test_enters_inference_mode_for_good():
            GUARD.__enter__()

        def test_cleans_up_after_it():
            GUARD.__exit__(None, None, None)
        """
    )
    result = pytester.runpytest("-p", "no:cacheprovider", "--gradfence-leaks", "-v")
    result.stdout.fnmatch_lines(
        [
            "*test_enters_inference_mode_for_good FAILED*",
            "*inference mode on exit*cannot be undone from outside*",
        ]
    )
    assert not torch.is_inference_mode_enabled()
