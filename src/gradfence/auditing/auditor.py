"""``gf.audit``: declare a block of code to be evaluation, and check that it is.

>>> import torch, gradfence as gf
>>> model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Dropout(0.1))
>>> with gf.audit(model) as report:
...     with gf.inference(model):
...         _ = model(torch.ones(2, 4))
>>> report.ok
True
>>> with gf.audit(model) as report:
...     _ = model.eval()(torch.ones(2, 4))          # eval() does not disable grad
>>> report.codes()
['GFR002', 'GFR003']
"""

from __future__ import annotations

import functools
import inspect
import threading
import warnings
from collections.abc import Callable, Iterable
from types import TracebackType
from typing import Any, TypeVar, cast

from torch import nn

from gradfence.auditing.collector import COMPILED, Collector
from gradfence.auditing.findings import CODES, check_codes
from gradfence.auditing.hooks import (
    HOOKED_CHECKS,
    Probe,
    blind_checks,
    compiled_reason,
    outermost,
)
from gradfence.auditing.ops import DropoutWatch, start_watching, stop_watching
from gradfence.auditing.report import AuditReport
from gradfence.auditing.state import StateSnapshot
from gradfence.errors import AuditError, GradfenceWarning, ScopeError

F = TypeVar("F", bound=Callable[..., Any])


def _named_modules(roots: tuple[nn.Module, ...]) -> list[tuple[str, nn.Module]]:
    """Every module under the roots once, with its dotted name (``"0.fc"`` for several roots)."""
    seen: set[int] = set()
    named: list[tuple[str, nn.Module]] = []
    for position, root in enumerate(roots):
        prefix = f"{position}" if len(roots) > 1 else ""
        for name, module in root.named_modules(prefix=prefix):
            if id(module) not in seen:
                seen.add(id(module))
                named.append((name, module))
    return named


def _add_note(exc: BaseException, note: str) -> None:
    """``exc.add_note(note)``, also on Python 3.10, which has no ``add_note`` (PEP 678).

    There, the note goes into ``__notes__`` as ``add_note`` would put it (pytest shows
    it); the exception itself is never replaced.
    """
    add_note = getattr(exc, "add_note", None)
    if add_note is not None:
        add_note(note)
        return
    notes = getattr(exc, "__notes__", None)
    try:
        if isinstance(notes, list):
            notes.append(note)
        else:
            setattr(exc, "__notes__", [note])  # noqa: B010 (3.10's BaseException types lack it)
    except (AttributeError, TypeError):  # an exception type that refuses attributes
        pass


# Audits open in the process: COMPILED is reset only when the first one opens, so an
# audit nested in another (or overlapping it in another thread) never erases its marks.
_open_audits = 0
_open_lock = threading.Lock()


def _opened() -> None:
    global _open_audits
    with _open_lock:
        if _open_audits == 0:
            COMPILED.reset()
        _open_audits += 1


def _closed() -> dict[str, bool]:
    """What compiled code left in COMPILED while this audit was open."""
    global _open_audits
    with _open_lock:
        _open_audits -= 1
        return {"hooks": COMPILED.hooks, "roots": COMPILED.roots, "ops": COMPILED.ops}


def _runtime_blind(checks: frozenset[str], marks: dict[str, bool]) -> dict[str, str]:
    """The checks blind in compiled code that ran during the audit (see ``CompiledRuns``)."""
    if not (marks["hooks"] or marks["ops"]):
        return {}
    codes = HOOKED_CHECKS if marks["roots"] else ("GFR005", "GFR006")
    return blind_checks(checks, codes, compiled_reason("it ran during the audit"))


class Audit:
    """What :func:`audit` returns: a context manager (its ``__enter__`` gives the report).

    One object audits one block: entering it a second time raises ``ScopeError``. As a
    decorator it is a template: every call of the decorated function gets a fresh audit.
    """

    __slots__ = (
        "_checks",
        "_collector",
        "_decorated",
        "_modules",
        "_probe",
        "_raise",
        "_report",
        "_state",
        "_strict",
        "_watch",
    )

    def __init__(
        self,
        modules: tuple[nn.Module, ...],
        *,
        raise_on_exit: bool,
        ignore: Iterable[str],
        strict: bool,
    ) -> None:
        for position, module in enumerate(modules):
            if not isinstance(module, nn.Module):
                raise ScopeError(
                    f"gf.audit() argument {position + 1} is {type(module).__name__}, not an "
                    "nn.Module: pass the modules to audit as separate arguments"
                )
        self._modules = modules
        self._raise = raise_on_exit
        self._strict = strict
        self._checks = frozenset(CODES) - check_codes(ignore)
        self._report: AuditReport | None = None
        self._probe: Probe | None = None
        self._state: StateSnapshot | None = None
        self._watch: DropoutWatch | None = None
        self._decorated: Callable[..., Any] | None = None  # set on the per-call copies
        self._collector = Collector()

    def __repr__(self) -> str:
        names = ", ".join(type(module).__name__ for module in self._modules)
        return f"gf.audit({names})"

    def __enter__(self) -> AuditReport:
        if self._report is not None:
            raise ScopeError(f"{self!r} was already entered: create one gf.audit() per block")
        named = _named_modules(self._modules)
        collector = self._collector
        collector.owner = threading.get_ident()  # the thread that enters, not the one that built
        self._state = StateSnapshot(self._modules, named, self._checks, self._strict)
        probe = Probe(collector, self._modules, named, self._checks)
        probe.install()
        if "GFR005" in self._checks:
            names = {id(module): (name, type(module).__name__) for name, module in named}
            self._watch = DropoutWatch(collector, names)
            start_watching(self._watch)
        _opened()
        self._probe = probe
        self._report = AuditReport()
        self._collector = collector
        return self._report

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        __tracebackhide__ = True  # pytest: show the user's block, not this method
        assert self._report is not None and self._probe is not None and self._state is not None
        try:
            self._probe.remove()
        finally:
            if self._watch is not None:
                stop_watching(self._watch)
            self._collector.closed = True
            marks = _closed()
        findings = self._state.findings() + outermost(self._collector.findings())
        order = list(CODES)
        findings.sort(key=lambda finding: order.index(finding.code))
        self._report.findings[:] = findings
        self._report.blind.update(_runtime_blind(self._checks, marks))
        self._report.blind.update(self._probe.blind)  # named modules: the more precise text
        if not findings or not (self._raise or self._decorated is not None):
            return
        if exc is not None:  # keep the body's own error; the findings as a note
            _add_note(exc, self._report.format())
        elif self._raise:
            raise AuditError(self._report.format())
        else:  # decorated, no raise_on_exit: a warning, since no one holds the report
            _warn_at(self._decorated, self._report.format())

    # decorating ---------------------------------------------------------------------

    def _for_call(self, func: Callable[..., Any]) -> Audit:
        """A fresh audit with this one's modules and options, for one call of ``func``."""
        fresh = Audit(
            self._modules,
            raise_on_exit=self._raise,
            ignore=frozenset(CODES) - self._checks,
            strict=self._strict,
        )
        fresh._decorated = func
        return fresh

    def __call__(self, func: F) -> F:
        """Decorate ``func`` (a function or an ``async def``): every call is audited.

        An ``async def`` is audited from its start to its completion, awaits included
        (forwards that run after an ``await``, or in a thread it awaits, are seen). The
        findings of a call are raised as :class:`~gradfence.AuditError` with
        ``raise_on_exit=True``, otherwise issued as a :class:`~gradfence.GradfenceWarning`;
        when the call raises, they are added to its exception as a note.
        """
        name = getattr(func, "__name__", type(func).__name__)
        if inspect.isclass(func):
            raise ScopeError(
                f"{self!r} cannot decorate the class {name}: decorate its methods "
                "(e.g. validate or predict) instead."
            )
        if not callable(func):
            raise ScopeError(f"{self!r} decorates functions; got {type(func).__name__}")
        if inspect.isgeneratorfunction(func) or inspect.isasyncgenfunction(func):
            raise ScopeError(
                f"{self!r} cannot decorate the generator function {name}: it would audit "
                f"only the creation of the generator. Audit the loop that consumes it: "
                f"with gf.audit(model): for item in {name}(...): ..."
            )
        template = self
        wrapper: Callable[..., Any]
        if inspect.iscoroutinefunction(func):

            @functools.wraps(func)
            async def coroutine_wrapper(*args: Any, **kwargs: Any) -> Any:
                with template._for_call(func):
                    return await func(*args, **kwargs)

            wrapper = coroutine_wrapper
        else:

            @functools.wraps(func)
            def function_wrapper(*args: Any, **kwargs: Any) -> Any:
                with template._for_call(func):
                    return func(*args, **kwargs)

            wrapper = function_wrapper
        return cast(F, wrapper)


def _warn_at(func: Callable[..., Any] | None, message: str) -> None:
    """A GradfenceWarning located at ``func``'s definition (a coroutine has no caller line)."""
    code = getattr(func, "__code__", None)
    if code is None:
        warnings.warn(GradfenceWarning(message), stacklevel=4)
        return
    warnings.warn_explicit(
        GradfenceWarning(message),
        GradfenceWarning,
        code.co_filename,
        code.co_firstlineno,
        module=getattr(func, "__module__", None),
    )


def audit(
    *modules: nn.Module,
    raise_on_exit: bool = False,
    ignore: Iterable[str] = (),
    strict: bool = False,
) -> Audit:
    """Check that the block it wraps honours the evaluation contract on ``modules``.

    Use it as ``with gf.audit(model) as report:``; after the block, ``report.findings``
    lists a :class:`~gradfence.Finding` per broken promise (codes GFR001-GFR007, see
    ``docs/audit.md``) and ``report.ok`` is True when there is none.

    * ``raise_on_exit=True`` raises :class:`~gradfence.AuditError` at exit instead
      (when the block itself raised, the findings are added to its error as a note).
    * ``ignore=["GFR005"]`` turns checks off by code (their cost goes with them).
    * ``strict=True`` also snapshots the value of every parameter and buffer, which
      catches writes through ``.data`` and to inference tensors (costly on big models).
    * As a decorator, ``@gf.audit(model, raise_on_exit=True)`` on a function or an
      ``async def`` audits every call (without ``raise_on_exit``, findings are warned).

    The audit does not change what the block computes: its hooks only read, its op
    watch (wrappers put in place of torch's dropout functions while an audit is open)
    calls each function with the arguments it got, and all of it is removed at exit,
    also when the block raises. Inside ``torch.compile``'d code the checks made while
    forwards run are blind: ``report.blind`` says which (see ``docs/audit.md``).
    """
    return Audit(modules, raise_on_exit=raise_on_exit, ignore=ignore, strict=strict)
