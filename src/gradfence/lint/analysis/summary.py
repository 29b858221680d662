"""Per-function summaries: what a function does to its parameters, ``self`` and its locals.

One pass over a module's functions (the binder, in pyright's terms) records, per function,
position-ordered *events* on *targets* and the *call sites* whose effects depend on other
functions:

- ``eval`` / ``train`` / ``restore``: the target module's mode is set (``restore`` is
  ``m.train(flag)`` with a flag the analysis cannot read);
- ``forward`` / ``forward_off``: the target module is run with gradients on, or under
  ``no_grad`` / ``inference_mode``;
- ``diff``: the target is differentiated (``.backward()``, ``torch.autograd.grad``,
  ``accelerator.backward(x)``, ``scaler.scale(x).backward()``); the empty target means
  "something" was differentiated;
- ``optim``: the target's parameters reach an optimiser;
- ``detach``: the target is detached or turned into a number;
- ``store``: the target is kept in a long-lived sink (``self.x``, ``self.x.append``);
- ``return``: the function returns a name, target ``"-:name"`` (the whole value) or
  ``"i:name"`` (element ``i`` of a returned tuple);
- ``inference_write``: under ``inference_mode``, the target gets a new tensor or module
  (``m.fc = nn.Linear(...)``, ``m.fc.weight.data = t``, ``self.cache = t``,
  ``m.resize_token_embeddings(n)``): inference tensors that outlive the region;
- ``clear``: gradients are cleared (``optimizer.zero_grad()``, ``model.zero_grad()``);
- ``keep``: a method keeps the value of a parameter on ``self`` with its graph (stored,
  accumulated or appended, never detached: :func:`~gradfence.lint.analysis.graphs.kept_parameters`);
- ``opaque``: the target is bound to something whose mode the analysis cannot see (the
  result of a call it cannot resolve, ``torch.jit.trace``/``script``, ``copy.deepcopy``,
  a ``self`` attribute injected through ``__init__``).

Targets are canonical: ``model = model.to(device)``, ``.cuda()``, ``.half()``,
``nn.DataParallel(model)``, ``DistributedDataParallel(model)``, ``torch.compile(model)`` and
``wrapper.module`` all name the module they wrap (module identity). A summary holds only
plain data, so it can be cached by the file's content hash and combined with the
summaries of other files later (:mod:`gradfence.lint.analysis.effects`).
"""

from __future__ import annotations

import ast
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from gradfence.lint.analysis.graphs import kept_parameters, plain_value
from gradfence.lint.imports import ImportMap, dotted
from gradfence.lint.model import child_fields
from gradfence.lint.scopes import GradState, mode_of_context, mode_of_set_call

# methods that return the module they are called on
RETURNS_SELF = frozenset(
    {"to", "cuda", "cpu", "float", "half", "double", "bfloat16", "type", "train", "eval"}
    | {"requires_grad_", "share_memory", "to_empty", "xpu", "mps"}
)
# wrappers whose mode is the wrapped module's
WRAPPERS = frozenset(
    {
        "torch.nn.DataParallel",
        "torch.nn.parallel.DataParallel",
        "torch.nn.parallel.DistributedDataParallel",
        "torch.nn.DistributedDataParallel",
        "torch.nn.parallel.distributed.DistributedDataParallel",
        "torch.compile",
        "torch.distributed.fsdp.FullyShardedDataParallel",
    }
)
_WRAPPER_LASTS = frozenset(
    {"DataParallel", "DistributedDataParallel", "DDP", "FullyShardedDataParallel", "FSDP"}
)
# whose result's mode the analysis cannot see
OPAQUE_CALLS = frozenset(
    {
        "torch.jit.trace",
        "torch.jit.script",
        "torch.jit.load",
        "torch.jit.freeze",
        "copy.deepcopy",
        "copy.copy",
        "torch.export.export",
    }
)
# a pickled module comes back in the mode it was saved in: unknown, unless the file shows
LOADERS = frozenset({"torch.load"})
DIFF_FUNCS = frozenset({"torch.autograd.grad", "torch.autograd.backward"})
_CLEARS_GRADIENTS = frozenset({"zero_grad", "zero_grads", "clear_grad", "clear_gradients"})
# methods that give a module new parameters or buffers
_NEW_TENSORS = frozenset(
    {"resize_token_embeddings", "register_buffer", "register_parameter", "add_module"}
)
_DETACHERS = frozenset({"detach", "item", "tolist", "numpy", "cpu_numpy"})
_MODES = frozenset({"eval", "train", "restore", "built", "bound_call", "opaque", "loaded"})
_NUMBER_FUNCS = frozenset({"float", "int", "round"})
# methods of a module (or of anything) that do not run its forward
_NOT_FORWARDS = RETURNS_SELF | frozenset(
    {
        "parameters",
        "named_parameters",
        "buffers",
        "modules",
        "children",
        "state_dict",
        "load_state_dict",
        "zero_grad",
        "step",
        "apply",
        "register_forward_hook",
        "register_buffer",
        "size",
        "dim",
    }
)
# containers that keep what is put in them (instances of these are never project classes)
_CONTAINER_LITERALS: dict[type, str] = {
    ast.List: "builtin:list",
    ast.Dict: "builtin:dict",
    ast.Set: "builtin:set",
    ast.ListComp: "builtin:list",
    ast.DictComp: "builtin:dict",
}
_CONTAINER_CALLS = frozenset({"list", "dict", "set", "deque", "defaultdict", "OrderedDict"})
_CONTAINER_QUALS = frozenset(
    {"collections.deque", "collections.defaultdict", "collections.OrderedDict"}
)
_OPTIMISER_HINT = ("optim", "SGD", "Adam", "RMSprop", "Lamb", "LARS", "Lion", "Adagrad")


@dataclass
class CallSite:
    """A call whose effects come from another function's summary."""

    line: int
    col: int
    # "name" (a function of the module or an import), "self.method", or "qual:pkg.mod.f"
    callee: str
    args: list[str | None]
    kwargs: dict[str, str]
    grad_off: bool
    receiver: str | None = None
    # constant arguments: "0", "1"... for positions, names for keywords
    consts: dict[str, Any] = field(default_factory=dict)

    def as_data(self) -> list[Any]:
        return [
            self.line,
            self.col,
            self.callee,
            self.args,
            self.kwargs,
            self.grad_off,
            self.receiver,
            self.consts,
        ]

    @classmethod
    def from_data(cls, data: list[Any]) -> CallSite:
        return cls(*data)


@dataclass
class FunctionSummary:
    """What one function does, before its callees are taken into account."""

    name: str  # "f", "Class.method", "<module>"
    params: list[str]
    grad_off: bool  # decorated with no_grad / inference_mode (or gradfence.inference)
    events: list[tuple[int, int, str, str]] = field(default_factory=list)
    calls: list[CallSite] = field(default_factory=list)
    kwonly: list[str] = field(default_factory=list)
    bound: list[str] = field(default_factory=list)  # names the body binds (its locals)
    defaults: dict[str, Any] = field(default_factory=dict)  # constant parameter defaults
    # name or ``self.x`` -> the class it is an instance of, as a call site names it
    # (``"AverageMeter"``, ``"qual:pkg.misc.AverageMeter"``, ``"builtin:list"``)
    instances: dict[str, str] = field(default_factory=dict)

    def as_data(self) -> list[Any]:
        return [
            self.name,
            self.params,
            self.grad_off,
            [list(e) for e in self.events],
            [c.as_data() for c in self.calls],
            self.kwonly,
            sorted(set(self.bound)),
            self.defaults,
            self.instances,
        ]

    @classmethod
    def from_data(cls, data: list[Any]) -> FunctionSummary:
        name, params, grad_off, events, calls, kwonly, bound, defaults, instances = data
        return cls(
            name,
            list(params),
            bool(grad_off),
            [(int(a), int(b), str(c), str(d)) for a, b, c, d in events],
            [CallSite.from_data(c) for c in calls],
            list(kwonly),
            list(bound),
            dict(defaults),
            dict(instances),
        )


@dataclass
class ModuleSummary:
    """Summaries of every function of one file, and what its imports bind."""

    functions: dict[str, FunctionSummary]
    imports: dict[str, str]  # local name -> qualified name (relative imports resolved)
    bases: dict[str, list[str]]  # class -> base names as written (dotted)
    differentiates_: bool  # the file differentiates anything at all
    # summarised lazily: whether the text may differentiate (then functions are asked)
    lazy_differentiates: bool | None = None

    @property
    def differentiates(self) -> bool:
        """Whether any function of the file differentiates anything."""
        if self.lazy_differentiates is not None:
            functions = self.functions
            if self.lazy_differentiates and isinstance(functions, LazyFunctions):
                functions.complete()
            self.differentiates_ = self.lazy_differentiates and any(
                e[2].split("|", 1)[0] == "diff" for f in functions.values() for e in f.events
            )
            self.lazy_differentiates = None
        return self.differentiates_

    def as_data(self) -> dict[str, Any]:
        functions = self.functions
        if isinstance(functions, LazyFunctions):
            functions.complete()
        return {
            "functions": {k: v.as_data() for k, v in functions.items()},
            "imports": self.imports,
            "bases": self.bases,
            "differentiates": self.differentiates,
        }

    @classmethod
    def from_data(cls, data: dict[str, Any]) -> ModuleSummary:
        return cls(
            {k: FunctionSummary.from_data(v) for k, v in data["functions"].items()},
            dict(data["imports"]),
            {k: list(v) for k, v in data["bases"].items()},
            bool(data["differentiates"]),
        )


def module_imports(tree: ast.Module, package: str | None) -> tuple[ImportMap, dict[str, str]]:
    """The file's import bindings: an :class:`ImportMap` for absolute names and a mapping
    that also resolves relative imports against ``package`` (``from .utils import f``)."""
    imports = ImportMap()
    bound: dict[str, str] = {}
    for node in _statements(tree.body):
        if isinstance(node, ast.Import):
            imports.add(node)
            for alias in node.names:
                if alias.asname is not None:
                    bound[alias.asname] = alias.name
                else:
                    top = alias.name.split(".", 1)[0]
                    bound.setdefault(top, top)
        elif isinstance(node, ast.ImportFrom):
            imports.add(node)
            base = _absolute(node, package)
            if base is None:
                continue
            for alias in node.names:
                if alias.name != "*":
                    local = alias.asname or alias.name
                    bound[local] = f"{base}.{alias.name}" if base else alias.name
    return imports, bound


def _statements(body: list[ast.stmt]) -> Iterator[ast.stmt]:
    """Every statement, nested blocks included, without descending into expressions (an
    import can only be a statement: this is much cheaper than ``ast.walk``)."""
    stack = list(reversed(body))
    while stack:
        node = stack.pop()
        yield node
        for name in ("body", "orelse", "finalbody", "handlers", "cases"):
            block = getattr(node, name, None)
            if block:
                stack.extend(reversed(block))


def _absolute(node: ast.ImportFrom, package: str | None) -> str | None:
    if not node.level:
        return node.module
    if package is None:
        return None
    parts = package.split(".") if package else []
    if node.level - 1 > len(parts):
        return None
    parts = parts[: len(parts) - (node.level - 1)]
    if node.module:
        parts.append(node.module)
    return ".".join(parts)


def _params(
    node: ast.FunctionDef | ast.AsyncFunctionDef, method: bool
) -> tuple[list[str], list[str]]:
    args = node.args
    positional = [a.arg for a in (*args.posonlyargs, *args.args)]
    static = any(dotted(d) == "staticmethod" for d in node.decorator_list)
    if method and positional and not static:
        positional = positional[1:]
    return positional, [a.arg for a in args.kwonlyargs]


class _Binder:
    """Walks one function body and records its summary."""

    def __init__(
        self,
        summary: FunctionSummary,
        imports: ImportMap,
        local_functions: set[str],
        in_class: bool,
        entry: GradState | None = None,
    ) -> None:
        self.summary = summary
        self.imports = imports
        self.local_functions = local_functions
        self.in_class = in_class
        self.aliases: dict[str, str] = {}
        self.volatile: set[str] = set()  # names bound to ``Variable(..., volatile=True)``
        self.inference_names: set[str] = set()  # names bound to tensors of inference_mode
        self.guard: str | None = None  # "param|op|json value" of the enclosing ``if``
        self.grad = entry or (GradState.DISABLED if summary.grad_off else GradState.DEFAULT)

    # -- identity -----------------------------------------------------------------------

    def target(self, node: ast.expr | None) -> str | None:
        """The canonical module/value a chain names: ``m.to(d).cuda()`` -> ``m``,
        ``dp.module`` -> what ``dp`` wraps, ``x`` -> what ``x`` aliases."""
        while node is not None:
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr in RETURNS_SELF
            ):
                node = node.func.value
                continue
            if isinstance(node, ast.Call) and self._wrapper(node) and node.args:
                node = node.args[0]
                continue
            if isinstance(node, ast.Attribute) and node.attr == "module":
                inner = self.target(node.value)
                return inner
            if isinstance(node, ast.Subscript):
                node = node.value  # ``self.models[key]``: an element of the container
                continue
            break
        if node is None:
            return None
        text = dotted(node)
        if text is None:
            return None
        seen = 0
        while text in self.aliases and seen < 8:
            text = self.aliases[text]
            seen += 1
        head, _, rest = text.partition(".")
        if rest and head in self.aliases and head != "self":
            text = f"{self.aliases[head]}.{rest}"
        return text

    def _wrapper(self, call: ast.Call) -> bool:
        qual = self.imports.resolve(call.func)
        if qual is not None:
            return qual in WRAPPERS
        last = dotted(call.func)
        return last is not None and last.rsplit(".", 1)[-1] in _WRAPPER_LASTS

    # -- walking ------------------------------------------------------------------------

    def event(self, node: ast.AST, kind: str, target: str) -> None:
        if self.guard is not None:
            kind = f"{kind}|{self.guard}"  # only when a parameter has a given value
        self.summary.events.append(
            (getattr(node, "lineno", 0), getattr(node, "col_offset", 0), kind, target)
        )

    def _guard_of(self, test: ast.expr) -> tuple[str, str] | None:
        """``(when true, when false)`` guards for ``if train:``, ``if not eval:``,
        ``if mode == "train":``, ``if optimizer is not None:`` on a parameter."""
        negate = False
        if isinstance(test, ast.UnaryOp) and isinstance(test.op, ast.Not):
            test, negate = test.operand, True
        params = self.summary.params + self.summary.kwonly
        if isinstance(test, ast.Name) and test.id in params:
            yes, no = f"{test.id}|truthy|true", f"{test.id}|truthy|false"
        elif (
            isinstance(test, ast.Compare)
            and isinstance(test.left, ast.Name)
            and test.left.id in params
            and len(test.ops) == 1
            and isinstance(test.comparators[0], ast.Constant)
            and isinstance(test.ops[0], ast.Eq | ast.NotEq | ast.Is | ast.IsNot)
        ):
            value = json.dumps(test.comparators[0].value)
            yes, no = f"{test.left.id}|eq|{value}", f"{test.left.id}|ne|{value}"
            if isinstance(test.ops[0], ast.NotEq | ast.IsNot):
                yes, no = no, yes
        else:
            return None
        return (no, yes) if negate else (yes, no)

    def block(self, body: list[ast.stmt]) -> None:
        for stmt in body:
            self.stmt(stmt)

    def stmt(self, node: ast.stmt) -> None:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            return  # summarised on their own
        if isinstance(node, ast.Return) and node.value is not None:
            self._returns(node, node.value)
        if isinstance(node, ast.With | ast.AsyncWith):
            saved = self.grad
            for item in node.items:
                self.expr(item.context_expr)
                mode = mode_of_context(item.context_expr, self.imports)
                if mode is not None:
                    self.grad = mode
            self.block(node.body)
            self.grad = saved
            return
        if isinstance(node, ast.Expr) and isinstance(node.value, ast.Call):
            value = node.value
            mode = mode_of_set_call(value, self.imports)
            if (
                mode is None
                and isinstance(value.func, ast.Attribute)
                and value.func.attr == "__enter__"
            ):
                mode = mode_of_context(value.func.value, self.imports)  # no_grad().__enter__()
            if mode is not None:
                self.grad = mode
            if (
                isinstance(value.func, ast.Attribute)
                and value.func.attr == "requires_grad_"
                and value.args
                and isinstance(value.args[0], ast.Constant)
                and value.args[0].value in (False, 0)
            ):
                frozen = self.target(value.func.value)
                if frozen is not None:
                    self.event(value, "frozen", frozen)
        if isinstance(node, ast.Assign | ast.AnnAssign | ast.AugAssign):
            if node.value is not None:
                self.expr(node.value)
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            self._inference_values(node, list(targets))
            if node.value is not None and not isinstance(node, ast.AugAssign):
                for target in targets:
                    self.bind(target, node.value, node)
                    self._volatile(target, node.value)
            return
        if isinstance(node, ast.For | ast.AsyncFor):
            self.expr(node.iter)
            self._freezes(node)
            element = node.iter
            if (
                isinstance(element, ast.Call)
                and isinstance(element.func, ast.Attribute)
                and element.func.attr in {"values", "children", "modules"}
            ):
                element = element.func.value  # ``for m in self.models.values():``
            container = (
                self.target(element) if isinstance(element, ast.Name | ast.Attribute) else None
            )
            if isinstance(node.target, ast.Name) and container is not None:
                self.aliases[node.target.id] = container  # an element stands for its container
            for name in _bound_names(node.target):
                self.summary.bound.append(name)
            self.block(node.body)
            self.block(node.orelse)
            return
        if isinstance(node, ast.If) and self.guard is None:
            guards = self._guard_of(node.test)
            if guards is not None:
                self.expr(node.test)
                for guard, branch in zip(guards, (node.body, node.orelse), strict=True):
                    self.guard = guard
                    self.block(branch)
                self.guard = None
                return
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.expr):
                self.expr(child)
        for name in ("body", "orelse", "finalbody"):
            block = getattr(node, name, None)
            if isinstance(block, list):
                self.block([s for s in block if isinstance(s, ast.stmt)])
        for handler in getattr(node, "handlers", ()) or ():
            self.block(handler.body)
        for case in getattr(node, "cases", ()) or ():
            self.block(case.body)

    def _inference_values(
        self, node: ast.Assign | ast.AnnAssign | ast.AugAssign, targets: list[ast.expr]
    ) -> None:
        """Attributes given a tensor made under inference_mode: assigned inside the region,
        or assigned later from a name bound inside it (``w`` or ``nn.Parameter(w)``)."""
        value = node.value
        inside = self.grad is GradState.INFERENCE
        if inside:
            carries = not plain_value(value)
        else:
            if isinstance(value, ast.Call) and (dotted(value.func) or "").endswith("Parameter"):
                value = value.args[0] if value.args else None
            carries = isinstance(value, ast.Name) and value.id in self.inference_names
        for target in targets:
            if isinstance(target, ast.Name) and not isinstance(node, ast.AugAssign):
                if inside and not plain_value(node.value):
                    self.inference_names.add(target.id)
                else:
                    self.inference_names.discard(target.id)
            elif isinstance(target, ast.Attribute) and carries:
                written = self.target(target)
                if written is not None:
                    self.event(node, "inference_write", written)

    def _returns(self, node: ast.Return, value: ast.expr) -> None:
        """``return loss`` / ``return loss, n``: which names the caller gets back."""
        items = list(enumerate(value.elts)) if isinstance(value, ast.Tuple) else [(-1, value)]
        for index, item in items:
            if isinstance(item, ast.Name):
                name = self.target(item) or item.id
                self.event(node, "return", f"{'-' if index < 0 else index}:{name}")

    def _volatile(self, target: ast.expr, value: ast.expr) -> None:
        """``x = Variable(x, volatile=True)`` (torch < 0.4): what runs on ``x`` records no
        graph, as under ``no_grad``."""
        if isinstance(target, ast.Tuple | ast.List) and isinstance(value, ast.Tuple | ast.List):
            for inner, item in zip(target.elts, value.elts, strict=False):
                self._volatile(inner, item)
            return
        if not isinstance(target, ast.Name):
            return
        if (
            isinstance(value, ast.Call)
            and (dotted(value.func) or "").rsplit(".", 1)[-1] == "Variable"
            and any(
                k.arg == "volatile" and isinstance(k.value, ast.Constant) and k.value.value
                for k in value.keywords
            )
        ):
            self.volatile.add(target.id)
        else:
            self.volatile.discard(target.id)

    def _freezes(self, node: ast.For | ast.AsyncFor) -> None:
        """``for p in model.parameters(): p.requires_grad = False``: ``model`` is frozen."""
        owner = _parameters_owner(node.iter)
        if owner is None or not isinstance(node.target, ast.Name):
            return
        variable = node.target.id
        for stmt in node.body:
            if (
                isinstance(stmt, ast.Assign)
                and isinstance(stmt.value, ast.Constant)
                and stmt.value.value in (False, 0)
                and any(
                    isinstance(t, ast.Attribute)
                    and t.attr == "requires_grad"
                    and isinstance(t.value, ast.Name)
                    and t.value.id == variable
                    for t in stmt.targets
                )
            ):
                frozen = self.target(owner)
                if frozen is not None:
                    self.event(node, "frozen", frozen)
                return

    def bind(self, target: ast.expr, value: ast.expr, node: ast.stmt) -> None:
        for bound in _bound_names(target):
            self.summary.bound.append(bound)
        name = dotted(target)
        if name is None:
            return
        self.aliases.pop(name, None)
        source = None
        if isinstance(value, ast.Name | ast.Attribute) or (
            isinstance(value, ast.Call)
            and (
                (isinstance(value.func, ast.Attribute) and value.func.attr in RETURNS_SELF)
                or self._wrapper(value)
            )
        ):
            source = self.target(value)
        if source == name:
            return  # ``model = model.to(device)``: the same module
        self.summary.instances.pop(name, None)
        kind = _CONTAINER_LITERALS.get(type(value))
        if kind is not None:
            self.summary.instances[name] = kind
        if source is not None:
            self.aliases[name] = source
            if name.startswith("self.") and "." not in source:
                self.event(node, "store", source)
            return
        while (
            isinstance(value, ast.Call)
            and isinstance(value.func, ast.Attribute)
            and value.func.attr in RETURNS_SELF
            and isinstance(value.func.value, ast.Call)
        ):
            value = value.func.value  # ``Net(...).to(device)``: what ``Net(...)`` is
        if isinstance(value, ast.Call):
            qual = self.imports.resolve(value.func)
            if qual in LOADERS:
                self.event(node, "loaded", name)
            elif qual in OPAQUE_CALLS:
                self.event(node, "opaque", name)
            elif qual is None or not qual.startswith("torch."):
                callee = dotted(value.func)
                last = (callee or "").rsplit(".", 1)[-1]
                if not last[:1].isupper():  # a factory, not a class: its result is opaque
                    self.event(node, "bound_call", name)
                else:
                    self.event(node, "built", name)
                if callee is not None and (last[:1].isupper() or last in _CONTAINER_CALLS):
                    self.summary.instances[name] = self._class_ref(value.func, callee, qual)
            else:
                self.event(node, "built", name)

    def _class_ref(self, func: ast.expr, callee: str, qual: str | None) -> str:
        """How a call site names the class a binding is an instance of."""
        if isinstance(func, ast.Name) and func.id in _CONTAINER_CALLS:
            return "builtin:" + func.id
        if qual is not None and qual in _CONTAINER_QUALS:
            return "builtin:" + qual
        if isinstance(func, ast.Name) and func.id not in self.imports.aliases:
            return func.id
        return "qual:" + (qual or callee)

    def expr(self, node: ast.expr) -> None:
        stack: list[ast.AST] = [node]
        pop, push, extend = stack.pop, stack.append, stack.extend
        while stack:
            sub = pop()
            kind = type(sub)
            if kind is ast.Name or kind is ast.Constant or kind is ast.Lambda:
                continue
            if kind is ast.Call:
                self.call(sub)  # type: ignore[arg-type]
            for name in child_fields(kind):
                value = getattr(sub, name, None)
                if value is None:
                    continue
                if type(value) is list:
                    extend(v for v in value if isinstance(v, ast.AST))
                elif isinstance(value, ast.AST):
                    push(value)

    def call(self, node: ast.Call) -> None:
        func = node.func
        off = self.grad.no_graph or self.grad is GradState.UNKNOWN
        if self.volatile and any(
            isinstance(a, ast.Name) and a.id in self.volatile for a in node.args
        ):
            off = True  # run on a volatile Variable: no graph (torch < 0.4)
        attr = func.attr if isinstance(func, ast.Attribute) else None
        if attr is not None:
            assert isinstance(func, ast.Attribute)
            receiver = self.target(func.value)
            if attr == "eval" and not node.args and not node.keywords and receiver:
                self.event(node, "eval", receiver)
                return
            if attr == "train" and receiver:
                args = [*node.args, *(k.value for k in node.keywords if k.arg == "mode")]
                if not args or (isinstance(args[0], ast.Constant) and args[0].value in (True, 1)):
                    self.event(node, "train", receiver)
                elif isinstance(args[0], ast.Constant) and args[0].value in (False, 0):
                    self.event(node, "eval", receiver)
                else:
                    self.event(node, "restore", receiver)
                return
            if attr == "backward":
                self.differentiate(node, func.value)
                return
            if attr in _DETACHERS and receiver:
                self.event(node, "detach", receiver)
            if attr in _CLEARS_GRADIENTS:
                self.event(node, "clear", receiver or "")
            if attr in _NEW_TENSORS and receiver and self.grad is GradState.INFERENCE:
                self.event(node, "inference_write", receiver)
            if attr in {"append", "extend", "add", "update", "insert", "log", "put"} and receiver:
                for arg in [*node.args, *(k.value for k in node.keywords)]:
                    value = self.target(arg)
                    if value is not None and receiver.startswith("self."):
                        self.event(node, "store", value)
            if attr in _NOT_FORWARDS and not (
                isinstance(func.value, ast.Name) and func.value.id in {"self", "cls"}
            ):
                return
        qual = self.imports.resolve(func)
        if qual in DIFF_FUNCS:
            first = node.args[0] if node.args else None
            self.differentiate(node, first, explicit=True)
            return
        if qual is not None and any(h in qual for h in _OPTIMISER_HINT) and "optim" in qual:
            for arg in node.args[:1]:
                root = _parameters_owner(arg)
                target = self.target(root) if root is not None else None
                if target is not None:
                    self.event(node, "optim", target)
            return
        if isinstance(func, ast.Name) and func.id in _NUMBER_FUNCS and node.args:
            value = self.target(node.args[0])
            if value is not None:
                self.event(node, "detach", value)
            return
        # a call of something: a module forward, or a function whose summary decides
        callee = dotted(func)
        if callee is None:
            return
        arg_targets = [self._argument(a) for a in node.args]
        kwargs = {
            k.arg: t
            for k in node.keywords
            if k.arg is not None
            for t in [self.target(k.value)]
            if t
        }
        receiver = None
        head = callee.split(".", 1)[0]
        if isinstance(func, ast.Name) and func.id not in self.imports.aliases:
            site_callee = func.id
        elif qual is not None and not qual.startswith("torch."):
            site_callee = "qual:" + qual
        elif callee.startswith(("self.", "cls.")) and callee.count(".") == 1:
            site_callee = callee
        elif attr is not None and head not in self.imports.aliases:
            site_callee = "method:" + attr
            receiver = self.target(func.value) if isinstance(func, ast.Attribute) else None
        else:
            site_callee = ""
        if site_callee:
            consts = {
                str(i): a.value
                for i, a in enumerate(node.args)
                if isinstance(a, ast.Constant) and isinstance(a.value, str | int | float | None)
            }
            consts.update(
                (k.arg, k.value.value)
                for k in node.keywords
                if k.arg is not None
                and isinstance(k.value, ast.Constant)
                and isinstance(k.value.value, str | int | float | None)
            )
            self.summary.calls.append(
                CallSite(
                    node.lineno,
                    node.col_offset,
                    site_callee,
                    arg_targets,
                    kwargs,
                    off,
                    receiver,
                    consts,
                )
            )
        if qual is None or not qual.startswith("torch."):
            target = self._forwarded(func)
            if target is not None and target not in {"self", "super", "print"}:
                self.event(node, "forward_off" if off else "forward", target)

    def _argument(self, node: ast.expr) -> str | None:
        """The target an argument names; a list or tuple of names gives them all, joined
        by commas (``set_mode("eval", [encoder, decoder])``)."""
        if isinstance(node, ast.Starred):
            return None
        if isinstance(node, ast.List | ast.Tuple):
            names = [self.target(e) for e in node.elts]
            found = [n for n in names if n is not None]
            return ",".join(found) if found else None
        return self.target(node)

    def _forwarded(self, func: ast.expr) -> str | None:
        """The module a call runs: ``m(...)``, ``self.m(...)``, ``m.forward(...)``,
        ``self.models[k](...)``. A method (``m.generate``, ``m.names.items``) is not a
        forward: what it does is the method's business."""
        if isinstance(func, ast.Attribute) and func.attr in {"forward", "__call__"}:
            return self.target(func.value)
        inner = func
        while isinstance(inner, ast.Subscript):
            inner = inner.value
        if isinstance(inner, ast.Name):
            return self.target(func)
        if (
            isinstance(inner, ast.Attribute)
            and isinstance(inner.value, ast.Name)
            and inner.value.id in {"self", "cls"}
        ):
            return self.target(func)
        return None

    def differentiate(self, node: ast.Call, value: ast.expr | None, explicit: bool = False) -> None:
        """``x.backward()``, ``owner.backward(x)``, ``scaler.scale(x).backward()``."""
        attr = node.func.attr if isinstance(node.func, ast.Attribute) else None
        if attr == "backward" and node.args and not explicit and value is not None:
            owner = dotted(value)
            # ``accelerator.backward(loss)``: the argument is differentiated, not the owner
            if owner is not None and not _is_tensor_like(owner):
                value = node.args[0]
        while (
            isinstance(value, ast.Call)
            and isinstance(value.func, ast.Attribute)
            and value.func.attr == "scale"
            and value.args
        ):
            value = value.args[0]
        roots = _names(value) if value is not None else set()
        if not roots:
            self.event(node, "diff", "")
        for root in roots:
            self.event(node, "diff", self.aliases.get(root, root))


def _defaults(node: ast.FunctionDef | ast.AsyncFunctionDef) -> dict[str, Any]:
    """Constant default values of the parameters (``train=True``, ``optimizer=None``)."""
    args = node.args
    positional = [*args.posonlyargs, *args.args]
    found: dict[str, Any] = {}
    pairs = list(
        zip(positional[len(positional) - len(args.defaults) :], args.defaults, strict=True)
    )
    pairs += [(a, d) for a, d in zip(args.kwonlyargs, args.kw_defaults, strict=True) if d]
    for arg, default in pairs:
        if isinstance(default, ast.Constant) and isinstance(
            default.value, str | int | float | None
        ):
            found[arg.arg] = default.value
    return found


def _bound_names(target: ast.expr) -> list[str]:
    """Plain names a binding target binds (tuple elements included)."""
    return [n.id for n in ast.walk(target) if isinstance(n, ast.Name)]


def _is_tensor_like(owner: str) -> bool:
    last = owner.rsplit(".", 1)[-1].lower()
    return not any(
        word in last
        for word in ("accelerator", "fabric", "engine", "strategy", "trainer", "booster", "scaler")
    )


def _names(node: ast.expr) -> set[str]:
    """Root names read by a differentiated expression (``(loss / k)`` -> {loss})."""
    found: set[str] = set()
    stack: list[ast.AST] = [node]
    while stack:
        sub = stack.pop()
        if isinstance(sub, ast.Name):
            found.add(sub.id)
        elif isinstance(sub, ast.Attribute):
            text = dotted(sub)
            if text is not None:
                found.add(text)
            else:
                stack.append(sub.value)
        elif isinstance(sub, ast.Call):
            if isinstance(sub.func, ast.Attribute):
                stack.append(sub.func.value)
            stack.extend(sub.args)
        else:
            stack.extend(ast.iter_child_nodes(sub))
    return found


def _parameters_owner(arg: ast.expr) -> ast.expr | None:
    """``model`` in ``model.parameters()``, ``filter(f, model.parameters())``,
    ``[{"params": model.head.parameters()}]``."""
    for sub in ast.walk(arg):
        if (
            isinstance(sub, ast.Call)
            and isinstance(sub.func, ast.Attribute)
            and sub.func.attr in {"parameters", "named_parameters"}
        ):
            return sub.func.value
    return None


class _Index:
    """Where each function of a module is, and what its imports and classes are: a walk
    over statements only, cheap next to summarising bodies."""

    def __init__(self, tree: ast.Module, package: str | None) -> None:
        self.imports, self.bound = module_imports(tree, package)
        self.bases: dict[str, list[str]] = {}
        self.local = {
            n.name
            for n in tree.body
            if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef)
        }
        self.nodes: dict[str, tuple[ast.FunctionDef | ast.AsyncFunctionDef | ast.Module, bool]]
        self.nodes = {"<module>": (tree, False)}
        self._walk(tree.body, "", False)

    def _walk(self, body: list[ast.stmt], prefix: str, in_class: bool) -> None:
        for stmt in body:
            if isinstance(stmt, ast.FunctionDef | ast.AsyncFunctionDef):
                name = f"{prefix}{stmt.name}"
                if name in self.nodes:  # a redefinition: its own key, as the file model has it
                    name = f"{name}@{stmt.lineno}"
                self.nodes[name] = (stmt, in_class)
                self._walk(stmt.body, f"{prefix}{stmt.name}.", False)
            elif isinstance(stmt, ast.ClassDef):
                self.bases[f"{prefix}{stmt.name}"] = [b for b in map(dotted, stmt.bases) if b]
                self._walk(stmt.body, f"{prefix}{stmt.name}.", True)
            elif isinstance(stmt, ast.If | ast.Try) or type(stmt).__name__ == "TryStar":
                for block in ("body", "orelse", "finalbody"):
                    inner = getattr(stmt, block, None)
                    if isinstance(inner, list):
                        self._walk(inner, prefix, in_class)

    def summarise(self, name: str) -> FunctionSummary:
        node, in_class = self.nodes[name]
        if isinstance(node, ast.Module):
            params: list[str] = []
            kwonly: list[str] = []
            grad_off = False
        else:
            params, kwonly = _params(node, in_class)
            grad_off = any(
                (m := mode_of_context(d, self.imports)) is not None and m.no_graph
                for d in node.decorator_list
            )
        summary = FunctionSummary(name, params, grad_off, kwonly=kwonly)
        entry = None
        if not isinstance(node, ast.Module):
            summary.defaults = _defaults(node)
            modes = [mode_of_context(d, self.imports) for d in node.decorator_list]
            if GradState.INFERENCE in modes:
                entry = GradState.INFERENCE
        _Binder(summary, self.imports, self.local, in_class, entry).block(node.body)
        if in_class and not isinstance(node, ast.Module):
            summary.events.extend(
                (line, col, "keep", param)
                for line, col, param in kept_parameters(node, [*params, *kwonly])
            )
        events = sorted(summary.events, key=lambda e: (e[0], e[1], e[2] not in _MODES, e[2], e[3]))
        cls = name.rpartition(".")[0]
        while cls and cls not in self.bases:
            cls = cls.rpartition(".")[0]  # a closure inside a method: the method's class
        if cls in self.bases:
            # ``self.helper(x)`` calls a method of the class: not a forward of a submodule
            events = [
                e
                for e in events
                if not (
                    e[2] in {"forward", "forward_off"}
                    and e[3].startswith("self.")
                    and f"{cls}.{e[3][5:]}" in self.nodes
                )
            ]
        summary.events = events
        return summary


class LazyFunctions(dict[str, FunctionSummary]):
    """Function summaries computed when first asked for: a linted file's rules usually ask
    about a few functions, not all of them."""

    def __init__(self, index: _Index) -> None:
        super().__init__()
        self._index = index

    def __missing__(self, key: str) -> FunctionSummary:
        if key not in self._index.nodes:
            raise KeyError(key)
        summary = self._index.summarise(key)
        self[key] = summary
        return summary

    def __contains__(self, key: object) -> bool:
        return key in self._index.nodes

    def get(self, key: str, default: Any = None) -> Any:
        return self[key] if key in self._index.nodes else default

    def complete(self) -> LazyFunctions:
        for key in self._index.nodes:
            if not dict.__contains__(self, key):
                self[key] = self._index.summarise(key)
        return self


def summarise(tree: ast.Module, package: str | None = None) -> ModuleSummary:
    """Summaries of every function, method and the module body of ``tree``."""
    index = _Index(tree, package)
    functions = {name: index.summarise(name) for name in index.nodes}
    differentiates = any(
        e[2].split("|", 1)[0] == "diff" for f in functions.values() for e in f.events
    )
    return ModuleSummary(functions, index.bound, index.bases, differentiates)


def summarise_lazily(tree: ast.Module, source: str, package: str | None = None) -> ModuleSummary:
    """Like :func:`summarise`, but each function is summarised when first asked for. The
    file "differentiates" only if its text holds a word that may (checked first)."""
    index = _Index(tree, package)
    functions = LazyFunctions(index)
    maybe = any(word in source for word in ("backward", "grad("))
    summary = ModuleSummary(functions, index.bound, index.bases, False)
    summary.lazy_differentiates = maybe
    return summary
