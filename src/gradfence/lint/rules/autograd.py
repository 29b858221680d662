"""GF2xx: backward passes and parameter updates that contradict the grad mode."""

from __future__ import annotations

import ast
from collections.abc import Iterator

from gradfence.lint.diagnostics import Fix
from gradfence.lint.imports import dotted
from gradfence.lint.model import AssignEvent, CallEvent, FileModel, FunctionModel, end_pos, pos
from gradfence.lint.rules.evidence import backward_argument, callers, names_in
from gradfence.lint.rules.recording import in_place_parameter_writes
from gradfence.lint.rules.registry import Hit, rule
from gradfence.lint.scopes import GradState

_AUTOGRAD_CALLS = frozenset({"torch.autograd.grad", "torch.autograd.backward"})
_INPLACE_UPDATES = frozenset(
    {"add_", "sub_", "mul_", "div_", "addcmul_", "addcdiv_", "copy_", "lerp_"}
)
_PARAMETRIC_LAYERS = frozenset(
    {
        "Linear",
        "Bilinear",
        "LazyLinear",
        "Conv1d",
        "Conv2d",
        "Conv3d",
        "ConvTranspose1d",
        "ConvTranspose2d",
        "ConvTranspose3d",
        "Embedding",
        "EmbeddingBag",
        "LayerNorm",
        "GroupNorm",
        "RMSNorm",
        "BatchNorm1d",
        "BatchNorm2d",
        "BatchNorm3d",
        "LSTM",
        "GRU",
        "RNN",
        "LSTMCell",
        "GRUCell",
        "RNNCell",
        "MultiheadAttention",
        "Transformer",
        "TransformerEncoder",
        "TransformerDecoder",
        "TransformerEncoderLayer",
        "TransformerDecoderLayer",
        "PReLU",
    }
)


def _last_assignment(
    function: FunctionModel, name: str, before: tuple[int, int]
) -> AssignEvent | None:
    """The last assignment to ``name`` that starts before ``before`` in the function."""
    last: AssignEvent | None = None
    for assign in function.assigns:
        here = pos(assign.node)
        if (
            here < before
            and name in assign.target_names()
            and (last is None or here > pos(last.node))
        ):
            last = assign
    return last


def _plain_path(target: ast.expr | None) -> str | None:
    """``loss`` or ``outputs.loss`` (names and attributes only, not on ``self``)."""
    if isinstance(target, ast.Name):
        return target.id
    if isinstance(target, ast.Attribute):
        path = dotted(target)
        if path is not None and path.split(".", 1)[0] not in {"self", "cls"}:
            return path
    return None


def _last_binding(
    function: FunctionModel, path: str, before: tuple[int, int]
) -> AssignEvent | None:
    """The last assignment before ``before`` to ``path`` or to an object it is read from
    (``outputs = model(x)`` for ``outputs.loss``)."""
    parts = path.split(".")
    found = [
        _last_assignment(function, ".".join(parts[:i]), before) for i in range(1, len(parts) + 1)
    ]
    return max((a for a in found if a is not None), key=lambda a: pos(a.node), default=None)


def _only_reads(value: ast.expr | None) -> bool:
    """Names, attributes and items gathered as they are (``p.grad``, ``[p.grad for p in
    ps]``, ``(a, b)``): tensors that may carry a graph from before, nothing computed."""
    if value is None:
        return False
    if isinstance(value, ast.Name | ast.Constant):
        return True
    if isinstance(value, ast.Attribute | ast.Subscript):
        return _only_reads(value.value)
    if isinstance(value, ast.List | ast.Tuple):
        return all(_only_reads(e) for e in value.elts)
    if isinstance(value, ast.ListComp | ast.GeneratorExp):
        return _only_reads(value.elt)
    return False


def _differentiated(call: CallEvent) -> ast.expr | None:
    """The tensor a backward call differentiates: ``x`` in ``x.backward()`` / ``grad(x, ...)``."""
    func = call.node.func
    argument = backward_argument(call)
    if argument is not None:
        return argument  # ``accelerator.backward(loss)``
    if call.attr == "backward" and isinstance(func, ast.Attribute):
        return func.value
    if call.qual in _AUTOGRAD_CALLS:
        if call.node.args:
            return call.node.args[0]
        for keyword in call.node.keywords:
            if keyword.arg in {"outputs", "tensors"}:
                return keyword.value
    return None


def _gets_requires_grad(
    function: FunctionModel, name: str, start: tuple[int, int], end: tuple[int, int]
) -> bool:
    """``name.requires_grad_()`` or ``name.requires_grad = True`` between two positions."""
    for call in function.calls:
        if call.attr == "requires_grad_" and call.receiver == name and start < pos(call.node) < end:
            return True
    for assign in function.assigns:
        if start < pos(assign.node) < end and f"{name}.requires_grad" in assign.target_names():
            return True
    return False


@rule(
    "GF201",
    "backward-in-no-grad",
    "`.backward()` / `torch.autograd.grad` on a value computed under no_grad",
)
def backward_in_no_grad(facts: FileModel) -> Iterator[Hit]:
    """
    ## What it does
    Flags `.backward()`, `torch.autograd.grad(...)` and `torch.autograd.backward(...)`
    inside a `no_grad` / `inference_mode` scope (and not under a nested `enable_grad`)
    when the differentiated value is computed inside that scope too. Tensors only gathered
    there (`grads = [p.grad for p in params]`) may carry a graph from before and are not
    flagged.

    ## Evidence
    A differentiation (`.backward()`, `torch.autograd.grad`) of a value assigned under
    no_grad in the same function. Confidence: high.

    ## Why is this a problem?
    Under `no_grad` no operation is recorded, so a value computed there has no `grad_fn`
    and there is nothing to differentiate.

    **Hidden detail.** The backward pass itself does not need grad mode: calling
    `loss.backward()` under `no_grad` on a loss computed *before* the block works, which
    is why the rule looks at where the value was computed. A value computed inside fails
    with `RuntimeError: element 0 of tensors does not require grad and does not have a
    grad_fn`; under `inference_mode`, even a nested `enable_grad()` cannot help, because
    inference mode excludes autograd from dispatch altogether.

    ## Example
    ```python
    @torch.no_grad()
    def saliency(model, x):
        x.requires_grad_(True)
        score = model(x).max()
        score.backward()
        return x.grad
    ```

    ## Use instead
    ```python
    def saliency(model, x):
        x = x.detach().requires_grad_(True)
        with torch.enable_grad():
            score = model(x).max()
        (grad,) = torch.autograd.grad(score, x)
        return grad
    ```

    ## References
    - PyTorch docs, locally disabling gradient computation:
      https://pytorch.org/docs/stable/notes/autograd.html#locally-disabling-gradient-computation
    - Trusted-AI/adversarial-robustness-toolbox#498; Lightning-AI/pytorch-lightning#13948
    """
    for function in facts.functions:
        for call in function.calls:
            if not call.mode.no_graph:
                continue
            target = _differentiated(call)
            if target is None:
                continue
            if isinstance(target, ast.Name):
                last = _last_assignment(function, target.id, pos(call.node))
                if last is None or not last.mode.no_graph:
                    continue  # computed before the block (or elsewhere): may have a graph
                if _only_reads(last.value):
                    continue  # ``grads = [p.grad for p in params]``: gathered, not computed
            elif not isinstance(target, ast.Call | ast.BinOp | ast.Subscript | ast.Attribute):
                continue
            what = "`.backward()`" if call.attr == "backward" else f"`{call.qual}`"
            mode = "inference_mode" if call.mode is GradState.INFERENCE else "no_grad"
            yield (
                call.node,
                f"{what} on a value computed under {mode}: it has no grad_fn (RuntimeError)",
                None,
            )


@rule(
    "GF202",
    "backward-on-no-grad-result",
    "`.backward()` later on a value computed inside a no_grad block",
)
def backward_on_no_grad_result(facts: FileModel) -> Iterator[Hit]:
    """
    ## What it does
    Flags `x.backward()` (or `torch.autograd.grad(x, ...)`) outside any disabled-grad scope
    when `x` was last assigned inside a `no_grad` / `inference_mode` block of the same
    function and was not given `requires_grad` since. `outputs.loss.backward()` counts
    when `outputs` was computed in such a block.

    ## Evidence
    A value computed inside a no_grad block and differentiated after it. Confidence:
    high.

    ## Why is this a problem?
    The value was computed without recording a graph. Leaving the block does not add one
    afterwards: the tensor stays a leaf with `requires_grad=False`.

    **Hidden detail.** The usual cause is a `with torch.no_grad():` widened during a
    refactor to cover the loss computation. The error appears at the backward call, far
    from the block that caused it: `RuntimeError: element 0 of tensors does not require
    grad and does not have a grad_fn`.

    ## Example
    ```python
    with torch.no_grad():
        logits = model(x)
        loss = criterion(logits, y)
    loss.backward()
    ```

    ## Use instead
    ```python
    logits = model(x)
    loss = criterion(logits, y)
    loss.backward()
    ```

    ## References
    - Lightning-AI/pytorch-lightning#19517; nianticlabs/monodepth2#24
    """
    for function in facts.functions:
        for call in function.calls:
            if call.mode.no_graph or call.mode is GradState.UNKNOWN:
                continue
            target = _differentiated(call)
            name = _plain_path(target)
            if name is None:
                continue
            here = pos(call.node)
            last = _last_binding(function, name, here)
            if last is None or not last.mode.no_graph:
                continue
            if _gets_requires_grad(function, name, pos(last.node), here):
                continue
            mode = "inference_mode" if last.mode is GradState.INFERENCE else "no_grad"
            yield (
                call.node,
                f"`{name}` was computed under {mode} (line {last.node.lineno}): "
                "it has no grad_fn to backpropagate through",
                None,
            )


def _parametric_attrs(facts: FileModel, init: FunctionModel) -> set[str]:
    """``self.X`` assigned a Parameter or a layer with parameters in ``__init__``."""
    attrs: set[str] = set()
    for assign in init.assigns:
        value = assign.value
        if not isinstance(value, ast.Call):
            continue
        qual = facts.imports.resolve(value.func)
        if qual is None:
            continue
        if qual in {"torch.nn.Parameter", "torch.nn.parameter.Parameter"}:
            if any(k.arg == "requires_grad" for k in value.keywords) or len(value.args) > 1:
                continue
        elif not (qual.startswith("torch.nn.") and qual.rsplit(".", 1)[1] in _PARAMETRIC_LAYERS):
            continue
        for target in assign.target_names():
            if target.startswith("self.") and target.count(".") == 1:
                attrs.add(target[5:])
    return attrs


@rule(
    "GF203",
    "no-grad-in-forward",
    "a parameter used under no_grad in `forward` never receives a gradient",
)
def no_grad_in_forward(facts: FileModel) -> Iterator[Hit]:
    """
    ## What it does
    Flags a `with torch.no_grad():` (or `inference_mode`) block in the `forward` of an
    `nn.Module` when the block uses one of the module's own parameters or parametric layers
    (registered in `__init__`) and a value computed in the block reaches `forward`'s return
    value. Modules that freeze parameters on purpose (`requires_grad` appears in the class)
    are left alone.

    ## Evidence
    A parameter of the Module (`self.<name>` registered as `nn.Parameter` or a
    submodule's parameter) read under no_grad in `forward`. Confidence: high.

    ## Why is this a problem?
    Everything computed in the block is cut from the graph. The loss still has a gradient
    through the other paths, so training runs, but the parameters used only inside the
    block never receive a gradient and never change.

    **Hidden detail.** There is no error: `param.grad` simply stays `None` and the optimizer
    skips the parameter. The model trains worse than it should and nothing says why.

    ## Example
    ```python
    class Head(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(16, 4)

        def forward(self, x):
            with torch.no_grad():
                z = self.proj(x)
            return z.softmax(-1)
    ```

    ## Use instead
    Remove the block, or freeze the layer explicitly if that is the intent:
    ```python
    self.proj.requires_grad_(False)
    ```

    ## References
    - PyTorch docs, `torch.no_grad`: https://pytorch.org/docs/stable/generated/torch.no_grad.html
    """
    for cls in facts.classes.values():
        forward = cls.methods.get("forward")
        init = cls.methods.get("__init__")
        if not cls.is_module or forward is None or init is None or not forward.withs:
            continue
        start, end = cls.node.lineno, cls.node.end_lineno or cls.node.lineno
        if any("requires_grad" in line for line in facts.lines[start - 1 : end]):
            continue
        params = _parametric_attrs(facts, init)
        if not params:
            continue
        for event in forward.withs:
            if not event.mode.no_graph or event.outer_mode.no_graph:
                continue
            body = event.node.body
            used = {
                sub.attr
                for stmt in body
                for sub in ast.walk(stmt)
                if isinstance(sub, ast.Attribute)
                and isinstance(sub.value, ast.Name)
                and sub.value.id == "self"
                and sub.attr in params
            }
            if not used:
                continue
            if _reaches_return(forward, event.node):
                names = ", ".join(f"`self.{name}`" for name in sorted(used))
                yield (
                    event.node,
                    f"{names} used under no_grad in `forward`: its parameters never learn",
                    None,
                )


def _reaches_return(forward: FunctionModel, block: ast.With | ast.AsyncWith) -> bool:
    """Whether a value assigned (or returned) in ``block`` flows into a return statement."""
    inside_start, inside_end = pos(block), end_pos(block)
    tainted: set[str] = set()
    for assign in sorted(forward.assigns, key=lambda a: pos(a.node)):
        here = pos(assign.node)
        flows = here > inside_end and assign.value is not None and names_in(assign.value) & tainted
        if inside_start <= here <= inside_end or flows:
            tainted.update(t for t in assign.target_names() if "." not in t)
    for ret in forward.returns:
        if ret.value is None:
            continue
        if inside_start <= pos(ret) <= inside_end:
            return True
        if pos(ret) > inside_end and names_in(ret.value) & tainted:
            return True
    return False


def _grad_of(node: ast.AST, target: str) -> bool:
    """Whether ``node`` reads ``<target>.grad``."""
    return any(
        isinstance(sub, ast.Attribute) and sub.attr == "grad" and dotted(sub.value) == target
        for sub in ast.walk(node)
    )


def _called_without_grad(facts: FileModel, function: FunctionModel) -> bool:
    if function.name.startswith("<"):
        return False
    return any(call.mode.no_graph for call in callers(facts, function))


@rule(
    "GF204",
    "manual-update-outside-no-grad",
    "in-place write to a parameter while grad mode is on (RuntimeError)",
)
def manual_update_outside_no_grad(facts: FileModel) -> Iterator[Hit]:
    """
    ## What it does
    Flags an in-place write to a parameter where gradients are enabled (no enclosing
    `no_grad`, no `@torch.no_grad()`, and no caller in the file that calls it under
    `no_grad`): an update from its own gradient (`p -= lr * p.grad`,
    `p.add_(p.grad, alpha=-lr)`), and any other in-place write — slice assignment
    (`w[:, :k] = 0`), `+=`, `zero_()`, `fill_()`, `copy_()`, `normal_()`, `uniform_()` —
    including through a name bound to the parameter (`w = self.fc.weight`). Writes
    through `p.data` are not flagged, nor `_init_weights` (frameworks call it under
    `no_grad`).

    ## Evidence
    The written tensor is proven a parameter: an update from its own `.grad`, a loop
    variable over `m.parameters()`, an attribute bound to `nn.Parameter(...)` (that
    requires grad) in the class, a layer's `self.<layer>.weight`/`.bias`, or a name bound
    to one of these; grad mode is on and no caller in the file runs the function under
    no_grad. Confidence: high.

    ## Why is this a problem?
    A parameter is a leaf tensor that requires grad. Autograd refuses to modify it in place
    while recording, because the modification itself would have to be differentiated.

    **Hidden detail.** The error names neither the parameter nor the update:
    `RuntimeError: a leaf Variable that requires grad is being used in an in-place
    operation.` It appears the first time the update runs, often after a full epoch of
    forward passes.

    ## Example
    ```python
    loss.backward()
    for p in model.parameters():
        p -= lr * p.grad
    ```

    ## Use instead
    ```python
    loss.backward()
    with torch.no_grad():
        for p in model.parameters():
            p -= lr * p.grad
    ```

    ## References
    - PyTorch tutorial, "Learning PyTorch with examples" (manual weight update under no_grad)
    - discuss.pytorch.org/t/leaf-variable-was-used-in-an-inplace-operation/308
    """
    source = facts.source
    widen = any(word in source for word in ("weight", "bias", "Parameter", "parameters()"))
    for function in facts.functions:
        hits: list[Hit] = []
        for assign in function.assigns:
            node = assign.node
            if not isinstance(node, ast.AugAssign) or assign.mode not in _GRAD_ON:
                continue
            target = dotted(node.target)
            if target is None or target.endswith((".data", ".grad")):
                continue
            if _grad_of(node.value, target):
                hits.append(
                    (
                        node,
                        f"in-place update of `{target}` from `{target}.grad` "
                        "with grad enabled: wrap it in `torch.no_grad()`",
                        None,
                    )
                )
        for call in function.calls:
            if call.attr not in _INPLACE_UPDATES or call.mode not in _GRAD_ON:
                continue
            target = call.receiver
            if target is None or target.endswith((".data", ".grad")):
                continue
            if any(_grad_of(arg, target) for arg in (*call.node.args, *call.node.keywords)):
                hits.append(
                    (
                        call.node,
                        f"`{target}.{call.attr}(...)` from `{target}.grad` "
                        "with grad enabled: wrap it in `torch.no_grad()`",
                        None,
                    )
                )
        if widen:
            cls = function.cls.node if function.cls is not None else None
            for written, message in in_place_parameter_writes(function.node, cls, facts.imports):
                hits.append((written, message, None))
        if hits and not _called_without_grad(facts, function):
            yield from hits


_GRAD_ON = frozenset({GradState.DEFAULT, GradState.ENABLED})
_REWRITABLE_OPS: dict[type[ast.operator], str] = {ast.Sub: "-=", ast.Add: "+="}


@rule(
    "GF205",
    "rebinding-update-in-no-grad",
    "`w = w - lr * w.grad` under no_grad rebinds `w` to a tensor that no longer requires grad",
    fixable=True,
)
def rebinding_update_in_no_grad(facts: FileModel) -> Iterator[Hit]:
    """
    ## What it does
    Flags `w = w - lr * w.grad` (any assignment of an expression reading `w.grad` back to
    the name `w`) inside a `no_grad` / `inference_mode` scope. The fix rewrites
    `w = w - <expr>` / `w = w + <expr>` to the in-place `w -= <expr>` / `w += <expr>`.

    ## Evidence
    A rebinding `w = w - lr * w.grad` under no_grad. Confidence: high.

    ## Why is this a problem?
    Under `no_grad` the right-hand side is a *new* tensor with `requires_grad=False`, and
    the assignment rebinds the name to it. The original parameter is never changed, and
    the new `w` is no longer a leaf that receives gradients.

    **Hidden detail.** The first step appears to work. The next forward through the new
    `w` records nothing, and the next `backward()` fails with `RuntimeError: element 0 of
    tensors does not require grad and does not have a grad_fn` (checked on torch 2.13);
    where other parameters keep the loss differentiable, `w` silently stops training.
    With a loop variable (`for p in params: p = p - ...`) the update is lost entirely,
    with no error at all.

    ## Example
    ```python
    with torch.no_grad():
        w = w - lr * w.grad
        w.grad = None
    ```

    ## Use instead
    ```python
    with torch.no_grad():
        w -= lr * w.grad
        w.grad = None
    ```

    ## References
    - PyTorch tutorial, "Learning PyTorch with examples" (in-place updates under no_grad)
    """
    text = facts.text
    for function in facts.functions:
        for assign in function.assigns:
            node = assign.node
            if not isinstance(node, ast.Assign) or not assign.mode.no_graph:
                continue
            if len(node.targets) != 1 or not isinstance(node.targets[0], ast.Name):
                continue
            name = node.targets[0].id
            value = node.value
            if not _grad_of(value, name):
                continue
            fix: Fix | None = None
            if (
                isinstance(value, ast.BinOp)
                and isinstance(value.left, ast.Name)
                and value.left.id == name
                and type(value.op) in _REWRITABLE_OPS
            ):
                op = _REWRITABLE_OPS[type(value.op)]
                content = f"{name} {op} {text.segment(value.right)}"
                fix = Fix(f"Update in place: `{name} {op} ...`", (text.replace(node, content),))
            yield (
                node,
                f"`{name} = ...{name}.grad...` under no_grad rebinds `{name}` to a tensor "
                "that does not require grad: update it in place",
                fix,
            )
