"""Graph recording against the code's intent.

- GF108: ``Variable(x, volatile=True)``, a no-op since torch 0.4: the graph is recorded
- GF207: grad off inside ``forward`` of a module whose output feeds a loss: the input's
  gradient is cut
"""

from __future__ import annotations

import ast
from collections.abc import Iterator

from gradfence.lint.imports import ImportMap, dotted
from gradfence.lint.model import FileModel
from gradfence.lint.rules.frames import (
    Function,
    decorated_grad_off,
    grad_off_ranges,
    inside,
    is_true,
    local_nodes,
    names_read,
    target_names,
)
from gradfence.lint.rules.registry import Hit, rule
from gradfence.lint.scopes import mode_of_context

# -- GF108 ------------------------------------------------------------------------------------

_VARIABLE = frozenset({"torch.autograd.Variable", "torch.autograd.variable.Variable"})


@rule(
    "GF108",
    "volatile-does-nothing",
    "`volatile=True` has had no effect since torch 0.4: the graph is recorded",
)
def volatile_does_nothing(facts: FileModel) -> Iterator[Hit]:
    """
    ## What it does
    Reports `Variable(x, volatile=True)` and `x.volatile = True`.

    ## Evidence
    The call resolves to `torch.autograd.Variable` through the file's
    imports (or is spelled `Variable(...)`/`autograd.Variable(...)`) with a literal
    `volatile=True`, or `.volatile` is assigned `True`. Confidence: high.

    ## Why is this a problem?
    Before PyTorch 0.4, a volatile input switched graph recording off for everything
    computed from it, and evaluation code relied on it to save memory. Since 0.4
    `Variable` is an alias that returns a plain tensor and `volatile` is ignored (torch
    only warns once: "volatile was removed and now has no effect"). Code written this
    way records the whole autograd graph of its evaluation: it holds every activation
    in memory until the outputs die, and runs out of memory on inputs that used to fit.

    **Hidden detail.** Nothing fails: the outputs are the same, only memory and time
    grow, so old evaluation scripts keep running long after the flag stopped working.

    ## Example
    ```python
    import torch
    from torch.autograd import Variable

    def evaluate(model, images):
        images = Variable(images, volatile=True)
        return model(images)
    ```

    ## Use instead
    ```python
    import torch

    def evaluate(model, images):
        with torch.no_grad():
            return model(images)
    ```

    ## References
    - PyTorch 0.4 migration guide, "Deprecation of volatile flag":
      https://pytorch.org/blog/pytorch-0_4_0-migration-guide/
    """
    if "volatile" not in facts.source:
        return
    imports = facts.imports
    for node in ast.walk(facts.tree):
        if isinstance(node, ast.Call):
            flag = next((k for k in node.keywords if k.arg == "volatile"), None)
            if flag is None or not is_true(flag.value):
                continue
            qual = imports.resolve(node.func)
            text = dotted(node.func) or ""
            if qual in _VARIABLE or (qual is None and text.rsplit(".", 1)[-1] == "Variable"):
                yield (
                    node,
                    "`volatile=True` has had no effect since torch 0.4: this code records the "
                    "whole graph (use `with torch.no_grad():`)",
                    None,
                )
        elif isinstance(node, ast.Assign) and is_true(node.value):
            for target in node.targets:
                if isinstance(target, ast.Attribute) and target.attr == "volatile":
                    yield (
                        node,
                        "`.volatile = True` has had no effect since torch 0.4: the graph is "
                        "still recorded (use `with torch.no_grad():`)",
                        None,
                    )


# -- GF207 ------------------------------------------------------------------------------------

_PARAMETER_CTORS = frozenset({"torch.nn.Parameter", "torch.nn.parameter.Parameter"})


def _is_loss_class(cls: ast.ClassDef) -> bool:
    names = [cls.name, *((dotted(b) or "").rsplit(".", 1)[-1] for b in cls.bases)]
    return any(n.endswith(("Loss", "Criterion")) for n in names)


def _parameter_attrs(cls: ast.ClassDef, imports: ImportMap) -> set[str]:
    """``self.w`` bound to ``nn.Parameter(...)`` in the class."""
    found: set[str] = set()
    for sub in ast.walk(cls):
        if isinstance(sub, ast.Assign) and isinstance(sub.value, ast.Call):
            qual = imports.resolve(sub.value.func) or ""
            last = (dotted(sub.value.func) or "").rsplit(".", 1)[-1]
            if qual in _PARAMETER_CTORS or (not qual and last == "Parameter"):
                for target in sub.targets:
                    found.update(n for n in target_names(target) if n.startswith("self."))
    return found


def _fed_parameters(classes: dict[str, ast.ClassDef], imports: ImportMap) -> set[str]:
    """Classes of the file whose instances another class calls on one of its parameters:
    their ``forward`` input needs a gradient."""
    fed: set[str] = set()
    for cls in classes.values():
        parameters = _parameter_attrs(cls, imports)
        if not parameters:
            continue
        instances: dict[str, str] = {}
        for sub in ast.walk(cls):
            if isinstance(sub, ast.Assign) and isinstance(sub.value, ast.Call):
                kind = dotted(sub.value.func)
                if kind in classes:
                    for target in sub.targets:
                        for name in target_names(target):
                            instances[name] = kind
        for sub in ast.walk(cls):
            if isinstance(sub, ast.Call):
                kind = instances.get(dotted(sub.func) or "")
                if kind is not None and any(dotted(a) in parameters for a in sub.args):
                    fed.add(kind)
    return fed


@rule(
    "GF207",
    "no-grad-cuts-input-gradient",
    "grad off inside `forward` of a module whose output feeds a loss: its input gets no gradient",
)
def no_grad_cuts_input_gradient(facts: FileModel) -> Iterator[Hit]:
    """
    ## What it does
    Reports `@torch.no_grad()` on `forward` (or a method it calls), or a
    `with torch.no_grad():` block inside `forward`, that computes the module's result from
    its input, when that input needs a gradient: the module is a loss (its first input is
    the prediction), or the file calls it on a parameter of another module.

    ## Evidence
    A class named like a loss (`...Loss`, `...Criterion`, or a base that
    is), or a class whose instance another class of the file calls on one of its
    `nn.Parameter` attributes; a value computed from that input inside the grad-off
    region reaches the `return`. Confidence: high.

    ## Why is this a problem?
    A grad-off region cuts the graph for everything computed inside it, the *input* of the
    module included, not only its own parameters (that case is GF203). A feature
    transform (STFT, filterbank, normalisation) written under `no_grad` for speed and then
    used inside a loss makes the loss a constant for the network that produced the
    prediction; a constraint applied to another module's parameter under `no_grad`
    stops that parameter from learning. Training runs, the loss moves through the other
    terms, and the cut part silently stops learning.

    **Hidden detail.** `no_grad` is often right in `forward`: on the *target* side of a
    loss, or on raw input data that has no gradient to lose. Those are not reported: only
    the loss's first input, and inputs the file shows are parameters, count.

    ## Example
    ```python
    import torch

    class SpectralLoss(torch.nn.Module):
        @torch.no_grad()
        def forward(self, prediction, target):
            return (torch.stft(prediction, 512).abs() - torch.stft(target, 512).abs()).mean()
    ```

    ## Use instead
    ```python
    import torch

    class SpectralLoss(torch.nn.Module):
        def forward(self, prediction, target):
            with torch.no_grad():
                reference = torch.stft(target, 512).abs()
            return (torch.stft(prediction, 512).abs() - reference).mean()
    ```

    ## References
    - PyTorch docs, "Locally disabling gradient computation":
      https://pytorch.org/docs/stable/notes/autograd.html#locally-disabling-gradient-computation
    """
    if "no_grad" not in facts.source and "inference_mode" not in facts.source:
        return
    imports = facts.imports
    classes = {n.name: n for n in ast.walk(facts.tree) if isinstance(n, ast.ClassDef)}
    fed = _fed_parameters(classes, imports)
    for cls in classes.values():
        loss = _is_loss_class(cls)
        if not loss and cls.name not in fed:
            continue
        methods = {f.name: f for f in cls.body if isinstance(f, Function)}
        forward = methods.get("forward") or methods.get("__call__")
        if forward is None:
            continue
        args = [a.arg for a in (*forward.args.posonlyargs, *forward.args.args)][1:]
        if not args:
            continue
        needs = {args[0]} if loss else set(args)
        decorator = next(
            (
                d
                for d in forward.decorator_list
                if (mode := mode_of_context(d, imports)) is not None and mode.no_graph
            ),
            None,
        )
        if decorator is not None:
            yield (
                decorator,
                f"`{cls.name}.{forward.name}` runs under no_grad: its input `{args[0]}` gets "
                f"no gradient through it (keep grad on for the input that is learned)",
                None,
            )
            continue
        yield from _cut_inside(forward, cls, methods, needs, imports)


def _cut_inside(
    forward: Function,
    cls: ast.ClassDef,
    methods: dict[str, Function],
    needs: set[str],
    imports: ImportMap,
) -> Iterator[Hit]:
    off = grad_off_ranges(forward, imports)
    derived = set(needs)
    cut: dict[str, ast.AST] = {}
    statements = sorted(
        (s for s in local_nodes(forward) if isinstance(s, ast.stmt)),
        key=lambda s: (s.lineno, s.col_offset),
    )
    for stmt in statements:
        if isinstance(stmt, ast.Assign):
            reads = names_read(stmt.value)
            if not reads & derived:
                continue
            names = [n for t in stmt.targets for n in target_names(t)]
            calls_off = _calls_grad_off_method(stmt.value, methods, derived, imports)
            if inside(stmt.lineno, off) or calls_off:
                for name in names:
                    cut[name] = calls_off or _enclosing_with(forward, stmt, imports) or stmt
            else:
                derived.update(names)
        elif isinstance(stmt, ast.Return) and stmt.value is not None:
            reads = names_read(stmt.value)
            if inside(stmt.lineno, off) and reads & derived:
                where = _enclosing_with(forward, stmt, imports) or stmt
                yield _cut_hit(cls, where, sorted(reads & derived)[0])
                return
            called = _calls_grad_off_method(stmt.value, methods, derived, imports)
            if called is not None:
                yield _cut_hit(cls, called, sorted(reads & derived)[0])
                return
            for name in sorted(reads & set(cut)):
                yield _cut_hit(cls, cut[name], name)
                return


def _cut_hit(cls: ast.ClassDef, where: ast.AST, name: str) -> Hit:
    return (
        where,
        f"`{name}` is computed from the input of `{cls.name}.forward` under no_grad and "
        f"returned: the input gets no gradient through it (keep grad on for the learned input)",
        None,
    )


def _calls_grad_off_method(
    value: ast.expr, methods: dict[str, Function], derived: set[str], imports: ImportMap
) -> ast.Call | None:
    """A call ``self.m(x)`` of a grad-off decorated method on a value that needs grad."""
    for sub in ast.walk(value):
        if isinstance(sub, ast.Call):
            name = dotted(sub.func) or ""
            method = methods.get(name[5:]) if name.startswith("self.") else None
            if (
                method is not None
                and decorated_grad_off(method, imports)
                and any(names_read(a) & derived for a in sub.args)
            ):
                return sub
    return None


def _enclosing_with(function: ast.AST, node: ast.stmt, imports: ImportMap) -> ast.AST | None:
    best: ast.AST | None = None
    for sub in local_nodes(function):
        if isinstance(sub, ast.With | ast.AsyncWith) and any(n is node for n in ast.walk(sub)):
            for item in sub.items:
                mode = mode_of_context(item.context_expr, imports)
                if mode is not None and mode.no_graph:
                    best = sub
    return best


# -- GF204, widened: any in-place write to a parameter while grad is on ---------------------

_INPLACE_WRITES = frozenset(
    {"zero_", "fill_", "copy_", "normal_", "uniform_", "add_", "sub_", "mul_", "div_"}
    | {"clamp_", "clamp_min_", "clamp_max_", "masked_fill_", "index_fill_", "scatter_"}
    | {"exponential_", "bernoulli_", "random_", "fill_diagonal_", "addcmul_", "addcdiv_"}
)
# hooks frameworks call under no_grad (Hugging Face wraps ``_init_weights`` so)
_INIT_HOOKS = frozenset({"_init_weights"})


def _parameters_named(function: ast.AST, cls: ast.ClassDef | None, imports: ImportMap) -> set[str]:
    """What the function can prove is a parameter: ``self.w`` bound to ``nn.Parameter``,
    ``self.layer.weight``/``.bias``, a loop variable over ``m.parameters()``, and local
    names bound to any of these (``w = self.fc.weight``)."""
    proven: set[str] = set()
    if cls is not None:
        proven |= _class_parameters(cls, imports)
    for sub in local_nodes(function):
        if isinstance(sub, ast.For | ast.AsyncFor) and isinstance(sub.iter, ast.Call):
            func = sub.iter.func
            if isinstance(func, ast.Attribute) and func.attr == "parameters":
                proven.update(target_names(sub.target))
            elif (
                isinstance(func, ast.Attribute)
                and func.attr == "named_parameters"
                and isinstance(sub.target, ast.Tuple)
                and len(sub.target.elts) == 2
            ):
                proven.update(target_names(sub.target.elts[1]))
    for sub in sorted(
        (s for s in local_nodes(function) if isinstance(s, ast.Assign)),
        key=lambda s: (s.lineno, s.col_offset),
    ):
        source = dotted(sub.value)
        if source is not None and _is_parameter(source, proven):
            for target in sub.targets:
                if isinstance(target, ast.Name):
                    proven.add(target.id)
    return proven


def _class_parameters(cls: ast.ClassDef, imports: ImportMap) -> set[str]:
    found: set[str] = set()
    for sub in ast.walk(cls):
        if isinstance(sub, ast.Assign) and _new_parameter(sub.value, imports):
            for target in sub.targets:
                found.update(n for n in target_names(target) if n.startswith("self."))
    return found


def _new_parameter(value: ast.expr, imports: ImportMap) -> bool:
    """``nn.Parameter(...)`` that requires grad (``requires_grad=False`` is a constant)."""
    if not isinstance(value, ast.Call):
        return False
    qual = imports.resolve(value.func) or ""
    last = (dotted(value.func) or "").rsplit(".", 1)[-1]
    if qual not in _PARAMETER_CTORS and (qual or last != "Parameter"):
        return False
    flag = [k.value for k in value.keywords if k.arg == "requires_grad"] + value.args[1:2]
    return not (flag and isinstance(flag[0], ast.Constant) and flag[0].value is False)


def _bound_here(function: ast.AST, name: str, line: int, imports: ImportMap) -> bool | None:
    """What the function's last binding of ``name`` before ``line`` makes it: a parameter
    (True), something else (False), or None when the function binds it nowhere before."""
    latest: ast.Assign | None = None
    for sub in local_nodes(function):
        if (
            isinstance(sub, ast.Assign)
            and sub.lineno < line
            and any(name in target_names(t) for t in sub.targets)
            and (latest is None or sub.lineno > latest.lineno)
        ):
            latest = sub
    if latest is None:
        return None
    return _new_parameter(latest.value, imports) or _is_parameter_text(dotted(latest.value))


def _is_parameter_text(text: str | None) -> bool:
    return text is not None and _is_parameter(text, set())


def _is_parameter(text: str, proven: set[str]) -> bool:
    if text in proven:
        return True
    parts = text.split(".")
    # ``self.fc.weight``: a layer's own weight or bias
    return len(parts) == 3 and parts[0] == "self" and parts[2] in {"weight", "bias"}


def in_place_parameter_writes(
    function: ast.AST, cls: ast.ClassDef | None, imports: ImportMap
) -> list[tuple[ast.AST, str]]:
    """In-place writes to a parameter in ``function`` while grad mode is on: slice
    assignment, augmented assignment and in-place methods, through ``.data`` excepted."""
    if isinstance(function, Function) and (
        function.name in _INIT_HOOKS or decorated_grad_off(function, imports)
    ):
        return []
    proven = _parameters_named(function, cls, imports)
    off = grad_off_ranges(function, imports)
    found: list[tuple[ast.AST, str]] = []
    for sub in local_nodes(function):
        target: ast.expr | None = None
        how = ""
        if isinstance(sub, ast.Assign):
            for item in sub.targets:
                if isinstance(item, ast.Subscript):
                    target, how = item.value, "slice assignment"
        elif isinstance(sub, ast.AugAssign) and not _reads_grad(sub.value):
            target, how = sub.target, "augmented assignment"
        elif (
            isinstance(sub, ast.Call)
            and isinstance(sub.func, ast.Attribute)
            and sub.func.attr in _INPLACE_WRITES
            and not any(_reads_grad(a) for a in sub.args)
        ):
            target, how = sub.func.value, f"`.{sub.func.attr}()`"
        if target is None or inside(getattr(sub, "lineno", 0), off):
            continue
        text = dotted(target)
        if text is None or not _is_parameter(text, proven):
            continue
        here = _bound_here(function, text, getattr(sub, "lineno", 0), imports)
        if here is False:
            continue  # bound to a plain tensor first (and wrapped in a Parameter later)
        found.append(
            (
                sub,
                f"in-place write to parameter `{text}` ({how}) with grad enabled: a leaf "
                f"that requires grad cannot change in place (wrap it in `torch.no_grad()`)",
            )
        )
    return found


def _reads_grad(node: ast.AST) -> bool:
    return any(isinstance(sub, ast.Attribute) and sub.attr == "grad" for sub in ast.walk(node))
