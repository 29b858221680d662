"""What the code says about names, shared by the rules.

Which names are modules, which functions evaluate, which calls train, who calls whom.
Each answer errs towards "don't know": rules stay silent where the evidence is thin.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Container, Iterator

from gradfence.lint.imports import dotted
from gradfence.lint.model import CallEvent, FileModel, FunctionModel, LoopModel
from gradfence.lint.names import FRAMEWORK_EVAL_HOOKS, is_eval_loader, tokens

_MODULE_NAME = re.compile(
    r"(^|_)(model|net|network|module|encoder|decoder|classifier|backbone|generator|"
    r"discriminator|critic|actor|policy|teacher|student|head)\d*$"
)
_MODULE_METHODS = frozenset(
    {
        "parameters",
        "named_parameters",
        "eval",
        "train",
        "state_dict",
        "load_state_dict",
        "modules",
        "named_modules",
        "children",
        "named_children",
    }
)
# classes of torch.nn that are not modules
_NOT_MODULES = frozenset(
    {"Parameter", "UninitializedParameter", "UninitializedBuffer", "Buffer", "ParameterList"}
)
_GRADIENT_USES = frozenset({"backward", "grad", "requires_grad_", "retain_grad", "register_hook"})
_MC_DROPOUT = re.compile(
    r"isinstance\([^)]*dropout|monte|\bmc_|_mc\b|mc_?dropout|bayes|uncertain", re.IGNORECASE
)


def is_eval_function(function: FunctionModel) -> bool:
    """A function whose name says it evaluates (see :func:`gradfence.lint.names.is_eval_name`)."""
    return function.evaluates


def is_eval_loop(loop: LoopModel) -> bool:
    """A loop over validation or test data."""
    return is_eval_loader(loop.words)


def is_framework_hook(function: FunctionModel) -> bool:
    """Lightning-style hooks already run under eval() and no_grad() by the framework."""
    return function.cls is not None and function.name in FRAMEWORK_EVAL_HOOKS


_VERB_PREFIXES = frozenset(
    {
        "load",
        "build",
        "get",
        "create",
        "make",
        "init",
        "from",
        "to",
        "set",
        "compute",
        "run",
        "new",
        "add",
        "register",
        "named",
        "prepare",
        "wrap",
        "apply",
        "find",
        "iter",
    }
)


def looks_like_module_name(text: str) -> bool:
    """``model``, ``self.encoder``, ``net2``: a name that conventionally holds a module.

    Factory functions (``load_model``, ``build_encoder``) are not.
    """
    last = text.rsplit(".", 1)[-1]
    if last[:1].isupper():
        return False  # a class: calling it builds a module, it does not run one
    last = last.lower().lstrip("_")
    if last.split("_", 1)[0] in _VERB_PREFIXES and "_" in last:
        return False
    return bool(_MODULE_NAME.search(last))


def is_module_ctor(facts: FileModel, call: ast.expr) -> bool:
    """``nn.Linear(...)``, ``torch.nn.Sequential(...)``, or a Module class defined in the file."""
    if not isinstance(call, ast.Call):
        return False
    qual = facts.imports.resolve(call.func)
    if qual is not None:
        last = qual.rsplit(".", 1)[-1]
        return (
            qual.startswith("torch.nn.")
            and qual.count(".") == 2
            and last[:1].isupper()
            and last not in _NOT_MODULES
        )
    if isinstance(call.func, ast.Name):
        cls = facts.classes.get(call.func.id)
        return cls is not None and cls.is_module
    return False


def _module_evidence(facts: FileModel, function: FunctionModel) -> set[str]:
    names: set[str] = set()
    for call in function.calls:
        if call.attr in _MODULE_METHODS and call.receiver:
            names.add(call.receiver)
    for assign in function.assigns:
        if assign.value is not None and is_module_ctor(facts, assign.value):
            names.update(assign.target_names())
    lists = _module_lists(function)
    for loop in function.loops:
        node = loop.node
        if isinstance(node, ast.For) and yields_modules(node.iter, lists):
            # ``for m in ...``, ``for i, m in enumerate(...)``, ``for name, m in named_children()``
            target = node.target.elts[-1] if isinstance(node.target, ast.Tuple) else node.target
            text = dotted(target)
            if text is not None:
                names.add(text)
    return names


_CHILD_METHODS = frozenset({"modules", "children", "named_modules", "named_children"})


def yields_modules(node: ast.expr, lists: Container[str] = ()) -> bool:
    """Whether ``node`` gives submodules: ``m.children()``, ``list(m.modules())[2:]``,
    ``enumerate(m.named_children())``, or a name bound to such a list."""
    for sub in ast.walk(node):
        if (
            isinstance(sub, ast.Call)
            and isinstance(sub.func, ast.Attribute)
            and sub.func.attr in _CHILD_METHODS
        ):
            return True
        if isinstance(sub, ast.Name) and sub.id in lists:
            return True
    return False


def _module_lists(function: FunctionModel) -> set[str]:
    """Names the function binds to a list of submodules (``layers = list(m.children())``)."""
    found: set[str] = set()
    node = function.node
    if isinstance(node, ast.ClassDef):
        return found
    for stmt in ast.walk(node):
        if (
            isinstance(stmt, ast.Assign)
            and len(stmt.targets) == 1
            and isinstance(stmt.targets[0], ast.Name)
            and yields_modules(stmt.value, found)
        ):
            found.add(stmt.targets[0].id)
    return found


def module_names(facts: FileModel, function: FunctionModel) -> set[str]:
    """Names shown to be modules in ``function`` (built from ``torch.nn``, iterated from
    ``.modules()``, used through Module-only methods), plus ``self.x`` shown anywhere."""
    cache: dict[int, set[str]] | None = facts.memo.get("module_names")
    if cache is None:
        cache = {}
        attributes: set[str] = set()
        for other in facts.functions:
            found = _module_evidence(facts, other)
            cache[id(other)] = found
            attributes |= {n for n in found if n.startswith("self.")}
        cache[0] = attributes
        facts.memo["module_names"] = cache
    return cache.get(id(function), set()) | cache[0]


def is_training_step(call: CallEvent) -> bool:
    """``loss.backward()``, ``optimizer.step()``, ``scaler.step(opt)``: a training step."""
    if call.attr == "backward" and not call.node.args:
        return True
    if call.attr == "step" and call.receiver:
        last = call.receiver.rsplit(".", 1)[-1].lower()
        return "opt" in last or last == "scaler"
    return False


def uses_gradients(function: FunctionModel) -> bool:
    """The function differentiates on purpose (backward, autograd.grad, requires_grad...)."""
    for call in function.calls:
        if call.attr in _GRADIENT_USES or call.qual in {
            "torch.autograd.grad",
            "torch.autograd.backward",
            "torch.enable_grad",
        }:
            return True
    for assign in function.assigns:
        for target in assign.targets:
            if isinstance(target, ast.Attribute) and target.attr == "requires_grad":
                return True
    return False


def mentions_mc_dropout(facts: FileModel, function: FunctionModel) -> bool:
    """The function's text talks about dropout / MC sampling: ``.train()`` there is on purpose."""
    node = function.node
    start = getattr(node, "lineno", 1)
    end = getattr(node, "end_lineno", start) or start
    return any(_MC_DROPOUT.search(line) for line in facts.lines[start - 1 : end])


def callers(facts: FileModel, function: FunctionModel) -> Iterator[CallEvent]:
    """Call sites in the file that call ``function`` (``f(...)``, ``self.f(...)``)."""
    for other in facts.functions:
        for call in other.calls:
            if call_targets(facts, call, function):
                yield call


def call_targets(facts: FileModel, call: CallEvent, function: FunctionModel) -> bool:
    """Whether ``call`` calls ``function``: a plain name, or ``self.method`` in its class."""
    func = call.node.func
    if isinstance(func, ast.Name):
        return func.id == function.name and function.cls is None
    if isinstance(func, ast.Attribute) and func.attr == function.name and function.cls:
        return call.receiver in {"self", "cls", function.cls.name}
    return False


def resolve_callees(facts: FileModel, call: CallEvent) -> list[FunctionModel]:
    """Functions of this file that ``call`` may call."""
    func = call.node.func
    name = func.id if isinstance(func, ast.Name) else getattr(func, "attr", None)
    if name is None:
        return []
    return [f for f in facts.functions_named(name) if call_targets(facts, call, f)]


def names_in(node: ast.AST) -> set[str]:
    """Every plain name read in an expression."""
    return {sub.id for sub in ast.walk(node) if isinstance(sub, ast.Name)}


# objects whose ``.backward(loss)`` takes the loss as argument (Accelerate, Fabric, DeepSpeed)
_BACKWARD_OWNERS = frozenset(
    {"accelerator", "fabric", "engine", "deepspeed", "strategy", "trainer", "booster"}
)


def backward_argument(call: CallEvent) -> ast.expr | None:
    """``loss`` in ``accelerator.backward(loss)`` / ``fabric.backward(loss)``."""
    func = call.node.func
    if call.attr != "backward" or not call.node.args or not isinstance(func, ast.Attribute):
        return None
    owner = (dotted(func.value) or "").rsplit(".", 1)[-1]
    return call.node.args[0] if tokens(owner) & _BACKWARD_OWNERS else None
