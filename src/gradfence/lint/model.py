"""One walk over a module's AST, recording what the rules need as compact events.

The walker visits every statement once, keeps the grad-scope model (:mod:`scopes`), the
enclosing function, class and loop, and records per function the calls, assignments,
``with`` blocks, expression statements, awaits and returns it meets. Rules then query
these short event lists instead of walking the tree again.
"""

from __future__ import annotations

import ast
import bisect
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from gradfence.lint.diagnostics import SourceText
from gradfence.lint.imports import ImportMap, dotted
from gradfence.lint.names import is_eval_loader, is_eval_name, might_evaluate, tokens
from gradfence.lint.scopes import GradState, last_name, mode_of_context, mode_of_set_call

if TYPE_CHECKING:
    from gradfence.lint.analysis.effects import Analysis
    from gradfence.lint.analysis.project import ProjectConfig

Pos = tuple[int, int]
# ``try``, and ``try``/``except*`` on Python 3.11+
_TRY_KINDS: tuple[type, ...] = (ast.Try, getattr(ast, "TryStar", ast.Try))

_EXECUTOR_CTORS = frozenset(
    {
        "concurrent.futures.ThreadPoolExecutor",
        "concurrent.futures.thread.ThreadPoolExecutor",
        "concurrent.futures.ProcessPoolExecutor",
        "multiprocessing.pool.ThreadPool",
        "multiprocessing.dummy.Pool",
        "multiprocessing.Pool",
    }
)


# Lines holding one of these words may matter to some rule; expressions elsewhere are not
# walked unless the context needs every call (grad-mode blocks, training loops, evaluation
# functions). Plain ``str.find`` is several times faster here than one big regex.
HOT_WORDS = (
    "grad",
    "eval",
    "train",
    "dropout",
    "scaled_dot",
    "infer",
    "valid",
    "predict",
    "test",
    "load_state_dict",
)
TRAINING_WORDS = ("backward", "step", "optim")


def line_numbers(source: str) -> tuple[list[int], list[int]]:
    """Sorted 1-based numbers of the lines holding a hot word, and of those holding a
    training word (training words are hot too)."""
    marks: list[tuple[int, bool]] = []
    find = source.find
    for words, training in ((HOT_WORDS, False), (TRAINING_WORDS, True)):
        for word in words:
            index = find(word)
            while index >= 0:
                marks.append((index, training))
                index = find(word, index + 1)
    marks.sort()
    hot: list[int] = []
    train: list[int] = []
    line, previous = 1, 0
    count = source.count
    for offset, training in marks:
        line += count("\n", previous, offset)
        previous = offset
        if not hot or hot[-1] != line:
            hot.append(line)
        if training and (not train or train[-1] != line):
            train.append(line)
    return hot, train


def _maybe_executor(call: ast.Call) -> bool:
    name = last_name(call) or ""
    return name.endswith(("Executor", "Pool"))


def pos(node: ast.AST) -> Pos:
    """Start position of a node, for ordering."""
    return (getattr(node, "lineno", 0), getattr(node, "col_offset", 0))


def end_pos(node: ast.AST) -> Pos:
    """End position of a node, for ordering."""
    return (getattr(node, "end_lineno", 0) or 0, getattr(node, "end_col_offset", 0) or 0)


def mentions_training(node: ast.AST) -> bool:
    """Whether an expression reads ``training`` or ``<x>.training``."""
    for sub in ast.walk(node):
        if (isinstance(sub, ast.Attribute) and sub.attr == "training") or (
            isinstance(sub, ast.Name) and sub.id == "training"
        ):
            return True
    return False


class LoopModel:
    """A ``for``/``while`` loop: the words of what it iterates over, and its enclosing loop."""

    __slots__ = ("node", "parent", "words")

    def __init__(self, node: ast.stmt, parent: LoopModel | None) -> None:
        self.node = node
        self.parent = parent
        self.words: set[str] = set()
        if isinstance(node, ast.For | ast.AsyncFor):
            # ``val_loader``, ``self.test_data``, ``enumerate(tqdm(dev_loader))``
            stack: list[ast.expr] = [node.iter]
            while stack:
                sub = stack.pop()
                if isinstance(sub, ast.Call):
                    stack.extend(sub.args)
                    stack.append(sub.func)
                    continue
                name = sub.id if isinstance(sub, ast.Name) else getattr(sub, "attr", None)
                if isinstance(name, str) and might_evaluate(name):
                    self.words |= tokens(name)
                if isinstance(sub, ast.Attribute):
                    stack.append(sub.value)

    def chain(self) -> Iterator[LoopModel]:
        """This loop and every enclosing loop, innermost first."""
        loop: LoopModel | None = self
        while loop is not None:
            yield loop
            loop = loop.parent


_UNSET: object = object()


class CallEvent:
    """A call expression and the context it runs in.

    ``qual`` (the canonical name of the callee) and ``receiver`` (``a.b`` in ``a.b.f()``) are
    computed on first use: most calls are never asked about.
    """

    __slots__ = (
        "_qual",
        "_receiver",
        "attr",
        "function",
        "imports",
        "loop",
        "mode",
        "node",
        "training_guard",
    )

    def __init__(
        self,
        node: ast.Call,
        function: FunctionModel,
        imports: ImportMap,
        mode: GradState,
        loop: LoopModel | None,
        training_guard: bool,
    ) -> None:
        self.node = node
        self.function = function
        self.imports = imports
        self.mode = mode
        self.loop = loop
        self.training_guard = training_guard
        func = node.func
        self.attr = func.attr if type(func) is ast.Attribute else None
        self._qual: object = _UNSET
        self._receiver: object = _UNSET

    @property
    def qual(self) -> str | None:
        """Canonical qualified name of the callee, if an import binds it."""
        if self._qual is _UNSET:
            self._qual = self.imports.resolve(self.node.func)
        return self._qual  # type: ignore[return-value]

    @property
    def receiver(self) -> str | None:
        """``a.b`` for ``a.b.f(...)``; None when the callee is not an attribute of a name chain."""
        if self._receiver is _UNSET:
            func = self.node.func
            self._receiver = dotted(func.value) if isinstance(func, ast.Attribute) else None
        return self._receiver  # type: ignore[return-value]

    @property
    def callee(self) -> str | None:
        """``name`` for ``name(...)`` and ``a.b`` for ``a.b(...)``: the called object's text."""
        return dotted(self.node.func)


class AssignEvent:
    """An assignment statement (plain, augmented or annotated) and its context."""

    __slots__ = ("function", "loop", "mode", "node", "targets", "value")

    def __init__(
        self,
        node: ast.Assign | ast.AugAssign | ast.AnnAssign,
        function: FunctionModel,
        mode: GradState,
        loop: LoopModel | None,
    ) -> None:
        self.node = node
        self.function = function
        self.mode = mode
        self.loop = loop
        self.targets: list[ast.expr] = (
            list(node.targets) if isinstance(node, ast.Assign) else [node.target]
        )
        self.value: ast.expr | None = node.value

    def target_names(self) -> Iterator[str]:
        """Dotted text of every plain target, tuple elements included."""
        stack = list(self.targets)
        while stack:
            target = stack.pop()
            if isinstance(target, ast.Tuple | ast.List):
                stack.extend(target.elts)
            elif isinstance(target, ast.Starred):
                stack.append(target.value)
            else:
                text = dotted(target)
                if text is not None:
                    yield text


class WithEvent:
    """A ``with`` statement whose items include a grad-mode context."""

    __slots__ = ("function", "loop", "mode", "node", "outer_mode")

    def __init__(
        self,
        node: ast.With | ast.AsyncWith,
        function: FunctionModel,
        mode: GradState,
        outer_mode: GradState,
        loop: LoopModel | None,
    ) -> None:
        self.node = node
        self.function = function
        self.mode = mode
        self.outer_mode = outer_mode
        self.loop = loop


class StmtEvent:
    """An expression statement (its value is discarded) and its context."""

    __slots__ = ("function", "mode", "node")

    def __init__(self, node: ast.Expr, function: FunctionModel, mode: GradState) -> None:
        self.node = node
        self.function = function
        self.mode = mode


class ClassModel:
    """A class definition; ``is_module`` when it derives from ``torch.nn.Module``."""

    __slots__ = ("is_module", "methods", "name", "node")

    def __init__(self, node: ast.ClassDef, is_module: bool) -> None:
        self.node = node
        self.name = node.name
        self.is_module = is_module
        self.methods: dict[str, FunctionModel] = {}


class FunctionModel:
    """A function, method or the module body, with the events recorded inside it."""

    __slots__ = (
        "assigns",
        "awaits",
        "calls",
        "cls",
        "decorators",
        "entry_mode",
        "evaluates",
        "exprs",
        "is_async",
        "loops",
        "name",
        "node",
        "parent",
        "qualname",
        "returns",
        "withs",
    )

    def __init__(
        self,
        node: ast.FunctionDef | ast.AsyncFunctionDef | ast.Module | ast.ClassDef,
        cls: ClassModel | None,
        parent: FunctionModel | None,
        entry_mode: GradState,
    ) -> None:
        self.node = node
        self.name = "<module>" if isinstance(node, ast.Module) else node.name
        self.cls = cls
        self.parent = parent
        self.entry_mode = entry_mode
        # the name summaries know it by: "f", "Class.method", "f.inner", "<module>"
        self.qualname = self.name
        if parent is not None and not isinstance(node, ast.Module | ast.ClassDef):
            owner = parent.qualname
            if owner.startswith("<class "):
                owner = owner[len("<class ") : -1]
            if owner != "<module>":
                self.qualname = f"{owner}.{self.name}"
        self.is_async = isinstance(node, ast.AsyncFunctionDef)
        # named like an evaluation function (validate, evaluate, predict...)
        self.evaluates = isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and is_eval_name(
            node.name
        )
        self.decorators: list[tuple[ast.expr, GradState | None]] = []
        self.calls: list[CallEvent] = []
        self.assigns: list[AssignEvent] = []
        self.withs: list[WithEvent] = []
        self.exprs: list[StmtEvent] = []
        self.awaits: list[ast.AST] = []
        self.returns: list[ast.Return] = []
        self.loops: list[LoopModel] = []


class FileModel:
    """Everything the rules know about one file."""

    def __init__(
        self,
        path: str,
        source: str,
        tree: ast.Module,
        target_torch: tuple[int, int] | None = None,
        project: ProjectConfig | None = None,
    ) -> None:
        self.path = path
        self.target_torch = target_torch
        self.source = source
        self.tree = tree
        self.imports = ImportMap()
        self.functions: list[FunctionModel] = []
        self.classes: dict[str, ClassModel] = {}
        self.executor_names: set[str] = set()
        self.bare_with_items: list[tuple[ast.expr, FunctionModel]] = []
        self.hot_lines, self.training_lines = line_numbers(source)
        self.by_name: dict[str, list[FunctionModel]] = {}
        self._qualnames: set[str] = set()
        self._text: SourceText | None = None
        self.project = project
        self._analysis: Analysis | None = None
        # per-file memo of derived facts that several rules share (one home for caches)
        self.memo: dict[str, Any] = {}

    @property
    def analysis(self) -> Analysis:
        """Function summaries composed across the file and the project (built on first use)."""
        if self._analysis is None:
            from gradfence.lint.analysis.effects import Analysis
            from gradfence.lint.analysis.project import module_name, project_for

            project = project_for(self.project)
            summary = project.summary_for(self.source, self.tree, self.path)
            name = None
            if project.root is not None:
                name = module_name(self.path, project.root)
            self._analysis = Analysis(summary, name or "<linted>", project)
        return self._analysis

    @property
    def lines(self) -> list[str]:
        """Source lines without line ends, numbered like the parser numbers them."""
        return self.text.lines

    @property
    def text(self) -> SourceText:
        """Position conversion and source segments for fixes (lines split on first use)."""
        if self._text is None:
            self._text = SourceText(self.source)
        return self._text

    @property
    def module(self) -> FunctionModel:
        """The pseudo-function holding module-level code."""
        return self.functions[0]

    def release(self) -> None:
        """Break the model's reference cycles so that the tree is freed at once.

        Events point at their function and functions at their events; without this the
        whole AST would wait for the cyclic garbage collector, which then has to scan it.
        """
        for function in self.functions:
            function.calls.clear()
            function.assigns.clear()
            function.withs.clear()
            function.exprs.clear()
            function.loops.clear()
            function.parent = None
            function.cls = None
        self.functions.clear()
        self.by_name.clear()
        self.classes.clear()
        self.bare_with_items.clear()
        self.memo.clear()
        self._analysis = None

    def functions_named(self, name: str) -> list[FunctionModel]:
        """Functions and methods with this name, anywhere in the file."""
        return self.by_name.get(name, [])

    def add_function(self, function: FunctionModel) -> None:
        """Register a function, method or pseudo-function."""
        self.functions.append(function)
        self.by_name.setdefault(function.name, []).append(function)
        if function.qualname in self._qualnames:  # a redefinition, named as summaries do
            function.qualname = f"{function.qualname}@{getattr(function.node, 'lineno', 0)}"
        self._qualnames.add(function.qualname)


class Walker:
    """Builds a :class:`FileModel` in one pass over the tree."""

    def __init__(self, model: FileModel) -> None:
        self.model = model
        self.imports = model.imports
        self.function = FunctionModel(model.tree, None, None, GradState.DEFAULT)
        model.add_function(self.function)
        self.full = False  # walk every expression, hot or not
        self.cls: ClassModel | None = None
        self.mode = GradState.DEFAULT
        self.loop: LoopModel | None = None
        self.training_guard = 0
        self.grad_with = 0  # grad-mode ``with`` blocks open in the current function

    def run(self) -> None:
        """Walk the whole module; leave every function's calls in source order."""
        self.block(self.model.tree.body)
        for function in self.model.functions:
            if function.calls:
                function.calls.sort(key=_call_pos)

    # -- statements -------------------------------------------------------------------

    def block(self, body: list[ast.stmt]) -> None:
        saved = self.mode
        for stmt in body:
            self.stmt(stmt)
        if self.mode is not saved:
            # a set_grad_enabled() inside a nested block: after it, nobody can tell
            self.mode = GradState.UNKNOWN if saved is not GradState.UNKNOWN else saved

    def stmt(self, node: ast.stmt) -> None:
        kind = type(node)
        if kind is ast.Expr:
            self.expr_stmt(node)  # type: ignore[arg-type]
        elif kind is ast.Assign or kind is ast.AugAssign or kind is ast.AnnAssign:
            self.assign(node)  # type: ignore[arg-type]
        elif kind is ast.FunctionDef or kind is ast.AsyncFunctionDef:
            self.function_def(node)  # type: ignore[arg-type]
        elif kind is ast.ClassDef:
            self.class_def(node)  # type: ignore[arg-type]
        elif kind is ast.With or kind is ast.AsyncWith:
            self.with_stmt(node)  # type: ignore[arg-type]
        elif kind is ast.For or kind is ast.AsyncFor or kind is ast.While:
            self.loop_stmt(node)  # type: ignore[arg-type]
        elif kind is ast.If:
            self.if_stmt(node)  # type: ignore[arg-type]
        elif kind is ast.Import or kind is ast.ImportFrom:
            self.imports.add(node)  # type: ignore[arg-type]
        elif kind is ast.Return:
            self.function.returns.append(node)  # type: ignore[arg-type]
            if node.value is not None:  # type: ignore[attr-defined]
                self.expr(node.value)  # type: ignore[attr-defined]
        elif kind in _TRY_KINDS:
            self.block(node.body)  # type: ignore[attr-defined]
            for handler in node.handlers:  # type: ignore[attr-defined]
                self.block(handler.body)
            self.block(node.orelse)  # type: ignore[attr-defined]
            self.block(node.finalbody)  # type: ignore[attr-defined]
        elif kind is ast.Match:
            self.expr(node.subject)  # type: ignore[attr-defined]
            for case in node.cases:  # type: ignore[attr-defined]
                if case.guard is not None:
                    self.expr(case.guard)
                self.block(case.body)
        elif self.is_hot(node):
            for child in ast.iter_child_nodes(node):
                if isinstance(child, ast.expr):
                    self.expr(child)

    def expr_stmt(self, node: ast.Expr) -> None:
        self.function.exprs.append(StmtEvent(node, self.function, self.mode))
        self.expr(node.value)
        value = node.value
        if isinstance(value, ast.Call):
            new_mode = mode_of_set_call(value, self.imports)
            if new_mode is not None:
                self.mode = new_mode

    def assign(self, node: ast.Assign | ast.AugAssign | ast.AnnAssign) -> None:
        self.function.assigns.append(AssignEvent(node, self.function, self.mode, self.loop))
        if node.value is not None:
            self.expr(node.value)
            if (
                isinstance(node.value, ast.Call)
                and isinstance(node, ast.Assign)
                and _maybe_executor(node.value)
                and self.imports.resolve(node.value.func) in _EXECUTOR_CTORS
            ):
                for target in node.targets:
                    text = dotted(target)
                    if text is not None:
                        self.model.executor_names.add(text)
        for target in node.targets if isinstance(node, ast.Assign) else [node.target]:
            if not isinstance(target, ast.Name):
                self.expr(target)

    def function_def(self, node: ast.FunctionDef | ast.AsyncFunctionDef) -> None:
        entry = GradState.DEFAULT
        decorators: list[tuple[ast.expr, GradState | None]] = []
        for decorator in node.decorator_list:
            self.expr(decorator)
            mode = mode_of_context(decorator, self.imports)
            decorators.append((decorator, mode))
            if mode is not None:
                entry = mode
        for default in (*node.args.defaults, *node.args.kw_defaults):
            if default is not None:
                self.expr(default)
        function = FunctionModel(node, self.cls, self.function, entry)
        function.decorators = decorators
        self.model.add_function(function)
        if self.cls is not None and self.function.node is self.cls.node:
            self.cls.methods.setdefault(node.name, function)
        saved = (self.function, self.cls, self.mode, self.loop, self.training_guard, self.grad_with)
        saved_full = self.full
        self.function, self.mode, self.loop = function, entry, None
        self.training_guard = self.grad_with = 0
        self.full = entry is not GradState.DEFAULT or function.evaluates
        if (
            self.full
            or node.name == "__init__"
            or any_between(self.model.hot_lines, node.lineno, node.end_lineno)
        ):
            self.block(node.body)
        # else: no word any rule looks for, and no context that needs every call: skip it
        (self.function, self.cls, self.mode, self.loop, self.training_guard, self.grad_with) = saved
        self.full = saved_full

    def class_def(self, node: ast.ClassDef) -> None:
        is_module = False
        for base in node.bases:
            self.expr(base)
            qual = self.imports.resolve(base)
            if qual is not None:
                if qual.startswith("torch.nn.") or qual.endswith(".LightningModule"):
                    is_module = True
            elif isinstance(base, ast.Name):
                local = self.model.classes.get(base.id)
                if local is not None and local.is_module:
                    is_module = True
        cls = ClassModel(node, is_module)
        self.model.classes.setdefault(node.name, cls)
        # the class body runs in the enclosing function's frame; methods get their own
        pseudo = FunctionModel(node, cls, self.function, self.mode)
        pseudo.name = f"<class {node.name}>"
        owner = self.function.qualname
        pseudo.qualname = (
            f"<class {node.name}>"
            if owner == "<module>"
            else f"<class {owner.removeprefix('<class ').removesuffix('>')}.{node.name}>"
        )
        self.model.add_function(pseudo)
        saved = (self.function, self.cls, self.loop)
        self.function, self.cls, self.loop = pseudo, cls, None
        self.block(node.body)
        self.function, self.cls, self.loop = saved

    def with_stmt(self, node: ast.With | ast.AsyncWith) -> None:
        outer = self.mode
        inner: GradState | None = None
        for item in node.items:
            self.expr(item.context_expr)
            mode = mode_of_context(item.context_expr, self.imports)
            if mode is not None:
                if isinstance(item.context_expr, ast.Call):
                    # enable_grad() inside inference_mode records no graph either
                    if not (mode is GradState.ENABLED and (inner or outer) is GradState.INFERENCE):
                        inner = mode
                else:
                    self.model.bare_with_items.append((item.context_expr, self.function))
            elif (
                isinstance(item.context_expr, ast.Call)
                and item.optional_vars is not None
                and self.imports.resolve(item.context_expr.func) in _EXECUTOR_CTORS
            ):
                text = dotted(item.optional_vars)
                if text is not None:
                    self.model.executor_names.add(text)
            if item.optional_vars is not None and not isinstance(item.optional_vars, ast.Name):
                self.expr(item.optional_vars)
        is_async = isinstance(node, ast.AsyncWith)
        if is_async and self.grad_with and self.function.is_async:
            self.function.awaits.append(node)
        if inner is None:
            self.block(node.body)
            return
        self.function.withs.append(WithEvent(node, self.function, inner, outer, self.loop))
        self.mode = inner
        self.grad_with += 1
        saved_full, self.full = self.full, True
        self.block(node.body)
        # after an inference_mode block, in-place updates anywhere later may matter (GF403)
        self.full = saved_full or inner is GradState.INFERENCE
        self.grad_with -= 1
        self.mode = outer

    def loop_stmt(self, node: ast.For | ast.AsyncFor | ast.While) -> None:
        if isinstance(node, ast.While):
            self.expr(node.test)
        else:
            self.expr(node.iter)
            if isinstance(node, ast.AsyncFor) and self.grad_with and self.function.is_async:
                self.function.awaits.append(node)
        loop = LoopModel(node, self.loop)
        self.function.loops.append(loop)
        saved, saved_full = self.loop, self.full
        self.loop = loop
        # training loops and evaluation loops need every call (losses, forwards, helpers)
        self.full = (
            self.full
            or any_between(self.model.training_lines, node.lineno, node.end_lineno)
            or is_eval_loader(loop.words)
        )
        self.block(node.body)
        self.loop, self.full = saved, saved_full
        self.block(node.orelse)

    def if_stmt(self, node: ast.If) -> None:
        self.expr(node.test)
        guard = self.is_hot(node.test) and mentions_training(node.test)
        self.training_guard += guard
        self.block(node.body)
        self.block(node.orelse)
        self.training_guard -= guard

    # -- expressions ------------------------------------------------------------------

    def is_hot(self, node: ast.AST) -> bool:
        """Whether a rule may care about ``node``: full context, or a hot line in its span."""
        if self.full:
            return True
        start = getattr(node, "lineno", 0)
        return any_between(self.model.hot_lines, start, getattr(node, "end_lineno", start))

    def expr(self, node: ast.expr) -> None:
        if not self.full and not self.is_hot(node):
            return
        function, imports = self.function, self.imports
        calls = function.calls
        stack: list[ast.AST] = [node]
        pop, push, extend = stack.pop, stack.append, stack.extend
        while stack:
            sub = pop()
            kind = type(sub)
            if kind is ast.Call:
                calls.append(
                    CallEvent(
                        sub,  # type: ignore[arg-type]
                        function,
                        imports,
                        self.mode,
                        self.loop,
                        self.training_guard > 0,
                    )
                )
            elif kind is ast.Await and self.grad_with and function.is_async:
                function.awaits.append(sub)
            elif kind is ast.Name or kind is ast.Constant:
                continue
            for field in child_fields(kind):
                value = getattr(sub, field, None)
                if value is None:
                    continue
                if type(value) is list:
                    extend(v for v in value if isinstance(v, ast.AST))
                elif isinstance(value, ast.AST):
                    push(value)


_FIELDS: dict[type, tuple[str, ...]] = {}
_LEAF_FIELDS = frozenset({"ctx", "id", "attr", "arg", "kind", "type_comment", "is_async"})


def child_fields(kind: type) -> tuple[str, ...]:
    """Fields of an AST node type that may hold child nodes."""
    fields = _FIELDS.get(kind)
    if fields is None:
        fields = tuple(f for f in getattr(kind, "_fields", ()) if f not in _LEAF_FIELDS)
        _FIELDS[kind] = fields
    return fields


def any_between(lines: list[int], start: int, end: int | None) -> bool:
    """Whether the sorted ``lines`` hold a number in ``[start, end]``."""
    index = bisect.bisect_left(lines, start)
    return index < len(lines) and lines[index] <= (end if end is not None else start)


def _call_pos(call: CallEvent) -> Pos:
    node = call.node
    return (node.lineno, node.col_offset)


def build_model(
    path: str,
    source: str,
    tree: ast.Module,
    target_torch: tuple[int, int] | None = None,
    project: ProjectConfig | None = None,
) -> FileModel:
    """Walk ``tree`` once and return the events the rules query."""
    model = FileModel(path, source, tree, target_torch, project)
    Walker(model).run()
    return model
