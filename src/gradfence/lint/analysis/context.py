"""The questions the rules ask, answered from evidence (summaries), not from names.

- :func:`events`: a function's events, callees included;
- :func:`mode_at`: the mode a module is known to be in at a point (``eval``, ``train`` or
  ``None`` for "cannot tell");
- :func:`trained_targets`: modules whose parameters reach an optimiser in view;
- :func:`is_trained`: whether a module is trained (optimiser, or its output reaches the
  differentiated loss when no optimiser is visible);
- :func:`eval_evidence`: why a point is an evaluation (validation loader, metric, grad-off
  function running a module it received, a script that never differentiates), each item
  a short reason; names only break ties.
"""

from __future__ import annotations

import ast
import re

from gradfence.lint.analysis.effects import Event
from gradfence.lint.imports import dotted
from gradfence.lint.model import FileModel, FunctionModel, LoopModel, Pos
from gradfence.lint.names import FRAMEWORK_EVAL_HOOKS, tokens

# hooks that their framework already runs under eval() and no_grad()
FRAMEWORK_HOOKS = FRAMEWORK_EVAL_HOOKS | frozenset({"valid_step", "inference_step", "eval_step"})
_LOADER_WORDS = frozenset({"val", "valid", "validation", "test", "eval", "evaluation", "dev"})
_METRIC_WORDS = frozenset(
    {"accuracy", "acc", "correct", "precision", "recall", "f1", "auc", "bleu", "psnr", "ssim"}
    | {"metric", "metrics", "score", "confusion", "miou", "iou", "top1", "top5", "mae", "rmse"}
    | {"dice", "wer", "cer", "map", "perplexity", "ppl"}
)
_METRIC_CALL = re.compile(
    r"\.argmax\(|\.topk\(|\.eq\(|accuracy|f1_score|torchmetrics|sklearn|dice|\bwer\("
)


def events(facts: FileModel, function: FunctionModel) -> list[Event]:
    """The function's events, calls into visible functions included (memoised)."""
    cache: dict[int, list[Event]] = facts.memo.setdefault("events", {})
    found = cache.get(id(function))
    if found is None:
        found = facts.analysis.events(function.qualname)
        cache[id(function)] = found
    return found


def related(a: str, b: str) -> bool:
    """``a`` is ``b``, or one contains the other (``model`` and ``model.encoder``)."""
    return a == b or a.startswith(b + ".") or b.startswith(a + ".")


def covers(outer: str, inner: str) -> bool:
    """``outer`` is ``inner`` or an ancestor of it: a mode set on it reaches ``inner``."""
    return inner == outer or inner.startswith(outer + ".")


def mode_at(facts: FileModel, function: FunctionModel, target: str, here: Pos) -> str | None:
    """The last mode set on ``target`` (or an ancestor) in the function before ``here``:
    ``"eval"``, ``"train"``, ``"restore"``; None when the function sets none."""
    last: str | None = None
    for line, col, kind, subject in events(facts, function):
        if (line, col) >= here:
            break
        if kind in {"eval", "train", "restore"} and covers(subject, target):
            last = kind
    return last


def binding_before(facts: FileModel, function: FunctionModel, target: str, here: Pos) -> str | None:
    """How ``target`` was last bound before ``here``: ``built`` (a class called),
    ``bound_call`` (a factory the analysis cannot see into), ``opaque`` (traced, scripted,
    copied, loaded)."""
    last: str | None = None
    for line, col, kind, subject in events(facts, function):
        if (line, col) > here:
            break
        if kind in {"built", "bound_call", "opaque", "loaded"} and subject == target:
            last = kind
    return last


def trained_targets(facts: FileModel, function: FunctionModel) -> set[str]:
    """Modules whose parameters reach an optimiser where ``function`` can see it: in the
    function (callees included) or in a method of its class (last name parts too, so that
    ``self.model`` and ``model`` meet)."""
    found: set[str] = set()
    scopes = [function]
    if function.cls is not None:
        scopes += function.cls.methods.values()
    for scope in scopes:
        for _, _, kind, subject in events(facts, scope):
            if kind == "optim" and subject:
                found.add(subject)
                found.add(subject.rsplit(".", 1)[-1])
    return found


def is_trained(facts: FileModel, function: FunctionModel, target: str) -> bool:
    """Whether ``target`` is trained: its parameters reach an optimiser, or (when no
    optimiser is visible) the function itself runs it with gradients on and differentiates."""
    optimised = trained_targets(facts, function)
    if optimised:
        last = target.rsplit(".", 1)[-1]
        return any(related(target, o) or last == o for o in optimised) or any(
            related(last, o) for o in optimised
        )
    items = events(facts, function)
    if any(k == "frozen" and covers(s, target) for _, _, k, s in items):
        return False
    own = facts.analysis.function(function.qualname)
    # run by this function itself with gradients on (not only inside a helper, which may
    # evaluate it), and something is differentiated
    forwarded = own is not None and any(
        k.split("|", 1)[0] == "forward" and related(s, target) for _, _, k, s in own.events
    )
    return forwarded and any(k == "diff" for _, _, k, _ in items)


def differentiates_between(facts: FileModel, function: FunctionModel, start: Pos, end: Pos) -> bool:
    """Something is differentiated between two points of the function (callees included)."""
    return any(
        kind == "diff" and start <= (line, col) < end
        for line, col, kind, _ in events(facts, function)
    )


def differentiates(facts: FileModel, function: FunctionModel) -> bool:
    """The function differentiates anything, itself or through a callee."""
    return any(kind == "diff" for _, _, kind, _ in events(facts, function))


def is_framework_hook(function: FunctionModel) -> bool:
    """A method the framework runs under eval() and no_grad() (Lightning, fairseq...)."""
    return function.cls is not None and function.name in FRAMEWORK_HOOKS


def loader_words(loop: LoopModel) -> bool:
    """The loop iterates over validation/test data (by the loader's provenance)."""
    return bool(loop.words & _LOADER_WORDS) and "train" not in loop.words


def eval_batches(facts: FileModel, function: FunctionModel) -> list[Pos]:
    """Where ``next(iter(val_loader))`` pulls a batch from evaluation data in the function."""
    found: list[Pos] = []
    node = function.node
    if "iter(" not in facts.source or isinstance(node, ast.Module):
        return found
    start = getattr(node, "lineno", 1)
    end = getattr(node, "end_lineno", start) or start
    if not any("next(" in line for line in facts.lines[start - 1 : end]):
        return found
    for sub in ast.walk(node):
        if (
            isinstance(sub, ast.Call)
            and isinstance(sub.func, ast.Name)
            and sub.func.id == "next"
            and sub.args
            and isinstance(sub.args[0], ast.Call)
            and isinstance(sub.args[0].func, ast.Name)
            and sub.args[0].func.id == "iter"
            and sub.args[0].args
        ):
            text = dotted(sub.args[0].args[0]) or ""
            words = tokens(text.rsplit(".", 1)[-1])
            if words & _LOADER_WORDS and "train" not in words:
                found.append((sub.lineno, sub.col_offset))
    return found


def eval_loader_batch(facts: FileModel, function: FunctionModel) -> bool:
    """``next(iter(val_loader))`` in the function: a batch pulled from evaluation data."""
    return bool(eval_batches(facts, function))


def computes_metric(facts: FileModel, function: FunctionModel) -> bool:
    """The function computes a metric on outputs (argmax/topk, accuracy, ``correct += ``)."""
    found: dict[int, bool] = facts.memo.setdefault("metric", {})
    key = id(function)
    if key not in found:
        node = function.node
        start = getattr(node, "lineno", 1)
        end = getattr(node, "end_lineno", start) or start
        text = "\n".join(facts.lines[start - 1 : end])
        hit = _METRIC_CALL.search(text) is not None
        if not hit:
            for assign in function.assigns:
                for name in assign.target_names():
                    if tokens(name.rsplit(".", 1)[-1]) & _METRIC_WORDS:
                        hit = True
                        break
        found[key] = hit
    return found[key]


def eval_evidence(
    facts: FileModel, function: FunctionModel, loop: LoopModel | None, grad_off: bool
) -> list[str]:
    """Why the code at this point evaluates; empty when nothing shows it."""
    reasons: list[str] = []
    if loop is not None and any(loader_words(outer) for outer in loop.chain()):
        reasons.append("loop over evaluation data")
    if eval_loader_batch(facts, function):
        reasons.append("batch from evaluation data")
    if computes_metric(facts, function):
        reasons.append("metric computed")
    if grad_off:
        reasons.append("gradients off")
    if (
        not facts.analysis.summary.differentiates
        and (function is facts.module or function.parent is facts.module)
        and is_script(facts)
    ):
        reasons.append("script never differentiates")
    return reasons


def is_script(facts: FileModel) -> bool:
    """A file meant to be run: an ``if __name__ == "__main__":`` block, or a loop or a
    ``with`` block at module level (a library module only defines things)."""
    return any(
        isinstance(node, ast.For | ast.While | ast.With)
        or (
            isinstance(node, ast.If)
            and isinstance(node.test, ast.Compare)
            and isinstance(node.test.left, ast.Name)
            and node.test.left.id == "__name__"
        )
        for node in facts.tree.body
    )


def sets_no_mode(facts: FileModel) -> bool:
    """Nothing in the file calls ``.eval()``, ``.train()`` or ``.train(flag)``."""
    found: bool | None = facts.memo.get("sets_no_mode")
    if found is None:
        found = not any(
            kind.split("|", 1)[0] in {"eval", "train", "restore"}
            for summary in facts.analysis.summary.functions.values()
            for _, _, kind, _ in summary.events
        )
        facts.memo["sets_no_mode"] = found
    return found


def class_trains(facts: FileModel, function: FunctionModel) -> bool:
    """Some method of the function's class differentiates: the class trains its modules,
    so it owns their mode (even for a module handed to its ``__init__``)."""
    if function.cls is None:
        return False
    return any(differentiates(facts, method) for method in function.cls.methods.values())


# decorators that do not change the grad mode of the function they wrap
_PLAIN_DECORATORS = frozenset(
    {
        "staticmethod",
        "classmethod",
        "property",
        "abstractmethod",
        "abc.abstractmethod",
        "override",
        "typing.override",
        "functools.wraps",
        "functools.lru_cache",
        "functools.cache",
        "functools.cached_property",
        "contextlib.contextmanager",
        "dataclasses.dataclass",
        "torch.jit.export",
        "torch.jit.ignore",
        "torch.jit.unused",
        "torch.compile",
        "pytest.fixture",
    }
)


def unknown_decorator(facts: FileModel, function: FunctionModel) -> bool:
    """A decorator the analysis cannot see through (``@smart_inference_mode()``,
    ``@eval_decorator``): it may set the grad mode or the module's mode around the body."""
    for decorator, mode in function.decorators:
        if mode is not None:
            continue
        func = decorator.func if isinstance(decorator, ast.Call) else decorator
        text = dotted(func) or ""
        qual = facts.imports.resolve(func) or text
        last = text.rsplit(".", 1)[-1]
        if (
            qual in _PLAIN_DECORATORS
            or text in _PLAIN_DECORATORS
            or last in {"setter", "getter", "deleter", "register", "wraps"}
            or qual.startswith(("pytest.", "typing.", "unittest."))
        ):
            continue
        return True
    return False


def is_test_code(facts: FileModel, function: FunctionModel) -> bool:
    """A unit test: a ``test_*`` function, or any function of a ``test_*.py`` / ``*_test.py``
    file. Its forwards compare outputs; they do not evaluate a model on data."""
    return is_test_file(facts) or function.name.startswith("test_")


def is_test_file(facts: FileModel) -> bool:
    """``test_*.py``, ``*_test.py``, ``conftest.py``: a unit-test module."""
    name = facts.path.replace("\\", "/").rsplit("/", 1)[-1]
    return name.startswith("test_") or name.endswith("_test.py") or name == "conftest.py"


_RANDOM = frozenset(
    {"rand", "randn", "randint", "zeros", "ones", "empty", "full", "tensor", "arange"}
    | {"rand_like", "randn_like", "zeros_like", "ones_like", "linspace", "eye"}
)


def _is_probe_value(node: ast.expr, probes: set[str]) -> bool:
    if isinstance(node, ast.Constant):
        return True
    if isinstance(node, ast.Name):
        return node.id in probes
    if isinstance(node, ast.Call):
        func = node.func
        last = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
        if last in _RANDOM:
            return True
        if isinstance(func, ast.Attribute) and func.attr in {"to", "cuda", "float", "half"}:
            return _is_probe_value(func.value, probes)
    if isinstance(node, ast.Tuple | ast.List):
        return all(_is_probe_value(e, probes) for e in node.elts)
    return False


def is_probe(facts: FileModel, function: FunctionModel, call: ast.Call) -> bool:
    """A forward on made-up input (``torch.randn(...)``, constants): a smoke test or a shape
    probe, not an evaluation on data."""
    arguments = [*call.args, *(k.value for k in call.keywords)]
    if not arguments:
        return False
    probes: set[str] = set()
    for assign in function.assigns:
        if assign.value is not None and _is_probe_value(assign.value, probes):
            probes.update(n for n in assign.target_names() if "." not in n)
    if not function.assigns and isinstance(function.node, ast.Module | ast.FunctionDef):
        for sub in ast.walk(function.node):
            if isinstance(sub, ast.Assign) and _is_probe_value(sub.value, probes):
                for target in sub.targets:
                    if isinstance(target, ast.Name):
                        probes.add(target.id)
    return all(_is_probe_value(a, probes) for a in arguments)


def is_frozen(items: list[Event], index: int, target: str) -> bool:
    """``target`` (or an ancestor) had every parameter frozen before event ``index``."""
    return any(
        kind == "frozen" and covers(subject, target) for _, _, kind, subject in items[:index]
    )


def call_sites(
    facts: FileModel, function: FunctionModel
) -> list[tuple[FunctionModel, int, int, bool]]:
    """Where the file calls ``function``: (caller, line, column, under grad-off), from the
    summaries (every call, whatever words its line holds)."""
    sites: dict[int, list[tuple[FunctionModel, int, int, bool]]] | None = facts.memo.get("sites")
    if sites is None:
        sites = {}
        by_name = {f.qualname: f for f in facts.functions}
        analysis = facts.analysis
        for caller in facts.functions:
            summary = analysis.function(caller.qualname)
            if summary is None:
                continue
            for site in summary.calls:
                ref = analysis.resolve(site, analysis.module, caller.qualname)
                if ref is None or ref[0] != analysis.module:
                    continue
                callee = by_name.get(ref[1])
                if callee is not None:
                    sites.setdefault(id(callee), []).append(
                        (caller, site.line, site.col, site.grad_off)
                    )
        facts.memo["sites"] = sites
    return sites.get(id(function), [])


def result_differentiated(facts: FileModel, caller: FunctionModel, line: int, col: int) -> bool:
    """What the call at (line, col) returns is differentiated by the caller (an attack
    calling ``predict(model, x)``): on the call's own line, or through the names it is
    assigned to."""
    names: set[str] = set()
    assigns = [
        sub
        for sub in ast.walk(caller.node)
        if isinstance(sub, ast.Assign | ast.AnnAssign) and sub.value is not None
    ]
    for assign in assigns:
        value = assign.value
        assert value is not None
        if any(
            isinstance(sub, ast.Call) and (sub.lineno, sub.col_offset) == (line, col)
            for sub in ast.walk(value)
        ):
            targets = assign.targets if isinstance(assign, ast.Assign) else [assign.target]
            for target in targets:
                names.update(n.id for n in ast.walk(target) if isinstance(n, ast.Name))
    for _ in range(3):  # ``adv = predict(...)``; ``loss = adv.sum()``; ``loss.backward()``
        for assign in assigns:
            value = assign.value
            assert value is not None
            if any(isinstance(sub, ast.Name) and sub.id in names for sub in ast.walk(value)):
                targets = assign.targets if isinstance(assign, ast.Assign) else [assign.target]
                for target in targets:
                    names.update(n.id for n in ast.walk(target) if isinstance(n, ast.Name))
    for ln, _, kind, subject in events(facts, caller):
        if kind != "diff":
            continue
        if ln == line or (subject and subject.split(".", 1)[0] in names):
            return True
    return False
