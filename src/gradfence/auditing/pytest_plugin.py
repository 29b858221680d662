"""The gradfence pytest plugin: on for every pytest run once gradfence is installed.

* fixture ``gradfence_audit``: ``with gradfence_audit(model): ...`` fails the test with
  the findings of :func:`gradfence.audit` (it is ``gf.audit(..., raise_on_exit=True)``);
* marker ``@pytest.mark.gradfence_eval("model")``: runs the test body under an audit of
  the module the fixture ``model`` returns (``ignore=`` and ``strict=`` go to ``gf.audit``);
* option ``--gradfence-leaks``: fails a test that leaves grad mode or inference mode
  changed (the test itself in its call phase, its fixtures at teardown), and puts grad
  mode back so that the next test does not inherit it.

This module imports neither torch nor the rest of gradfence at import time, so it adds
nothing to the start-up of test runs that do not use it.
"""

from __future__ import annotations

from collections.abc import Callable, Generator, Iterable
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from torch import nn

    from gradfence.auditing.auditor import Audit

MARKER = "gradfence_eval"
_EVAL_TARGET = pytest.StashKey["Audit"]()
_BASELINE = pytest.StashKey[tuple[bool, bool]]()


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("gradfence")
    group.addoption(
        "--gradfence-leaks",
        action="store_true",
        default=False,
        help="fail a test that leaves grad mode or inference mode changed (gradfence)",
    )


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        f"{MARKER}(fixture_name, **audit_options): run the test body under gf.audit() of "
        "the module that fixture returns; the test fails with the audit's findings",
    )


# --- fixture ---------------------------------------------------------------------------


@pytest.fixture
def gradfence_audit() -> Callable[..., Audit]:
    """A factory: ``with gradfence_audit(model, ignore=(), strict=False):`` audits the block.

    At the end of the block the test fails (``gf.AuditError``) listing every finding.
    """

    def factory(*modules: nn.Module, ignore: Iterable[str] = (), strict: bool = False) -> Audit:
        from gradfence.auditing.auditor import audit

        return audit(*modules, raise_on_exit=True, ignore=ignore, strict=strict)

    return factory


# --- marker ----------------------------------------------------------------------------


_MARKER_OPTIONS = ("ignore", "strict")


@pytest.fixture(autouse=True)
def _gradfence_eval_target(request: pytest.FixtureRequest) -> None:
    """Resolve the fixture a ``gradfence_eval`` marker names and build the audit (at setup).

    A misused marker makes the test error at setup with one line saying what is wrong.
    """
    marker = request.node.get_closest_marker(MARKER)
    if marker is None:
        return
    where = f"@pytest.mark.{MARKER} on {request.node.nodeid}"
    if len(marker.args) != 1 or not isinstance(marker.args[0], str):
        pytest.fail(
            f'@pytest.mark.{MARKER} takes one fixture name, e.g. @pytest.mark.{MARKER}("model"); '
            f"got {marker.args!r} on {request.node.nodeid}",
            pytrace=False,
        )
    unknown = sorted(set(marker.kwargs) - set(_MARKER_OPTIONS))
    if unknown:
        pytest.fail(
            f"{where}: unknown option(s) {', '.join(unknown)}; it takes "
            f"{' and '.join(f'{name}=' for name in _MARKER_OPTIONS)} (the test fails on "
            "findings)",
            pytrace=False,
        )
    from torch import nn

    from gradfence.auditing.auditor import audit

    name = marker.args[0]
    module = request.getfixturevalue(name)
    if not isinstance(module, nn.Module):
        pytest.fail(
            f"{where}: fixture {name!r} returned {type(module).__name__}, not an nn.Module "
            "(name a fixture that returns the model, or use the gradfence_audit fixture)",
            pytrace=False,
        )
    try:
        checker = audit(module, raise_on_exit=True, **marker.kwargs)
    except ValueError as error:  # an unknown code in ignore=
        pytest.fail(f"{where}: {error}", pytrace=False)
    request.node.stash[_EVAL_TARGET] = checker


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Generator[None, object, object]:
    target = item.stash.get(_EVAL_TARGET, None)
    leaks = item.config.getoption("gradfence_leaks")
    if target is None and not leaks:
        return (yield)
    before = _modes() if leaks else None
    try:
        if target is None:
            result = yield
        else:
            from gradfence.errors import AuditError

            failure = ""
            try:
                with target:
                    result = yield
            except AuditError as error:
                name = item.get_closest_marker(MARKER).args[0]  # type: ignore[union-attr]
                failure = f"@{MARKER}({name!r}): {error}"
            if failure:
                pytest.fail(failure, pytrace=False)
    except BaseException:
        if before is not None:
            _restore_grad(before)  # the test failed anyway: just keep the next one clean
        raise
    if before is not None:
        _check_leak(item, before, "the test")
    return result


# --- leak check ------------------------------------------------------------------------


def _modes() -> tuple[bool, bool]:
    from gradfence.auditing.state import current_modes

    return current_modes()


def _restore_grad(before: tuple[bool, bool]) -> bool:
    """Put grad mode back to ``before``; False when inference mode changed (no way back)."""
    import torch

    if torch.is_inference_mode_enabled() != before[1]:
        return False
    torch.set_grad_enabled(before[0])
    return True


def _check_leak(item: pytest.Item, before: tuple[bool, bool], who: str) -> None:
    """Fail when the modes now differ from ``before``; put grad mode back where possible."""
    from gradfence.auditing.state import mode_leak

    after = _modes()
    finding = mode_leak(before, after, f"by {who} {item.nodeid}")
    if finding is None:
        return
    if _restore_grad(before):
        outcome = "gradfence put grad mode back for the tests after it"
    else:
        # Report it once: the teardown check compares with the state left behind.
        item.stash[_BASELINE] = after
        outcome = "inference mode cannot be undone from outside: later tests inherit it"
    pytest.fail(f"{finding} ({outcome}; --gradfence-leaks)", pytrace=False)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_setup(item: pytest.Item) -> Generator[None, object, object]:
    if item.config.getoption("gradfence_leaks"):
        item.stash[_BASELINE] = _modes()
    return (yield)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_teardown(
    item: pytest.Item, nextitem: pytest.Item | None
) -> Generator[None, object, object]:
    result = yield
    baseline = item.stash.get(_BASELINE, None)
    if baseline is not None:
        _check_leak(item, baseline, "a fixture of")
    return result
