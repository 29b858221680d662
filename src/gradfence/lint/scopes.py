"""The grad-scope model: which grad mode is in force at a point of the code.

Every statement the walker visits is tagged with one :class:`GradState`. Function bodies
start in ``DEFAULT`` (grad enabled unless a caller says otherwise) or in the mode of a
grad-mode decorator; a ``with`` item that is a grad-mode context switches the mode of its
body; ``set_grad_enabled(<literal>)`` as a statement switches the mode of the statements
after it. Anything the model cannot decide is ``UNKNOWN`` and rules stay silent there.
"""

from __future__ import annotations

import ast
import enum

from gradfence.lint.imports import ImportMap


class GradState(enum.Enum):
    """Grad mode in force at a node."""

    DEFAULT = "default"  # nothing says otherwise: grad enabled unless a caller disabled it
    ENABLED = "enabled"  # explicitly enabled (enable_grad, set_grad_enabled(True), ...)
    DISABLED = "disabled"  # no_grad or set_grad_enabled(False)
    INFERENCE = "inference"  # inference_mode()
    UNKNOWN = "unknown"  # set_grad_enabled(<expression>), inference_mode(<expression>)

    @property
    def no_graph(self) -> bool:
        """True where no autograd graph is recorded for sure."""
        return self is GradState.DISABLED or self is GradState.INFERENCE


GRAD_NAMES = frozenset({"no_grad", "enable_grad", "set_grad_enabled", "inference_mode"})
_GRADFENCE_SCOPES = frozenset({"inference", "training"})
GRAD_CONTEXTS = frozenset(
    {"torch.no_grad", "torch.enable_grad", "torch.set_grad_enabled", "torch.inference_mode"}
)
# the three that are classes meant to be instantiated with no argument
NULLARY_GRAD_CONTEXTS = frozenset({"torch.no_grad", "torch.enable_grad", "torch.inference_mode"})


def _literal_bool(call: ast.Call, keyword: str) -> bool | None:
    """The bool given as first positional argument or ``keyword``; None if not a literal."""
    arg: ast.expr | None = call.args[0] if call.args else None
    for kw in call.keywords:
        if kw.arg == keyword:
            arg = kw.value
    if arg is None:
        return None
    if isinstance(arg, ast.Constant) and isinstance(arg.value, bool | int):
        return bool(arg.value)
    return None


def last_name(expr: ast.expr) -> str | None:
    """``f`` for ``f``, ``a.b.f``, ``f(...)``, ``a.f(...)``: a cheap check before resolving."""
    if isinstance(expr, ast.Call):
        expr = expr.func
    if isinstance(expr, ast.Attribute):
        return expr.attr
    if isinstance(expr, ast.Name):
        return expr.id
    return None


def _gradfence_scope(call: ast.Call, qual: str | None) -> GradState | None:
    """``gradfence.inference(...)`` (no_grad or inference_mode) and ``gradfence.training(...)``."""
    if qual in {"gradfence.training", "gradfence.scope.training"}:
        return GradState.ENABLED
    if qual not in {"gradfence.inference", "gradfence.scope.inference"}:
        return None
    mode = next((k.value for k in call.keywords if k.arg == "mode"), None)
    if mode is None:
        return GradState.DISABLED
    if isinstance(mode, ast.Constant) and mode.value in {"no_grad", "inference_mode"}:
        return GradState.DISABLED if mode.value == "no_grad" else GradState.INFERENCE
    return GradState.UNKNOWN


def mode_of_context(expr: ast.expr, imports: ImportMap) -> GradState | None:
    """The grad mode a ``with`` item or decorator puts its body in; None if not a grad context.

    torch's grad-mode contexts, and gradfence's own ``inference``/``training`` scopes.
    """
    name = last_name(expr)
    if name not in GRAD_NAMES and name not in _GRADFENCE_SCOPES and name not in imports.aliases:
        return None
    if isinstance(expr, ast.Call):
        qual = imports.resolve(expr.func)
        if qual not in GRAD_CONTEXTS:
            return _gradfence_scope(expr, qual)
        if qual == "torch.no_grad":
            return GradState.DISABLED
        if qual == "torch.enable_grad":
            return GradState.ENABLED
        if qual == "torch.set_grad_enabled":
            value = _literal_bool(expr, "mode")
            if value is None:
                return GradState.UNKNOWN
            return GradState.ENABLED if value else GradState.DISABLED
        if not expr.args and not expr.keywords:
            return GradState.INFERENCE
        value = _literal_bool(expr, "mode")
        if value is None:
            return GradState.UNKNOWN
        return GradState.INFERENCE if value else GradState.ENABLED
    qual = imports.resolve(expr)
    # bare decorator form (@torch.no_grad, torch >= 2.1)
    if qual == "torch.no_grad":
        return GradState.DISABLED
    if qual == "torch.enable_grad":
        return GradState.ENABLED
    if qual == "torch.inference_mode":
        return GradState.INFERENCE
    return None


def mode_of_set_call(call: ast.Call, imports: ImportMap) -> GradState | None:
    """Mode set by a statement-level ``set_grad_enabled(...)`` call; None if not one."""
    name = last_name(call)
    if name != "set_grad_enabled" and name not in imports.aliases:
        return None
    if imports.resolve(call.func) != "torch.set_grad_enabled":
        return None
    value = _literal_bool(call, "mode")
    if value is None:
        return GradState.UNKNOWN
    return GradState.ENABLED if value else GradState.DISABLED
