"""One walk over a module's AST, recording what the rules need as compact events.

The walker visits every statement once, keeps the grad-scope model (:mod:`scopes`), the
enclosing function, class and loop, and records per function the calls, assignments,
``with`` blocks, expression statements, awaits and returns it meets. Rules then query
these short event lists instead of walking the tree again.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterator

from gradfence.lint.diagnostics import SourceText
from gradfence.lint.imports import ImportMap, dotted
from gradfence.lint.scopes import GradMode, mode_of_context, mode_of_set_call

Pos = tuple[int, int]

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


_NEWLINE = re.compile(r"\r\n|\r|\n")


def split_lines(source: str) -> list[str]:
    """Split on the line ends the tokenizer recognises (not on form feeds and friends)."""
    return _NEWLINE.split(source)


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
    """A ``for``/``while`` loop: what it iterates over and which loop encloses it."""

    __slots__ = ("iter_text", "node", "parent")

    def __init__(self, node: ast.stmt, parent: LoopModel | None) -> None:
        self.node = node
        self.parent = parent
        self.iter_text = ""
        if isinstance(node, ast.For | ast.AsyncFor):
            self.iter_text = ast.unparse(node.iter) if _short(node.iter) else ""

    def contains(self, node: ast.AST) -> bool:
        """Whether ``node`` lies textually inside this loop."""
        return pos(self.node) <= pos(node) and end_pos(node) <= end_pos(self.node)

    def chain(self) -> Iterator[LoopModel]:
        """This loop and every enclosing loop, innermost first."""
        loop: LoopModel | None = self
        while loop is not None:
            yield loop
            loop = loop.parent


def _short(node: ast.expr) -> bool:
    return (getattr(node, "end_lineno", 0) or 0) - getattr(node, "lineno", 0) < 3


class CallEvent:
    """A call expression and the context it runs in."""

    __slots__ = (
        "attr",
        "function",
        "in_grad_with",
        "loop",
        "mode",
        "node",
        "qual",
        "receiver",
        "training_guard",
    )

    def __init__(
        self,
        node: ast.Call,
        function: FunctionModel,
        qual: str | None,
        mode: GradMode,
        loop: LoopModel | None,
        training_guard: bool,
        in_grad_with: bool,
    ) -> None:
        self.node = node
        self.function = function
        self.qual = qual
        self.mode = mode
        self.loop = loop
        self.training_guard = training_guard
        self.in_grad_with = in_grad_with
        func = node.func
        self.attr = func.attr if isinstance(func, ast.Attribute) else None
        self.receiver = dotted(func.value) if isinstance(func, ast.Attribute) else None

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
        mode: GradMode,
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
        mode: GradMode,
        outer_mode: GradMode,
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

    def __init__(self, node: ast.Expr, function: FunctionModel, mode: GradMode) -> None:
        self.node = node
        self.function = function
        self.mode = mode


class ClassModel:
    """A class definition; ``is_module`` when it derives from ``torch.nn.Module``."""

    __slots__ = ("base_quals", "is_module", "methods", "name", "node")

    def __init__(self, node: ast.ClassDef, is_module: bool) -> None:
        self.node = node
        self.name = node.name
        self.is_module = is_module
        self.methods: dict[str, FunctionModel] = {}
        self.base_quals: list[str] = []


class FunctionModel:
    """A function, method or the module body, with the events recorded inside it."""

    __slots__ = (
        "assigns",
        "awaits",
        "calls",
        "cls",
        "decorators",
        "entry_mode",
        "exprs",
        "is_async",
        "loops",
        "name",
        "node",
        "parent",
        "returns",
        "withs",
    )

    def __init__(
        self,
        node: ast.FunctionDef | ast.AsyncFunctionDef | ast.Module | ast.ClassDef,
        cls: ClassModel | None,
        parent: FunctionModel | None,
        entry_mode: GradMode,
    ) -> None:
        self.node = node
        self.name = "<module>" if isinstance(node, ast.Module) else node.name
        self.cls = cls
        self.parent = parent
        self.entry_mode = entry_mode
        self.is_async = isinstance(node, ast.AsyncFunctionDef)
        self.decorators: list[tuple[ast.expr, GradMode | None]] = []
        self.calls: list[CallEvent] = []
        self.assigns: list[AssignEvent] = []
        self.withs: list[WithEvent] = []
        self.exprs: list[StmtEvent] = []
        self.awaits: list[ast.AST] = []
        self.returns: list[ast.Return] = []
        self.loops: list[LoopModel] = []

    @property
    def is_method(self) -> bool:
        """Defined directly in a class body."""
        return self.cls is not None


class FileModel:
    """Everything the rules know about one file."""

    def __init__(
        self,
        path: str,
        source: str,
        tree: ast.Module,
        target_torch: tuple[int, int] | None = None,
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
        self._lines: list[str] | None = None

    @property
    def lines(self) -> list[str]:
        """Source lines without line ends, numbered like the parser numbers them."""
        if self._lines is None:
            self._lines = split_lines(self.source)
        return self._lines

    @property
    def text(self) -> SourceText:
        """Position conversion and source segments for fixes."""
        return SourceText(self.lines)

    @property
    def module(self) -> FunctionModel:
        """The pseudo-function holding module-level code."""
        return self.functions[0]

    def functions_named(self, name: str) -> list[FunctionModel]:
        """Functions and methods with this name, anywhere in the file."""
        return [f for f in self.functions if f.name == name]


class Walker:
    """Builds a :class:`FileModel` in one pass over the tree."""

    def __init__(self, model: FileModel) -> None:
        self.model = model
        self.imports = model.imports
        self.function = FunctionModel(model.tree, None, None, GradMode.DEFAULT)
        model.functions.append(self.function)
        self.cls: ClassModel | None = None
        self.mode = GradMode.DEFAULT
        self.loop: LoopModel | None = None
        self.training_guard = 0
        self.grad_with = 0  # grad-mode ``with`` blocks open in the current function

    def run(self) -> None:
        """Walk the whole module."""
        self.block(self.model.tree.body)

    # -- statements -------------------------------------------------------------------

    def block(self, body: list[ast.stmt]) -> None:
        saved = self.mode
        for stmt in body:
            self.stmt(stmt)
        if self.mode is not saved:
            # a set_grad_enabled() inside a nested block: after it, nobody can tell
            self.mode = GradMode.UNKNOWN if saved is not GradMode.UNKNOWN else saved

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
        elif kind is ast.Try or kind is ast.TryStar:
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
        else:
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
        entry = GradMode.DEFAULT
        decorators: list[tuple[ast.expr, GradMode | None]] = []
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
        self.model.functions.append(function)
        if self.cls is not None and self.function.node is self.cls.node:
            self.cls.methods.setdefault(node.name, function)
        saved = (self.function, self.cls, self.mode, self.loop, self.training_guard, self.grad_with)
        self.function, self.mode, self.loop = function, entry, None
        self.training_guard = self.grad_with = 0
        self.block(node.body)
        (self.function, self.cls, self.mode, self.loop, self.training_guard, self.grad_with) = saved

    def class_def(self, node: ast.ClassDef) -> None:
        quals: list[str] = []
        is_module = False
        for base in node.bases:
            self.expr(base)
            qual = self.imports.resolve(base)
            if qual is not None:
                quals.append(qual)
                if qual.startswith("torch.nn.") or qual.endswith(".LightningModule"):
                    is_module = True
            elif isinstance(base, ast.Name):
                local = self.model.classes.get(base.id)
                if local is not None and local.is_module:
                    is_module = True
        cls = ClassModel(node, is_module)
        cls.base_quals = quals
        self.model.classes.setdefault(node.name, cls)
        # the class body runs in the enclosing function's frame; methods get their own
        pseudo = FunctionModel(node, cls, self.function, self.mode)
        pseudo.name = f"<class {node.name}>"
        self.model.functions.append(pseudo)
        saved = (self.function, self.cls, self.loop)
        self.function, self.cls, self.loop = pseudo, cls, None
        self.block(node.body)
        self.function, self.cls, self.loop = saved

    def with_stmt(self, node: ast.With | ast.AsyncWith) -> None:
        outer = self.mode
        inner: GradMode | None = None
        for item in node.items:
            self.expr(item.context_expr)
            mode = mode_of_context(item.context_expr, self.imports)
            if mode is not None:
                if isinstance(item.context_expr, ast.Call):
                    # enable_grad() inside inference_mode records no graph either
                    if not (mode is GradMode.ENABLED and (inner or outer) is GradMode.INFERENCE):
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
        self.block(node.body)
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
        saved = self.loop
        self.loop = loop
        self.block(node.body)
        self.loop = saved
        self.block(node.orelse)

    def if_stmt(self, node: ast.If) -> None:
        self.expr(node.test)
        guard = mentions_training(node.test)
        self.training_guard += guard
        self.block(node.body)
        self.block(node.orelse)
        self.training_guard -= guard

    # -- expressions ------------------------------------------------------------------

    def expr(self, node: ast.expr) -> None:
        for sub in ast.walk(node):
            kind = type(sub)
            if kind is ast.Call:
                self.function.calls.append(
                    CallEvent(
                        sub,  # type: ignore[arg-type]
                        self.function,
                        self.imports.resolve(sub.func),  # type: ignore[attr-defined]
                        self.mode,
                        self.loop,
                        self.training_guard > 0,
                        self.grad_with > 0,
                    )
                )
            elif kind is ast.Await and self.grad_with and self.function.is_async:
                self.function.awaits.append(sub)


def build_model(
    path: str, source: str, tree: ast.Module, target_torch: tuple[int, int] | None = None
) -> FileModel:
    """Walk ``tree`` once and return the events the rules query."""
    model = FileModel(path, source, tree, target_torch)
    Walker(model).run()
    return model
