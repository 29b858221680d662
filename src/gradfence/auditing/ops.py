"""GFR005 at the op level: a ``TorchFunctionMode`` that sees functional dropout calls.

``F.dropout(x, p)`` defaults to ``training=True`` and ``scaled_dot_product_attention``
applies ``dropout_p`` whatever the module mode, so a module's ``training`` flag says
nothing about them. Every one of the functions below reaches ``__torch_function__``
on torch 2.13 (checked): the ``torch.nn.functional`` wrappers are seen once, as
themselves (the inner ``torch.dropout`` call runs with the mode switched off), and
the ``torch.*`` ops when called directly.

Torch-function modes are per thread: the auditor pushes this mode in whichever thread
runs an audited module's forward (see :mod:`gradfence.auditing.hooks`), so it covers worker
threads too. It is *not* pushed around the rest of the block, because an active mode
makes ``has_torch_function`` true, which turns off the fused fast path of
``TransformerEncoder`` and changes its results in the last bits.
"""

from __future__ import annotations

import inspect
import os
import sys
import threading
from collections.abc import Callable
from types import FrameType
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch.compiler import is_dynamo_compiling
from torch.overrides import TorchFunctionMode

from gradfence.auditing.collector import COMPILED, Collector, module_label


class _Spec(NamedTuple):
    """Where a dropout function takes its probability and its training switch."""

    label: str
    p_index: int
    p_name: str
    p_default: float
    train_index: int  # -1: no switch, the op always applies its dropout
    train_name: str
    train_default: bool


def _python_spec(func: Callable[..., Any], label: str, p_name: str, train_name: str) -> _Spec:
    params = list(inspect.signature(func).parameters.values())
    names = [param.name for param in params]
    p_index, train_index = names.index(p_name), names.index(train_name)
    p_default = params[p_index].default
    train_default = params[train_index].default
    return _Spec(
        label,
        p_index,
        p_name,
        float(p_default) if isinstance(p_default, int | float) else 0.0,
        train_index,
        train_name,
        bool(train_default) if isinstance(train_default, bool) else True,
    )


def _watched() -> dict[Any, _Spec]:
    specs: dict[Any, _Spec] = {}
    for name in ("dropout", "dropout1d", "dropout2d", "dropout3d", "alpha_dropout"):
        specs[getattr(F, name)] = _python_spec(getattr(F, name), f"F.{name}", "p", "training")
    specs[F.feature_alpha_dropout] = _python_spec(
        F.feature_alpha_dropout, "F.feature_alpha_dropout", "p", "training"
    )
    specs[F.multi_head_attention_forward] = _python_spec(
        F.multi_head_attention_forward, "F.multi_head_attention_forward", "dropout_p", "training"
    )
    # The ops: (input, p, train), train required (no default; native_dropout: None is on).
    for name in (
        "dropout",
        "dropout_",
        "alpha_dropout",
        "alpha_dropout_",
        "feature_dropout",
        "feature_dropout_",
        "feature_alpha_dropout",
        "feature_alpha_dropout_",
        "native_dropout",
    ):
        specs[getattr(torch, name)] = _Spec(f"torch.{name}", 1, "p", 0.0, 2, "train", False)
    # scaled_dot_product_attention(query, key, value, attn_mask=None, dropout_p=0.0, ...)
    specs[F.scaled_dot_product_attention] = _Spec(
        "F.scaled_dot_product_attention", 4, "dropout_p", 0.0, -1, "", True
    )
    return specs


WATCHED: dict[Any, _Spec] = _watched()
_watched_spec = WATCHED.get  # every func torch passes a mode is hashable

# Frames in these directories are the machinery between the user's call and the mode.
_TORCH_DIR = os.path.dirname(torch.__file__) + os.sep
_TORCH_MODULES_DIR = os.path.join(_TORCH_DIR, "nn", "modules") + os.sep
_THIS_FILE = __file__


_MISSING = object()


def _argument(args: tuple[Any, ...], kwargs: dict[str, Any], index: int, name: str) -> Any:
    if len(args) > index:
        return args[index]
    return kwargs.get(name, _MISSING)


class DropoutWatch(TorchFunctionMode):
    """Records a GFR005 finding for each functional dropout call that really drops.

    Passes every call through unchanged: ``func(*args, **kwargs)``, nothing else.
    Calls made by torch's own modules (``nn.Dropout``, ``nn.MultiheadAttention``) are
    left to the module hooks, which know the module's name.
    """

    def __init__(self, collector: Collector, names: dict[int, tuple[str, str]]) -> None:
        super().__init__()
        self._collector = collector
        self._names = names

    def __torch_function__(
        self,
        func: Any,
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        spec = _watched_spec(func)
        if spec is not None:
            if is_dynamo_compiling():  # traced by torch.compile: see CompiledRuns
                COMPILED.ops = True
            else:
                self._check(spec, args, kwargs or {})
        if kwargs:
            return func(*args, **kwargs)
        return func(*args)

    def _check(self, spec: _Spec, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        p = _argument(args, kwargs, spec.p_index, spec.p_name)
        if p is _MISSING:
            p = spec.p_default
        if spec.train_index >= 0:
            training = _argument(args, kwargs, spec.train_index, spec.train_name)
            if training is _MISSING:
                training = spec.train_default
            elif training is None:
                training = True
        else:
            training = True
        try:
            active = bool(training) and float(p) > 0.0
        except (TypeError, ValueError, RuntimeError):
            active = bool(training)
        if active:
            self._record(spec, p)

    def _record(self, spec: _Spec, p: object) -> None:
        frame = _user_frame(sys._getframe(2))
        if frame is None:
            return  # nn.Dropout & co.: reported by the module hooks, with the module's name
        filename, line = frame.f_code.co_filename, frame.f_lineno
        # One finding per module and call site: every layer of a model runs the same line
        # (BERT's attention in each encoder layer), and each layer is a finding of its own.
        name, label, owner = self._enclosing_module(frame)
        where = f"{os.path.basename(filename)}:{line}"
        place = f"in the forward of {label}" if label else "outside any audited module's forward"
        # In a module left in train mode, a call gated on self.training drops too: the
        # first fix is the mode. The F.* wrappers hand their defaults on as keywords, so
        # whether the caller wrote training= cannot be told apart here.
        in_training = bool(getattr(owner, "training", False))
        if spec.train_index < 0:
            gate = "pass dropout_p=self.p if self.training else 0.0"
            why = f"dropout_p={p} applies dropout whatever the module's mode"
        else:
            gate = f"pass {spec.train_name}=self.training (or use an nn.Dropout submodule)"
            default = (
                f" ({spec.label} defaults to {spec.train_name}=True)"
                if spec.train_default and not in_training
                else ""
            )
            why = f"p={p} with {spec.train_name}=True{default}"
        if in_training:
            why = f"{why}, and {label} is in training mode"
            fix = (
                "evaluate under gf.inference(model) (or call model.eval() first); "
                f"if the call is not gated on self.training, also {gate}"
            )
        else:
            fix = gate
        other = threading.get_ident() != self._collector.owner
        self._collector.add(
            ("GFR005", "op", name, filename, line, spec.label, other),
            "GFR005",
            name,
            lambda thread: (
                f"{spec.label} dropped activations at {where} {place} {thread}: {why}. Fix: {fix}."
            ),
            {
                "function": spec.label,
                "site": f"{filename}:{line}",
                "p": p,
                "module_training": in_training,
            },
        )

    def _enclosing_module(self, frame: FrameType | None) -> tuple[str, str, Any]:
        """Dotted name, label and object of the nearest audited module whose forward runs."""
        while frame is not None:
            code = frame.f_code
            if code.co_name == "forward" and code.co_argcount > 0:
                owner = frame.f_locals.get(code.co_varnames[0])
                known = self._names.get(id(owner))
                if known is not None:
                    name, cls = known
                    return name, module_label(name, cls), owner
            frame = frame.f_back
        return "", "", None


def _user_frame(frame: FrameType | None) -> FrameType | None:
    """The first frame outside torch and this module; None when torch's modules made the call.

    Calls from ``torch/nn/modules`` come from ``nn.Dropout``, ``nn.MultiheadAttention``
    and the like, whose ``training`` flag the module hooks already check.
    """
    while frame is not None:
        filename = frame.f_code.co_filename
        if filename.startswith(_TORCH_MODULES_DIR):
            return None
        if not (filename.startswith(_TORCH_DIR) or filename == _THIS_FILE):
            return frame
        frame = frame.f_back
    return None
