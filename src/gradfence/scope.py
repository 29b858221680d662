"""Scoped grad mode and module mode, restored exactly: ``gf.inference`` and ``gf.training``.

Two PyTorch switches govern a forward pass, and they behave differently:

* grad mode (``no_grad``, ``inference_mode``) is *thread-local* and scoped;
* a module's ``training`` flag is a plain attribute: *process-global* and unscoped.

A :class:`Scope` sets both on entry and puts both back on exit, exactly: every
submodule gets its own flag back (a frozen BatchNorm inside a training model stays
frozen), grad mode and inference mode return to what they were, also when the body
raises. Wherever a module overrides the switch (``train``/``eval`` on its class or on
the instance, a ``training`` property), the scope does exactly what ``model.eval()`` /
``model.train()`` do. As a decorator it covers plain functions, generators, ``async
def`` and async generators; for the last three the module flags (process-global) are
held from the first resumption to the end, and grad mode (thread-local) is set only
while the body's own code runs, so the caller (or any task interleaving on the thread)
keeps its own grad mode, while work handed to another thread sees the modules in the
scope's mode.

Module flags are shared by all threads, so scopes on the same module that overlap in
time from different threads cannot both hold. gradfence tracks every active scope:
when scopes on the same module close out of order, the one that closes first hands
its saved flags to the one still open instead of restoring them under its feet (and
puts back any of them that a ``train()`` override's recursion reaches while it
restores the rest), so the module ends up as it was before the first scope opened.
Overlapping scopes with *different* targets (``training`` in one thread while
``inference`` runs in another) raise a :class:`~gradfence.errors.ScopeOverlapWarning`.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import inspect
import itertools
import operator
import threading
import warnings
from collections.abc import Callable, Generator, Iterable
from typing import Any, Protocol, TypeVar, cast

import torch
from torch import nn

from gradfence import compat
from gradfence.errors import ScopeError, ScopeOverlapWarning
from gradfence.modes import GRAD_MODES, GradMode

F = TypeVar("F", bound=Callable[..., Any])


class _Resumable(Protocol):
    """What a generator, a coroutine's ``__await__`` iterator and the like provide."""

    def send(self, value: Any, /) -> Any: ...
    def throw(self, exc: BaseException, /) -> Any: ...
    def close(self) -> None: ...


# --- switching modules exactly as model.train() / model.eval() would ---------------

# What a class does differently from nn.Module when its mode is switched (bit flags).
_EVAL_OVERRIDE = 1  # the class overrides eval()
_TRAIN_OVERRIDE = 2  # the class overrides train()
_FLAG_SETTER = 4  # `module.training = flag` runs code (custom __setattr__, a property)
_class_kinds: dict[type, int] = {}


def _class_kind(cls: type) -> int:
    kind = _class_kinds.get(cls)
    if kind is None:
        kind = (
            (_EVAL_OVERRIDE if getattr(cls, "eval", None) is not nn.Module.eval else 0)
            | (_TRAIN_OVERRIDE if getattr(cls, "train", None) is not nn.Module.train else 0)
            | (0 if compat.has_plain_training_attribute(cls) else _FLAG_SETTER)
        )
        _class_kinds[cls] = kind
    return kind


class _TrainStandIn:
    """Stands in for a plain child's ``train`` while its parent's own override runs.

    ``nn.Module.train`` reaches each child through ``child.train(mode)``, looked up on
    the instance. During one call of an overriding ``train()``/``eval()`` (every Hugging
    Face model's), each plain child gets this object in its ``__dict__``, so the
    override's recursion switches the child's subtree with gradfence's own walk (same
    flags, none of ``nn.Module.train``'s per-level cost) instead of level by level. Any
    other thread that calls the child's ``train`` in that window gets the class's own.
    """

    __slots__ = ("action", "module", "thread")

    def __init__(self, module: nn.Module, action: _SubtreeAction) -> None:
        self.module = module
        self.action = action
        self.thread = threading.get_ident()

    def __call__(self, mode: bool = True) -> nn.Module:
        module = self.module
        if threading.get_ident() != self.thread or not isinstance(mode, bool):
            return type(module).train(module, mode)
        self.action(module, mode)
        return module


# What a stand-in does with the subtree of the child it stands in for.
_SubtreeAction = Callable[[nn.Module, bool], None]


def _switch_subtree(module: nn.Module, training: bool) -> None:
    _switch(module, training, as_root=False)


def _instance_train(own: dict[str, Any]) -> bool:
    """True when a module's ``__dict__`` holds its own ``train`` (not our stand-in)."""
    return "train" in own and type(own["train"]) is not _TrainStandIn


def _own_switch(module: nn.Module, kind: int, training: bool, *, as_root: bool) -> int:
    """Which of its own methods ``module`` switches through: 2 eval(), 1 train(), 0 none.

    ``eval()`` only where ``model.eval()`` would call it: on a root switched to eval (the
    recursion of ``nn.Module.train`` calls ``train(False)`` on every child).
    """
    own = module.__dict__
    if as_root and not training and (kind & _EVAL_OVERRIDE or "eval" in own):
        return 2
    if kind & _TRAIN_OVERRIDE or _instance_train(own):
        return 1
    return 0


def _run_override(
    module: nn.Module, training: bool, *, use_eval: bool, action: _SubtreeAction
) -> None:
    """Call ``module.eval()`` or ``module.train(training)``: the module's own switch.

    Its plain children get a :class:`_TrainStandIn` running ``action`` for the call.
    """
    stand_ins: list[tuple[nn.Module, _TrainStandIn]] = []
    if compat.train_recursion_looks_up_instances():
        for child in compat.children(module):
            if child is None or "train" in child.__dict__:
                continue
            if _class_kind(type(child)) & (_TRAIN_OVERRIDE | _FLAG_SETTER):
                continue  # its own code runs anyway: nothing to save
            stand_in = _TrainStandIn(child, action)
            child.__dict__["train"] = stand_in
            stand_ins.append((child, stand_in))
    try:
        if use_eval:
            module.eval()
        else:
            module.train(training)
    finally:
        for child, stand_in in stand_ins:
            if child.__dict__.get("train") is stand_in:
                del child.__dict__["train"]


def _switch(
    root: nn.Module, training: bool, *, as_root: bool, seen: set[int] | None = None
) -> None:
    """Do what ``root.train(training)`` does (``root.eval()`` for a root switched to eval).

    Follows ``nn.Module.train``'s recursion, pre-order: wherever a module says otherwise
    (an override of ``train``, or of ``eval`` on a root, on its class or on the instance)
    its own method is called and owns its subtree; a ``training`` that is a property, or
    a custom ``__setattr__``, gets the assignment; every other module gets its flag
    written directly, and only where it differs. Each module is visited once.
    """
    seen = set() if seen is None else seen
    stack: list[nn.Module | None] = [root]
    pop, extend = stack.pop, stack.extend
    kinds, modules_of = _class_kinds, compat.children_dict
    while stack:
        module = pop()
        if module is None:
            continue
        key = id(module)
        if key in seen:
            continue
        seen.add(key)
        cls = type(module)
        kind = kinds.get(cls)
        if kind is None:
            kind = _class_kind(cls)
        own = module.__dict__
        if kind or "train" in own or "eval" in own:
            how = _own_switch(module, kind, training, as_root=as_root and module is root)
            if how:
                _run_override(module, training, use_eval=how == 2, action=_switch_subtree)
                continue
            if kind & _FLAG_SETTER:
                module.training = training
        if not kind & _FLAG_SETTER and own.get("training") is not training:
            own["training"] = training
        below = modules_of(module)
        if below:
            extend(reversed(below.values()))


def _set_own_mode(
    module: nn.Module,
    training: bool,
    kind: int | None = None,
    action: _SubtreeAction | None = None,
) -> bool:
    """Switch one module to ``training`` through its own switch, where it has one.

    ``eval()`` when switching to eval and it is overridden (on the class or on the
    instance), else an overridden ``train(training)``; otherwise the flag alone. The
    caller fixes up the descendants afterwards. Returns whether an override ran.
    """
    if kind is None:
        kind = _class_kind(type(module))
    how = _own_switch(module, kind, training, as_root=True)
    if how:
        _run_override(module, training, use_eval=how == 2, action=action or _switch_subtree)
    elif kind & _FLAG_SETTER:
        module.training = training
    else:
        compat.write_training(module, training)
    return bool(how)


def _force_flag(module: nn.Module, training: bool) -> None:
    """Last resort after a module's own switch raised: set its flag as plainly as it allows."""
    if _class_kind(type(module)) & _FLAG_SETTER:
        with contextlib.suppress(Exception):
            object.__setattr__(module, "training", training)
    else:
        compat.write_training(module, training)


# --- snapshots of module flags -----------------------------------------------------


_training_of = operator.attrgetter("training")


class ModeSnapshot:
    """Every module reachable from some roots, in pre-order, with its ``training`` flag.

    Modules are keyed by identity, so a module shared by two parents appears once and a
    module renamed or moved inside the tree is still recognised. Besides ``modules``,
    ``index`` (``id(module)`` to position) and ``flags``, it records for each position
    the position just past its subtree (``ends``: the modules first reached through it),
    its registered children (``children``: to tell on exit whether the tree changed) and
    whether it is ``plain`` (nothing on its class or instance overrides the switch, so
    its flag is written directly). One walk, iterative and lean on purpose: it runs at
    every scope entry.
    """

    __slots__ = ("children", "ends", "flags", "index", "modules", "plain", "roots")

    def __init__(self, roots: Iterable[nn.Module]) -> None:
        self.roots = tuple(roots)
        order: list[nn.Module] = []
        index: dict[int, int] = {}
        ends: list[int] = []
        children: list[tuple[nn.Module | None, ...]] = []
        plain: list[bool] = []
        stack: list[nn.Module | int | None] = list(self.roots)
        stack.reverse()
        pop, append, extend = stack.pop, stack.append, stack.extend
        modules_of, kinds = compat.children_dict, _class_kinds
        while stack:
            module = pop()
            if module is None:
                continue
            if type(module) is int:  # the end marker of a subtree
                ends[module] = len(order)
                continue
            key = id(module)
            if key in index:
                continue
            position = len(order)
            index[key] = position
            order.append(module)  # type: ignore[arg-type]
            ends.append(position + 1)
            cls = type(module)
            kind = kinds.get(cls)
            if kind is None:
                kind = _class_kind(cls)
            own = module.__dict__
            plain.append(not (kind or "train" in own or "eval" in own))
            below = tuple(modules_of(module).values())  # type: ignore[arg-type]
            children.append(below)
            if below:
                append(position)
                extend(reversed(below))
        self.modules, self.index, self.ends = order, index, ends
        self.children, self.plain = children, plain
        self.flags: list[bool] = list(map(_training_of, order))  # properties honoured

    def apply(self, training: bool) -> None:
        """Switch the roots to ``training`` exactly as ``root.train(training)`` would.

        ``root.eval()`` when switching to eval. Wherever a module overrides the switch
        (``train``/``eval`` on its class or instance, a ``training`` property), its own
        code runs; every other flag is written directly, and only where it differs.
        Expects the trees as they were when the snapshot was taken.
        """
        done = 0
        for root in self.roots:
            position = self.index[id(root)]
            if position >= done:  # a root inside an earlier root's tree is switched
                self._apply(position, self.ends[position], training, root=position)
                done = self.ends[position]

    def _apply(self, start: int, stop: int, training: bool, *, root: int = -1) -> None:
        modules, ends, plain = self.modules, self.ends, self.plain
        position = start
        while position < stop:
            module = modules[position]
            own = module.__dict__
            if not plain[position]:
                kind = _class_kind(type(module))
                how = _own_switch(module, kind, training, as_root=position == root)
                if how:
                    _run_override(module, training, use_eval=how == 2, action=self._stand_in)
                    position = ends[position]
                    continue
                if kind & _FLAG_SETTER:
                    module.training = training
                    position += 1
                    continue
            if own["training"] is not training:
                own["training"] = training
            position += 1

    def _stand_in(self, module: nn.Module, training: bool) -> None:
        position = self.index.get(id(module))
        if position is None or self.modules[position] is not module:
            _switch(module, training, as_root=False)  # not in the snapshot: walk it
        else:
            self._apply(position, self.ends[position], training)

    def unchanged(self) -> bool:
        """True when every module still has exactly the children it had at the snapshot."""
        # map() chains run in C: this runs at every exit
        now = map(tuple, map(dict.values, map(compat.children_dict, self.modules)))
        return list(now) == self.children

    def restore(self, keep: dict[int, bool] | None = None) -> None:
        """Put every module that is still in the trees back to its recorded flag.

        Follows the trees as they are *now*: modules removed in the meantime are not
        touched, modules added in the meantime keep the flag they have. A module whose
        class (or instance) overrides the switch gets it called with the flag it is
        restored to, and its descendants are then restored to their own flags
        (pre-order), whatever the override did to them. ``keep`` maps ``id(module)`` to a
        flag to hold instead of the recorded one (modules still held by another open
        scope): if an override's recursion flips one of them, it is switched back in the
        same pass. If one module fails to restore, the others are still restored and the
        first error is raised at the end.
        """
        errors: list[BaseException] = []
        if self.unchanged():  # the common case: restore along the recorded order
            self._restore(0, len(self.modules), keep or {}, errors)
        else:
            restorer = _Restorer(self, keep or {}, errors)
            for root in self.roots:
                restorer.walk(root)
            if restorer.overridden:
                restorer.verify()
        if errors:
            _raise_first(errors, "restoring module modes")

    def _restore(
        self, start: int, stop: int, keep: dict[int, bool], errors: list[BaseException]
    ) -> None:
        """Restore positions ``start`` to ``stop``, pre-order; overrides' stand-ins recurse."""
        modules, flags = self.modules, self.flags

        def stand_in(module: nn.Module, mode: bool) -> None:
            position = self.index.get(id(module))
            if position is not None and modules[position] is module:
                self._restore(position, self.ends[position], keep, errors)

        for module, target, is_plain in zip(
            modules[start:stop], flags[start:stop], self.plain[start:stop], strict=True
        ):
            if keep:
                target = keep.get(id(module), target)
            if is_plain:
                own = module.__dict__
                if own["training"] is not target:
                    own["training"] = target
            elif module.training is not target:
                _switch_one(module, _class_kind(type(module)), target, stand_in, errors)


def _switch_one(
    module: nn.Module,
    kind: int,
    target: bool,
    action: _SubtreeAction,
    errors: list[BaseException],
) -> bool:
    """Restore one module through its own switch; on error, record it and force the flag.

    Returns whether an override ran (its recursion may have switched descendants).
    """
    try:
        return _set_own_mode(module, target, kind, action)
    except BaseException as exc:  # keep restoring the rest, raise at the end
        errors.append(exc)
        _force_flag(module, target)
        return True


class _Restorer:
    """:meth:`ModeSnapshot.restore` when the trees changed: a walk of the trees as they are."""

    __slots__ = ("errors", "flags", "index", "keep", "order", "overridden", "seen")

    def __init__(
        self, snapshot: ModeSnapshot, keep: dict[int, bool], errors: list[BaseException]
    ) -> None:
        self.index, self.flags, self.keep = snapshot.index, snapshot.flags, keep
        self.seen: set[int] = set()
        self.order: list[nn.Module] = []
        self.errors = errors
        self.overridden = False

    def target(self, key: int) -> bool | None:
        flag = self.keep.get(key)
        if flag is None:
            position = self.index.get(key)
            if position is not None:
                flag = self.flags[position]
        return flag

    def walk(self, root: nn.Module, mode: bool = True) -> None:
        """Restore ``root``'s subtree, pre-order (also what stand-ins run, ``mode`` unused).

        Where an override runs, its plain children are restored by stand-ins during the
        call (so each module is visited once); every module reached is recorded for
        :meth:`verify`.
        """
        seen, order, kinds, index, flags, keep = (
            self.seen,
            self.order,
            _class_kinds,
            self.index,
            self.flags,
            self.keep,
        )
        stack: list[nn.Module | None] = [root]
        pop, extend = stack.pop, stack.extend
        modules_of = compat.children_dict
        while stack:
            module = pop()
            if module is None:
                continue
            key = id(module)
            if key in seen:
                continue
            seen.add(key)
            order.append(module)
            if keep:
                target = self.target(key)
            else:
                position = index.get(key)
                target = None if position is None else flags[position]
            if target is not None:
                cls = type(module)
                kind = kinds.get(cls)
                if kind is None:
                    kind = _class_kind(cls)
                own = module.__dict__
                if kind or "train" in own or "eval" in own:
                    if module.training is not target and _switch_one(
                        module, kind, target, self.walk, self.errors
                    ):
                        self.overridden = True
                elif own.get("training") is not target:
                    own["training"] = target
            below = modules_of(module)
            if below:
                extend(reversed(below.values()))

    def verify(self) -> None:
        """After overrides ran: whatever their own code switched, put back (pre-order)."""
        for module in self.order:
            target = self.target(id(module))
            if target is not None and module.training is not target:
                try:
                    _set_own_mode(module, target)
                except BaseException as exc:
                    self.errors.append(exc)
                    _force_flag(module, target)


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
        self.guard: Any = None  # the entered torch.inference_mode(), exited on restore
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
        keep: dict[int, bool] = {}
        if _active and next(reversed(_active)) > entry.sequence:
            # Closed out of order: a newer scope recorded *our* in-scope flags as its
            # "before" state. Give it our real "before" state instead, and hold every
            # module it uses at its current flag while we restore the rest: our restore
            # may run a train() override whose recursion reaches them.
            for sequence, newer in _active.items():
                if sequence < entry.sequence or newer.snapshot is None:
                    continue
                target = newer.snapshot
                for key, theirs in target.index.items():
                    if key in keep:
                        continue
                    keep[key] = target.modules[theirs].training
                    position = snapshot.index.get(key)
                    if position is not None:
                        target.flags[theirs] = snapshot.flags[position]
        snapshot.restore(keep)


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
        guard = torch.inference_mode()
        guard.__enter__()
        entry.guard = guard
    else:
        entry.grad_before = torch.is_grad_enabled()
        torch.set_grad_enabled(grad == "enable_grad")  # a plain call applies the mode
    entry.thread_entries = _thread_entries()
    entry.thread_entries.append(entry)


def _undo_grad(entry: _Entry) -> None:
    # Leave inference mode by exiting its guard: entering inference_mode(False)
    # instead would force grad mode ON whatever it was before.
    if entry.guard is not None:
        guard, entry.guard = entry.guard, None
        guard.__exit__(None, None, None)
    elif entry.grad_before is not None:
        torch.set_grad_enabled(entry.grad_before)


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

    __slots__ = ("_awaitable", "_hold", "_scope")

    def __init__(self, scope: Scope, awaitable: Any, *, hold: bool) -> None:
        self._scope = scope
        self._awaitable = awaitable
        self._hold = hold

    def __await__(self) -> Generator[Any, Any, Any]:
        return self._scope._drive(self._awaitable.__await__(), hold=self._hold)


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

    def _enter_grad(self) -> _Entry:
        """A fresh entry holding this scope's grad mode on the calling thread."""
        if self._training and torch.is_inference_mode_enabled():
            raise ScopeError(
                "gf.training() cannot run inside torch.inference_mode(): no autograd graph "
                "can be recorded there, not even under enable_grad(). Leave the "
                "inference_mode block (or use gf.inference(..., mode='no_grad') outside)."
            )
        entry = _Entry()
        _enter_grad(entry, self._grad)
        return entry

    def _enter(self) -> _Entry:
        entry = self._enter_grad()
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

    def _hold_modules(self) -> _Entry | None:
        """Switch and register this scope's modules (no grad mode), or None without any."""
        if not self._modules:
            return None
        held = _Entry()
        _register(held, self._modules, self._training)
        return held

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

    def _drive(self, step: _Resumable, *, hold: bool = True) -> Generator[Any, Any, Any]:
        """Run a resumable (generator, coroutine) inside the scope.

        Module flags are process-global: with ``hold``, they are switched at the first
        resumption and held until the resumable completes, raises or is closed, so work
        it hands to another thread while suspended (``await asyncio.to_thread(model,
        x)``) runs in the scope's mode. Grad mode is thread-local: each resumption
        (send/throw/close) gets it in a fresh entry that is exited before the value goes
        back out, so whoever runs in between keeps its own grad mode.
        """
        held: _Entry | None = None
        value: Any = None
        error: BaseException | None = None
        try:
            while True:
                entry = self._enter_grad()
                try:
                    if hold and held is None:
                        held = self._hold_modules()
                        hold = False
                    out = step.send(value) if error is None else step.throw(error)
                except StopIteration as stop:
                    return stop.value
                finally:
                    _exit_grad(entry)
                error = None
                try:
                    value = yield out
                except GeneratorExit:
                    entry = self._enter_grad()
                    try:
                        step.close()
                    finally:
                        _exit_grad(entry)
                    raise
                except BaseException as exc:
                    value, error = None, exc
        finally:
            if held is not None:
                _unregister(held)

    # decorating ---------------------------------------------------------------------

    def __call__(self, func: F) -> F:
        """Decorate ``func`` so its body runs inside this scope (a fresh entry per call).

        A generator, coroutine or async generator holds the module flags from its first
        resumption to its end and has grad mode set during each of its resumptions.
        """
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
                held = scope._hold_modules()  # runs at the first __anext__
                try:
                    step = agen.asend(None)
                    while True:
                        try:
                            item = await _Stepped(scope, step, hold=False)
                        except StopAsyncIteration:
                            return
                        try:
                            sent = yield item
                        except GeneratorExit:
                            await _Stepped(scope, agen.aclose(), hold=False)
                            raise
                        except BaseException as exc:
                            step = agen.athrow(exc)
                        else:
                            step = agen.asend(sent)
                finally:
                    if held is not None:
                        _unregister(held)

            wrapper = async_gen_wrapper
        elif inspect.iscoroutinefunction(func):

            @functools.wraps(func)
            async def coroutine_wrapper(*args: Any, **kwargs: Any) -> Any:
                return await _Stepped(scope, func(*args, **kwargs), hold=True)

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
