"""Summaries composed along the call graph: what a call does, seen from its caller.

:class:`Analysis` answers, for one linted file, the questions the rules ask:

- :meth:`Analysis.events`: a function's events with every resolvable call replaced by the
  callee's effects, mapped onto the caller's arguments (``validate(model)`` where
  ``validate`` calls ``m.eval()`` is an ``eval`` of ``model`` at the call);
- :meth:`Analysis.effects`: the net effect of a function on its parameters and ``self``
  attributes (final mode, forwards, differentiation, optimiser, detach, store).

Callees are found in the same file (functions, ``self.method``, classes' ``__init__``) and
in the project's own modules (``from .utils import validate``, ``import pkg.trainer``).
Effects are computed on demand and memoised; a cycle in the call graph is iterated until
nothing changes (at most a few rounds: effects only grow).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from gradfence.lint.analysis.project import Project
from gradfence.lint.analysis.summary import CallSite, FunctionSummary, ModuleSummary

Event = tuple[int, int, str, str]
_MODE_KINDS = ("eval", "train", "restore")


@dataclass
class Effects:
    """What a function does to its parameters and ``self`` attributes, callees included."""

    mode: dict[str, str] = field(default_factory=dict)  # target -> last mode set
    # target -> first mode set, when that comes before anything is differentiated
    entry: dict[str, str] = field(default_factory=dict)
    globals_: set[str] = field(default_factory=set)  # module-level names among the targets
    # (kind, target, "param|op|value"): effects only when a parameter has a given value
    guarded: list[tuple[str, str, str]] = field(default_factory=list)
    evals: set[str] = field(default_factory=set)  # set to eval at some point
    forwards: set[str] = field(default_factory=set)  # run with gradients on
    forwards_off: set[str] = field(default_factory=set)  # run under no_grad
    diffs: set[str] = field(default_factory=set)  # differentiated
    differentiates: bool = False
    optim: set[str] = field(default_factory=set)
    detaches: set[str] = field(default_factory=set)
    stores: set[str] = field(default_factory=set)
    keeps: set[str] = field(default_factory=set)  # kept on ``self`` with the graph
    inference_writes: set[str] = field(default_factory=set)  # given inference tensors

    def key(self) -> tuple[object, ...]:
        return (
            tuple(sorted(self.mode.items())),
            tuple(sorted(self.entry.items())),
            len(self.evals),
            len(self.forwards),
            len(self.forwards_off),
            len(self.diffs),
            self.differentiates,
            len(self.optim),
            len(self.detaches),
            len(self.stores),
            len(self.keeps),
            len(self.inference_writes),
            len(self.guarded),
        )


_EMPTY = Effects()
# how far down the call graph effects are followed (the pitfalls are a few calls deep; a
# large library's whole call graph is not needed to judge a training loop)
MAX_DEPTH = 4
MAX_CROSS_DEPTH = 2
FunctionRef = tuple[str, str]  # (module name, function name)


class Analysis:
    """The composed view of one linted file within its project."""

    def __init__(self, summary: ModuleSummary, module: str, project: Project) -> None:
        self.summary = summary
        self.module = module
        self.project = project
        self._effects: dict[FunctionRef, Effects] = {}
        self._events: dict[FunctionRef, list[Event]] = {}
        self._active: set[FunctionRef] = set()
        self._depth: dict[FunctionRef, int] = {}  # how deep in the call graph each was computed
        self._cycle = False

    # -- lookup ---------------------------------------------------------------------------

    def _summary_of(self, module: str) -> ModuleSummary | None:
        if module == self.module:
            return self.summary
        return self.project.module(module)

    def function(self, name: str, module: str | None = None) -> FunctionSummary | None:
        summary = self._summary_of(module or self.module)
        return None if summary is None else summary.functions.get(name)

    def resolve(self, site: CallSite, module: str, caller: str) -> FunctionRef | None:
        """The function a call site calls, if the analysis can see it."""
        summary = self._summary_of(module)
        if summary is None:
            return None
        callee = site.callee
        if callee.startswith(("self.", "cls.")):
            cls = caller.rpartition(".")[0]
            while cls and cls not in summary.bases:
                cls = cls.rpartition(".")[0]  # a closure inside a method: the method's class
            return self._method(module, cls, callee.split(".", 1)[1], 0) if cls else None
        if callee.startswith("qual:"):
            return self._qual(callee[5:])
        if callee.startswith("method:"):
            return None
        prefix = caller.rpartition(".")[0]
        while True:  # nested functions see their enclosing function's names
            name = f"{prefix}.{callee}" if prefix else callee
            if name in summary.functions:
                return (module, name)
            if name in summary.bases:
                return self._method(module, name, "__init__", 0)
            if not prefix:
                break
            prefix = prefix.rpartition(".")[0]
        qual = summary.imports.get(callee)
        return self._qual(qual) if qual is not None else None

    def _qual(self, qual: str) -> FunctionRef | None:
        found = self.project.resolve(qual)
        if found is None:
            return None
        module, summary, name = found
        if name in summary.functions:
            return (module, name)
        if name in summary.bases:
            return self._method(module, name, "__init__", 0)
        return None

    def _method(self, module: str, cls: str, name: str, depth: int) -> FunctionRef | None:
        summary = self._summary_of(module)
        if summary is None or depth > 4:
            return None
        if f"{cls}.{name}" in summary.functions:
            return (module, f"{cls}.{name}")
        for base in summary.bases.get(cls, ()):
            if base in summary.bases:
                found = self._method(module, base, name, depth + 1)
            else:
                qual = summary.imports.get(base.split(".", 1)[0])
                if qual is None:
                    continue
                qual = qual + base[len(base.split(".", 1)[0]) :]
                where = self.project.resolve(qual)
                if where is None:
                    continue
                found = self._method(where[0], where[2], name, depth + 1)
            if found is not None:
                return found
        return None

    def instance_class(self, caller: str, name: str) -> tuple[str, str] | str | None:
        """The class ``name`` (a local or ``self.x``) is bound to an instance of, seen from
        the function ``caller``: ``(module, class)`` for a project class, ``"builtin"`` for
        a list, dict, set or deque, ``"foreign"`` for a class outside the project (or one
        the analysis cannot find), None when no binding is visible."""
        summary = self.summary
        scopes: list[tuple[str, str]] = []
        if name.startswith("self."):
            cls = caller.rpartition(".")[0]
            while cls and cls not in summary.bases:
                cls = cls.rpartition(".")[0]
            if not cls:
                return None
            for module, owner in self._classes(self.module, cls, 0):
                owned = self._summary_of(module)
                if owned is not None:
                    prefix = owner + "."
                    scopes += [(module, f) for f in owned.functions if f.startswith(prefix)]
        else:
            scopes = [(self.module, caller)]
        for module, function_name in scopes:
            function = self.function(function_name, module)
            ref = function.instances.get(name) if function is not None else None
            if ref is None:
                continue
            if ref.startswith("builtin:"):
                return "builtin"
            found = self._class_of(ref, module)
            return found if found is not None else "foreign"
        return None

    def is_module_class(self, cls: tuple[str, str]) -> bool:
        """``cls`` derives from ``torch.nn.Module`` (or Lightning's), through project base
        classes in any module of the project."""
        for module, name in self._classes(cls[0], cls[1], 0):
            summary = self._summary_of(module)
            for base in summary.bases.get(name, ()) if summary is not None else ():
                head, _, rest = base.partition(".")
                qual = summary.imports.get(head) if summary is not None else None
                full = f"{qual}.{rest}" if qual and rest else qual
                if full and (full.startswith("torch.nn.") or full.endswith(".LightningModule")):
                    return True
        return False

    def overridden(self, method: str) -> FunctionRef | None:
        """The method of a project base class that ``Class.method`` (of the linted file)
        overrides, in this module or another."""
        cls = self.class_of(method)
        if cls is None:
            return None
        name = method[len(cls[1]) + 1 :]
        for module, base in self._classes(cls[0], cls[1], 0)[1:]:
            found = self._method(module, base, name, 0)
            if found is not None:
                return found
        return None

    def class_of(self, caller: str) -> tuple[str, str] | None:
        """The class whose method (or a closure in one) ``caller`` is, in the linted file."""
        cls = caller.rpartition(".")[0]
        while cls and cls not in self.summary.bases:
            cls = cls.rpartition(".")[0]
        return (self.module, cls) if cls else None

    def _classes(self, module: str, cls: str, depth: int) -> list[tuple[str, str]]:
        """``cls`` and its project base classes, as ``(module, class)``."""
        summary = self._summary_of(module)
        if summary is None or depth > 4:
            return []
        found = [(module, cls)]
        for base in summary.bases.get(cls, ()):
            where = self._class_of(base, module)
            if where is not None:
                found += self._classes(where[0], where[1], depth + 1)
        return found

    def _class_of(self, ref: str, module: str) -> tuple[str, str] | None:
        """A class named as a call site names it (``Name``, ``qual:pkg.mod.Name``, a dotted
        base ``mod.Name``), if the project defines it."""
        summary = self._summary_of(module)
        if summary is None:
            return None
        if ref.startswith("qual:"):
            qual: str | None = ref[5:]
        elif ref in summary.bases:
            return (module, ref)
        else:
            head, _, rest = ref.partition(".")
            qual = summary.imports.get(head)
            if qual is not None and rest:
                qual = f"{qual}.{rest}"
        for _ in range(4):  # ``pkg/__init__.py`` re-exports ``from .net import NeuralNet``
            if qual is None:
                return None
            found = self.project.resolve(qual)
            if found is None:
                return None
            if found[2] in found[1].bases:
                return (found[0], found[2])
            qual = found[1].imports.get(found[2])
        return None

    def returned_losses(self, site: CallSite, module: str, caller: str) -> set[int]:
        """What a call gives back that its callee differentiated (``return loss`` after
        ``loss.backward()``): ``-1`` for the whole value, ``i`` for element ``i`` of a tuple."""
        ref = self.resolve(site, module, caller)
        if ref is None:
            return set()
        items = self.events(ref[1], ref[0])
        differentiated = {t for _, _, kind, t in items if kind == "diff" and t}
        found: set[int] = set()
        for _, _, kind, target in items:
            if kind == "return":
                index, _, name = target.partition(":")
                if name in differentiated:
                    found.add(-1 if index == "-" else int(index))
        return found

    def kept_arguments(self, cls: tuple[str, str], method: str) -> list[str] | None:
        """The parameters (in order, ``self`` left out) of ``cls.method`` that it keeps on
        the object with their graph; None when the method cannot be found."""
        ref = self._method(cls[0], cls[1], method, 0)
        function = self.function(ref[1], ref[0]) if ref is not None else None
        if ref is None or function is None:
            return None
        effects = self.effects(ref[1], ref[0])
        kept = effects.keeps - effects.detaches
        return [p if p in kept else "" for p in function.params]

    # -- composition ----------------------------------------------------------------------

    def events(self, name: str, module: str | None = None) -> list[Event]:
        """The function's events, with resolvable calls replaced by their effects (an event
        under ``if <parameter>:`` counts: inside the function the value is not known)."""
        return [
            (line, col, kind.split("|", 1)[0], target)
            for line, col, kind, target in self._raw_events(name, module)
        ]

    def _raw_events(self, name: str, module: str | None = None) -> list[Event]:
        module = module or self.module
        ref = (module, name)
        cached = self._events.get(ref)
        if cached is not None:
            return cached
        function = self.function(name, module)
        if function is None:
            return []
        found = sorted(function.events, key=_order)
        deep = len(self._active) >= MAX_DEPTH  # callees this far down are not followed
        for site in function.calls:
            if deep:
                break
            target = self.resolve(site, module, name)
            if target is None or target == ref:
                continue
            if target[0] != module and len(self._active) >= MAX_CROSS_DEPTH:
                continue
            callee = self.function(target[1], target[0])
            if callee is None:
                continue
            effects = self.effects(target[1], target[0])
            found.extend(_mapped(site, callee, effects, target[0] == module))
        found.sort(key=lambda event: (event[0], event[1]))  # stable: a call's order kept
        if not self._active:
            self._events[ref] = found
        return found

    def effects(self, name: str, module: str | None = None) -> Effects:
        """Net effects of a function on its parameters and ``self`` attributes."""
        module = module or self.module
        ref = (module, name)
        if ref in self._active:
            self._cycle = True
            return self._effects.get(ref, _EMPTY)
        depth = len(self._active)
        if ref in self._effects and self._depth.get(ref, 0) <= depth and not self._cycle:
            return self._effects[ref]  # computed with at least this much depth to spare
        top = not self._active
        for _ in range(4 if top else 1):
            self._cycle = False
            self._active.add(ref)
            try:
                result = self._compute(ref)
            finally:
                self._active.discard(ref)
            previous = self._effects.get(ref)
            self._effects[ref] = result
            self._depth[ref] = depth
            if not top or not self._cycle or (previous and previous.key() == result.key()):
                break
        return self._effects[ref]

    def _compute(self, ref: FunctionRef) -> Effects:
        function = self.function(ref[1], ref[0])
        if function is None:
            return Effects()
        exported = set(function.params) | set(function.kwonly)
        owner = self._summary_of(ref[0])
        module_level = owner.functions.get("<module>") if owner is not None else None
        shared = set(module_level.bound) if module_level is not None else set()
        shared -= set(function.bound) | exported
        if ref[1] == "<module>":
            shared = set()
        result = Effects()
        for _, _, kind, target in self._raw_events(ref[1], ref[0]):
            if "|" in kind:
                kind, guard = kind.split("|", 1)
                if not target or _exported(target, exported):
                    result.guarded.append((kind, target, guard))
                continue
            if kind == "diff":
                result.differentiates = True
            if not target:
                continue
            head = target.split(".", 1)[0]
            if head in shared:
                result.globals_.add(head)
            elif not _exported(target, exported):
                continue
            if kind in _MODE_KINDS:
                if target not in result.mode and not result.differentiates:
                    result.entry[target] = kind
                result.mode[target] = kind
                if kind == "eval":
                    result.evals.add(target)
            elif kind == "forward":
                result.forwards.add(target)
            elif kind == "forward_off":
                result.forwards_off.add(target)
            elif kind == "diff":
                result.diffs.add(target)
            elif kind == "optim":
                result.optim.add(target)
            elif kind == "detach":
                result.detaches.add(target)
            elif kind == "store":
                result.stores.add(target)
            elif kind == "keep":
                result.keeps.add(target)
            elif kind == "inference_write":
                result.inference_writes.add(target)
        if function.grad_off:
            result.forwards_off |= result.forwards
            result.forwards = set()
        return result


_RANK = {"built": 0, "bound_call": 0, "opaque": 0, "loaded": 0}
_RANK.update({"eval": 1, "train": 1, "restore": 1, "frozen": 1})


def _order(event: Event) -> tuple[int, int, int, str, str]:
    """Position order; at one position (a call's effects) mode switches come first."""
    return (event[0], event[1], _RANK.get(event[2], 2), event[2], event[3])


def _exported(target: str, params: set[str]) -> bool:
    head = target.split(".", 1)[0]
    return head in params or head == "self"


def _mapped(
    site: CallSite, callee: FunctionSummary, effects: Effects, same_module: bool
) -> list[Event]:
    """The callee's effects as events of the caller, at the call's position, in the order
    the callee has them: modes set on entry, then forwards and differentiation, then the
    modes it leaves behind."""
    mapping: dict[str, str] = {}
    for index, param in enumerate(callee.params):
        if index < len(site.args):
            arg = site.args[index]
            if arg is not None:
                mapping[param] = arg
    for param in (*callee.params, *callee.kwonly):
        if param in site.kwargs:
            mapping[param] = site.kwargs[param]
    if site.callee.startswith(("self.", "cls.")):
        mapping["self"] = "self"
    elif site.receiver is not None:
        mapping["self"] = site.receiver
    if same_module:
        for name in effects.globals_:
            mapping.setdefault(name, name)

    def onto(target: str) -> list[str]:
        head, dot, rest = target.partition(".")
        base = mapping.get(head)
        if base is None:
            return []
        return [f"{one}{dot}{rest}" for one in base.split(",")]  # a list literal: each

    out: list[Event] = []
    at = (site.line, site.col)
    for target, kind in effects.entry.items():
        out.extend((*at, kind, mapped) for mapped in onto(target))
    for kind, targets in (
        ("forward_off" if site.grad_off else "forward", effects.forwards),
        ("forward_off", effects.forwards_off),
        ("optim", effects.optim),
        ("detach", effects.detaches),
        ("store", effects.stores),
        ("keep", effects.keeps),
        ("inference_write", effects.inference_writes),
        ("diff", effects.diffs),
    ):
        for target in targets:
            out.extend((*at, kind, mapped) for mapped in onto(target))
    if effects.differentiates:
        out.append((*at, "diff", ""))
    for target, kind in effects.mode.items():
        out.extend((*at, kind, mapped) for mapped in onto(target))
    for kind, target, guard in effects.guarded:
        holds = _holds(guard, site, callee)
        if holds is False:
            continue  # ``run_epoch(model, loader, train=False)``: not this branch
        if holds is None and kind in {"eval", "train"}:
            kind = "restore"  # depends on a value the call does not fix: mode unknown
        out.extend((*at, kind, mapped) for mapped in (onto(target) if target else [""]))
    return out


def _holds(guard: str, site: CallSite, callee: FunctionSummary) -> bool | None:
    """Whether ``param|op|value`` holds for this call (None: the call does not say)."""
    param, op, expected = guard.split("|", 2)
    given: object = _MISSING
    if param in site.consts:
        given = site.consts[param]
    elif param in callee.params and str(callee.params.index(param)) in site.consts:
        given = site.consts[str(callee.params.index(param))]
    elif param in site.kwargs or (
        param in callee.params and callee.params.index(param) < len(site.args)
    ):
        return None  # passed, but not as a constant
    elif param in callee.defaults:
        given = callee.defaults[param]
    if given is _MISSING:
        return None
    if op == "truthy":
        return bool(given) == (expected == "true")
    same = json.dumps(given) == expected
    return same if op == "eq" else not same


_MISSING = object()
