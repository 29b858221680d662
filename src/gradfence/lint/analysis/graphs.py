"""Which expressions carry a tensor's autograd graph, and which parameters a method keeps.

- :func:`graph_refs`: an expression reads one of some names other than through
  ``.item()``/``.detach()``/``.data``/a size (the value it computes still holds the graph);
- :func:`kept_parameters`: the parameters a method keeps beyond the call, graph and all:
  assigned or accumulated into ``self`` (``self.val = v``, ``self.sum += v * n``,
  ``self._sum[i] += v``) or appended to a container on ``self``, without being detached or
  turned into a number anywhere in the method (a meter that calls ``.item()`` keeps a
  number). The summaries record them as ``keep`` events, so a caller that hands the loss
  to such a method is known to keep the loss (GF401).
"""

from __future__ import annotations

import ast

from gradfence.lint.imports import dotted

SANITIZING_METHODS = frozenset({"item", "detach", "tolist", "numpy", "detach_"})
SCALAR_ATTRS = frozenset({"shape", "dtype", "device", "ndim", "is_cuda"})
# turn a tensor into a Python number (or a copy without the graph)
_NUMBER_FUNCS = frozenset({"float", "int", "bool", "round"})
_SANITIZING_FUNCS = frozenset({"float", "int", "bool", "len", "str", "round"})
_SCALAR_METHODS = frozenset({"item", "size", "tolist", "dim", "numel", "detach_"})
# methods of a container on ``self`` that keep their arguments
KEEPING_METHODS = frozenset({"append", "extend", "insert", "add", "appendleft", "put"})


def graph_refs(node: ast.AST, tainted: set[str]) -> bool:
    """Whether ``node`` reads a tainted name other than through ``.item()``/``.detach()``...

    Iterative, so that a 2,000-term sum does not exhaust the recursion limit.
    """
    return graph_name(node, tainted) is not None


def graph_name(node: ast.AST, tainted: set[str] | dict[str, str]) -> str | None:
    """The first tainted name ``node`` reads with its graph (see :func:`graph_refs`)."""
    stack: list[ast.AST] = [node]
    while stack:
        sub = stack.pop()
        if isinstance(sub, ast.Name):
            if sub.id in tainted:
                return sub.id
        elif isinstance(sub, ast.Call):
            func = sub.func
            if isinstance(func, ast.Attribute) and func.attr in SANITIZING_METHODS:
                continue
            if getattr(func, "attr", getattr(func, "id", None)) == "grad":
                continue  # torch.autograd.grad(loss, ...) returns gradients, not the loss
            if isinstance(func, ast.Attribute):
                stack.append(func.value)  # a method of the loss itself: loss.mean()...
            if (dotted(func) or "").split(".", 1)[0] == "torch":
                stack.extend(sub.args)
                stack.extend(k.value for k in sub.keywords)
            # f(loss): what an arbitrary function returns is unknown, so its args are not read
        elif isinstance(sub, ast.Compare | ast.Lambda) or (
            isinstance(sub, ast.Attribute) and sub.attr in {"data", *SCALAR_ATTRS}
        ):
            continue
        else:
            stack.extend(ast.iter_child_nodes(sub))
    return None


def plain_value(value: ast.expr | None) -> bool:
    """An expression that is certainly not a tensor (a constant, a size, an ``.item()``)."""
    if value is None or isinstance(value, ast.Constant):
        return True
    if isinstance(value, ast.Attribute) and value.attr in SCALAR_ATTRS:
        return True
    if isinstance(value, ast.Call):
        func = value.func
        if isinstance(func, ast.Attribute) and func.attr in _SCALAR_METHODS:
            return True
        if isinstance(func, ast.Name) and func.id in _SANITIZING_FUNCS:
            return True
    if isinstance(value, ast.UnaryOp):
        return plain_value(value.operand)
    if isinstance(value, ast.BinOp):
        return plain_value(value.left) and plain_value(value.right)
    return False


def body_nodes(body: list[ast.stmt]) -> list[ast.AST]:
    """Every node of a body in source order, nested functions and classes left out."""
    found: list[ast.AST] = []
    stack: list[ast.AST] = list(reversed(body))
    while stack:
        node = stack.pop()
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef | ast.Lambda):
            continue
        found.append(node)
        stack.extend(reversed(list(ast.iter_child_nodes(node))))
    return found


def _on_self(target: ast.expr) -> bool:
    """``self.x``, ``self.x[i]``, ``self.x.y``: a place that outlives the call."""
    while isinstance(target, ast.Attribute | ast.Subscript):
        target = target.value
    return isinstance(target, ast.Name) and target.id == "self"


def _sanitized(node: ast.AST, derived: dict[str, str]) -> str | None:
    """The parameter a call turns into a number or detaches: ``v.item()``, ``float(v)``."""
    if not isinstance(node, ast.Call):
        return None
    func = node.func
    if isinstance(func, ast.Attribute) and func.attr in SANITIZING_METHODS | {"cpu"}:
        inner = func.value
        while isinstance(inner, ast.Attribute | ast.Subscript):
            inner = inner.value
        if isinstance(inner, ast.Name):
            return derived.get(inner.id)
    if isinstance(func, ast.Name) and func.id in _NUMBER_FUNCS and node.args:
        first = node.args[0]
        if isinstance(first, ast.Name):
            return derived.get(first.id)
    return None


def kept_parameters(
    node: ast.FunctionDef | ast.AsyncFunctionDef, params: list[str]
) -> list[tuple[int, int, str]]:
    """``(line, col, parameter)`` for each parameter of a method kept on ``self`` with its
    graph; a parameter detached or turned into a number anywhere in the method is not."""
    if not params:
        return []
    nodes = body_nodes(node.body)
    derived = {p: p for p in params}  # name -> the parameter its value comes from
    for _ in range(2):  # values derived from derived values, in any order
        for sub in nodes:
            if isinstance(sub, ast.For | ast.AsyncFor | ast.comprehension):
                source = _source(_iterated(sub.iter), derived)
                if source is not None:
                    for name in ast.walk(sub.target):
                        if isinstance(name, ast.Name):
                            derived.setdefault(name.id, source)
            elif isinstance(sub, ast.Assign | ast.AnnAssign) and sub.value is not None:
                source = _source(sub.value, derived)
                targets = sub.targets if isinstance(sub, ast.Assign) else [sub.target]
                for target in targets:
                    if isinstance(target, ast.Name) and source is not None:
                        derived.setdefault(target.id, source)
    sanitized = {p for sub in nodes if (p := _sanitized(sub, derived)) is not None}
    kept: list[tuple[int, int, str]] = []
    for sub in nodes:
        value: ast.expr | None = None
        if (isinstance(sub, ast.Assign) and any(_on_self(t) for t in sub.targets)) or (
            isinstance(sub, ast.AugAssign | ast.AnnAssign) and _on_self(sub.target)
        ):
            value = sub.value
        elif (
            isinstance(sub, ast.Call)
            and isinstance(sub.func, ast.Attribute)
            and sub.func.attr in KEEPING_METHODS
            and _on_self(sub.func.value)
        ):
            value = ast.Tuple(elts=[*sub.args, *(k.value for k in sub.keywords)])
        if value is None:
            continue
        source = _source(value, derived)
        if source is not None and source not in sanitized:
            kept.append((sub.lineno, sub.col_offset, source))  # type: ignore[attr-defined]
    return kept


def _source(value: ast.AST, derived: dict[str, str]) -> str | None:
    """The parameter whose graph ``value`` carries, if it carries one."""
    name = graph_name(value, derived)
    return None if name is None else derived[name]


def _iterated(node: ast.expr) -> ast.expr:
    """What a loop walks over: ``values`` in ``enumerate(values)``, ``zip(values, w)``
    (as a tuple), ``values.items()``."""
    if isinstance(node, ast.Call):
        func = node.func
        if isinstance(func, ast.Name) and func.id in _ITERATORS:
            return ast.Tuple(elts=list(node.args))
        if isinstance(func, ast.Attribute) and func.attr in {"items", "values"}:
            return func.value
    return node


_ITERATORS = frozenset({"enumerate", "zip", "reversed", "list", "tuple", "iter", "sorted"})
