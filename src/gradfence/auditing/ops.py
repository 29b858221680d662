"""GFR005 at the op level: the functional dropout calls that really drop.

``F.dropout(x, p)`` defaults to ``training=True`` and ``scaled_dot_product_attention``
applies ``dropout_p`` whatever the module mode, so a module's ``training`` flag says
nothing about them. While at least one audit that checks GFR005 is open, the
functions below (``torch.nn.functional.dropout`` ... ``torch.native_dropout``) are
replaced in their modules by a wrapper that reads the arguments that decide whether
the call drops, then calls the original with exactly the arguments it got. Only the
functions themselves are wrapped: every other op costs nothing (a
``TorchFunctionMode`` would put every op of a forward through Python, about 3 us
each). When the last such audit exits, the originals are put back.

The wrapper sees calls from every thread, and attributes each call that drops to the
nearest audited module whose ``forward`` is on the stack; calls from torch's own
modules (``nn.Dropout``, ``nn.MultiheadAttention``) are left to the module hooks, and a
call outside any audited forward counts only on the audit's own thread. A ``torch.nn.
functional`` function that calls another one (``F.dropout1d`` calls ``F.dropout2d``) is
seen once, as itself. Code that bound a function before the audit began
(``from torch.nn.functional import dropout``) calls the original, unseen.
"""

from __future__ import annotations

import functools
import inspect
import os
import sys
import threading
from collections.abc import Callable
from types import FrameType, ModuleType
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.compiler import is_dynamo_compiling

from gradfence.auditing.collector import COMPILED, Collector, module_label
from gradfence.auditing.hooks import DROPOUT_MODULES, record_dropout_module


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


def _watched() -> list[tuple[ModuleType, str, _Spec]]:
    """(module, attribute, spec) of every watched function."""
    specs: list[tuple[ModuleType, str, _Spec]] = []
    for name in (
        "dropout",
        "dropout1d",
        "dropout2d",
        "dropout3d",
        "alpha_dropout",
        "feature_alpha_dropout",
    ):
        specs.append((F, name, _python_spec(getattr(F, name), f"F.{name}", "p", "training")))
    specs.append(
        (
            F,
            "multi_head_attention_forward",
            _python_spec(
                F.multi_head_attention_forward,
                "F.multi_head_attention_forward",
                "dropout_p",
                "training",
            ),
        )
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
        specs.append((torch, name, _Spec(f"torch.{name}", 1, "p", 0.0, 2, "train", False)))
    # scaled_dot_product_attention(query, key, value, attn_mask=None, dropout_p=0.0, ...)
    specs.append(
        (
            F,
            "scaled_dot_product_attention",
            _Spec("F.scaled_dot_product_attention", 4, "dropout_p", 0.0, -1, "", True),
        )
    )
    return specs


# Frames in these directories are the machinery between the user's call and the mode.
_TORCH_DIR = os.path.dirname(torch.__file__) + os.sep
_TORCH_MODULES_DIR = os.path.join(_TORCH_DIR, "nn", "modules") + os.sep
_THIS_FILE = __file__


_MISSING = object()


def _argument(args: tuple[Any, ...], kwargs: dict[str, Any], index: int, name: str) -> Any:
    if len(args) > index:
        return args[index]
    return kwargs.get(name, _MISSING)


def _drops(spec: _Spec, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[bool, Any]:
    """(does this call drop activations?, its probability)."""
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
        return bool(training) and float(p) > 0.0, p
    except (TypeError, ValueError, RuntimeError):
        return bool(training), p


class _Watching(threading.local):
    inside = False  # in a watched function already (F.dropout1d -> F.dropout2d)


# The open audits' watches (a tuple, swapped whole: the wrappers read it without a lock)
_watches: tuple[DropoutWatch, ...] = ()
_originals: dict[tuple[ModuleType, str], Any] = {}
_watch_lock = threading.Lock()
_watching = _Watching()


def _wrap(original: Any, spec: _Spec) -> Callable[..., Any]:
    @functools.wraps(original)
    def watched(*args: Any, **kwargs: Any) -> Any:
        if is_dynamo_compiling():  # traced by torch.compile: see CompiledRuns
            COMPILED.ops = True
            return original(*args, **kwargs)
        watches = _watches
        if not watches or _watching.inside:
            return original(*args, **kwargs)
        drops, p = _drops(spec, args, kwargs)
        if not drops:
            return original(*args, **kwargs)
        caller = sys._getframe(1)
        frame = _user_frame(caller)
        if frame is not None:
            for watch in watches:
                watch.record(spec, p, frame)
        else:  # torch's own modules: nn.Dropout & co. are reported here, by module
            dropout = _dropout_module(caller)
            if dropout is not None:
                for watch in watches:
                    watch.record_module(dropout)
        _watching.inside = True
        try:
            return original(*args, **kwargs)
        finally:
            _watching.inside = False

    return watched


_WRAPPERS: dict[tuple[ModuleType, str], Callable[..., Any]] = {
    (namespace, name): _wrap(getattr(namespace, name), spec) for namespace, name, spec in _watched()
}


def start_watching(watch: DropoutWatch) -> None:
    """Add ``watch``; the first one puts the wrappers in place of the functions."""
    global _watches
    with _watch_lock:
        if not _watches:
            for (namespace, name), wrapper in _WRAPPERS.items():
                _originals[namespace, name] = getattr(namespace, name)
                setattr(namespace, name, wrapper)
        _watches = (*_watches, watch)


def stop_watching(watch: DropoutWatch) -> None:
    """Remove ``watch``; the last one puts the original functions back."""
    global _watches
    with _watch_lock:
        _watches = tuple(other for other in _watches if other is not watch)
        if not _watches:
            for (namespace, name), original in _originals.items():
                setattr(namespace, name, original)
            _originals.clear()


class DropoutWatch:
    """Records a GFR005 finding, for one audit, for each functional dropout call that drops."""

    def __init__(self, collector: Collector, names: dict[int, tuple[str, str]]) -> None:
        self._collector = collector
        self._names = names

    def record(self, spec: _Spec, p: object, frame: FrameType) -> None:
        """Record the call made at ``frame`` if it belongs to this audit."""
        name, label, owner = self._enclosing_module(frame)
        if owner is None and threading.get_ident() != self._collector.owner:
            return  # another thread's work, outside any audited forward
        self._record(spec, p, frame, name, label, owner)

    def record_module(self, module: nn.Module) -> None:
        """Record that ``module`` (torch's own Dropout class) dropped, if it is audited."""
        known = self._names.get(id(module))
        if known is not None:
            name, cls = known
            p = getattr(module, "p", None)
            record_dropout_module(self._collector, name, module_label(name, cls), "p", p)

    def _record(
        self, spec: _Spec, p: object, frame: FrameType, name: str, label: str, owner: Any
    ) -> None:
        # One finding per module and call site: every layer of a model runs the same line
        # (BERT's attention in each encoder layer), and each layer is a finding of its own.
        filename, line = frame.f_code.co_filename, frame.f_lineno
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


def _dropout_module(frame: FrameType) -> nn.Module | None:
    """The torch Dropout module whose ``forward`` is ``frame``, if it is one."""
    code = frame.f_code
    if code.co_name != "forward" or code.co_argcount == 0:
        return None
    owner = frame.f_locals.get(code.co_varnames[0])
    return owner if isinstance(owner, DROPOUT_MODULES) else None


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
