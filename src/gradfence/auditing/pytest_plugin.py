"""The gradfence pytest plugin: on for every pytest run once gradfence is installed.

* fixture ``gradfence_audit``: ``with gradfence_audit(model): ...`` fails the test with
  the findings of :func:`gradfence.audit` (it is ``gf.audit(..., raise_on_exit=True)``);
* marker ``@pytest.mark.gradfence_eval("model")``: runs the test body under an audit of
  the module the fixture ``model`` returns (``ignore=`` and ``strict=`` go to ``gf.audit``);
* option ``--gradfence-leaks``: fails a test that leaves grad mode or inference mode
  changed (the test itself in its call phase, its fixtures at teardown; a wider-scoped
  fixture when it is finalised), and puts grad mode back so that the next test does
  not inherit it.

This module imports neither torch nor the rest of gradfence at import time, so it adds
nothing to the start-up of test runs that do not use it.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable, Generator, Iterable
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from torch import nn

    from gradfence.auditing.auditor import Audit

MARKER = "gradfence_eval"
_EVAL_TARGET = pytest.StashKey["Audit"]()
_BASELINE = pytest.StashKey[tuple[tuple[bool, bool], tuple[bool, bool]]]()


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("gradfence")
    group.addoption(
        "--gradfence-leaks",
        action="store_true",
        default=False,
        help="fail a test that leaves grad mode or inference mode changed (gradfence)",
    )


def pytest_configure(config: pytest.Config) -> None:
    if config.getoption("gradfence_leaks", False) and importlib.util.find_spec("torch") is None:
        raise pytest.UsageError("--gradfence-leaks needs torch: pip install 'gradfence[torch]'")
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
        _check_leak(item, before, f"the test {item.nodeid}")
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
    finding = mode_leak(before, after, f"by {who}")
    if finding is None:
        return
    if _restore_grad(before):
        outcome = "gradfence put grad mode back for the tests after it"
    else:
        # Report it once: the teardown check compares with the state left behind.
        baseline = item.stash.get(_BASELINE, None)
        if baseline is not None:
            item.stash[_BASELINE] = (baseline[0], after)
        outcome = "inference mode cannot be undone from outside: later tests inherit it"
    pytest.fail(f"{finding} ({outcome}; --gradfence-leaks)", pytrace=False)


# Fixtures wider than a function (module, session, ...) may hold a mode across tests,
# e.g. ``with torch.no_grad(): yield`` in a module fixture: each one that changed the
# modes in its setup is kept here (fixturedef, modes before, modes after) until it is
# finalised, where it must give back the modes it found.
_HELD = pytest.StashKey[list[tuple[object, tuple[bool, bool], tuple[bool, bool]]]]()


def _held(config: pytest.Config) -> list[tuple[object, tuple[bool, bool], tuple[bool, bool]]]:
    return config.stash.setdefault(_HELD, [])


@pytest.hookimpl(wrapper=True)
def pytest_fixture_setup(
    fixturedef: pytest.FixtureDef[object], request: pytest.FixtureRequest
) -> Generator[None, object, object]:
    if fixturedef.scope == "function" or not request.config.getoption("gradfence_leaks"):
        return (yield)
    before = _modes()
    result = yield
    after = _modes()
    if after != before:
        _held(request.config).append((fixturedef, before, after))
    return result


def pytest_fixture_post_finalizer(
    fixturedef: pytest.FixtureDef[object], request: pytest.FixtureRequest
) -> None:
    held = request.config.stash.get(_HELD, [])
    for position in range(len(held) - 1, -1, -1):
        if held[position][0] is fixturedef:
            before = held.pop(position)[1]
            _fail_if_changed(
                before, f"the {fixturedef.scope}-scoped fixture {fixturedef.argname!r}"
            )
            return


def _fail_if_changed(before: tuple[bool, bool], who: str) -> None:
    """A wider fixture's teardown did not give back the modes its setup found."""
    from gradfence.auditing.state import mode_leak

    finding = mode_leak(before, _modes(), f"by {who}")
    if finding is not None:
        restored = _restore_grad(before)
        outcome = "gradfence put grad mode back" if restored else "inference mode stays on"
        pytest.fail(f"{finding} ({outcome}; --gradfence-leaks)", pytrace=False)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_setup(item: pytest.Item) -> Generator[None, object, object]:
    if item.config.getoption("gradfence_leaks"):
        held = _held(item.config)
        # (modes now, modes once every wider fixture now held is finalised)
        item.stash[_BASELINE] = (_modes(), held[0][1] if held else _modes())
    return (yield)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_teardown(
    item: pytest.Item, nextitem: pytest.Item | None
) -> Generator[None, object, object]:
    result = yield
    baseline = item.stash.get(_BASELINE, None)
    if baseline is not None:
        held = _held(item.config)
        # Wider fixtures still held keep their mode; else everything is back to the ground.
        expected = held[-1][2] if held else baseline[1]
        _check_leak(item, expected, f"a fixture of {item.nodeid}")
    return result
