"""Syntax facts several rules read straight from a function's tree: what runs in its own
frame, where grad is off, which names a statement binds or reads, and the shapes that
build an optimiser or run ``backward()``.

The event model (:mod:`gradfence.lint.model`) records only what its rules query; rules
that judge whole statements and loops (GF108, GF206, GF207, GF309, GF310, GF404) use
these helpers on the tree instead, each after a cheap text test on the source.
"""

from __future__ import annotations

import ast
from collections.abc import Iterable, Iterator

from gradfence.lint.imports import ImportMap, dotted
from gradfence.lint.model import FileModel
from gradfence.lint.scopes import mode_of_context

Function = ast.FunctionDef | ast.AsyncFunctionDef
Loop = ast.For | ast.AsyncFor | ast.While


# -- small syntax helpers -------------------------------------------------------------------


def local_nodes(node: ast.AST) -> Iterator[ast.AST]:
    """Every node below ``node`` that runs in the same frame (nested defs and lambdas
    are skipped: they run later, if at all)."""
    stack = list(ast.iter_child_nodes(node))
    while stack:
        sub = stack.pop()
        if isinstance(sub, Function | ast.ClassDef | ast.Lambda):
            continue
        yield sub
        stack.extend(ast.iter_child_nodes(sub))


def functions(tree: ast.Module) -> Iterator[tuple[Function, ast.ClassDef | None]]:
    """Every function and method of the file, with its class (None outside classes)."""
    stack: list[tuple[ast.AST, ast.ClassDef | None]] = [(tree, None)]
    while stack:
        node, cls = stack.pop()
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.ClassDef):
                stack.append((child, child))
            elif isinstance(child, Function):
                yield child, cls
                stack.append((child, None))
            elif isinstance(child, ast.stmt):
                stack.append((child, cls))


def code_blocks(tree: ast.Module) -> Iterator[ast.Module | Function]:
    """The module body (a script's top level) and then every function of the file."""
    yield tree
    for function, _cls in functions(tree):
        yield function


def grad_off_ranges(function: ast.AST, imports: ImportMap) -> list[tuple[int, int]]:
    """Line ranges of ``with no_grad()``/``inference_mode()`` blocks inside ``function``."""
    ranges: list[tuple[int, int]] = []
    for sub in local_nodes(function):
        if isinstance(sub, ast.With | ast.AsyncWith):
            for item in sub.items:
                mode = mode_of_context(item.context_expr, imports)
                if mode is not None and mode.no_graph:
                    ranges.append((sub.lineno, sub.end_lineno or sub.lineno))
    return ranges


def decorated_grad_off(function: Function, imports: ImportMap) -> bool:
    return any(
        (mode := mode_of_context(d, imports)) is not None and mode.no_graph
        for d in function.decorator_list
    )


def inside(line: int, ranges: Iterable[tuple[int, int]]) -> bool:
    return any(start <= line <= end for start, end in ranges)


def is_backward(call: ast.Call) -> bool:
    """``x.backward()``, ``accelerator.backward(x)``, ``self.manual_backward(x)``: a backward
    that adds into ``.grad`` (distributed autograd keeps its gradients per context)."""
    func = call.func
    if not isinstance(func, ast.Attribute) or func.attr not in {"backward", "manual_backward"}:
        return False
    owner = dotted(func.value) or ""
    return not ("dist" in owner and "autograd" in owner)


def names_read(node: ast.AST) -> set[str]:
    """Dotted names an expression reads (``self.h``, ``h``, and each prefix ``self``)."""
    found: set[str] = set()
    for sub in ast.walk(node):
        if isinstance(sub, ast.Name | ast.Attribute) and isinstance(sub.ctx, ast.Load):
            text = dotted(sub)
            if text is not None:
                found.add(text)
    return found


def target_names(target: ast.expr) -> list[str]:
    """Dotted names a binding target binds (tuple elements included)."""
    if isinstance(target, ast.Tuple | ast.List):
        return [n for elt in target.elts for n in target_names(elt)]
    if isinstance(target, ast.Starred):
        return target_names(target.value)
    text = dotted(target)
    return [text] if text is not None else []


def statement_indent(facts: FileModel, node: ast.stmt) -> str:
    line = facts.lines[node.lineno - 1]
    return line[: len(line) - len(line.lstrip())]


def is_true(node: ast.expr) -> bool:
    """A literal ``True`` (or ``1``)."""
    return isinstance(node, ast.Constant) and node.value in (True, 1)


def is_false(node: ast.expr) -> bool:
    """A literal ``False`` (or ``0``)."""
    return isinstance(node, ast.Constant) and node.value in (False, 0) and node.value is not None


def module_of(node: ast.expr) -> str | None:
    """``self.enc`` for ``self.enc``, ``self.enc.to(d)``, ``self.enc.parameters()``."""
    while isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
        node = node.func.value
    return dotted(node)


def parameters_of(iterable: ast.expr) -> str | None:
    """``m`` for ``m.parameters()``, ``m.named_parameters()`` (through ``enumerate``/``list``)."""
    for sub in ast.walk(iterable):
        if (
            isinstance(sub, ast.Call)
            and isinstance(sub.func, ast.Attribute)
            and sub.func.attr in {"parameters", "named_parameters"}
        ):
            return module_of(sub.func.value)
    return None


def is_backward_node(node: ast.AST) -> bool:
    return isinstance(node, ast.Call) and is_backward(node)


OPTIMISER_CLASSES = frozenset(
    {
        "SGD",
        "Adam",
        "AdamW",
        "Adamax",
        "Adagrad",
        "Adadelta",
        "RMSprop",
        "Rprop",
        "ASGD",
        "NAdam",
        "RAdam",
        "LBFGS",
        "SparseAdam",
        "Adafactor",
        "Lion",
        "Lamb",
        "LAMB",
        "LARS",
        "FusedAdam",
        "FusedLAMB",
        "AdamW8bit",
    }
)


def constructs_optimiser(value: ast.expr, imports: ImportMap) -> bool:
    if not isinstance(value, ast.Call):
        return False
    qual = imports.resolve(value.func) or ""
    if qual.startswith("torch.optim.") and "lr_scheduler" not in qual and "swa" not in qual:
        return True
    last = (dotted(value.func) or "").rsplit(".", 1)[-1]
    return last in OPTIMISER_CLASSES


def local_callees(tree: ast.Module) -> dict[str, ast.AST]:
    """Functions the file defines, by the names a call would use (``f``, ``self.f``)."""
    found: dict[str, ast.AST] = {}
    for function, cls in functions(tree):
        if cls is None:
            found.setdefault(function.name, function)
        else:
            found.setdefault(f"self.{function.name}", function)
    return found
