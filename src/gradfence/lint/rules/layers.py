"""GF306-GF308: how a module is built: functional dropout that ignores the mode, submodules
that `.eval()`/`.parameters()` cannot see, and `requires_grad` set on a module.

The mode itself (switched, leaked, missing) is :mod:`.modes`'s.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator

from gradfence.lint.diagnostics import HIGH, LOW, Fix
from gradfence.lint.imports import dotted
from gradfence.lint.model import (
    FileModel,
    FunctionModel,
    mentions_training,
    pos,
)
from gradfence.lint.rules.evidence import (
    is_module_ctor,
    looks_like_module_name,
    module_names,
    yields_modules,
)
from gradfence.lint.rules.registry import Hit, rule

_DROPOUT_FUNCS = frozenset(
    {
        "torch.nn.functional.dropout",
        "torch.nn.functional.dropout1d",
        "torch.nn.functional.dropout2d",
        "torch.nn.functional.dropout3d",
        "torch.nn.functional.alpha_dropout",
        "torch.nn.functional.feature_alpha_dropout",
    }
)
_SDPA = "torch.nn.functional.scaled_dot_product_attention"


@rule(
    "GF306",
    "ungated-functional-dropout",
    "functional dropout in a Module that does not follow `self.training`",
    fixable=True,
)
def ungated_functional_dropout(facts: FileModel) -> Iterator[Hit]:
    """
    ## What it does
    Inside an `nn.Module`, flags `F.dropout(...)` (and `dropout1d/2d/3d`, `alpha_dropout`,
    `feature_alpha_dropout`) called without `training=`, and
    `F.scaled_dot_product_attention(..., dropout_p=p)` where `p` is not zero and does not
    depend on `self.training`. Calls under `if self.training:` are not flagged. The fix
    adds `training=self.training` to the dropout call.

    ## Evidence
    A call resolving to `torch.nn.functional.dropout` (and variants) in a method of an
    `nn.Module` without `training=`, not under `if self.training:`. Intent: a comment
    near the call or in the function saying dropout always applies ("always", "at
    inference", "MC dropout") silences it; a probability that is an argument of a method
    other than `forward` (a sampling method, where the caller chooses) makes it low
    confidence with an unsafe fix.

    ## Why is this a problem?
    Functional dropout has no module flag to consult: `F.dropout(x, p)` defaults to
    `training=True`, and `scaled_dot_product_attention` applies `dropout_p` whatever the
    module's mode.

    **Hidden detail.** `model.eval()` reaches only registered submodules; a functional
    call keeps dropping activations at evaluation and in production. Predictions are
    random from call to call, which shows up as unstable metrics, not as an error.

    ## Example
    ```python
    class Block(nn.Module):
        def forward(self, x):
            return F.dropout(self.proj(x), p=0.1)
    ```

    ## Use instead
    ```python
    class Block(nn.Module):
        def forward(self, x):
            return F.dropout(self.proj(x), p=0.1, training=self.training)
    ```
    and `dropout_p=self.p if self.training else 0.0` for attention.

    ## References
    - PyTorch docs, `torch.nn.functional.dropout`:
      https://pytorch.org/docs/stable/generated/torch.nn.functional.dropout.html
    - pytorch/pytorch#26338, #124464
    """
    text = facts.text
    for function in facts.functions:
        if function.cls is None or not function.cls.is_module:
            continue
        has_self = _first_arg(function) == "self"
        for call in function.calls:
            if call.training_guard or call.qual is None:
                continue
            node = call.node
            if any(isinstance(a, ast.Starred) for a in node.args) or any(
                k.arg is None for k in node.keywords
            ):
                continue
            if call.qual in _DROPOUT_FUNCS:
                if len(node.args) >= 3:
                    continue  # the third positional argument is ``training``
                if not node.args and not any(k.arg == "input" for k in node.keywords):
                    continue
                if any(k.arg == "training" for k in node.keywords):
                    continue
                intent = _dropout_intent(facts, function, node)
                if intent == "always":
                    continue  # the code says dropout applies at evaluation too
                fix = None
                if has_self:
                    last = max(
                        [*node.args, *node.keywords],
                        key=lambda n: (
                            getattr(n, "end_lineno", 0),
                            getattr(n, "end_col_offset", 0),
                        ),
                    )
                    fix = Fix(
                        "Add `training=self.training`",
                        (text.insert_after(last, ", training=self.training"),),
                        safe=intent is None,
                    )
                yield (
                    node,
                    f"`{text.segment(node.func)}` without `training=` drops activations in eval "
                    "mode too",
                    fix,
                    HIGH if intent is None else LOW,
                )
            elif call.qual == _SDPA:
                value = next((k.value for k in node.keywords if k.arg == "dropout_p"), None)
                if value is None and len(node.args) > 4:
                    value = node.args[4]
                if value is None or _depends_on_training(function, value):
                    continue
                if isinstance(value, ast.Constant) and not value.value:
                    continue
                yield (
                    node,
                    "`dropout_p` of `scaled_dot_product_attention` ignores `self.training`: "
                    "use `p if self.training else 0.0`",
                    None,
                )


_ALWAYS = ("always", "at inference", "at test time", "in eval", "mc dropout", "monte carlo")


def _dropout_intent(facts: FileModel, function: FunctionModel, call: ast.Call) -> str | None:
    """Why this dropout may be meant to stay on: ``"always"`` when a comment next to it or
    in the function says so; ``"caller"`` when its probability is an argument of a method
    other than ``forward`` (a sampling method: the caller chooses); else None."""
    start = max(getattr(function.node, "lineno", 1), call.lineno - 3)
    for line in facts.lines[start - 1 : (call.end_lineno or call.lineno)]:
        comment = line.partition("#")[2].lower()
        if comment and any(word in comment for word in _ALWAYS):
            return "always"
    probability = call.args[1] if len(call.args) > 1 else None
    for keyword in call.keywords:
        if keyword.arg == "p":
            probability = keyword.value
    node = function.node
    if (
        isinstance(probability, ast.Name)
        and isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
        and node.name not in {"forward", "__call__"}
        and probability.id in {a.arg for a in (*node.args.args, *node.args.kwonlyargs)}
    ):
        return "caller"
    return None


def _first_arg(function: FunctionModel) -> str | None:
    node = function.node
    if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
        args = [*node.args.posonlyargs, *node.args.args]
        return args[0].arg if args else None
    return None


def _depends_on_training(function: FunctionModel, value: ast.expr) -> bool:
    if mentions_training(value):
        return True
    if isinstance(value, ast.Name):
        return any(
            value.id in assign.target_names()
            and assign.value is not None
            and mentions_training(assign.value)
            for assign in function.assigns
        )
    return False


@rule(
    "GF307",
    "unregistered-submodules",
    "modules kept in a plain list/tuple/dict on `self` are invisible to `.eval()`",
    fixable=True,
)
def unregistered_submodules(facts: FileModel) -> Iterator[Hit]:
    """
    ## What it does
    Flags, in an `nn.Module`'s `__init__`, a list, tuple or dict of freshly built modules
    (`nn.Linear(...)`, `nn.Dropout()`, modules defined in the file) assigned to `self.x`,
    including list and dict comprehensions. The fix wraps a list or tuple in
    `nn.ModuleList(...)` and a dict with string keys in `nn.ModuleDict(...)`.

    ## Evidence
    In `__init__` of an `nn.Module`, `self.x` bound to a list/tuple/dict whose elements
    are all module constructions (`torch.nn` classes or Module classes of the file), or
    `self.x = []` followed by `self.x.append(<module>)`. Not evidence: a later
    assignment rebinding `self.x` from itself (`nn.Sequential(*self.x)`), or
    `add_module`/`register_module` in `__init__`. Confidence: high.

    ## Why is this a problem?
    `nn.Module` registers a submodule only when the attribute value *is* a module.
    Containers from Python are stored as plain attributes.

    **Hidden detail.** Every recursive operation skips them: `.eval()` and `.train()`,
    `.to(device)` and `.cuda()`, `.parameters()` (so the optimizer never updates them),
    `state_dict()` (so checkpoints silently lack them). Dropout inside stays on after
    `model.eval()`; on GPU the forward fails with `Expected all tensors to be on the same
    device`.

    ## Example
    ```python
    class MLP(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = [nn.Linear(8, 8), nn.Dropout(0.2), nn.Linear(8, 1)]
    ```

    ## Use instead
    ```python
    class MLP(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = nn.ModuleList([nn.Linear(8, 8), nn.Dropout(0.2), nn.Linear(8, 1)])
    ```

    ## References
    - PyTorch docs, `nn.ModuleList`:
      https://pytorch.org/docs/stable/generated/torch.nn.ModuleList.html
    """
    text = facts.text
    for cls in facts.classes.values():
        init = cls.methods.get("__init__")
        if not cls.is_module or init is None or _registers_explicitly(facts, init):
            continue
        for assign in init.assigns:
            node = assign.node
            if not isinstance(node, ast.Assign) or len(node.targets) != 1:
                continue
            target = dotted(node.targets[0])
            if target is None or not target.startswith("self.") or target.count(".") != 1:
                continue
            value = node.value
            if _rebound_later(init, target, node):
                continue  # ``self.blocks = nn.Sequential(*self.blocks)`` registers them
            if isinstance(value, ast.List) and not value.elts:
                appended = _appended_module(facts, init, target, node)
                if appended is not None:
                    yield (
                        appended,
                        f"modules appended to a plain list on `{target}` are not registered: "
                        "`.eval()`, `.to()` and `.parameters()` skip them",
                        None,
                    )
                continue
            container, fix_name, elements = _module_container(value)
            if container is None or not elements:
                continue
            if not all(is_module_ctor(facts, e) for e in elements):
                continue
            if all(_stateless(facts, e) for e in elements):
                continue  # nothing to register: no parameters, buffers or mode
            local = facts.imports.local_name(f"torch.nn.{fix_name}") if fix_name else None
            if local is not None:
                source = text.segment(value)
                if isinstance(value, ast.Tuple) and not _parenthesized(value, source):
                    source = f"({source})"
                fix = Fix(f"Wrap in `{local}`", (text.replace(value, f"{local}({source})"),))
            yield (
                value,
                f"modules in a plain {container} on `{target}` are not registered: "
                "`.eval()`, `.to()` and `.parameters()` skip them",
                fix,
            )


_STATE_WORDS = ("Parameter", "register_buffer", "training", "nn.", "torch.nn")


def _stateless(facts: FileModel, element: ast.expr) -> bool:
    """A Module class of this file that holds no parameters, buffers or submodules and
    never reads ``self.training``: registering it changes nothing."""
    if not isinstance(element, ast.Call) or not isinstance(element.func, ast.Name):
        return False
    cls = facts.classes.get(element.func.id)
    if cls is None:
        return False
    node = cls.node
    start, end = node.lineno, node.end_lineno or node.lineno
    body = "\n".join(line.partition("#")[0] for line in facts.lines[start:end])
    if any(word in body for word in _STATE_WORDS):
        return False
    init = cls.methods.get("__init__")
    return init is None or not any(
        name.startswith("self.") and assign.value is not None and isinstance(assign.value, ast.Call)
        for assign in init.assigns
        for name in assign.target_names()
    )


def _rebound_later(init: FunctionModel, target: str, node: ast.Assign) -> bool:
    """A later assignment in ``__init__`` rebinds ``target`` from itself."""
    for assign in init.assigns:
        if pos(assign.node) <= pos(node) or assign.value is None:
            continue
        if target in assign.target_names() and any(
            dotted(sub) == target for sub in ast.walk(assign.value) if isinstance(sub, ast.expr)
        ):
            return True
    return False


def _appended_module(
    facts: FileModel, init: FunctionModel, target: str, node: ast.Assign
) -> ast.Call | None:
    """``target.append(nn.Conv2d(...))`` after ``target = []`` in ``__init__``."""
    for sub in ast.walk(init.node):
        if (
            isinstance(sub, ast.Call)
            and isinstance(sub.func, ast.Attribute)
            and sub.func.attr in {"append", "extend", "insert"}
            and dotted(sub.func.value) == target
            and pos(sub) > pos(node)
            and sub.args
        ):
            value = sub.args[-1]
            elements = value.elts if isinstance(value, ast.List | ast.Tuple) else [value]
            if elements and all(is_module_ctor(facts, e) for e in elements):
                return sub
    return None


def _registers_explicitly(facts: FileModel, init: FunctionModel) -> bool:
    """``self.add_module(name, layer)`` for each element: the plain list is only a view."""
    start = getattr(init.node, "lineno", 1)
    end = getattr(init.node, "end_lineno", start) or start
    return any(
        "add_module(" in line or "register_module(" in line for line in facts.lines[start - 1 : end]
    )


def _module_container(value: ast.expr) -> tuple[str | None, str | None, list[ast.expr]]:
    """(container word, fix class or None, element expressions)."""
    if isinstance(value, ast.List):
        return "list", "ModuleList", list(value.elts)
    if isinstance(value, ast.Tuple):
        return "tuple", "ModuleList", list(value.elts)
    if isinstance(value, ast.ListComp):
        return "list", "ModuleList", [value.elt]
    if isinstance(value, ast.Dict):
        keys_ok = all(isinstance(k, ast.Constant) and isinstance(k.value, str) for k in value.keys)
        return "dict", "ModuleDict" if keys_ok else None, [v for v in value.values if v]
    if isinstance(value, ast.DictComp):
        return "dict", None, [value.value]
    return None, None, []


def _parenthesized(value: ast.Tuple, source: str) -> bool:
    if not (source.startswith("(") and source.endswith(")")) or not value.elts:
        return False
    first = value.elts[0]
    return (first.lineno, first.col_offset) != (value.lineno, value.col_offset)


@rule(
    "GF308",
    "module-requires-grad-attribute",
    "`module.requires_grad = False` (or the typo `.require_grad`) freezes nothing",
    fixable=True,
)
def module_requires_grad_attribute(facts: FileModel) -> Iterator[Hit]:
    """
    ## What it does
    Flags `m.requires_grad = ...` when `m` is an `nn.Module` (built from `torch.nn` in the
    file; taken from `.modules()`/`.children()`/`.named_children()`, directly, through
    `enumerate`, a slice such as `list(m.children())[:k]`, or a variable holding that list,
    whatever the loop variable is named; used through Module methods; or named like one:
    `model`, `encoder`, `backbone`...), and the typo `x.require_grad = ...` on anything.
    The fix rewrites the statement to `m.requires_grad_(...)`.

    ## Evidence
    `x.requires_grad = ...` where `x` is shown to be a module (built from `torch.nn`,
    taken from `.modules()`/`.children()` as above, used through Module methods) or named
    like one; any `x.require_grad = ...`. Confidence: high.

    ## Why is this a problem?
    `requires_grad` is a property of tensors. On a module it is just a new Python attribute:
    the parameters keep `requires_grad=True`. The typo `require_grad` creates a new
    attribute on a tensor as well.

    **Hidden detail.** No error and no warning: the "frozen" backbone keeps training,
    receives gradients and changes, and the optimizer state grows for it. Transfer-learning
    results are quietly different from the intended setup.

    ## Example
    ```python
    backbone.requires_grad = False
    for p in head.parameters():
        p.require_grad = False
    ```

    ## Use instead
    ```python
    backbone.requires_grad_(False)
    for p in head.parameters():
        p.requires_grad_(False)
    ```

    ## References
    - PyTorch docs, `Module.requires_grad_`:
      https://pytorch.org/docs/stable/generated/torch.nn.Module.html#torch.nn.Module.requires_grad_
    - pytorch/test-infra#4687 (TorchFix TOR002, the typo)
    """
    text = facts.text
    for function in facts.functions:
        modules: set[str] | None = None
        for assign in function.assigns:
            node = assign.node
            for target in assign.targets:
                if not isinstance(target, ast.Attribute):
                    continue
                owner = dotted(target.value)
                if (
                    owner is None
                    and target.attr == "requires_grad"
                    and yields_modules(target.value)
                ):
                    owner = text.segment(target.value)  # ``list(m.children())[0]``
                    if modules is None:
                        modules = module_names(facts, function)
                    modules = modules | {owner}
                if owner is None:
                    continue
                if target.attr == "requires_grad":
                    if modules is None:
                        modules = module_names(facts, function)
                    if owner == "self" or not (owner in modules or looks_like_module_name(owner)):
                        continue
                    message = f"`{owner}.requires_grad = ...` sets a plain attribute on a module"
                elif target.attr == "require_grad":
                    message = f"`{owner}.require_grad` is a typo: it freezes nothing"
                else:
                    continue
                fix = None
                if isinstance(node, ast.Assign) and len(node.targets) == 1:
                    content = (
                        f"{text.segment(target.value)}.requires_grad_({text.segment(node.value)})"
                    )
                    fix = Fix("Use `.requires_grad_(...)`", (text.replace(node, content),))
                yield target, message + f": use `{owner}.requires_grad_(...)`", fix
