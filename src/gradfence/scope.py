"""Scoped grad mode and module mode, restored exactly: ``gf.inference`` and ``gf.training``.

Two PyTorch switches govern a forward pass, and they behave differently:

* grad mode (``no_grad``, ``inference_mode``) is *thread-local* and scoped;
* a module's ``training`` flag is a plain attribute: *process-global* and unscoped.

A :class:`Scope` sets both on entry and puts both back on exit, exactly: every
submodule gets its own flag back (a frozen BatchNorm inside a training model stays
frozen), grad mode and inference mode return to what they were, also when the body
raises. As a decorator it covers plain functions, generators, ``async def`` and async
generators; for the last three the scope is in force exactly while the body's own code
runs, and the caller (or any task interleaving on the thread) sees its own state.

Module flags are shared by all threads, so scopes on the same module that overlap in
time from different threads cannot both hold. gradfence tracks every active scope:
when scopes on the same module close out of order, the one that closes first hands
its saved flags to the one still open instead of restoring them under its feet, so
the module ends up as it was before the first scope opened. Overlapping scopes with
*different* targets (``training`` in one thread while ``inference`` runs in another)
raise a :class:`~gradfence.errors.ScopeOverlapWarning`.
"""

from __future__ import annotations

import contextvars
import functools
import inspect
import itertools
import threading
import warnings
from collections.abc import Callable, Generator, Iterable
from typing import Any, Literal, Protocol, TypeVar, cast

import torch
from torch import nn

from gradfence.errors import ScopeError, ScopeOverlapWarning

GradMode = Literal["no_grad", "inference_mode"]
GRAD_MODES: tuple[str, ...] = ("no_grad", "inference_mode")

F = TypeVar("F", bound=Callable[..., Any])


class _Resumable(Protocol):
    """What a generator, a coroutine's ``__await__`` iterator and the like provide."""

    def send(self, value: Any, /) -> Any: ...
    def throw(self, exc: BaseException, /) -> Any: ...
    def close(self) -> None: ...


# --- which classes need their own train() called -----------------------------------

_custom_mode_cache: dict[type, bool] = {}


def _has_custom_mode(cls: type) -> bool:
    """True when ``cls`` overrides ``train``/``eval`` (or ``__setattr__``).

    Such modules get their own ``train(mode)`` called, so the override runs with the
    flag it is being given; every other module's flag is written directly, which is
    what ``nn.Module.train`` itself would do, minus its per-level overhead.
    """
    custom = _custom_mode_cache.get(cls)
    if custom is None:
        custom = (
            getattr(cls, "train", None) is not nn.Module.train
            or getattr(cls, "eval", None) is not nn.Module.eval
            or getattr(cls, "__setattr__", None) is not nn.Module.__setattr__
        )
        _custom_mode_cache[cls] = custom
    return custom


def _set_mode(module: nn.Module, training: bool) -> None:
    """Call the module's own mode switch (its override), as ``model.train()`` would."""
    if not training and type(module).eval is not nn.Module.eval:
        module.eval()
    else:
        module.train(training)


# --- snapshots of module flags -----------------------------------------------------


def _preorder(roots: Iterable[nn.Module | None]) -> tuple[list[nn.Module], dict[int, int]]:
    """Every module reachable from ``roots``, pre-order, each once (keyed by identity).

    Returns the modules and a map from ``id(module)`` to its position. Iterative and
    lean on purpose: it runs twice per scope (entry and exit).
    """
    order: list[nn.Module] = []
    index: dict[int, int] = {}
    stack: list[nn.Module | None] = list(roots)
    stack.reverse()
    pop, extend = stack.pop, stack.extend
    while stack:
        module = pop()
        if module is None:
            continue
        key = id(module)
        if key in index:
            continue
        index[key] = len(order)
        order.append(module)
        children = module._modules
        if children:
            extend(reversed(children.values()))
    return order, index


class ModeSnapshot:
    """Every module reachable from some roots, in pre-order, with its ``training`` flag.

    Modules are keyed by identity, so a module shared by two parents appears once and a
    module renamed or moved inside the tree is still recognised.
    """

    __slots__ = ("flags", "index", "modules", "roots")

    def __init__(self, roots: Iterable[nn.Module]) -> None:
        self.roots = tuple(roots)
        self.modules, self.index = _preorder(self.roots)
        self.flags: list[bool] = [module.training for module in self.modules]

    def apply(self, training: bool) -> None:
        """Switch every module to ``training`` the way ``root.train(training)`` would.

        Modules whose class overrides the mode switch get it called (so e.g. a
        ``train()`` that pins a frozen part in eval keeps working) and own their
        subtree; all others get a direct flag write, and only where it differs.
        """
        owned: set[int] = set()  # modules inside the subtree of an overriding module
        cache = _custom_mode_cache
        for module in self.modules:
            cls = type(module)
            custom = cache.get(cls)
            if custom is None:
                custom = _has_custom_mode(cls)
            if custom or owned:
                key = id(module)
                if key in owned:
                    continue
                if custom:
                    _set_mode(module, training)
                    owned.update(_preorder(module._modules.values())[1])
                    continue
            if module.training is not training:
                module.__dict__["training"] = training

    def restore(self, skip: set[int] | frozenset[int] = frozenset()) -> None:
        """Put every module that is still in the trees back to its recorded flag.

        Walks the trees as they are *now*: modules removed in the meantime are not
        touched, modules added in the meantime keep the flag they have. A module whose
        class overrides ``train()`` gets ``train(saved_flag)`` called, so its override
        runs with the flag it is restored to; since that recurses, its descendants are
        fixed up afterwards (pre-order). If one module fails to restore, the others are
        still restored and the first error is raised at the end.
        """
        current, _ = _preorder(self.roots)
        index, flags = self.index, self.flags
        added = [(m, m.training) for m in current if id(m) not in index]
        errors: list[BaseException] = []
        for module in current:
            key = id(module)
            position = index.get(key)
            if position is None or key in skip:
                continue
            saved = flags[position]
            if module.training is saved:
                continue
            if _has_custom_mode(type(module)):
                try:
                    _set_mode(module, saved)
                except BaseException as exc:  # keep restoring the rest, raise below
                    errors.append(exc)
                    module.__dict__["training"] = saved
            else:
                module.__dict__["training"] = saved
        for module, flag in added:
            module.__dict__["training"] = flag
        if errors:
            _raise_first(errors, "restoring module modes")


def _raise_first(errors: list[BaseException], what: str) -> None:
    first = errors[0]
    add_note = getattr(first, "add_note", None)
    if add_note is not None and len(errors) > 1:
        others = ", ".join(f"{type(e).__name__}: {e}" for e in errors[1:])
        add_note(f"gradfence: {len(errors) - 1} more error(s) while {what}: {others}")
    raise first


# --- the registry of active scopes (module flags are process-global) ---------------

_registry_lock = threading.RLock()
_active: dict[int, _Entry] = {}  # entry sequence number -> entry, oldest first
_sequence = itertools.count()


class _Entry:
    """The state one entry into a scope must put back on exit."""

    __slots__ = (
        "closed",
        "grad_before",
        "guard",
        "owner",
        "sequence",
        "snapshot",
        "thread_entries",
        "training",
    )

    def __init__(self) -> None:
        self.grad_before: bool | None = None
        self.guard: Any = None  # the C++ inference-mode guard, exited on restore
        self.thread_entries: list[_Entry] = []  # the grad-mode stack of the entering thread
        self.closed = False
        self.snapshot: ModeSnapshot | None = None
        self.sequence = -1
        self.owner = 0
        self.training = False


def _overlaps(a: ModeSnapshot, b: ModeSnapshot) -> bool:
    small, large = (a, b) if len(a.index) <= len(b.index) else (b, a)
    return any(key in large.index for key in small.index)


def _register(entry: _Entry, roots: tuple[nn.Module, ...], training: bool) -> None:
    """Snapshot, register and switch the modules, atomically w.r.t. other scopes."""
    with _registry_lock:
        snapshot = ModeSnapshot(roots)
        entry.snapshot = snapshot
        entry.training = training
        entry.owner = threading.get_ident()
        for other in _active.values():
            if (
                other.owner != entry.owner
                and other.training is not training
                and other.snapshot is not None
                and _overlaps(other.snapshot, snapshot)
            ):
                warnings.warn(
                    f"gf.{'training' if training else 'inference'}() entered on a module "
                    f"that a gf.{'training' if other.training else 'inference'}() scope in "
                    "another thread is using: module modes are process-global, so each "
                    "thread now sees the other's flags. Give each thread its own model "
                    "copy, or serialise the two.",
                    ScopeOverlapWarning,
                    stacklevel=4,
                )
                break
        entry.sequence = next(_sequence)
        _active[entry.sequence] = entry
        try:
            snapshot.apply(training)
        except BaseException:
            _unregister(entry)
            raise


def _unregister(entry: _Entry) -> None:
    """Restore the entry's modules, or hand them to a newer scope still using them."""
    with _registry_lock:
        snapshot = entry.snapshot
        _active.pop(entry.sequence, None)
        if snapshot is None:
            return
        handed: set[int] = set()
        if _active and next(reversed(_active)) > entry.sequence:
            # Closed out of order: a newer scope recorded *our* in-scope flags as its
            # "before" state. Give it our real "before" state instead and leave those
            # modules alone, so the last scope to close restores the original flags.
            for sequence, newer in _active.items():
                if sequence < entry.sequence or newer.snapshot is None:
                    continue
                target = newer.snapshot
                for key, position in snapshot.index.items():
                    theirs = target.index.get(key)
                    if theirs is not None and key not in handed:
                        target.flags[theirs] = snapshot.flags[position]
                        handed.add(key)
        snapshot.restore(skip=handed)


# --- grad mode ---------------------------------------------------------------------


_thread_state = threading.local()


def _thread_entries() -> list[_Entry]:
    """The calling thread's active entries, oldest first (grad mode is per thread)."""
    try:
        entries: list[_Entry] = _thread_state.entries
    except AttributeError:
        entries = _thread_state.entries = []
    return entries


def _enter_grad(entry: _Entry, grad: str) -> None:
    if grad == "inference_mode":
        guard = torch._C._InferenceMode(True)
        guard.__enter__()  # type: ignore[no-untyped-call]
        entry.guard = guard
    else:
        entry.grad_before = torch.is_grad_enabled()
        torch._C._set_grad_enabled(grad == "enable_grad")
    entry.thread_entries = _thread_entries()
    entry.thread_entries.append(entry)


def _undo_grad(entry: _Entry) -> None:
    # Leave inference mode by exiting its guard: entering inference_mode(False)
    # instead would force grad mode ON whatever it was before.
    if entry.guard is not None:
        guard, entry.guard = entry.guard, None
        guard.__exit__(None, None, None)
    elif entry.grad_before is not None:
        torch._C._set_grad_enabled(entry.grad_before)


def _exit_grad(entry: _Entry) -> None:
    """Restore the grad mode an entry changed, keeping each thread's changes LIFO.

    An entry closed while a newer one of the same thread is still open (two ``with``
    blocks exited out of order, or spanning an ``await`` in two tasks) is only marked
    closed: the newer one still owns the thread's grad mode. It is undone, in LIFO
    order, when the entries above it have closed, so the thread ends with the grad
    mode and inference mode it had before the oldest of them.
    """
    entries = entry.thread_entries
    if entries is not _thread_entries():
        # Closed from another thread (e.g. a finaliser): that thread's grad mode is not
        # ours to change; just forget the entry.
        if entry in entries:
            entries.remove(entry)
        return
    if entries and entries[-1] is entry:
        entries.pop()
        _undo_grad(entry)
        while entries and entries[-1].closed:
            _undo_grad(entries.pop())
    elif entry in entries:
        entry.closed = True
    else:
        _undo_grad(entry)


# --- the scope ---------------------------------------------------------------------


class _Stepped:
    """An awaitable that runs another awaitable one step at a time inside a scope."""

    __slots__ = ("_awaitable", "_scope")

    def __init__(self, scope: Scope, awaitable: Any) -> None:
        self._scope = scope
        self._awaitable = awaitable

    def __await__(self) -> Generator[Any, Any, Any]:
        return self._scope._drive(self._awaitable.__await__())


class Scope:
    """A grad-mode + module-mode scope; build it with :func:`inference` or :func:`training`.

    Use it as a context manager or as a decorator. Creating it changes nothing; every
    entry takes a fresh snapshot, so one object can be nested, re-entered recursively
    and shared between threads.
    """

    __slots__ = ("_entries", "_grad", "_modules", "_training")

    def __init__(self, modules: tuple[nn.Module, ...], *, training: bool, grad: str) -> None:
        self._modules = modules
        self._training = training
        self._grad = grad
        # Per thread and per asyncio task, so one object can be used concurrently.
        self._entries: contextvars.ContextVar[tuple[_Entry, ...]] = contextvars.ContextVar(
            "gradfence_scope_entries"
        )

    def __repr__(self) -> str:
        names = ", ".join(type(m).__name__ for m in self._modules)
        if self._training:
            return f"gf.training({names})"
        sep = ", " if names else ""
        return f"gf.inference({names}{sep}mode={self._grad!r})"

    # entering and leaving -----------------------------------------------------------

    def _enter(self) -> _Entry:
        if self._training and torch.is_inference_mode_enabled():
            raise ScopeError(
                "gf.training() cannot run inside torch.inference_mode(): no autograd graph "
                "can be recorded there, not even under enable_grad(). Leave the "
                "inference_mode block (or use gf.inference(..., mode='no_grad') outside)."
            )
        entry = _Entry()
        _enter_grad(entry, self._grad)
        if self._modules:
            try:
                _register(entry, self._modules, self._training)
            except BaseException:
                _exit_grad(entry)
                raise
        return entry

    def _exit(self, entry: _Entry) -> None:
        try:
            if entry.snapshot is not None:
                _unregister(entry)
        finally:
            _exit_grad(entry)

    def __enter__(self) -> Scope:
        entry = self._enter()
        self._entries.set((*self._entries.get(()), entry))
        return self

    def __exit__(self, *exc_info: object) -> None:
        entries = self._entries.get(())
        if not entries:
            raise ScopeError(f"{self!r} exited more often than it was entered")
        self._entries.set(entries[:-1])
        self._exit(entries[-1])

    def _drive(self, step: _Resumable) -> Generator[Any, Any, Any]:
        """Run a resumable (generator, coroutine) with the scope in force only while it runs.

        Each resumption (send/throw/close) gets a fresh entry that is exited before the
        value goes back out, so whoever runs in between sees its own modes.
        """
        value: Any = None
        error: BaseException | None = None
        while True:
            entry = self._enter()
            try:
                out = step.send(value) if error is None else step.throw(error)
            except StopIteration as stop:
                return stop.value
            finally:
                self._exit(entry)
            error = None
            try:
                value = yield out
            except GeneratorExit:
                entry = self._enter()
                try:
                    step.close()
                finally:
                    self._exit(entry)
                raise
            except BaseException as exc:
                value, error = None, exc

    # decorating ---------------------------------------------------------------------

    def __call__(self, func: F) -> F:
        """Decorate ``func`` so its body runs inside this scope (a fresh entry per call)."""
        if inspect.isclass(func):
            raise ScopeError(
                f"{self!r} cannot decorate the class {func.__name__}: decorate its "
                "methods (e.g. forward or predict) instead."
            )
        if not callable(func):
            raise ScopeError(f"{self!r} decorates functions; got {type(func).__name__}")
        scope = self
        wrapper: Callable[..., Any]

        if inspect.isasyncgenfunction(func):

            @functools.wraps(func)
            async def async_gen_wrapper(*args: Any, **kwargs: Any) -> Any:
                agen = func(*args, **kwargs)
                step = agen.asend(None)
                while True:
                    try:
                        item = await _Stepped(scope, step)
                    except StopAsyncIteration:
                        return
                    try:
                        sent = yield item
                    except GeneratorExit:
                        await _Stepped(scope, agen.aclose())
                        raise
                    except BaseException as exc:
                        step = agen.athrow(exc)
                    else:
                        step = agen.asend(sent)

            wrapper = async_gen_wrapper
        elif inspect.iscoroutinefunction(func):

            @functools.wraps(func)
            async def coroutine_wrapper(*args: Any, **kwargs: Any) -> Any:
                return await _Stepped(scope, func(*args, **kwargs))

            wrapper = coroutine_wrapper
        elif inspect.isgeneratorfunction(func):

            @functools.wraps(func)
            def generator_wrapper(*args: Any, **kwargs: Any) -> Any:
                return (yield from scope._drive(func(*args, **kwargs)))

            wrapper = generator_wrapper
        else:

            @functools.wraps(func)
            def function_wrapper(*args: Any, **kwargs: Any) -> Any:
                entry = scope._enter()
                try:
                    return func(*args, **kwargs)
                finally:
                    scope._exit(entry)

            wrapper = function_wrapper
        return cast(F, wrapper)


def _check_modules(api: str, modules: tuple[Any, ...]) -> tuple[nn.Module, ...]:
    for position, module in enumerate(modules):
        if isinstance(module, nn.Module):
            continue
        if callable(module) and not isinstance(module, type):
            hint = f"write @gf.{api}() with parentheses to decorate a function"
        elif isinstance(module, list | tuple):
            hint = f"pass modules as separate arguments: gf.{api}(*modules)"
        else:
            hint = "pass torch.nn.Module objects"
        raise ScopeError(
            f"gf.{api}() argument {position + 1} is {type(module).__name__}, "
            f"not an nn.Module: {hint}"
        )
    return modules


def inference(*modules: nn.Module, mode: GradMode = "no_grad") -> Scope:
    """Evaluation mode and disabled grad, both restored exactly on exit.

    Every given module (and each of its submodules) is switched to eval as
    ``module.eval()`` would, and grad is disabled (``mode="no_grad"``) or inference
    mode entered (``mode="inference_mode"``). On exit each submodule gets back its own
    flag, and grad/inference mode return to what they were. With no modules only the
    grad mode is scoped.

    Inside ``mode="no_grad"``, a nested ``torch.enable_grad()`` records graphs again;
    inside ``mode="inference_mode"`` it cannot (autograd is off for the whole block).

    >>> import torch, gradfence as gf
    >>> model = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.BatchNorm1d(3))
    >>> model[1].eval()                      # a frozen BatchNorm
    BatchNorm1d(3, eps=1e-05, momentum=0.1, affine=True, track_running_stats=True)
    >>> with gf.inference(model):
    ...     y = model(torch.ones(2, 3))
    >>> model.training, model[1].training, y.requires_grad
    (True, False, False)
    """
    if mode not in GRAD_MODES:
        raise ScopeError(
            f"unknown mode {mode!r} for gf.inference(): use 'no_grad' (the default) or "
            "'inference_mode'"
        )
    return Scope(_check_modules("inference", modules), training=False, grad=mode)


def training(*modules: nn.Module) -> Scope:
    """Train mode and enabled grad, both restored exactly on exit: the mirror of :func:`inference`.

    Modules are switched as ``module.train()`` would (class overrides of ``train()``
    run, e.g. to keep frozen parts in eval). Raises :class:`~gradfence.ScopeError` inside
    ``torch.inference_mode()``, where no graph can be recorded at all.

    >>> import torch, gradfence as gf
    >>> model = torch.nn.Linear(2, 1).eval()
    >>> with gf.training(model), torch.no_grad():
    ...     pass
    >>> with torch.no_grad(), gf.training(model):
    ...     loss = model(torch.ones(1, 2)).sum()
    >>> model.training, loss.requires_grad
    (False, True)
    """
    return Scope(_check_modules("training", modules), training=True, grad="enable_grad")
