"""GF4xx: tensors that keep graphs alive, and inference tensors that escape their scope."""

from __future__ import annotations

import ast
from collections.abc import Iterator

from gradfence.lint.analysis.context import differentiates, events, is_trained
from gradfence.lint.analysis.graphs import (
    KEEPING_METHODS,
    SANITIZING_METHODS,
    body_nodes,
    graph_refs,
    plain_value,
)
from gradfence.lint.diagnostics import LOW, Fix, SourceText
from gradfence.lint.imports import dotted
from gradfence.lint.model import (
    AssignEvent,
    CallEvent,
    FileModel,
    FunctionModel,
    LoopModel,
    Pos,
    any_between,
    end_pos,
    pos,
)
from gradfence.lint.rules.evidence import backward_argument, names_in
from gradfence.lint.rules.registry import Hit, rule
from gradfence.lint.scopes import GradState

_COLLECTORS = frozenset({"append", "extend", "update", "add", "insert"})


def _in_loop(loop: LoopModel, event_loop: LoopModel | None) -> bool:
    return event_loop is not None and any(outer is loop for outer in event_loop.chain())


def _backward_roots(call: CallEvent) -> set[str]:
    """Names holding the differentiated loss: ``loss`` in ``(loss / k).backward()`` and
    ``losses`` in ``losses[i].backward()`` (not the index ``i``)."""
    func = call.node.func
    if call.attr != "backward" or not isinstance(func, ast.Attribute):
        return set()
    # ``accelerator.backward(loss)``: the loss is the argument
    start: ast.expr = backward_argument(call) or func.value
    roots: set[str] = set()
    stack: list[ast.AST] = [start]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.Name):
            roots.add(node.id)
        elif isinstance(node, ast.Subscript):
            stack.append(node.value)
        elif isinstance(node, ast.Call):
            if not (isinstance(node.func, ast.Attribute) and node.func.attr == "scale"):
                stack.append(node.func)  # ``scaler.scale(loss)``: the scaler is not the loss
            stack.extend(node.args)
        else:
            stack.extend(ast.iter_child_nodes(node))
    return roots


@rule(
    "GF401",
    "accumulated-graph",
    "the loss tensor is accumulated across iterations, keeping every graph alive",
    fixable=True,
)
def accumulated_graph(facts: FileModel) -> Iterator[Hit]:
    """
    ## What it does
    In a loop that calls `.backward()`, flags accumulating the loss — or a value derived
    from it — without `.item()`, `.detach()` or `float()`: `total += loss`,
    `total = total + loss`, `losses.append(loss)`, `meter.update(loss)`. A loss handed to
    an object of a project class (a meter, tracker or logger, defined in the file or in
    another module of the project) whose method keeps its argument on the object
    (`self.sum += v`, `self.val = v`, `self.history.append(v)`) is flagged too, in a loop
    that differentiates or, when the object outlives the call (`self.losses`, a
    parameter), anywhere in a function that differentiates: a per-step method such as
    `train_step`; there, a list kept on the object (`self.history.append(loss)`) counts
    too. Lists that are later backpropagated through on purpose, accumulation
    under `no_grad`, a name rebound to a detached value first (`loss = loss.detach()`), a
    project meter that calls `.item()`/`float()`/`.detach()` on what it is given, and an
    object of a class from another package (what it keeps cannot be seen) are not
    flagged. The loss of `accelerator.backward(loss)` (Accelerate, Fabric, DeepSpeed) and
    of `scaler.scale(loss).backward()` is tracked, and so is a loop whose `backward()` is
    inside a project helper: one that differentiates the loss it is given
    (`self.optimize(loss)`), or one that differentiates its own loss and returns it
    (`loss, n = train_batch(model, batch, optimizer)`). Where the accumulated value is the
    loss name itself, the fix adds `.detach()`.

    ## Evidence
    In a loop that differentiates a value, that value (or one computed from it)
    accumulated without `.item()`/`.detach()`/`float()`: augmented or self-referencing
    assignment, or a collector call (`append`, `update`, `add`...) on a list or on an
    object whose class cannot be seen. For an object of a project class, the method's
    summary decides, across files: it must keep the parameter the loss is passed as on
    `self` (assigned, accumulated into an attribute or an item of one, appended to a
    container on `self`, also through a loop over a list argument or a helper method it
    calls) and never detach it or turn it into a number. A list literal of losses
    (`meter.update([loss1 * 1000, loss2])`) is the loss; so are the loss-named parts the
    differentiated loss is computed from in the same code (`loss = loss_ce + 0.1 *
    loss_reg`: inputs, targets and weights feed it too but hold no graph, so only
    loss-named parts count), and a value returned together with the differentiated loss
    by one call and named a loss (`loss, _, coarse_loss = self.compute(batch)`). A
    helper's differentiation is read from its summary (in the file or another module of
    the project): `backward()` on a parameter it was given, or on a name it returns
    (`return loss`, `return loss, n`; `return loss.item()` is a number). The `.detach()`
    fix is safe only on the differentiated tensor itself; on a derived value it is unsafe.
    Confidence: high.

    ## Why is this a problem?
    The loss tensor holds its autograd graph, and the graph holds every saved activation of
    the forward pass. Adding it to a running total (or keeping it in a list) links each
    iteration's graph to the next, so none of them can be freed.

    **Hidden detail.** `backward()` frees the graph's *buffers*, but the accumulator still
    references the graph nodes, and `total` itself becomes a tensor with a `grad_fn` that
    chains every iteration. Memory grows linearly with the number of steps: the PyTorch FAQ
    calls this "accumulating history across your training loop", and the symptom is
    `CUDA out of memory` after a number of steps, or a steadily slowing loop.

    ## Example
    ```python
    total_loss = 0
    for x, y in loader:
        loss = criterion(model(x), y)
        loss.backward()
        optimizer.step()
        total_loss += loss
    ```

    ## Use instead
    ```python
    total_loss = 0.0
    for x, y in loader:
        loss = criterion(model(x), y)
        loss.backward()
        optimizer.step()
        total_loss += loss.item()
    ```

    ## References
    - PyTorch FAQ, "My model reports cuda runtime error(2): out of memory":
      https://pytorch.org/docs/stable/notes/faq.html
    - IBM/mi-prometheus#111; MultimediaTechLab/YOLO PR #83; microsoft/SpareNet 8bbc200
      (`self.losses.update([coarse_loss * 1000, ...])` into a project meter)
    """
    text = facts.text
    for function in facts.functions:
        backward_calls = [c for c in function.calls if c.loop is not None and c.attr == "backward"]
        helpers = _helper_backwards(facts, function)
        backward_calls += [c for c in helpers if c not in backward_calls]
        reported: set[int] = set()
        yield from _kept_by_project_objects(facts, function, reported)
        if not backward_calls:
            continue
        feeds_backward = _names_feeding_backward(function)
        for backward in backward_calls:
            loop = backward.loop
            assert loop is not None
            roots = helpers.get(backward) or _backward_roots(backward)
            if not roots:
                continue
            assigns = sorted(
                (a for a in function.assigns if _in_loop(loop, a.loop)), key=lambda a: pos(a.node)
            )
            # names given a fresh value every iteration (not ``x = x + ...``)
            rebound = {
                name
                for a in assigns
                if isinstance(a.node, ast.Assign | ast.AnnAssign)
                for name in a.target_names()
                if a.value is None or name not in names_in(a.value)
            }
            tainted = set(roots) | _loss_components(
                [
                    (list(a.target_names()), a.value)
                    for a in assigns
                    if isinstance(a.node, ast.Assign) and a.value is not None
                ],
                roots,
            )
            for assign in assigns:
                if isinstance(assign.node, ast.AugAssign) or assign.value is None:
                    continue
                if graph_refs(assign.value, tainted):
                    reads = names_in(assign.value)  # ``x = x + loss`` accumulates, see below
                    tainted.update(
                        n for n in assign.target_names() if "." not in n and n not in reads
                    )
            for assign in assigns:
                live = _still_tainted(tainted, assigns, pos(assign.node))
                hit = _accumulation(assign, live, roots, rebound, text)
                if hit is not None and id(assign.node) not in reported:
                    reported.add(id(assign.node))
                    yield hit
            for call in function.calls:
                if call.attr not in _COLLECTORS or not _in_loop(loop, call.loop):
                    continue
                if call.mode.no_graph or call.receiver is None or call.receiver in rebound:
                    continue
                if call.receiver.split(".", 1)[0] in feeds_backward:
                    continue
                args = [*call.node.args, *(k.value for k in call.node.keywords)]
                live = _still_tainted(tainted, assigns, pos(call.node))
                if not any(graph_refs(arg, live) for arg in args):
                    continue
                if id(call.node) in reported:
                    continue
                # an object of a class: what it keeps is its method's business (above); a
                # class from another package cannot be seen into
                cls = facts.analysis.instance_class(function.qualname, call.receiver)
                if cls == "foreign" or (
                    isinstance(cls, tuple)
                    and facts.analysis.kept_arguments(cls, call.attr) is not None
                ):
                    continue
                reported.add(id(call.node))
                fix = None
                if len(args) == 1 and isinstance(args[0], ast.Name):
                    fix = _detach_fix(args[0], text, roots)
                yield (
                    call.node,
                    f"`{call.receiver}.{call.attr}(...)` keeps the loss graph of every "
                    "iteration alive: use `.item()` or `.detach()`",
                    fix,
                )


def _kept_by_project_objects(
    facts: FileModel, function: FunctionModel, reported: set[int]
) -> Iterator[Hit]:
    """``self.losses.update([loss * 1000])`` where ``losses`` is an instance of a project
    class whose method keeps its argument on the object (the summaries say so, across
    files), in a function that differentiates that loss: in a loop that differentiates,
    or anywhere in a per-step function when the object outlives the call (``self.x``, a
    parameter); there, also a list or set that outlives the call (``self.history.append``).
    A class from another package, or a method that detaches, is silent."""
    node = function.node
    if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
        return
    start = node.lineno
    if not any_between(facts.training_lines, start, node.end_lineno or start):
        return
    own = facts.analysis.function(function.qualname)
    if own is None:
        return
    sites = [
        c
        for c in own.calls
        if c.callee.startswith("method:") and c.receiver is not None and not c.grad_off
    ]
    if not sites:
        return
    diffs = [(line, col, t) for line, col, kind, t in events(facts, function) if kind == "diff"]
    roots = {target for _, _, target in diffs if target and "." not in target}
    if not roots:
        return
    body = body_nodes(node.body)
    tainted = _loss_values(body, roots)
    calls = {pos(n): n for n in body if isinstance(n, ast.Call)}
    lives_on = {"self", *own.params, *own.kwonly}
    for site in sites:
        call = calls.get((site.line, site.col))
        receiver = site.receiver
        if call is None or receiver is None or id(call) in reported:
            continue
        here = (site.line, site.col)
        in_training_loop = any(
            pos(loop.node) <= here <= end_pos(loop.node)
            and any(pos(loop.node) <= (line, col) <= end_pos(loop.node) for line, col, _ in diffs)
            for loop in function.loops
        )
        if not in_training_loop and receiver.split(".", 1)[0] not in lives_on:
            continue
        live = _live_at(body, tainted, here)
        if not live or not any(
            graph_refs(a, live) for a in [*call.args, *(k.value for k in call.keywords)]
        ):
            continue
        cls = facts.analysis.instance_class(function.qualname, receiver)
        method = site.callee[len("method:") :]
        if cls == "builtin" and method in KEEPING_METHODS and not in_training_loop:
            # ``self.history.append(loss)`` in a per-step method (in a loop: see the
            # collector calls of the rule)
            kept = [*call.args]
            keeper = f"`{method}` keeps it in the container"
        elif isinstance(cls, tuple):
            params = facts.analysis.kept_arguments(cls, method)
            if not params:
                continue
            kept = [a for a, p in zip(call.args, params, strict=False) if p]
            kept += [k.value for k in call.keywords if k.arg is not None and k.arg in params]
            keeper = f"`{cls[1]}.{method}` stores its argument on the object"
        else:
            continue
        if not any(graph_refs(a, live) for a in kept):
            continue
        reported.add(id(call))
        fix = None
        if len(kept) == 1 and isinstance(kept[0], ast.Name) and len(call.args) == 1:
            fix = _detach_fix(kept[0], facts.text, roots)
        yield (
            call,
            f"`{dotted(call.func)}(...)` keeps the loss with its graph: {keeper}, so every "
            "step's graph stays alive (pass `.item()` or `.detach()`)",
            fix,
        )


def _loss_values(body: list[ast.AST], roots: set[str]) -> set[str]:
    """The differentiated names and the names computed from them (``scaled = loss * k``);
    a value returned with the loss by the same call and named a loss too
    (``loss, _, coarse_loss = self.compute(batch)``)."""
    assigns = [n for n in body if isinstance(n, ast.Assign) and len(n.targets) == 1]
    tainted = set(roots) | _loss_components(
        [
            ([n.id for n in ast.walk(a.targets[0]) if isinstance(n, ast.Name)], a.value)
            for a in assigns
        ],
        roots,
    )
    for _ in range(2):
        for assign in assigns:
            target = assign.targets[0]
            if isinstance(target, ast.Tuple | ast.List):
                names = [e.id for e in target.elts if isinstance(e, ast.Name)]
                if set(names) & tainted:
                    tainted.update(n for n in names if "loss" in n.lower())
                elif graph_refs(assign.value, tainted):
                    tainted.update(names)
            elif isinstance(target, ast.Name) and graph_refs(assign.value, tainted):
                tainted.add(target.id)
    return tainted


def _loss_components(pairs: list[tuple[list[str], ast.expr]], roots: set[str]) -> set[str]:
    """The parts a differentiated loss is computed from, bound in the same code and named a
    loss (``loss = loss_ce + 0.1 * loss_reg``: ``loss_ce``, ``loss_reg``): each holds its
    own piece of the graph. Inputs, targets and weights feed the loss too, but carry none:
    only loss-named parts count."""
    computed = {name for names, value in pairs if not plain_value(value) for name in names}
    found: set[str] = set()
    for _ in range(3):
        before = len(found)
        for names, value in pairs:
            if set(names) & (roots | found):
                found.update(
                    n
                    for n in names_in(value)
                    if n in computed and "loss" in n.lower() and n not in roots
                )
        if len(found) == before:
            break
    return found


def _live_at(body: list[ast.AST], tainted: set[str], here: Pos) -> set[str]:
    """``tainted`` less the names last rebound before ``here`` to a value without the graph."""
    last: dict[str, ast.expr] = {}
    for sub in body:
        if isinstance(sub, ast.Assign) and pos(sub) < here:
            for target in sub.targets:
                if isinstance(target, ast.Name) and target.id in tainted:
                    last[target.id] = sub.value
    return {n for n in tainted if n not in last or not _cuts_graph(last[n])}


def _helper_backwards(facts: FileModel, function: FunctionModel) -> dict[CallEvent, set[str]]:
    """Calls in a loop to a helper that differentiates its argument (``self.optimize(loss)``
    where ``optimize`` calls ``loss.backward()``) or differentiates a loss it returns
    (``loss = train_batch(...)``), with the names of what they differentiate."""
    loop_calls = [c for c in function.calls if c.loop is not None and c.attr != "backward"]
    node = function.node
    start = getattr(node, "lineno", 1)
    end = getattr(node, "end_lineno", start) or start
    if not loop_calls or not any_between(facts.training_lines, start, end):
        return {}
    at = {pos(c.node): c for c in loop_calls}
    found: dict[CallEvent, set[str]] = {}
    for line, col, kind, target in events(facts, function):
        call = at.get((line, col))
        if kind == "diff" and call is not None and target and "." not in target:
            found.setdefault(call, set()).add(target)
    own = facts.analysis.function(function.qualname)
    if own is None:
        return found
    # ``loss, n = train_batch(...)`` where ``train_batch`` differentiates ``loss`` and
    # returns it: the names bound to what it returns are the loss
    bound = {
        id(a.value): a.targets[0]
        for a in function.assigns
        if isinstance(a.node, ast.Assign) and len(a.targets) == 1
    }
    for site in own.calls:
        call = at.get((site.line, site.col))
        bound_to = bound.get(id(call.node)) if call is not None else None
        if call is None or bound_to is None:
            continue
        returned = facts.analysis.returned_losses(site, facts.analysis.module, function.qualname)
        for index in returned:
            element: ast.expr | None = bound_to if index < 0 else None
            if index >= 0 and isinstance(bound_to, ast.Tuple | ast.List):
                element = bound_to.elts[index] if index < len(bound_to.elts) else None
            if isinstance(element, ast.Name):
                found.setdefault(call, set()).add(element.id)
    return found


def _still_tainted(tainted: set[str], assigns: list[AssignEvent], here: Pos) -> set[str]:
    """``tainted`` less the names whose last assignment in the loop before ``here`` cut the
    graph: ``loss = loss.detach()``, ``loss = loss.item()``, ``loss = float(loss)``."""
    last: dict[str, ast.expr | None] = {}
    for assign in assigns:  # sorted by position
        if pos(assign.node) >= here:
            break
        if isinstance(assign.node, ast.Assign | ast.AnnAssign):
            for name in assign.target_names():
                if name in tainted:
                    last[name] = assign.value
    return {name for name in tainted if name not in last or not _cuts_graph(last[name])}


def _cuts_graph(value: ast.expr | None) -> bool:
    """``x.detach()``, ``x.detach().cpu()``, ``x.item()``, ``float(x)``, a constant..."""
    if value is None:
        return False
    if plain_value(value):
        return True
    while isinstance(value, ast.Call) and isinstance(value.func, ast.Attribute):
        if value.func.attr in SANITIZING_METHODS:
            return True
        value = value.func.value
    return False


def _names_feeding_backward(function: FunctionModel) -> set[str]:
    """Names read by a ``.backward()`` receiver, directly or through assignments."""
    feeding: set[str] = set()
    for call in function.calls:
        feeding |= _backward_roots(call)
    for _ in range(3):
        for assign in function.assigns:
            if assign.value is not None and set(assign.target_names()) & feeding:
                feeding |= names_in(assign.value)
    return feeding


def _detach_fix(name: ast.Name, text: SourceText, roots: set[str]) -> Fix:
    """``.detach()`` is safe only on a value known to be a tensor: one that is
    differentiated (``loss`` of ``loss.backward()``); on anything else it may not exist."""
    return Fix(
        f"Detach: `{name.id}.detach()`",
        (text.insert_after(name, ".detach()"),),
        safe=name.id in roots,
    )


def _accumulation(
    assign: AssignEvent, tainted: set[str], roots: set[str], rebound: set[str], text: SourceText
) -> Hit | None:
    node = assign.node
    if assign.mode.no_graph or assign.value is None:
        return None
    if isinstance(node, ast.AugAssign):
        target = dotted(node.target)
        if target is None or target in roots or target in rebound or target in tainted:
            return None
        if not graph_refs(node.value, tainted):
            return None
        fix = _detach_fix(node.value, text, roots) if isinstance(node.value, ast.Name) else None
        return (
            node,
            f"`{target}` accumulates the loss with its graph: every iteration's graph stays "
            "alive (use `.item()` or `.detach()`)",
            fix,
        )
    if isinstance(node, ast.Assign) and len(node.targets) == 1:
        target = dotted(node.targets[0])
        value = node.value
        if target is None or "." in target or target in roots:
            return None
        if not isinstance(value, ast.BinOp) or target not in names_in(value):
            return None
        other = value.right if dotted(value.left) == target else value.left
        if dotted(value.left) != target and dotted(value.right) != target:
            return None
        if not graph_refs(other, tainted - {target}):
            return None
        fix = _detach_fix(other, text, roots) if isinstance(other, ast.Name) else None
        return (
            node,
            f"`{target}` accumulates the loss with its graph: every iteration's graph stays "
            "alive (use `.item()` or `.detach()`)",
            fix,
        )
    return None


@rule(
    "GF402",
    "inference-tensor-stored",
    "a tensor stored on `self` under inference_mode breaks later training",
)
def inference_tensor_stored(facts: FileModel) -> Iterator[Hit]:
    """
    ## What it does
    Flags inference tensors that outlive their `torch.inference_mode()` region on
    something that is trained later:
    - assignments to `self.<attr>` inside an inference_mode block, or in a method
      decorated with `@torch.inference_mode()`, of an `nn.Module` (its own file or a
      project base class in another module says so), or (`--preview`) of any object
      whose other methods read that attribute and differentiate;
    - a module given new weights, layers or buffers under inference_mode
      (`model.resize_token_embeddings(n)`, `model.fc = nn.Linear(...)`,
      `model.fc.weight.data = ...`, `register_buffer`), in the function itself or in a
      project helper it passes the module to (`@torch.inference_mode() def
      add_tokens(model, ...)`), or given a tensor made inside an inference_mode block
      afterwards (`model.head.weight.data = prototypes`, `nn.Parameter(prototypes)`),
      when the function then trains that module.

    Constants, sizes, `.item()` values and other plain Python values are not flagged, nor
    is anything done under `no_grad` (tensors made there are normal tensors), nor in-place
    writes into existing weights under inference_mode (`w[:, :k] = 0`, `w.zero_()`: the
    weight stays a normal tensor), nor a module changed this way that is only run
    afterwards.

    ## Evidence
    A tensor assigned to `self.<x>` inside an inference_mode region: on a module,
    confidence high; on another object, only when a method of its class reads `self.<x>`
    and differentiates something, and then confidence low (`--preview`): the read fails
    only in an operation that saves the tensor for backward (`model(x) * self.scale`
    does, `x - self.mean` on an input that needs no gradient does not), which the
    analysis cannot tell. For a module passed around: the function summaries
    record, per function, what gets new tensors under inference_mode (`m.<attr> = ...`
    with a tensor or module value, `resize_token_embeddings`, `register_buffer`,
    `register_parameter`, `add_module`; after the region, `m.<attr> = name` or
    `nn.Parameter(name)` of a name bound inside it and not rebound since: a `.clone()`
    outside the region is a normal tensor), mapped onto the caller's arguments across files;
    the module must then be trained by the caller (its parameters reach an optimiser, or
    with no optimiser in view, it is run and something is differentiated). Confidence:
    high.

    ## Why is this a problem?
    Every tensor created under inference mode is an *inference tensor*. Cached on the
    module, it outlives the block: the next training step that uses the cache fails.

    **Hidden detail.** Outside inference mode an inference tensor cannot be saved for
    backward, modified in place or given `requires_grad`. The training step fails with
    `RuntimeError: Inference tensors cannot be saved for backward. Please do not use
    Tensors created in inference mode in computation tracked by autograd.` (checked on
    torch 2.13) — from code that only ever *reads* the cache, often many steps after the
    evaluation that filled it. The same happens to weights: a layer or a resized embedding
    created under inference mode holds inference tensors, and the first backward that saves
    them fails the same way (checked on torch 2.13 with `resize_token_embeddings` of a
    Hugging Face model, a new `nn.Linear`, `weight.data = ...`), while writing into the
    existing weight in place (`w[:, :k] = 0`) leaves it a normal tensor and trains fine.

    ## Example
    ```python
    class Encoder(nn.Module):
        @torch.inference_mode()
        def warmup(self, x):
            self.cached_keys = self.proj(x)
    ```

    A module changed in an inference-mode helper, then trained:
    ```python
    @torch.inference_mode()
    def add_tokens(model, tokenizer):
        model.resize_token_embeddings(len(tokenizer))

    add_tokens(model, tokenizer)
    optimizer = torch.optim.AdamW(model.parameters())
    ```

    ## Use instead
    Cache (or change the module) under `no_grad` (normal tensors without a graph), or
    `.clone()` the value *outside* inference mode before storing it:
    ```python
    class Encoder(nn.Module):
        @torch.no_grad()
        def warmup(self, x):
            self.cached_keys = self.proj(x)
    ```

    ## References
    - PyTorch docs, inference mode:
      https://pytorch.org/docs/stable/notes/autograd.html#inference-mode
    - facebookresearch/dinov2#472; unslothai/unsloth#2434
    """
    reported: set[Pos] = set()
    for function in facts.functions:
        if function.cls is not None:
            yield from _stored_on_object(facts, function, reported)
        yield from _module_changed_then_trained(facts, function, reported)


def _stored_on_object(
    facts: FileModel, function: FunctionModel, reported: set[Pos]
) -> Iterator[Hit]:
    """``self.x = <tensor>`` under inference_mode, on a module (its own file or a project
    base class in another file says so) or on an object whose training reads ``self.x``."""
    cls = function.cls
    assert cls is not None
    module: bool | None = None
    for assign in function.assigns:
        if assign.mode is not GradState.INFERENCE or plain_value(assign.value):
            continue
        for target in assign.targets:
            text = dotted(target)
            if text is None or not text.startswith("self."):
                continue
            if module is None:
                ref = facts.analysis.class_of(function.qualname)
                module = cls.is_module or (ref is not None and facts.analysis.is_module_class(ref))
            if not module and not _read_where_trained(facts, function, text):
                continue
            reported.add(pos(assign.node))
            if module:
                yield (
                    target,
                    f"`{text}` stores an inference tensor on the module: using it outside "
                    "inference_mode raises RuntimeError",
                    None,
                )
            else:  # whether the read saves it for backward is beyond the analysis
                yield (
                    target,
                    f"`{text}` stores an inference tensor on the object, and a method that "
                    "trains reads it: an operation that saves it for backward raises "
                    "RuntimeError",
                    None,
                    LOW,
                )


def _read_where_trained(facts: FileModel, function: FunctionModel, attribute: str) -> bool:
    """Another method of the class reads ``self.x`` and differentiates: the inference
    tensor takes part in training."""
    assert function.cls is not None
    for method in function.cls.methods.values():
        if method is function or not isinstance(method.node, ast.FunctionDef):
            continue
        reads = any(
            isinstance(sub, ast.Attribute)
            and isinstance(sub.ctx, ast.Load)
            and dotted(sub) == attribute
            for sub in body_nodes(method.node.body)
        )
        if reads and differentiates(facts, method):
            return True
    return False


def _module_changed_then_trained(
    facts: FileModel, function: FunctionModel, reported: set[Pos]
) -> Iterator[Hit]:
    """A module given new weights, layers or buffers under inference_mode (in the
    function or in a project helper it calls: ``add_tokens(model)`` whose
    ``@torch.inference_mode()`` body calls ``model.resize_token_embeddings(n)``), then
    trained by the function."""
    node = function.node
    if isinstance(node, ast.ClassDef):
        return
    start = getattr(node, "lineno", 1)
    end = getattr(node, "end_lineno", None) or len(facts.lines)
    if not any_between(facts.training_lines, start, end):
        return
    writes = [
        (line, col, target)
        for line, col, kind, target in events(facts, function)
        if kind == "inference_write" and not target.startswith("self.")
    ]
    nodes: dict[Pos, ast.AST] | None = None
    for line, col, target in writes:
        head = target.split(".", 1)[0]
        if (line, col) in reported or not is_trained(facts, function, head):
            continue
        if nodes is None:
            nodes = {}
            for sub in body_nodes(node.body):  # a call rather than its statement
                if isinstance(sub, ast.Call | ast.Assign | ast.AnnAssign):
                    nodes.setdefault(pos(sub), sub)
                    if isinstance(sub, ast.Call):
                        nodes[pos(sub)] = sub
        at = nodes.get((line, col))
        if at is None:
            continue
        reported.add((line, col))
        if isinstance(at, ast.Call):
            what = f"`{dotted(at.func) or 'the call'}(...)` gives `{head}` new tensors"
        else:
            what = f"`{target}` is given a tensor made"
        yield (
            at,
            f"{what} under inference_mode, and `{head}` is trained afterwards: its "
            "inference tensors raise RuntimeError in backward",
            None,
        )


def _mutations(
    function: FunctionModel, name: str
) -> Iterator[tuple[tuple[int, int], ast.AST, str]]:
    for assign in function.assigns:
        node = assign.node
        if assign.mode is GradState.INFERENCE:
            continue
        if isinstance(node, ast.AugAssign) and dotted(node.target) == name:
            yield pos(node), node, "augmented assignment"
        elif isinstance(node, ast.Assign):
            for target in node.targets:
                if isinstance(target, ast.Subscript) and dotted(target.value) == name:
                    yield pos(node), node, "item assignment"
    for call in function.calls:
        attr = call.attr
        if (
            call.mode is not GradState.INFERENCE
            and call.receiver == name
            and attr is not None
            and attr.endswith("_")
            and not attr.startswith("_")
        ):
            yield pos(call.node), call.node, f"`.{attr}()`"


@rule(
    "GF403",
    "inference-tensor-mutated-outside",
    "a tensor from an inference_mode block is modified in place after it (RuntimeError)",
)
def inference_tensor_mutated_outside(facts: FileModel) -> Iterator[Hit]:
    """
    ## What it does
    Flags an in-place modification — `x /= n`, `x.add_(...)`, `x[i] = v` — of a name that
    was bound to a tensor inside a `with torch.inference_mode():` block, when it happens
    after the block and the name was not rebound in between.

    ## Evidence
    An in-place operation, after an inference_mode block, on a name assigned inside it.
    Confidence: high.

    ## Why is this a problem?
    Values computed inside the block are inference tensors, and inference tensors may only
    be modified in place inside inference mode.

    **Hidden detail.** A classic shape: `test_loss += loss_fn(pred, y)` (no `.item()`)
    inside the block turns the Python number `test_loss` into an inference tensor, and the
    averaging `test_loss /= len(loader)` after the block fails with `RuntimeError:
    Inplace update to inference tensor outside InferenceMode is not allowed.You can make a
    clone to get a normal tensor before doing inplace update.` (verbatim, torch 2.13)

    ## Example
    ```python
    test_loss = 0
    with torch.inference_mode():
        for x, y in loader:
            test_loss += loss_fn(model(x), y)
    test_loss /= len(loader)
    ```

    ## Use instead
    ```python
    test_loss = 0.0
    with torch.inference_mode():
        for x, y in loader:
            test_loss += loss_fn(model(x), y).item()
    test_loss /= len(loader)
    ```

    ## References
    - PyTorch docs, inference mode:
      https://pytorch.org/docs/stable/notes/autograd.html#inference-mode
    - mrdbourke/pytorch-deep-learning#397; ultralytics/yolov5#11186
    """
    for function in facts.functions:
        for event in function.withs:
            if event.mode is not GradState.INFERENCE or event.outer_mode is GradState.INFERENCE:
                continue
            start, end = pos(event.node), end_pos(event.node)
            bound: dict[str, tuple[int, int]] = {}
            for assign in function.assigns:
                here = pos(assign.node)
                if not start <= here <= end or plain_value(assign.value):
                    continue
                if isinstance(assign.node, ast.AugAssign) and plain_value(assign.node.value):
                    continue
                for name in assign.target_names():
                    if "." not in name:
                        bound[name] = here
            for name in bound:
                rebinds = [
                    pos(a.node)
                    for a in function.assigns
                    if pos(a.node) > end
                    and isinstance(a.node, ast.Assign | ast.AnnAssign)
                    and name in a.target_names()
                ]
                first_rebind = min(rebinds, default=(1 << 30, 0))
                found = sorted(
                    (m for m in _mutations(function, name) if end < m[0] < first_rebind),
                    key=lambda m: m[0],
                )
                if found:
                    _, node, how = found[0]
                    yield (
                        node,
                        f"`{name}` is an inference tensor from the inference_mode block "
                        f"(line {bound[name][0]}): {how} outside it raises RuntimeError",
                        None,
                    )
