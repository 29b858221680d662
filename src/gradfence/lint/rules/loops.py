"""Training loops: what one iteration leaves to the next.

- GF206: ``optimizer.step()`` every iteration, gradients never cleared
- GF404: a tensor carried from one training iteration to the next with its graph
"""

from __future__ import annotations

import ast
import builtins
import re
from collections.abc import Callable, Iterator

from gradfence.lint.diagnostics import LOW, Edit, Fix
from gradfence.lint.imports import ImportMap, dotted
from gradfence.lint.model import FileModel
from gradfence.lint.rules.frames import (
    Function,
    Loop,
    code_blocks,
    constructs_optimiser,
    decorated_grad_off,
    functions,
    grad_off_ranges,
    inside,
    is_backward_node,
    local_callees,
    local_nodes,
    names_read,
    statement_indent,
    target_names,
)
from gradfence.lint.rules.registry import Hit, rule

# -- GF206 ------------------------------------------------------------------------------------

_OPTIMISER_WORD = re.compile(r"(optim|optimi[sz]er|(^|_)opt(_|$|\d))", re.IGNORECASE)
_NOT_OPTIMISER_WORD = re.compile(r"sched|(^|_)lr(_|$)|scaler|engine|swa|ema|env", re.IGNORECASE)
_CLEARING_CALLS = frozenset({"zero_grad", "zero_grads", "clear_grad", "clear_gradients"})


def _optimisers_built(tree: ast.Module, imports: ImportMap) -> set[str]:
    """Names and attributes the file binds to a newly built optimiser."""
    built: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and constructs_optimiser(node.value, imports):
            for target in node.targets:
                built.update(target_names(target))
    return built


def _stepped_optimiser(call: ast.Call, built: set[str]) -> tuple[str, bool] | None:
    """``(optimiser, sure)`` for ``opt.step()`` or ``scaler.step(opt)``; None otherwise."""
    func = call.func
    if not isinstance(func, ast.Attribute) or func.attr != "step":
        return None
    receiver = dotted(func.value)
    if receiver is None:
        return None
    last = receiver.rsplit(".", 1)[-1]
    if "scaler" in last.lower() and call.args:
        inner = dotted(call.args[0])
        return (inner, True) if inner is not None else None
    name = _stepped_optimiser_name(receiver, built)
    return (name, True) if name is not None else None


def _stepped_optimiser_name(receiver: str, built: set[str]) -> str | None:
    """``receiver`` when it is an optimiser: built as one in this file, or named like one."""
    if receiver in built:
        return receiver
    last = receiver.rsplit(".", 1)[-1]
    if _NOT_OPTIMISER_WORD.search(last) or not _OPTIMISER_WORD.search(last):
        return None
    return receiver


def _clearing(optimiser: str, built: set[str]) -> Callable[[ast.AST], bool]:
    """A test for nodes that clear the gradients ``optimiser`` steps with:
    ``zero_grad()`` on it or on a model (not on another optimiser), ``p.grad = None``,
    ``p.grad.zero_()``, ``del p.grad``."""

    def clears(node: ast.AST) -> bool:
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr in _CLEARING_CALLS
        ):
            receiver = dotted(node.func.value)
            if receiver is None or receiver == optimiser:
                return True
            return _stepped_optimiser_name(receiver, built) is None
        return _clears_by_hand(node)

    return clears


def _clears_by_hand(node: ast.AST) -> bool:
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
        owner = node.func.value
        while isinstance(owner, ast.Attribute) and owner.attr == "data":
            owner = owner.value
        if isinstance(owner, ast.Attribute) and owner.attr == "grad":
            return node.func.attr in {"zero_", "fill_", "detach_", "mul_"}
    if isinstance(node, ast.Assign | ast.AugAssign | ast.AnnAssign | ast.Delete):
        targets = node.targets if isinstance(node, ast.Assign | ast.Delete) else [node.target]
        return any(isinstance(t, ast.Attribute) and t.attr == "grad" for t in targets)
    return False


def _reaches(
    start: ast.AST,
    callees: dict[str, ast.AST],
    test: Callable[[ast.AST], bool],
    *,
    nested: bool,
) -> bool:
    """Whether ``test`` holds for a node under ``start`` or under a file-local function it
    calls (transitively). ``nested`` also looks inside functions defined under ``start``
    (closures handed to ``optimizer.step(closure)``)."""
    seen: set[int] = set()
    todo: list[ast.AST] = [start]
    while todo:
        node = todo.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        walk = ast.walk(node) if nested or node is not start else local_nodes(node)
        for sub in walk:
            if test(sub):
                return True
            if isinstance(sub, ast.Call):
                name = dotted(sub.func)
                callee = callees.get(name or "")
                if callee is not None:
                    todo.append(callee)
                for arg in sub.args:  # ``optimizer.step(closure)``
                    target = callees.get(dotted(arg) or "")
                    if target is not None:
                        todo.append(target)
    return False


def _conditional_path(loop: Loop, node: ast.AST) -> bool:
    """Whether ``node`` sits under an ``if`` (or an ``except``) inside ``loop``'s body."""

    def search(body: list[ast.stmt], guarded: bool) -> bool | None:
        for stmt in body:
            if stmt is node or any(sub is node for sub in ast.walk(stmt)):
                if stmt is node or isinstance(stmt, ast.Expr | ast.Assign | ast.AugAssign):
                    return guarded
                if isinstance(stmt, ast.If):
                    inner = search(stmt.body, True)
                    return inner if inner is not None else search(stmt.orelse, True)
                if isinstance(stmt, ast.Try) or type(stmt).__name__ == "TryStar":
                    found = search(stmt.body, guarded)  # type: ignore[attr-defined]
                    if found is not None:
                        return found
                    for handler in stmt.handlers:  # type: ignore[attr-defined]
                        found = search(handler.body, True)
                        if found is not None:
                            return found
                    return search(
                        stmt.orelse + stmt.finalbody,  # type: ignore[attr-defined]
                        guarded,
                    )
                for name in ("body", "orelse"):
                    block = getattr(stmt, name, None)
                    if isinstance(block, list):
                        found = search(block, guarded)
                        if found is not None:
                            return found
                return guarded
        return None

    return bool(search(loop.body, False))


def _innermost_loops(function: ast.AST) -> Iterator[tuple[Loop, ast.Call]]:
    """``(loop, call)`` for every call and the innermost loop of ``function`` around it."""

    def visit(node: ast.AST, loop: Loop | None) -> Iterator[tuple[Loop, ast.Call]]:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, Function | ast.ClassDef | ast.Lambda):
                continue
            inner = child if isinstance(child, Loop) else loop
            if isinstance(child, ast.Call) and loop is not None:
                yield loop, child
            yield from visit(child, inner)

    yield from visit(function, None)


@rule(
    "GF206",
    "missing-zero-grad",
    "`optimizer.step()` every iteration but gradients are never cleared: they pile up",
    fixable=True,
)
def missing_zero_grad(facts: FileModel) -> Iterator[Hit]:
    """
    ## What it does
    Reports `optimizer.step()` (or `scaler.step(optimizer)`) called on every iteration
    of a loop that also runs `backward()`, when nothing in that loop, nor in a function
    of the file it calls, clears the gradients (`zero_grad()` on the optimiser or a
    model, `p.grad = None`, `p.grad.zero_()`, `del p.grad`). Also reports a per-batch
    method (`train_step`, `training_step`, `*_batch`) that runs `backward()` and applies
    the gradients itself (`optimizer.step()`, `p.data.add_(-lr, p.grad)`) when nothing in
    its class clears them and its caller is a framework: the class derives from a
    framework's base class, or the method overrides one of a project base class that
    cleared the gradients (the override drops the clear).

    ## Evidence
    The stepped object is built from `torch.optim` (or a known optimiser
    class) in this file, or is named like an optimiser (`optimizer`, `optim_g`, `opt`);
    the step is unconditional in the innermost loop around it; the loop (or a function
    of this file it calls) runs `backward()`. A loop that hands work to functions the
    analysis cannot see is judged only on what it shows. Distributed autograd's backward
    (gradients kept per context) does not count. For a per-batch method: its name says it
    runs once per batch (`step`, `batch`); it differentiates and steps or updates
    parameters from `.grad`, with no loop of its own; no method of the class clears
    gradients; and either a base class comes from a package outside the project and
    torch (its loop cannot be seen), or the project base class method it overrides (found
    through the summaries, in any module, also through a package's `__init__`
    re-export) clears them. Overriding a project method that never cleared them is
    silent. Confidence: high.

    ## Why is this a problem?
    `backward()` *adds* into `.grad`. Without a clear, the gradient used by step `n` is
    the sum of the gradients of all `n` batches so far: the effective learning rate grows
    with every step, training diverges or stalls, and nothing raises.

    **Hidden detail.** Accumulating on purpose looks different: the step runs every `k`
    iterations (inside an `if`), or the gradients are cleared right after the step.
    Those are not reported, and neither is a loop that builds a fresh optimiser each
    iteration.

    ## Example
    ```python
    import torch

    def train(model, loader, loss_fn):
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        optimizer.zero_grad()
        for x, y in loader:
            loss = loss_fn(model(x), y)
            loss.backward()
            optimizer.step()
    ```

    ## Use instead
    ```python
    import torch

    def train(model, loader, loss_fn):
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        for x, y in loader:
            optimizer.zero_grad()
            loss = loss_fn(model(x), y)
            loss.backward()
            optimizer.step()
    ```
    The fix (unsafe: it changes the numbers the author may have tuned against) clears
    the gradients right after the step.

    ## References
    - PyTorch docs, `Optimizer.zero_grad`:
      https://pytorch.org/docs/stable/generated/torch.optim.Optimizer.zero_grad.html
    - skorch-dev/skorch 7d36887 (a `train_step` override without `zero_grad()`)
    """
    if "backward" not in facts.source:
        return
    tree = facts.tree
    built = _optimisers_built(tree, facts.imports)
    callees = local_callees(tree)
    yield from _framework_hooks(facts, built, callees)
    if ".step(" not in facts.source:
        return
    for function in code_blocks(tree):
        for loop, call in _innermost_loops(function):
            stepped = _stepped_optimiser(call, built)
            if stepped is None:
                continue
            optimiser, _sure = stepped
            if _conditional_path(loop, call):
                continue
            if not _reaches(loop, callees, is_backward_node, nested=False):
                continue
            if _reaches(loop, callees, _clearing(optimiser, built), nested=True):
                continue
            if _built_in(loop, optimiser, facts.imports):
                continue
            statement = _statement_of(loop, call)
            fix = None
            if statement is not None and statement.end_lineno is not None:
                indent = statement_indent(facts, statement)
                end = (statement.end_lineno, statement.end_col_offset or 0)
                fix = Fix(
                    f"clear the gradients after the step: `{optimiser}.zero_grad()`",
                    (Edit(*end, *end, f"\n{indent}{optimiser}.zero_grad()"),),
                    safe=False,
                )
            yield (
                call,
                f"`{optimiser}` steps every iteration but the gradients are never cleared in "
                f"this loop: each step adds this batch's gradients to all earlier ones "
                f"(call `{optimiser}.zero_grad()` each iteration)",
                fix,
            )


# a framework method run once per batch (``train_step``, ``training_step``, ``fit_batch``)
_PER_BATCH_HOOK = re.compile(r"step|batch", re.IGNORECASE)


def _framework_hooks(
    facts: FileModel, built: set[str], callees: dict[str, ast.AST]
) -> Iterator[Hit]:
    """A per-batch method of a class built on a framework's base class (imported from
    outside the project and outside torch) that differentiates and applies the gradients
    itself (``optimizer.step()``, ``p.data.add_(-lr, p.grad)``), when nothing in the
    class clears them: the framework calls it every batch, so the gradients pile up. A
    method that overrides one of a project base class (any module) counts only when the
    method it replaces cleared the gradients."""
    for cls in ast.walk(facts.tree):
        if not isinstance(cls, ast.ClassDef) or not cls.bases:
            continue
        methods = [m for m in cls.body if isinstance(m, Function)]
        if any(_reaches(m, callees, _clears_anything, nested=True) for m in methods):
            continue
        external: bool | None = None
        for method in methods:
            if not _PER_BATCH_HOOK.search(method.name):
                continue
            # the method it overrides (a project base class, any module) cleared them
            replaced = facts.analysis.overridden(f"{cls.name}.{method.name}")
            if replaced is not None:
                if not any(
                    e[2] == "clear" for e in facts.analysis.events(replaced[1], replaced[0])
                ):
                    continue
            else:
                if external is None:
                    external = _framework_base(facts, cls)
                if not external:
                    continue
            nodes = list(local_nodes(method))
            if not any(is_backward_node(n) for n in nodes):
                continue
            if any(
                isinstance(n, Loop) and any(is_backward_node(i) for i in local_nodes(n))
                for n in nodes
            ):
                continue  # a loop of its own: judged as a loop
            update = next(
                (
                    n
                    for n in nodes
                    if (isinstance(n, ast.Call) and _stepped_optimiser(n, built) is not None)
                    or _applies_gradient(n)
                ),
                None,
            )
            if update is None:
                continue
            why = (
                f"`{replaced[1]}` it overrides cleared them"
                if replaced is not None
                else "a hook of a framework base class"
            )
            yield (
                update,
                f"`{method.name}` runs once per batch ({why}) and applies the gradients of "
                "its `backward()`, but nothing in the class clears them: each step adds this "
                "batch's gradients to all earlier ones (call `zero_grad()` before the "
                "backward)",
                None,
            )


def _framework_base(facts: FileModel, cls: ast.ClassDef) -> bool:
    """A base class imported from a package that is neither torch nor the project."""
    for base in cls.bases:
        qual = facts.imports.resolve(base) or _imported(facts, base)
        if qual is None or qual.split(".", 1)[0] in {"torch", "builtins", "typing", "abc"}:
            continue
        if facts.analysis.project.resolve(qual) is None:
            return True
    return False


def _imported(facts: FileModel, base: ast.expr) -> str | None:
    """``inferno.NeuralNet`` where ``import inferno`` binds the head."""
    text = dotted(base)
    if text is None or "." not in text:
        return None
    head = text.split(".", 1)[0]
    return text if head in facts.analysis.summary.imports else None


def _clears_anything(node: ast.AST) -> bool:
    if (
        isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and node.func.attr in _CLEARING_CALLS
    ):
        return True
    return _clears_by_hand(node)


def _applies_gradient(node: ast.AST) -> bool:
    """``p.data.add_(-lr, p.grad)``, ``p.data.sub_(lr * p.grad)``, ``p -= lr * p.grad``."""
    if (
        isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and node.func.attr in {"add_", "sub_", "addcdiv_", "addcmul_"}
    ):
        return any(_reads_grad(a) for a in [*node.args, *(k.value for k in node.keywords)])
    if isinstance(node, ast.AugAssign) and isinstance(node.op, ast.Sub | ast.Add):
        target = node.target
        return not (isinstance(target, ast.Attribute) and target.attr == "grad") and _reads_grad(
            node.value
        )
    return False


def _reads_grad(node: ast.AST) -> bool:
    return any(isinstance(s, ast.Attribute) and s.attr == "grad" for s in ast.walk(node))


def _built_in(loop: Loop, name: str, imports: ImportMap) -> bool:
    """Whether the loop builds the optimiser afresh each iteration."""
    for sub in local_nodes(loop):
        if (
            isinstance(sub, ast.Assign)
            and constructs_optimiser(sub.value, imports)
            and any(name in target_names(t) for t in sub.targets)
        ):
            return True
    return False


def _statement_of(loop: Loop, node: ast.AST) -> ast.stmt | None:
    """The simple statement of ``loop`` that holds ``node``."""
    for sub in ast.walk(loop):
        if isinstance(sub, ast.Expr | ast.Assign | ast.AugAssign) and any(
            inner is node for inner in ast.walk(sub)
        ):
            return sub
    return None


# -- GF404 ------------------------------------------------------------------------------------

_DETACHING = re.compile(r"detach|repackage|\.data\b|\.item\(|\.cpu\(|numpy", re.IGNORECASE)
_NOT_FORWARD_HEADS = frozenset({"torch", "np", "numpy", "math", "F", "random"}) | frozenset(
    name for name in dir(builtins) if not name.startswith("_")
)
# reading the input only for its type, device or shape does not connect it to the graph
_SHAPE_ONLY_CALLS = frozenset(
    {"type_as", "to", "view_as", "expand_as", "reshape_as", "size", "dim", "new_zeros"}
    | {"new_ones", "new_empty", "new_full", "new_tensor", "get_device"}
)
_SHAPE_ONLY_ATTRS = frozenset({"device", "dtype", "shape", "ndim", "is_cuda"})


@rule(
    "GF404",
    "state-carries-graph",
    "a tensor carried across training iterations keeps every step's graph alive",
)
def state_carries_graph(facts: FileModel) -> Iterator[Hit]:
    """
    ## What it does
    Reports state that one training iteration hands to the next with its autograd graph:

    - a value a module returns and is given back to it on the next iteration of a loop
      that runs `backward()` (`output, hidden = model(x, hidden)`), when nothing in the
      loop detaches it or starts it afresh;
    - a running statistic or memory that a module's `forward` updates from itself and its
      input (`self.mean = 0.9 * self.mean + 0.1 * x.mean()`) outside `no_grad` and
      without `.detach()`.

    ## Evidence
    For the loop shape: the same name is an argument and a result of one
    call inside a loop that differentiates, it is bound before that loop, and no other
    statement of the loop rebinds or detaches it. For the module shape: an attribute
    assigned in `forward` from an expression that reads the same attribute and the
    forward's input (reading only its dtype, device or shape does not count), with no
    `no_grad`, `.detach()` or `.data` on the way. Confidence: high for the loop shape; low
    (`--preview`) for the module shape, since the analysis cannot prove the statistic is
    differentiated later.

    ## Why is this a problem?
    The carried tensor remembers how it was computed, including the previous iteration's
    graph, which remembers the one before. Either the second `backward()` fails with
    "Trying to backward through the graph a second time", or (with `retain_graph=True`)
    memory and step time grow with every iteration.

    **Hidden detail.** Truncated back-propagation through time needs the *value* of the
    hidden state across batches but not its history: `hidden = hidden.detach()` (or a
    `repackage_hidden` helper) at each iteration keeps one and drops the other.

    ## Example
    ```python
    import torch

    def train(model, batches, optimizer, loss_fn):
        hidden = model.init_hidden()
        for x, y in batches:
            optimizer.zero_grad()
            output, hidden = model(x, hidden)
            loss_fn(output, y).backward()
            optimizer.step()
    ```

    ## Use instead
    ```python
    import torch

    def train(model, batches, optimizer, loss_fn):
        hidden = model.init_hidden()
        for x, y in batches:
            optimizer.zero_grad()
            hidden = hidden.detach()
            output, hidden = model(x, hidden)
            loss_fn(output, y).backward()
            optimizer.step()
    ```

    ## References
    - PyTorch examples, word_language_model `repackage_hidden`:
      https://github.com/pytorch/examples/tree/main/word_language_model
    - PyTorch FAQ, "My model reports cuda runtime error(2): out of memory":
      https://pytorch.org/docs/stable/notes/faq.html
    """
    if "backward" in facts.source:
        yield from _loop_carried(facts)
    if "forward" in facts.source and "self." in facts.source:
        yield from _running_state(facts)


def _loop_carried(facts: FileModel) -> Iterator[Hit]:
    imports = facts.imports
    for function in code_blocks(facts.tree):
        if isinstance(function, Function) and decorated_grad_off(function, imports):
            continue
        off = grad_off_ranges(function, imports)
        for loop in (n for n in local_nodes(function) if isinstance(n, Loop)):
            if not any(is_backward_node(n) for n in local_nodes(loop)):
                continue
            statements = [s for s in local_nodes(loop) if isinstance(s, ast.stmt)]
            statements.sort(key=lambda s: (s.lineno, s.col_offset))
            for stmt in statements:
                carried = _fed_back(stmt)
                if carried is None or inside(stmt.lineno, off):
                    continue
                name, call = carried
                if not _bound_before(function, loop, name):
                    continue
                if _handled_in_loop(loop, stmt, name):
                    continue
                yield (
                    call,
                    f"`{name}` is carried from one training iteration to the next with its "
                    f"graph: every step's graph stays reachable (detach it each iteration: "
                    f"`{name} = {name}.detach()`)",
                    None,
                )


def _fed_back(stmt: ast.stmt) -> tuple[str, ast.Call] | None:
    """``(name, call)`` for ``out, name = f(x, name)``: a forward given its own result."""
    if not isinstance(stmt, ast.Assign) or not isinstance(stmt.value, ast.Call):
        return None
    call = stmt.value
    callee = dotted(call.func)
    if callee is None or callee.split(".", 1)[0] in _NOT_FORWARD_HEADS:
        return None
    if isinstance(call.func, ast.Attribute) and call.func.attr not in {"forward", "__call__"}:
        head = callee.split(".", 1)[0]
        if head != "self" or callee.count(".") != 1:
            return None  # ``obj.method(...)`` is not known to be a forward
    bound = {n for t in stmt.targets for n in target_names(t)}
    arguments: list[ast.expr] = [*call.args, *(k.value for k in call.keywords)]
    for arg in arguments:
        for item in arg.elts if isinstance(arg, ast.Tuple | ast.List) else [arg]:
            text = dotted(item)
            if text is not None and text in bound and text != "self":
                return text, call
    return None


def _bound_before(function: ast.AST, loop: Loop, name: str) -> bool:
    """Whether ``name`` is bound in ``function`` before ``loop`` starts (or is a
    parameter of it): otherwise its first iteration reads something else."""
    if isinstance(function, Function):
        args = function.args
        if any(a.arg == name for a in (*args.posonlyargs, *args.args, *args.kwonlyargs)):
            return True
    for sub in local_nodes(function):
        if isinstance(sub, ast.Assign | ast.AnnAssign) and sub.lineno < loop.lineno:
            targets = sub.targets if isinstance(sub, ast.Assign) else [sub.target]
            if any(name in target_names(t) for t in targets):
                return True
    return name.startswith("self.")


def _handled_in_loop(loop: Loop, stmt: ast.stmt, name: str) -> bool:
    """Another statement of the loop rebinds or detaches ``name``."""
    for sub in local_nodes(loop):
        if sub is stmt:
            continue
        if isinstance(sub, ast.Assign | ast.AnnAssign | ast.AugAssign):
            targets = sub.targets if isinstance(sub, ast.Assign) else [sub.target]
            if any(name in target_names(t) for t in targets):
                return True
        if isinstance(sub, ast.Call) and name in names_read(sub):
            text = ast.unparse(sub.func)
            if _DETACHING.search(text):
                return True
    return False


def _running_state(facts: FileModel) -> Iterator[Hit]:
    imports = facts.imports
    for function, cls in functions(facts.tree):
        if cls is None or function.name != "forward" or decorated_grad_off(function, imports):
            continue
        args = function.args
        inputs = {a.arg for a in (*args.posonlyargs, *args.args, *args.kwonlyargs)[1:]}
        if not inputs:
            continue
        off = grad_off_ranges(function, imports)
        derived = set(inputs)
        for stmt in sorted(
            (s for s in local_nodes(function) if isinstance(s, ast.Assign)),
            key=lambda s: (s.lineno, s.col_offset),
        ):
            reads = _values_read(stmt.value)
            text = ast.unparse(stmt.value)
            clean = not _DETACHING.search(text)
            for target in stmt.targets:
                names = target_names(target)
                if reads & derived and clean:
                    derived.update(n for n in names if "." not in n)
                for name in names:
                    if (
                        name.startswith("self.")
                        and name.count(".") == 1
                        and name in reads
                        and reads & derived
                        and clean
                        and not inside(stmt.lineno, off)
                        and not _guarded_by_eval(function, stmt)
                    ):
                        yield (
                            stmt,
                            f"`{name}` is updated in `forward` from itself and the input "
                            f"with the graph: each step's graph stays attached to it (update "
                            f"it under `torch.no_grad()` or from `.detach()`ed values)",
                            None,
                            LOW,
                        )


def _values_read(node: ast.expr) -> set[str]:
    """Names whose *values* an expression uses: ``self.mean.type_as(x)`` reads ``self.mean``
    but only the dtype of ``x``."""
    found: set[str] = set()
    stack: list[ast.AST] = [node]
    while stack:
        sub = stack.pop()
        if isinstance(sub, ast.Attribute) and sub.attr in _SHAPE_ONLY_ATTRS:
            continue
        if (
            isinstance(sub, ast.Call)
            and isinstance(sub.func, ast.Attribute)
            and sub.func.attr in _SHAPE_ONLY_CALLS
        ):
            stack.append(sub.func.value)
            continue
        if isinstance(sub, ast.Name | ast.Attribute) and isinstance(sub.ctx, ast.Load):
            text = dotted(sub)
            if text is not None:
                found.add(text)
        stack.extend(ast.iter_child_nodes(sub))
    return found


def _guarded_by_eval(function: Function, stmt: ast.stmt) -> bool:
    """``if not self.training:`` around the update: it never runs while training."""
    for sub in local_nodes(function):
        if isinstance(sub, ast.If) and any(inner is stmt for inner in ast.walk(sub)):
            test = ast.unparse(sub.test)
            if "training" in test and "not" in test:
                in_body = any(inner is stmt for s in sub.body for inner in ast.walk(s))
                if in_body:
                    return True
    return False
