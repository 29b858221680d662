"""GF3xx: train/eval mode of modules switched, leaked, missing or bypassed."""

from __future__ import annotations

import ast
from collections.abc import Iterator

from gradfence.lint.analysis.context import (
    binding_before,
    call_sites,
    class_trains,
    covers,
    differentiates,
    differentiates_between,
    eval_batches,
    eval_evidence,
    events,
    is_framework_hook,
    is_frozen,
    is_probe,
    is_test_code,
    is_test_file,
    is_trained,
    loader_words,
    mode_at,
    result_differentiated,
    sets_no_mode,
    unknown_decorator,
)
from gradfence.lint.analysis.effects import Event
from gradfence.lint.diagnostics import HIGH, LOW
from gradfence.lint.imports import dotted
from gradfence.lint.model import (
    CallEvent,
    FileModel,
    FunctionModel,
    Pos,
    any_between,
    end_pos,
    pos,
)
from gradfence.lint.names import tokens
from gradfence.lint.rules.evidence import (
    callers,
    is_eval_function,
    is_eval_loop,
    is_module_ctor,
    looks_like_module_name,
    mentions_mc_dropout,
    module_names,
    resolve_callees,
    uses_gradients,
)
from gradfence.lint.rules.frames import is_false, is_true
from gradfence.lint.rules.registry import Hit, rule
from gradfence.lint.scopes import GradState


def is_eval_call(call: CallEvent) -> bool:
    """``m.eval()`` or ``m.train(False)``."""
    if call.attr == "eval" and not call.node.args and not call.node.keywords:
        return True
    if call.attr == "train":
        args = [*call.node.args, *(k.value for k in call.node.keywords if k.arg == "mode")]
        return len(args) == 1 and is_false(args[0])
    return False


# Module methods that return the module itself: ``m.to(device).train()`` trains ``m``
_RETURNS_SELF = frozenset(
    {"to", "cuda", "cpu", "float", "half", "double", "bfloat16", "type", "train", "eval"}
    | {"requires_grad_", "apply", "share_memory", "to_empty"}
)


def _chain_root(node: ast.expr) -> str | None:
    """``m`` for ``m.to(device)`` / ``m.cuda().float()``: the module a chain returns."""
    while (
        isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and node.func.attr in _RETURNS_SELF
    ):
        node = node.func.value
    return dotted(node)


def is_train_call(call: CallEvent) -> bool:
    """``m.train()``, ``m.train(True)`` or ``m.train(<expression>)`` (a restore); also
    ``m.to(device).train()``."""
    if call.attr != "train":
        return False
    if call.receiver is None:
        func = call.node.func
        if not isinstance(func, ast.Attribute) or _chain_root(func.value) is None:
            return False
    args = [*call.node.args, *(k.value for k in call.node.keywords if k.arg == "mode")]
    return not args or not is_false(args[0])


def _plain_train_call(call: CallEvent) -> bool:
    """``m.train()`` / ``m.train(True)``: switches to training, restores nothing."""
    if not is_train_call(call):
        return False
    args = [*call.node.args, *(k.value for k in call.node.keywords if k.arg == "mode")]
    return not args or is_true(args[0])


@rule(
    "GF301",
    "mode-method-not-called",
    "`model.eval` / `model.train` without `()` does nothing",
    fixable=True,
)
def mode_method_not_called(facts: FileModel) -> Iterator[Hit]:
    """
    ## What it does
    Flags `model.eval` and `model.train` written as a statement without being called.

    ## Evidence
    An expression statement `x.eval` / `x.train` that is not called. Confidence: high.

    ## Why is this a problem?
    The statement evaluates the bound method and throws it away. The module's mode does not
    change.

    **Hidden detail.** Python accepts the line without complaint and nothing fails later:
    dropout stays active and BatchNorm keeps normalising with batch statistics (and
    updating its running statistics from evaluation data). The only symptom is worse,
    noisier metrics.

    ## Example
    ```python
    model.eval
    with torch.no_grad():
        accuracy = evaluate(model, loader)
    ```

    ## Use instead
    ```python
    model.eval()
    with torch.no_grad():
        accuracy = evaluate(model, loader)
    ```

    ## References
    - PyTorch docs, `Module.eval`:
      https://pytorch.org/docs/stable/generated/torch.nn.Module.html#torch.nn.Module.eval
    """
    text = facts.text
    for function in facts.functions:
        for event in function.exprs:
            value = event.node.value
            if isinstance(value, ast.Attribute) and value.attr in {"eval", "train"}:
                message = f"`{text.segment(value)}` is not called: the mode does not change"
                yield value, message, text.call_it(value)


@rule(
    "GF302",
    "eval-mode-leak",
    "a helper leaves the model in eval mode inside a training loop",
)
def eval_mode_leak(facts: FileModel) -> Iterator[Hit]:
    """
    ## What it does
    Flags an `.eval()` inside a loop that trains — directly, or as the effect of a helper
    of the file or of another module of the project (`validate(model)`,
    `self.validate()`, `from .utils import evaluate`) — when the next iteration trains the
    same module again before anything switches it (or an ancestor) back to `.train()`. A
    switch to eval in one branch of an `if` whose other branch calls `.train()` (`if phase
    == "train": model.train() else: model.eval()`) chooses the mode per iteration and is
    not flagged.

    ## Evidence
    From the analysis core: in a loop whose body differentiates (itself or through a
    callee), an `.eval()` of a module — directly or as the effect of a helper in this
    file or another module of the project — that the next iteration reaches before any
    `.train()` of that module or an ancestor (or through
    `DataParallel`/`.module`/`.to()`, the same module). The module must be trained: its
    parameters reach an optimiser, or, when no optimiser is visible, its output reaches
    the differentiated loss. Not evidence: `.train()` on another module; an EMA copy or
    frozen backbone that is never optimised; an `.eval()` followed by a backward in the
    same iteration (a linear probe training in eval on purpose); a helper that sets
    `.train()` on entry. Confidence: high.

    ## Why is this a problem?
    `eval()` is a persistent flag on every submodule, not a scope. After the periodic
    validation returns, training continues with dropout disabled and BatchNorm frozen on
    its running statistics.

    **Hidden detail.** Nothing fails. The loss curve changes slope right after the first
    validation, and the model trains as a different (unregularised) model from then on;
    fixing the bug in published code has changed its reported results.

    ## Example
    ```python
    def validate(model, loader):
        model.eval()
        with torch.no_grad():
            return sum(criterion(model(x), y).item() for x, y in loader)

    model.train()
    for step, (x, y) in enumerate(train_loader):
        loss = criterion(model(x), y)
        loss.backward()
        optimizer.step()
        if step % 100 == 0:
            validate(model, val_loader)
    ```

    ## Use instead
    Scope the mode so that it is restored, whatever the caller did before:
    ```python
    def validate(model, loader):
        with gradfence.inference(model):
            return sum(criterion(model(x), y).item() for x, y in loader)
    ```
    or call `model.train()` at the top of every training step.

    ## References
    - fartashf/vsepp#4; Project-MONAI/MONAI PR #1131
    - PyTorch docs, `Module.train`:
      https://pytorch.org/docs/stable/generated/torch.nn.Module.html#torch.nn.Module.train
    """
    for function in facts.functions:
        if not any(
            any_between(facts.training_lines, loop.node.lineno, loop.node.end_lineno)
            for loop in function.loops
        ):
            continue  # no loop that may train (cheap, before any analysis)
        items = events(facts, function)
        if not any(kind == "diff" for _, _, kind, _ in items):
            continue
        reported: set[Pos] = set()
        own = facts.analysis.function(function.qualname)
        own_evals = {
            (e[0], e[1]) for e in (own.events if own else ()) if e[2].split("|", 1)[0] == "eval"
        }
        for loop in function.loops:
            start, stop = pos(loop.node), end_pos(loop.node)
            inside = [e for e in items if start <= (e[0], e[1]) <= stop]
            if not any(kind == "diff" for _, _, kind, _ in inside):
                continue
            for index, (line, col, kind, target) in enumerate(inside):
                here = (line, col)
                if kind != "eval" or here in reported:
                    continue
                if not is_trained(facts, function, target):
                    continue  # an EMA copy, a frozen backbone: eval on purpose
                same_iteration = _next_mode_or_step(inside[index + 1 :], target)
                if same_iteration == "diff":
                    # trained in eval in the same iteration: on purpose after a direct
                    # .eval() or inside a helper that trains (a linear probe's frozen
                    # BatchNorm); the bug after a helper that only evaluates
                    helper_trains = any(k == "diff" and (ln, cl) == here for ln, cl, k, _ in inside)
                    if here in own_evals or helper_trains:
                        continue
                elif same_iteration is not None:
                    continue  # switched back before the loop ends
                elif _next_mode_or_step(inside[:index], target) != "diff":
                    continue
                call = call_at(function, here)
                if call is None or _mode_chosen_by_branch(function, call):
                    continue
                reported.add(here)
                if is_eval_call(call):
                    what = f"`{call.receiver}.eval()`"
                    if call.attr == "train":
                        what = f"`{call.receiver}.train(False)`"
                else:
                    what = f"`{dotted(call.node.func)}()`"
                yield (
                    call.node,
                    f"{what} leaves `{target}` in eval mode and the loop trains it again "
                    "without `.train()`",
                    None,
                )


def _next_mode_or_step(items: list[Event], target: str) -> str | None:
    """The first of: a differentiation (``"diff"``), a switch of ``target`` (or an ancestor)
    back to train (``"train"``), another ``.eval()`` of it (``"eval"``, judged on its own)."""
    for _, _, kind, subject in items:
        if kind == "diff":
            return "diff"
        if kind in {"train", "restore", "eval"} and covers(subject, target):
            return "train" if kind == "restore" else kind
    return None


def node_at(function: FunctionModel, here: Pos) -> ast.Call | None:
    """The call expression of ``function`` that starts at ``here`` (recorded or not)."""
    call = call_at(function, here)
    if call is not None:
        return call.node
    for sub in ast.walk(function.node):
        if isinstance(sub, ast.Call) and (sub.lineno, sub.col_offset) == here:
            return sub
    return None


def call_at(function: FunctionModel, here: Pos) -> CallEvent | None:
    """The recorded call of ``function`` that starts at ``here``."""
    for call in function.calls:
        if (call.node.lineno, call.node.col_offset) == here:
            return call
    return None


def _within(statements: list[ast.stmt], here: Pos) -> bool:
    return bool(statements) and pos(statements[0]) <= here <= end_pos(statements[-1])


def _mode_chosen_by_branch(function: FunctionModel, call: CallEvent) -> bool:
    """``if phase == "train": model.train() else: model.eval()``: the other branch of an
    enclosing ``if`` switches to train, so which mode the loop trains in is decided at run
    time (the phase loop of the PyTorch transfer-learning tutorial). Stay silent."""
    trains = [pos(c.node) for c in function.calls if _plain_train_call(c)]
    if not trains:
        return False
    here = pos(call.node)
    for node in ast.walk(function.node):
        if not isinstance(node, ast.If) or not node.orelse:
            continue
        if _within(node.body, here):
            other = node.orelse
        elif _within(node.orelse, here):
            other = node.body
        else:
            continue
        if any(_within(other, t) for t in trains):
            return True
    return False


def _is_eval_context(function: FunctionModel, call: CallEvent) -> bool:
    if is_eval_function(function):
        return True
    return call.loop is not None and any(is_eval_loop(loop) for loop in call.loop.chain())


def _forward_target(facts: FileModel, call: CallEvent, modules: set[str]) -> str | None:
    """``R`` when the call is ``R(...)`` on something that is a module."""
    callee = dotted(call.node.func)
    if (
        callee is None
        or callee in {"self", "super"}
        or (
            call.attr is not None
            and call.attr
            in {
                "eval",
                "train",
                "forward",
            }
        )
    ):
        return None
    if isinstance(call.node.func, ast.Name) and (
        facts.functions_named(callee) or callee in facts.imports.aliases
    ):
        return None  # a function of this file or an imported one, not a module
    if _is_criterion(facts, call.function, callee):
        return None  # a loss module: no mode-dependent layers
    for arg in call.node.args:
        text = dotted(arg)
        if text is not None and (text in modules or looks_like_module_name(text)):
            return None  # ``reparameterize_model(model)``: a helper given a module
    if callee in modules:
        return callee
    root = callee.split(".", 1)[0]
    if "." in callee and root != "self" and not looks_like_module_name(root):
        return None  # ``solver.model()``: a method of something that is not a module
    if looks_like_module_name(callee):
        return callee
    return None


_CRITERION_WORDS = frozenset({"criterion", "criteria", "loss", "losses"})


def _is_criterion(facts: FileModel, function: FunctionModel, name: str) -> bool:
    """``criterion``, ``loss_fn``, or a name built from ``torch.nn.<X>Loss``."""
    if tokens(name.rsplit(".", 1)[-1]) & _CRITERION_WORDS:
        return True
    owners = [function, facts.module]
    if function.cls is not None:
        owners += function.cls.methods.values()
    for owner in owners:
        for assign in owner.assigns:
            value = assign.value
            if isinstance(value, ast.Call) and name in assign.target_names():
                qual = facts.imports.resolve(value.func) or ""
                if qual.startswith("torch.nn.") and qual.endswith("Loss"):
                    return True
    return False


def _related(receiver: str | None, target: str) -> bool:
    if receiver is None:
        return False
    return (
        receiver == target or target.startswith(receiver + ".") or receiver.startswith(target + ".")
    )


def _switched_before(function: FunctionModel, target: str, limit: Pos, *, to_eval: bool) -> bool:
    for call in function.calls:
        if pos(call.node) >= limit:
            continue
        if to_eval:
            if is_eval_call(call) and _related(call.receiver, target):
                return True
            if call.qual == "gradfence.inference" and any(
                dotted(arg) == target for arg in call.node.args
            ):
                return True
        elif is_train_call(call) and _related(call.receiver, target):
            return True
    return False


def _caller_evaluates(facts: FileModel, function: FunctionModel, depth: int = 2) -> bool:
    """Some caller in the file (or its caller) switches a module to eval before the call."""
    if depth == 0 or function.name.startswith("<"):
        return False
    for caller, line, col, _ in call_sites(facts, function):
        if any(is_eval_call(c) and pos(c.node) < (line, col) for c in caller.calls):
            return True
        if any(c.qual == "gradfence.inference" for c in caller.calls):
            return True
        if _caller_evaluates(facts, caller, depth - 1):
            return True
    return False


def _locally_loaded(facts: FileModel, function: FunctionModel, target: str, limit: Pos) -> bool:
    """``target = load_model(...)``: built by a call we cannot see into (may set eval).

    ``target = Net(...)`` followed by ``target.load_state_dict(...)`` is not opaque: a class
    whose weights are then loaded is a module built in train mode.
    """
    for assign in function.assigns:
        if pos(assign.node) < limit and target in assign.target_names():
            value = assign.value
            while (
                isinstance(value, ast.Call)
                and isinstance(value.func, ast.Attribute)
                and value.func.attr in _RETURNS_SELF
                and isinstance(value.func.value, ast.Call)
            ):
                value = value.func.value  # ``Net(...).to(device)`` is what ``Net(...)`` is
            if not isinstance(value, ast.Call) or is_module_ctor(facts, value):
                return False
            return not (
                _constructs_class(value) and _loads_weights(function, target, pos(assign.node))
            )
    return False


def _constructs_class(call: ast.Call) -> bool:
    """``Net(...)`` or ``models.ResNet(...)``: a CamelCase class called, not a factory."""
    callee = dotted(call.func)
    if callee is None:
        return False
    last = callee.rsplit(".", 1)[-1]
    return last[:1].isupper() and not last.isupper()


def _loads_weights(function: FunctionModel, target: str, after: Pos) -> bool:
    return any(
        call.attr == "load_state_dict" and call.receiver == target and pos(call.node) > after
        for call in function.calls
    )


def _bound_locally(function: FunctionModel, name: str) -> bool:
    """``name`` is a parameter of ``function`` or assigned in it (it shadows a global)."""
    node = function.node
    if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
        args = node.args
        every = [*args.posonlyargs, *args.args, *args.kwonlyargs, args.vararg, args.kwarg]
        if any(arg is not None and arg.arg == name for arg in every):
            return True
    return any(name in assign.target_names() for assign in function.assigns)


def _loaded_by_caller(facts: FileModel, function: FunctionModel, target: str) -> bool:
    """``target`` is a parameter, and some caller in the file passes a module it got from a
    call we cannot see into (``model = get_setup(); generate_predictions(model, ...)``)."""
    node = function.node
    if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
        return False
    params = [a.arg for a in (*node.args.posonlyargs, *node.args.args)]
    static = any(dotted(d) == "staticmethod" for d in node.decorator_list)
    if function.cls is not None and params and not static:
        params = params[1:]  # self / cls
    if target not in params and target not in {a.arg for a in node.args.kwonlyargs}:
        return False
    index = params.index(target) if target in params else None
    for site in callers(facts, function):
        call = site.node
        passed = next((k.value for k in call.keywords if k.arg == target), None)
        if passed is None and index is not None and index < len(call.args):
            passed = call.args[index]
        name = dotted(passed) if passed is not None else None
        if name is not None and _locally_loaded(facts, site.function, name, pos(call)):
            return True
    return False


def _set_up_elsewhere(facts: FileModel, function: FunctionModel, target: str) -> bool:
    """The module is switched to eval, or loaded by an opaque call, where it is set up:
    another method of the class for ``self.x`` (``__init__``), module level for globals."""
    if target.startswith("self.") and function.cls is not None:
        owners = [m for m in function.cls.methods.values() if m is not function]
    elif function is not facts.module and _bound_locally(function, target.split(".", 1)[0]):
        return False  # a parameter or local of the function, not the global of that name
    else:
        owners = [facts.module]
    end = (1 << 30, 0)
    for owner in owners:
        if _switched_before(owner, target, end, to_eval=True):
            return True
        if _locally_loaded(facts, owner, target, end):
            return True
    return False


def _helper_evaluates_before(facts: FileModel, function: FunctionModel, limit: Pos) -> bool:
    """``prepare(model)`` before the forward, where ``prepare`` calls ``.eval()``."""
    for call in function.calls:
        if pos(call.node) >= limit:
            break  # calls are sorted by position
        for callee in resolve_callees(facts, call):
            if callee is not function and any(is_eval_call(c) for c in callee.calls):
                return True
    return False


def _evaluation_forwards(facts: FileModel) -> list[tuple[FunctionModel, CallEvent, str, str]]:
    """First forward of each module where the evidence says "evaluation", per function,
    with the finding's confidence (memoised: GF304 and GF305 share it)."""
    cached: list[tuple[FunctionModel, CallEvent, str, str]] | None = facts.memo.get("forwards")
    if cached is None:
        cached = list(_find_evaluation_forwards(facts))
        facts.memo["forwards"] = cached
    return cached


def _eval_region_loop(facts: FileModel, function: FunctionModel, call: CallEvent) -> bool:
    """The call is in a loop over evaluation data whose body differentiates nothing."""
    if call.loop is None:
        return False
    for loop in call.loop.chain():
        if loader_words(loop):
            start, stop = pos(loop.node), end_pos(loop.node)
            return not differentiates_between(facts, function, start, stop)
    return False


def _helper_forwards(facts: FileModel, function: FunctionModel) -> dict[Pos, str]:
    """Calls of the function that run a ``self`` module through a method of the class."""
    callees = {pos(c.node): c.callee for c in function.calls}
    found: dict[Pos, str] = {}
    for line, col, kind, subject in events(facts, function):
        if (
            kind in {"forward", "forward_off"}
            and subject.startswith("self.")
            and subject.count(".") == 1
            and callees.get((line, col), subject) != subject
            and not _is_criterion(facts, function, subject)
        ):
            found.setdefault((line, col), subject)
    return found


def _after_eval_batch(facts: FileModel, function: FunctionModel, call: CallEvent) -> bool:
    """A batch pulled from evaluation data (``next(iter(test_loader))``) before the call,
    with nothing differentiated in between."""
    here = pos(call.node)
    return any(
        start < here and not differentiates_between(facts, function, start, here)
        for start in eval_batches(facts, function)
    )


def _find_evaluation_forwards(
    facts: FileModel,
) -> Iterator[tuple[FunctionModel, CallEvent, str, str]]:
    for function in facts.functions:
        if is_framework_hook(function) or function.name.startswith("<class"):
            continue
        if unknown_decorator(facts, function):
            continue  # a decorator the analysis cannot see through may set the mode
        testing = is_test_code(facts, function)
        named = is_eval_function(function)
        loops = any(loader_words(loop) for loop in function.loops)
        if not function.calls or not (
            named
            or loops
            or function.entry_mode.no_graph
            or any(call.mode.no_graph for call in function.calls)
            or eval_batches(facts, function)
        ):
            continue  # no evidence to weigh (cheap, before any analysis)
        node = function.node
        start = getattr(node, "lineno", 1)
        end = len(facts.lines) if isinstance(node, ast.Module) else node.end_lineno
        trains = any_between(facts.training_lines, start, end or start) and differentiates(
            facts, function
        )
        grad_off_function = function.entry_mode.no_graph
        evidence = eval_evidence(facts, function, None, grad_off_function)
        seen: set[str] = set()
        weak: dict[str, CallEvent] = {}
        via_helpers: dict[Pos, str] | None = None
        modules: set[str] | None = None
        # a method of a Module: its submodules run in the caller's mode
        in_module_class = function.cls is not None and function.cls.is_module
        for call in function.calls:
            if _eval_region_loop(facts, function, call):
                confidence = LOW if is_test_file(facts) else HIGH
            elif trains and not _after_eval_batch(facts, function, call):
                continue  # the function trains and the call is not in an evaluation region
            elif trains:
                confidence = HIGH if call.mode.no_graph else LOW
            else:
                here = evidence
                if call.mode.no_graph and "gradients off" not in here:
                    here = [*here, "gradients off"]
                if here and (named or len(here) > 1) and not testing:
                    confidence = HIGH
                elif named or here:
                    confidence = LOW  # a name or one piece of evidence alone: --preview
                else:
                    continue
            if modules is None:
                modules = module_names(facts, function)
            target = _forward_target(facts, call, modules)
            if target is None and call.attr is not None and call.receiver in {"self", "cls"}:
                # ``self._forward_pass(x)``: a helper that runs the module
                if via_helpers is None:
                    via_helpers = _helper_forwards(facts, function)
                target = via_helpers.get(pos(call.node))
            if target is None or target in seen:
                continue
            if in_module_class and target.startswith("self."):
                continue
            if confidence == HIGH:
                seen.add(target)
                yield function, call, target, confidence
            else:
                weak.setdefault(target, call)  # reported only if no stronger evidence follows
        for target, call in weak.items():
            if target not in seen:
                yield function, call, target, LOW


@rule(
    "GF303",
    "train-in-inference",
    "`.train()` inside no_grad or an evaluation function, then the module is run",
)
def train_in_inference(facts: FileModel) -> Iterator[Hit]:
    """
    ## What it does
    Flags `m.train()` / `m.train(True)` inside a `no_grad` / `inference_mode` scope or
    inside an evaluation function (`validate`, `evaluate`, `test`, `predict`, `infer`...)
    when `m` is run afterwards in the same function. A `.train()` that restores the mode
    at the end, and functions that talk about dropout sampling (MC dropout) or compute
    gradients on purpose, are not flagged.

    ## Evidence
    `.train()` of a module under no_grad/inference_mode or in a function named like an
    evaluation, followed by a forward of that module in the same function; no MC-dropout
    wording, no differentiation in the function, no recalibration (`update_bn`).
    Confidence: high.

    ## Why is this a problem?
    `no_grad` controls gradient recording; it does not change what the layers compute. In
    train mode, dropout drops activations and BatchNorm normalises with the batch
    statistics *and overwrites its running statistics* with the evaluation data.

    **Hidden detail.** BatchNorm never consults grad mode: "buffers are only updated if
    ... we are in training mode". Evaluating in train mode under `no_grad` therefore
    changes the model that is being evaluated, with no error. Metrics are noisy and the
    next training step starts from contaminated statistics.

    ## Example
    ```python
    def validate(model, loader):
        model.train()
        with torch.no_grad():
            return [model(x) for x, _ in loader]
    ```

    ## Use instead
    ```python
    def validate(model, loader):
        with gradfence.inference(model):
            return [model(x) for x, _ in loader]
    ```

    ## References
    - pliang279/MultiBench#26
    - PyTorch source, `torch/nn/modules/batchnorm.py`
    """
    for function in facts.functions:
        candidates = [
            c
            for c in function.calls
            if _plain_train_call(c) and (c.mode.no_graph or is_eval_function(function))
        ]
        if not candidates or mentions_mc_dropout(facts, function) or uses_gradients(function):
            continue
        if _recalibrates(function):
            continue
        modules = module_names(facts, function)
        for call in candidates:
            receiver = call.receiver or ""
            later = [
                other
                for other in function.calls
                if pos(other.node) > pos(call.node)
                and (
                    _forward_target(facts, other, modules | {receiver}) == receiver
                    or (other.attr == "forward" and other.receiver == receiver)
                )
            ]
            if later:
                yield (
                    call.node,
                    f"`{receiver}.train()` before `{receiver}` is run for evaluation: dropout "
                    "is active and BatchNorm statistics are overwritten",
                    None,
                )


_RECALIBRATION = frozenset(
    {
        "bn",
        "batchnorm",
        "norm",
        "stats",
        "statistics",
        "calibrate",
        "calibration",
        "running",
        "update",
        "recalibrate",
    }
)


def _recalibrates(function: FunctionModel) -> bool:
    """``update_bn``, ``recalibrate_stats``: train mode under no_grad on purpose."""
    return bool(tokens(function.name) & _RECALIBRATION)


@rule(
    "GF304",
    "inference-without-eval",
    "a module is run for evaluation without `.eval()` first",
)
def inference_without_eval(facts: FileModel) -> Iterator[Hit]:
    """
    ## What it does
    Flags the first forward of a module where the evidence says the code evaluates (see
    Evidence) when nothing switched that module to eval first: no `.eval()`,
    `.train(False)` or `gradfence.inference(model)` earlier in the function, in a helper
    it calls, or in a caller in the file. A module whose mode is set where the analysis
    cannot see (loaded by a factory, traced, injected, decorated) is not flagged. A model
    built from a class and then given weights (`model = Net(); model.load_state_dict(...)`)
    is in train mode, and is flagged.

    ## Evidence
    From the analysis core, evidence that the forward evaluates: a loop over
    validation/test data whose body differentiates nothing (high on its own); a batch
    pulled with `next(iter(test_loader))` with nothing differentiated before the
    forward; a metric computed on outputs (argmax/topk, accuracy, dice, WER...);
    gradients off (`no_grad`, `inference_mode`, grad-off decorator); a file that never
    differentiates. Two pieces, or one plus an evaluation name, give high confidence;
    one piece or a name alone gives low confidence (`--preview`). The module's mode must
    be known: silent when it was built by a factory the analysis cannot see into,
    traced/scripted/copied, handed to `__init__` of a class that never trains it, set up
    in another method, given by a caller that loaded it, wrapped by a decorator the
    analysis cannot see through, or a framework hook (Lightning `validation_step`,
    fairseq `valid_step`...). `torch.load` counts only in a file that never
    differentiates and never sets a mode. A `.train()` before the forward is on purpose
    unless a training part (differentiation) lies between them.

    ## Why is this a problem?
    Grad-mode contexts do not change module mode: `no_grad` and `inference_mode` leave
    dropout active and BatchNorm in batch-statistics mode. A model evaluated in train mode
    gives noisy, pessimistic metrics and updates BatchNorm running statistics from the
    evaluation data.

    **Hidden detail.** The PyTorch docs for `inference_mode` say it "does NOT automatically
    set the model to evaluation mode". A module is in train mode from construction until
    something calls `.eval()`.

    ## Example
    ```python
    def evaluate(model, loader):
        with torch.no_grad():
            return [model(x).argmax(-1) for x, _ in loader]
    ```

    ## Use instead
    ```python
    def evaluate(model, loader):
        with gradfence.inference(model):
            return [model(x).argmax(-1) for x, _ in loader]
    ```

    ## References
    - PyTorch docs, `torch.inference_mode`:
      https://pytorch.org/docs/stable/generated/torch.inference_mode.html
    - wolny/pytorch-3dunet#53; asteroid-team/asteroid#643
    """
    skip: dict[int, bool] = {}
    for function, call, target, confidence in _evaluation_forwards(facts):
        key = id(function)
        if key not in skip:
            skip[key] = mentions_mc_dropout(facts, function) or _caller_evaluates(facts, function)
        if skip[key]:
            continue
        here = pos(call.node)
        if _switched_before(function, target, here, to_eval=True):
            continue  # .eval() or gradfence.inference(model) (cheap, before any analysis)
        if _method_not_module(function, target):
            continue  # ``self.feed_data(...)``: a method (maybe inherited), not a module
        if _enclosing_evaluates(facts, function, target):
            continue  # a closure run by a function that set the mode first
        mode = mode_at(facts, function, target, here)
        if mode in {"eval", "restore"}:
            continue
        if mode == "train" and not _trained_since_train(facts, function, target, here):
            continue  # explicit train mode for evaluation is on purpose (MC dropout...)
        binding = binding_before(facts, function, target, here)
        if binding in {"bound_call", "opaque"}:
            continue  # built by a factory, traced, copied: its mode is set out of sight
        if binding == "loaded" and not (
            sets_no_mode(facts) and not facts.analysis.summary.differentiates
        ):
            continue  # unpickled in the mode it was saved in, unless an inference script
        if binding is None and _locally_loaded(facts, function, target, here):
            continue  # (a class called: built in train mode; judged by the analysis)
        if _loaded_by_caller(facts, function, target):
            continue
        if binding is None and _set_up_elsewhere(facts, function, target):
            continue
        if _injected(facts, function, target) and not class_trains(facts, function):
            continue  # handed in, and this class never trains it: its mode is set outside
        if _helper_evaluates_before(facts, function, here):
            continue
        yield (
            call.node,
            f"`{target}` is run for evaluation without `{target}.eval()` first",
            None,
            confidence,
        )


def _method_not_module(function: FunctionModel, target: str) -> bool:
    """``self.x`` is called but never bound in the class: a method (perhaps of a base class
    in another file), not a submodule."""
    cls = function.cls
    if cls is None or not target.startswith("self.") or target.count(".") != 1:
        return False
    if target[5:] in cls.methods:
        return True
    return not any(
        target in assign.target_names()
        for method in cls.methods.values()
        for assign in method.assigns
    )


def _enclosing_evaluates(facts: FileModel, function: FunctionModel, target: str) -> bool:
    """A nested function whose enclosing function switches ``target`` to eval (it runs the
    closure afterwards: ``def validate(model): model.eval(); run_validate(loader)``)."""
    parent = function.parent
    if (
        parent is None
        or parent is facts.module
        or not isinstance(parent.node, ast.FunctionDef | ast.AsyncFunctionDef)
    ):
        return False
    return any(is_eval_call(c) and _related(c.receiver, target) for c in parent.calls)


def _trained_since_train(facts: FileModel, function: FunctionModel, target: str, here: Pos) -> bool:
    """``model.train()`` then a training part that differentiates, then this forward: the
    train mode was for training and is still on (a test loop after the training loop)."""
    last: Pos | None = None
    for line, col, kind, subject in events(facts, function):
        if (line, col) >= here:
            break
        if kind in {"train", "eval", "restore"} and covers(subject, target):
            last = (line, col)
    return last is not None and differentiates_between(facts, function, last, here)


def _injected(facts: FileModel, function: FunctionModel, target: str) -> bool:
    """``self.model = model`` in ``__init__``: a module handed in, whose mode the caller
    sets where the analysis cannot see."""
    if not target.startswith("self.") or function.cls is None:
        return False
    init = function.cls.methods.get("__init__")
    if init is None or not isinstance(init.node, ast.FunctionDef | ast.AsyncFunctionDef):
        return False
    params = {a.arg for a in (*init.node.args.args, *init.node.args.kwonlyargs)}
    head = ".".join(target.split(".")[:2])
    for assign in init.assigns:
        if head in assign.target_names() and assign.value is not None:
            source = assign.value
            while isinstance(source, ast.Call) and isinstance(source.func, ast.Attribute):
                source = source.func.value  # ``model.to(device)``
            if isinstance(source, ast.Name) and source.id in params:
                return True
    return False


@rule(
    "GF305",
    "eval-without-no-grad",
    "forwards after `.eval()` for evaluation still record an autograd graph",
)
def eval_without_no_grad(facts: FileModel) -> Iterator[Hit]:
    """
    ## What it does
    Flags a forward of a module with gradients on in the region after its `.eval()` (up to
    its next `.train()`) where nothing is differentiated — in the function, or in a helper
    that received the module (`model.eval(); run(model, loader)`). A function that trains
    first and evaluates after is judged by the region after `.eval()`, not as a whole.

    ## Evidence
    From the analysis core: a forward with gradients on (directly, or in a callee that
    received the module) in the region after `.eval()` of that module up to its next
    `.train()`, where nothing is differentiated (the region, not the whole function).
    Reported once, where the `.eval()` and the forward meet. Silent when the function's
    callers run it under no_grad or differentiate what it returns (an attack), after
    `torch.no_grad().__enter__()`, when the module's parameters are all frozen, on
    made-up input (`torch.randn(...)`: a smoke test), in unit tests, under a decorator
    the analysis cannot see through, and in framework hooks. Confidence: high.

    ## Why is this a problem?
    `eval()` changes what dropout and BatchNorm compute; it does not turn off gradient
    recording. Every forward still builds an autograd graph and keeps its activations alive
    for as long as the outputs live.

    **Hidden detail.** "eval always allows backprop" (pytorch/pytorch#7013): the outputs
    have a `grad_fn`. Collected into a list across a test set, they keep every batch's
    activations alive, and evaluation runs out of memory where training did not:
    `CUDA out of memory`.

    ## Example
    ```python
    def predict(model, loader):
        model.eval()
        return [model(x) for x, _ in loader]
    ```

    ## Use instead
    ```python
    @torch.no_grad()
    def predict(model, loader):
        model.eval()
        return [model(x) for x, _ in loader]
    ```
    or `with gradfence.inference(model):`, which does both and restores both.

    ## References
    - pytorch/pytorch#7013; jhjacobsen/invertible-resnet#15; mindsdb/lightwood#154
    """
    for function in facts.functions:
        if is_framework_hook(function) or function.entry_mode is not GradState.DEFAULT:
            continue
        if unknown_decorator(facts, function) or is_test_code(facts, function):
            continue
        if not any(is_eval_call(call) for call in function.calls):
            continue  # no .eval() here (cheap, before any analysis)
        items = events(facts, function)
        if not any(kind == "eval" for _, _, kind, _ in items):
            continue
        skip: bool | None = None
        seen: set[str] = set()
        for index, (line, col, kind, target) in enumerate(items):
            if kind != "forward" or not target or target in seen:
                continue
            here = (line, col)
            start = _eval_switch_before(items, index, target)
            if start is None or start == here:
                continue  # the callee's own .eval() and forward: reported there, once
            if is_frozen(items, index, target):
                continue  # no parameter requires grad: no graph is recorded
            stop = next(
                (
                    (ln, cl)
                    for ln, cl, k, t in items[index:]
                    if k in {"train", "restore"} and covers(t, target)
                ),
                (1 << 30, 0),
            )
            if differentiates_between(facts, function, start, stop):
                continue  # the region after .eval() differentiates: gradients on purpose
            node = node_at(function, here)
            if node is None or is_probe(facts, function, node):
                continue
            if skip is None:
                skip = any(
                    grad_off or result_differentiated(facts, caller, line, col)
                    for caller, line, col, grad_off in call_sites(facts, function)
                )  # run under no_grad by its callers, or an attack: gradients on purpose
            if skip:
                break
            seen.add(target)
            callee = dotted(node.func) or "the call"
            if callee == target or callee.split(".", 1)[0] == target:
                message = (
                    f"`{target}` is evaluated after `.eval()` with gradients on: wrap it in "
                    "`torch.no_grad()`"
                )
            else:
                message = (
                    f"`{callee}(...)` runs `{target}` after `.eval()` with gradients on: "
                    "wrap it in `torch.no_grad()`"
                )
            yield node, message, None


def _eval_switch_before(items: list[Event], index: int, target: str) -> Pos | None:
    """Where ``target`` (or an ancestor) was last switched, if to eval, before event ``index``."""
    for line, col, kind, subject in reversed(items[:index]):
        if kind in {"eval", "train", "restore"} and covers(subject, target):
            return (line, col) if kind == "eval" else None
    return None
