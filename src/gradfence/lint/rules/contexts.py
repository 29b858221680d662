"""GF1xx: grad-mode context managers and decorators used in a way that does not work."""

from __future__ import annotations

import ast
from collections.abc import Iterator

from gradfence.lint.diagnostics import LOW
from gradfence.lint.model import FileModel, FunctionModel, Pos, end_pos, pos
from gradfence.lint.rules.registry import Hit, rule
from gradfence.lint.scopes import (
    GRAD_CONTEXTS,
    NULLARY_GRAD_CONTEXTS,
    GradState,
    mode_of_set_call,
)

_THREAD_STARTERS = frozenset({"threading.Thread", "threading.Timer", "asyncio.to_thread"})


def _worker(call: ast.Call, qual: str | None) -> ast.expr | None:
    """The callable handed to another thread: ``Thread(target=f)``, ``Timer(t, f)``,
    ``loop.run_in_executor(ex, f)``, ``pool.submit(f)`` / ``pool.map(f, ...)``."""
    for keyword in call.keywords:
        if keyword.arg in {"target", "function", "fn", "func"}:
            return keyword.value
    # Thread(group, target), Timer(interval, function), run_in_executor(executor, func)
    second = qual in {"threading.Thread", "threading.Timer"} or (
        isinstance(call.func, ast.Attribute) and call.func.attr == "run_in_executor"
    )
    index = 1 if second else 0
    return call.args[index] if len(call.args) > index else None


def _worker_sets_own_mode(facts: FileModel, worker: ast.expr | None) -> bool:
    """The worker is a function of this file that disables grad itself (a no_grad /
    inference_mode decorator, or a body that is such a ``with`` block): the thread it runs
    on gets that mode whatever the submitting thread had."""
    if isinstance(worker, ast.Name):
        name = worker.id
    elif (
        isinstance(worker, ast.Attribute)
        and isinstance(worker.value, ast.Name)
        and worker.value.id in {"self", "cls"}
    ):
        name = worker.attr
    else:
        return False
    functions = facts.functions_named(name)
    return bool(functions) and all(
        _owns_no_grad(f) or _delegates_to_no_grad(facts, f) for f in functions
    )


_BUILTINS = frozenset({"print", "len", "range", "enumerate", "zip", "isinstance", "str", "int"})


def _delegates_to_no_grad(facts: FileModel, function: FunctionModel) -> bool:
    """The worker runs nothing itself with gradients on, and hands the work to a function
    of the file that disables grad (``@torch.no_grad()`` on the method it calls)."""
    analysis = facts.analysis
    summary = analysis.function(function.qualname)
    if summary is None or any(
        kind.split("|", 1)[0] == "forward" and subject not in _BUILTINS
        for _, _, kind, subject in summary.events
    ):
        return False  # it runs something itself, with gradients on
    for site in summary.calls:
        target = analysis.resolve(site, analysis.module, function.qualname)
        callee = analysis.function(target[1], target[0]) if target is not None else None
        if callee is not None and callee.grad_off:
            return True
    return False


def _owns_no_grad(function: FunctionModel) -> bool:
    if any(mode is not None and mode.no_graph for _, mode in function.decorators):
        return True
    node = function.node
    if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
        return False
    body = node.body
    if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
        body = body[1:]  # docstring
    return len(body) == 1 and any(w.node is body[0] and w.mode.no_graph for w in function.withs)


@rule(
    "GF101",
    "grad-context-not-instantiated",
    "`with torch.no_grad:` uses the class itself as the context manager (TypeError)",
    fixable=True,
)
def grad_context_not_instantiated(facts: FileModel) -> Iterator[Hit]:
    """
    ## What it does
    Flags `with torch.no_grad:`, `with torch.enable_grad:` and `with torch.inference_mode:`
    (any import alias) where the class is used as the context manager without being called.

    ## Evidence
    The `with` item resolves through the file's imports to `torch.no_grad`,
    `torch.enable_grad` or `torch.inference_mode` (any alias or re-export) and is not
    called. Confidence: high.

    ## Why is this a problem?
    `no_grad`, `enable_grad` and `inference_mode` are classes. The `with` statement needs
    an *instance* that has `__enter__`/`__exit__`; the class object has neither.

    **Hidden detail.** The bare form works as a *decorator* (`@torch.no_grad`, since
    torch 2.1), which makes the `with` spelling look plausible, but it fails the moment
    the block is reached: `TypeError: 'type' object does not support the context manager
    protocol` on Python 3.11+, `AttributeError: __enter__` on Python 3.10 and older.

    ## Example
    ```python
    with torch.no_grad:
        logits = model(x)
    ```

    ## Use instead
    ```python
    with torch.no_grad():
        logits = model(x)
    ```

    ## References
    - PyTorch docs, `torch.no_grad`: https://pytorch.org/docs/stable/generated/torch.no_grad.html
    - Python data model, context managers:
      https://docs.python.org/3/reference/datamodel.html#context-managers
    """
    text = facts.text
    for expr, _function in facts.bare_with_items:
        source = text.segment(expr)
        yield expr, f"`{source}` is a class: call it (`with {source}():`)", text.call_it(expr)


@rule(
    "GF102",
    "discarded-grad-context",
    "`torch.no_grad()` as a statement creates a context manager and throws it away",
)
def discarded_grad_context(facts: FileModel) -> Iterator[Hit]:
    """
    ## What it does
    Flags `torch.no_grad()`, `torch.enable_grad()` and `torch.inference_mode()` written as
    a statement of their own, outside a `with` or decorator.

    ## Evidence
    An expression statement that is a call resolving to a grad-mode context. Confidence:
    high.

    ## Why is this a problem?
    These objects change the grad mode only in `__enter__`, i.e. when a `with` statement
    (or the decorator wrapper) enters them. Calling the constructor alone builds the object
    and drops it: the grad mode never changes, and every following operation records an
    autograd graph.

    **Hidden detail.** `torch.set_grad_enabled(False)` *does* take effect as a plain call
    (its constructor sets the mode), which is why the bare `torch.no_grad()` looks like it
    should work too. The symptom is memory growth during evaluation and outputs with
    `requires_grad=True` / a `grad_fn`, never an error.

    ## Example
    ```python
    torch.no_grad()
    predictions = model(batch)
    ```

    ## Use instead
    ```python
    with torch.no_grad():
        predictions = model(batch)
    ```

    ## References
    - PyTorch docs, locally disabling gradient computation:
      https://pytorch.org/docs/stable/notes/autograd.html#locally-disabling-gradient-computation
    - pytorch/pytorch PR #5555
    """
    for function in facts.functions:
        for event in function.exprs:
            value = event.node.value
            if isinstance(value, ast.Call):
                qual = facts.imports.resolve(value.func)
                if qual in NULLARY_GRAD_CONTEXTS:
                    yield value, f"`{qual}()` does nothing unless entered: use `with`", None


@rule(
    "GF103",
    "global-grad-disable",
    "`torch.set_grad_enabled(False)` as a call disables gradients for the whole thread",
)
def global_grad_disable(facts: FileModel) -> Iterator[Hit]:
    """
    ## What it does
    Flags `torch.set_grad_enabled(False)` (any alias) called as a statement rather than
    used in a `with`, when it runs at module level, in `__init__`, or in a function that
    never switches the mode back.

    ## Evidence
    A statement `set_grad_enabled(False)` (resolved through imports) not switched back
    later in the function (or by a sibling method such as `__exit__`). Not evidence of a
    bug: inside the entry point of a script that never differentiates (`main()` called
    from `if __name__ == "__main__":`, or the guard itself). Under the `__main__` guard
    of a script that does differentiate: low confidence (`--preview`).

    ## Why is this a problem?
    As a plain call, `set_grad_enabled(False)` turns gradient recording off for the rest
    of the thread's life, not for a block. Run at import time, every program that imports
    the module loses gradients; run in a constructor, building an object silently breaks
    training elsewhere.

    **Hidden detail.** Grad mode is thread-local: the damage is confined to the thread that
    ran the call, so the same training code works in one process layout and fails in
    another. The symptom is far from the cause: `RuntimeError: element 0 of tensors does
    not require grad and does not have a grad_fn` at the first `loss.backward()`.

    ## Example
    ```python
    import torch

    torch.set_grad_enabled(False)  # "we only do inference here"
    ```

    ## Use instead
    ```python
    import torch

    with torch.set_grad_enabled(False):
        run_inference()
    ```
    or decorate the inference function with `@torch.no_grad()`.

    ## References
    - PyTorch docs, `torch.set_grad_enabled`:
      https://pytorch.org/docs/stable/generated/torch.set_grad_enabled.html
    - huggingface/transformers PR #13257; pytorch/pytorch#82145
    """
    imports = facts.imports
    for function in facts.functions:
        sets = [
            (pos(call.node), mode_of_set_call(call.node, imports))
            for call in function.calls
            if call.qual == "torch.set_grad_enabled"
        ]
        for event in function.exprs:
            value = event.node.value
            if not isinstance(value, ast.Call):
                continue
            if mode_of_set_call(value, imports) is not GradState.DISABLED:
                continue
            here = pos(value)
            restored = any(p > here and m is not GradState.DISABLED for p, m in sets)
            if function.cls is not None and function.name not in {"__init__", "<module>"}:
                # a context-manager-like class: __enter__ disables, __exit__ restores
                restored = restored or _restored_by_sibling(facts, function)
            where = function.name
            if not facts.analysis.summary.differentiates and (
                _entry_point(facts, function) or _under_main_guard(facts, here)
            ):
                continue  # an inference-only script switching gradients off for its run
            if function is facts.module and _under_main_guard(facts, here):
                where = "__main__"
            if where == "__main__":
                if not restored:
                    yield (
                        value,
                        "`set_grad_enabled(False)` under `__main__` disables gradients for the "
                        "whole run, training included",
                        None,
                        LOW,
                    )
            elif where.startswith("<"):
                yield value, "`set_grad_enabled(False)` at import time disables gradients", None
            elif where == "__init__":
                yield value, "`set_grad_enabled(False)` in `__init__` disables gradients", None
            elif not restored:
                yield (
                    value,
                    f"`set_grad_enabled(False)` in `{where}()` is never switched back",
                    None,
                )


def _entry_point(facts: FileModel, function: FunctionModel) -> bool:
    """A top-level function that the ``if __name__ == "__main__":`` block calls."""
    if function.parent is not facts.module:
        return False
    for node in facts.tree.body:
        if _is_main_guard(node):
            for sub in ast.walk(node):
                if (
                    isinstance(sub, ast.Call)
                    and isinstance(sub.func, ast.Name)
                    and sub.func.id == function.name
                ):
                    return True
    return False


def _is_main_guard(node: ast.stmt) -> bool:
    return (
        isinstance(node, ast.If)
        and isinstance(node.test, ast.Compare)
        and isinstance(node.test.left, ast.Name)
        and node.test.left.id == "__name__"
    )


def _under_main_guard(facts: FileModel, here: Pos) -> bool:
    """``here`` is inside a top-level ``if __name__ == "__main__":`` block."""
    for node in facts.tree.body:
        if _is_main_guard(node) and pos(node) <= here <= end_pos(node):
            return True
    return False


def _restored_by_sibling(facts: FileModel, function: FunctionModel) -> bool:
    cls = function.cls
    assert cls is not None
    for method in cls.methods.values():
        if method is function:
            continue
        for call in method.calls:
            if call.qual == "torch.set_grad_enabled":
                mode = mode_of_set_call(call.node, facts.imports)
                if mode is not GradState.DISABLED:
                    return True
    return False


@rule(
    "GF104",
    "grad-decorator-on-coroutine",
    "a grad-mode decorator on `async def` does not cover the coroutine's body",
)
def grad_decorator_on_coroutine(facts: FileModel) -> Iterator[Hit]:
    """
    ## What it does
    Flags `@torch.no_grad()`, `@torch.inference_mode()`, `@torch.enable_grad()` and
    `@torch.set_grad_enabled(...)` (with or without parentheses) on an `async def`
    function, coroutine or async generator.

    ## Evidence
    A grad-mode decorator (resolved through imports) on an `async def`. Confidence:
    high.

    ## Why is this a problem?
    The decorator wraps the *call* of the function. Calling an `async def` function only
    creates the coroutine object; the body runs later, when the coroutine is awaited, by
    which time the decorator has already restored the caller's mode. The body runs with
    whatever grad mode the awaiting thread happens to be in.

    **Hidden detail.** PyTorch's decorator special-cases generator functions (it re-enters
    the mode around every `send`) but not coroutines (checked on torch 2.13). Nothing
    fails: the handler just builds autograd graphs for every request, and memory grows
    until `CUDA out of memory`.

    ## Example
    ```python
    @torch.no_grad()
    async def handle(request):
        return model(await decode(request))
    ```

    ## Use instead
    Enter the mode inside the body, around code that does not `await`:
    ```python
    async def handle(request):
        x = await decode(request)
        with gradfence.inference(model):
            return model(x)
    ```

    ## References
    - PyTorch source, `torch/utils/_contextlib.py` (generator special case, no coroutine case)
    - vllm-project/vllm PR #49153 review discussion
    """
    for function in facts.functions:
        if not function.is_async:
            continue
        for decorator, mode in function.decorators:
            func = decorator.func if isinstance(decorator, ast.Call) else decorator
            if mode is not None and facts.imports.resolve(func) in GRAD_CONTEXTS:
                yield (
                    decorator,
                    f"grad-mode decorator on `async def {function.name}` does not apply to its "
                    "body: use `with gradfence.inference(...)` inside it",
                    None,
                )


@rule(
    "GF105",
    "await-in-grad-scope",
    "`await` inside a grad-mode `with` leaks the mode to other tasks on the thread",
)
def await_in_grad_scope(facts: FileModel) -> Iterator[Hit]:
    """
    ## What it does
    Flags `await`, `async for` and `async with` inside a `with torch.no_grad()`,
    `torch.enable_grad()`, `torch.set_grad_enabled(...)` or `torch.inference_mode()` block
    of an `async def` function.

    ## Evidence
    An `await`, `async for` or `async with` lexically inside a grad-mode `with` block of
    an `async def`. Confidence: high.

    ## Why is this a problem?
    Grad mode belongs to the thread, and every asyncio task of an event loop shares one
    thread. While the coroutine is suspended at the `await`, other tasks run with the mode
    this block set; when it resumes, it may find the mode another task left behind.

    **Hidden detail.** The `with` block restores the mode it saved on entry when it exits,
    which may clobber a mode set by a task that entered in between: two interleaved
    handlers can leave the server with gradients disabled (or enabled) for good. Symptoms
    are intermittent: graphs built in "no_grad" handlers, or `element 0 of tensors does not
    require grad` in a training task sharing the loop.

    ## Example
    ```python
    async def handle(request):
        with torch.no_grad():
            x = await decode(request)
            return model(x)
    ```

    ## Use instead
    ```python
    async def handle(request):
        x = await decode(request)
        with torch.no_grad():
            return model(x)
    ```

    ## References
    - PyTorch docs, grad mode is thread-local:
      https://pytorch.org/docs/stable/notes/autograd.html#grad-modes
    - pytorch/pytorch#82145
    """
    for function in facts.functions:
        for node in function.awaits:
            what = {ast.AsyncFor: "async for", ast.AsyncWith: "async with"}.get(type(node), "await")
            yield (
                node,
                f"`{what}` inside a grad-mode `with` block leaks the mode to other tasks",
                None,
            )


@rule(
    "GF106",
    "grad-decorator-without-call",
    "`@torch.no_grad` without parentheses fails on torch < 2.1",
    fixable=True,
)
def grad_decorator_without_call(facts: FileModel) -> Iterator[Hit]:
    """
    ## What it does
    When the target is older than torch 2.1 (`--target-torch 2.0`, `target-torch = "2.0"`
    in `[tool.gradfence]`, or else the lower bound of the torch requirement the project
    declares in pyproject.toml, setup.py, setup.cfg or requirements*.txt), flags
    `@torch.no_grad`, `@torch.enable_grad` and `@torch.inference_mode` used as decorators
    without parentheses. Without a target version the rule is silent.

    ## Evidence
    A bare grad-mode decorator, and a target older than torch 2.1: `--target-torch`,
    `[tool.gradfence] target-torch`, or the lower bound of the project's declared torch
    requirement. Confidence: high.

    ## Why is this a problem?
    Before torch 2.1 the bare form passes the decorated function to the constructor, which
    takes no argument.

    **Hidden detail.** `@torch.no_grad` and `@torch.enable_grad` fail at import time of the
    module that defines the function: `TypeError: __init__() takes 1 positional argument
    but 2 were given`. `@torch.inference_mode` is worse: it takes the function as its `mode`
    argument, so nothing fails until the call, which returns a function instead of running
    the body (pytorch/pytorch#113211). Code written against a recent torch looks fine and
    breaks only for users pinned to an older one.

    ## Example
    ```python
    @torch.no_grad
    def evaluate(model, loader): ...
    ```

    ## Use instead
    ```python
    @torch.no_grad()
    def evaluate(model, loader): ...
    ```

    ## References
    - pytorch/pytorch PR #107086 (bare decorator support for all three, torch 2.1)
    - pytorch/pytorch#113211
    """
    target = facts.target_torch
    if target is None or target >= (2, 1):
        return
    text = facts.text
    for function in facts.functions:
        for decorator, mode in function.decorators:
            if mode is not None and not isinstance(decorator, ast.Call):
                fix = text.call_it(decorator, prefix="@")
                yield (
                    decorator,
                    f"`@{text.segment(decorator)}` needs parentheses before torch 2.1",
                    fix,
                )


@rule(
    "GF107",
    "thread-escapes-grad-scope",
    "a thread or executor started under no_grad runs with gradients enabled",
)
def thread_escapes_grad_scope(facts: FileModel) -> Iterator[Hit]:
    """
    ## What it does
    Flags `threading.Thread(...)`, `threading.Timer(...)`, `asyncio.to_thread(...)`,
    `loop.run_in_executor(...)` and `submit`/`map` on an executor created in the file,
    when called inside a `no_grad` / `inference_mode` scope. A worker that is a function of
    the file setting its own mode (a `no_grad`/`inference_mode` decorator, or a body that
    is one such `with` block) is not flagged.

    ## Evidence
    A thread/executor start (resolved through imports, or `submit`/`map` on an executor
    created in the file) under no_grad/inference_mode, whose worker is not a function of
    the file that sets its own mode. Confidence: high.

    ## Why is this a problem?
    Grad mode is thread-local. The other thread does not inherit the mode of the thread
    that started it or submitted the work: it runs with gradients *enabled*.

    **Hidden detail.** The code reads as if the work happens "inside" the `with` block, and
    on a single thread it would. In the worker thread every forward records a graph and
    keeps activations alive: memory grows with no error, until `CUDA out of memory`.
    Under `gf.inference(model)` (a `with` block, or a decorated `async def` awaiting
    `asyncio.to_thread(model, x)`) the worker half-inherits the scope: it sees the model
    in eval mode, since module flags are process-global and the scope holds them until it
    exits, but its grad mode is its own, so it still records graphs unless it enters a
    scope itself.

    ## Example
    ```python
    with torch.no_grad(), ThreadPoolExecutor() as pool:
        outputs = list(pool.map(model, batches))
    ```

    ## Use instead
    Set the mode inside the function the thread runs:
    ```python
    @torch.no_grad()
    def predict(batch):
        return model(batch)

    with ThreadPoolExecutor() as pool:
        outputs = list(pool.map(predict, batches))
    ```

    ## References
    - PyTorch docs, grad modes are thread-local:
      https://pytorch.org/docs/stable/notes/autograd.html#grad-modes
    - pytorch/pytorch#20528, #82145
    """
    for function in facts.functions:
        for call in function.calls:
            if not call.mode.no_graph:
                continue
            if (
                call.qual in _THREAD_STARTERS
                or call.attr == "run_in_executor"
                or (call.attr in {"submit", "map"} and call.receiver in facts.executor_names)
            ) and not _worker_sets_own_mode(facts, _worker(call.node, call.qual)):
                what = call.qual or call.callee or call.attr
                yield (
                    call.node,
                    f"`{what}` runs in another thread, which has gradients enabled: grad "
                    "mode is per thread (module eval() is shared, no_grad is not); set it "
                    "in the worker",
                    None,
                )
