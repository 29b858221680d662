"""The private or implementation-defined PyTorch behaviour gradfence relies on, in one file.

Everywhere else gradfence uses PyTorch's public API. What has no public equivalent
(or none cheap enough for code that runs on every scope entry) lives here, one small
function per fact, each naming what it depends on. ``tests/test_compat.py`` pins every
one of those facts on the installed torch, so a PyTorch upgrade that changes one fails
there, naming the function, instead of as a silent wrong result somewhere else.

Sections, one per part of torch: the module tree and its mode flags (used by the scope),
module state (parameters, buffers and pre-hooks, for the audit), tensor versions and
compiled modules (for the audit). Add a new private use here, in
its section, with its test; do not reach into torch at the call site.
"""

from __future__ import annotations

import operator
import sys
from collections.abc import Callable, ItemsView, ValuesView
from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from _collections_abc import dict_values

__all__ = [
    "children",
    "children_dict",
    "compiled_in_place",
    "direct_buffers",
    "direct_parameters",
    "forward_pre_hooks",
    "has_plain_training_attribute",
    "is_compile_wrapper",
    "train_recursion_looks_up_instances",
    "version",
    "write_training",
]


# --- the module tree and its mode flags -------------------------------------------


def children(module: nn.Module) -> dict_values[str, nn.Module | None]:
    """The modules registered directly on ``module``, in registration order.

    ``None`` where a child was registered as ``None``; a module registered under two
    names appears twice. The public ``module.children()`` is a generator with a
    de-duplicating memo, several times slower on trees walked at every scope entry.

    Relies on: ``nn.Module._modules``, a dict from name to module (or ``None``).
    """
    return module._modules.values()


children_dict: Callable[[nn.Module], dict[str, nn.Module | None]] = operator.attrgetter("_modules")
"""``module._modules``: the same as :func:`children` as a dict by name, for hot loops.

A C-level getter, cheaper than a Python call per module in walks over whole trees.
"""


def has_plain_training_attribute(cls: type) -> bool:
    """True when ``module.training = flag`` on a ``cls`` only stores ``flag`` in ``__dict__``.

    Then :func:`write_training` is what the assignment (and so ``nn.Module.train``)
    does to the flag. False when ``cls`` overrides ``__setattr__`` or defines
    ``training`` as a property (or any descriptor): the assignment must run then.

    Relies on: ``nn.Module`` not defining ``training`` as a class attribute, and
    ``nn.Module.__setattr__`` storing a ``bool`` (neither a tensor nor a module) through
    ``object.__setattr__``.
    """
    if getattr(cls, "__setattr__", None) is not nn.Module.__setattr__:
        return False
    return not any("training" in vars(klass) for klass in cls.__mro__)


def write_training(module: nn.Module, flag: bool) -> None:
    """Set ``module``'s own flag, as ``nn.Module.train`` does for one level (see above)."""
    module.__dict__["training"] = flag


_recursion_probe: bool | None = None


def train_recursion_looks_up_instances() -> bool:
    """True when ``nn.Module.train`` switches each child by calling ``child.train(mode)``.

    That call is looked up on the child *instance*, which is what lets an instance
    override (``module.train = disabled_train``) pin a part, and what lets the scope
    stand in for a plain child's ``train`` while a class's own ``train()`` override
    recurses. Probed once on the installed torch; if a release stops doing it, the
    scope falls back to letting the override recurse at full cost (still correct).

    Relies on: ``nn.Module.train`` setting ``self.training`` and then calling
    ``module.train(mode)`` for every child.
    """
    global _recursion_probe
    if _recursion_probe is None:
        parent, child = nn.Module(), nn.Module()
        parent.add_module("child", child)
        seen: list[object] = []

        def stand_in(mode: bool = True) -> nn.Module:
            seen.append(mode)
            return child

        child.__dict__["train"] = stand_in
        try:
            nn.Module.train(parent, False)
        finally:
            del child.__dict__["train"]
        _recursion_probe = seen == [False] and parent.training is False and child.training
    return _recursion_probe


# --- module state -----------------------------------------------------------------


def direct_parameters(module: nn.Module) -> ItemsView[str, torch.nn.Parameter | None]:
    """``(name, parameter)`` registered directly on ``module`` (``None`` where set so).

    Relies on: ``nn.Module._parameters``, a dict from name to parameter (or ``None``).
    """
    return module._parameters.items()


def direct_buffers(module: nn.Module) -> ItemsView[str, torch.Tensor | None]:
    """``(name, buffer)`` registered directly on ``module`` (``None`` where set so).

    Relies on: ``nn.Module._buffers``, a dict from name to tensor (or ``None``).
    """
    return module._buffers.items()


def forward_pre_hooks(module: nn.Module) -> ValuesView[Callable[..., object]]:
    """The forward pre-hooks registered on ``module`` itself, in registration order.

    The hook objects as registered: a ``weight_norm``'s is its ``WeightNorm`` instance.
    Not the global ones of ``register_module_forward_pre_hook``.

    Relies on: ``nn.Module._forward_pre_hooks``, a dict from handle id to the object
    passed to ``register_forward_pre_hook``.
    """
    return module._forward_pre_hooks.values()


# --- tensor versions ---------------------------------------------------------------


def version(tensor: torch.Tensor) -> int:
    """``tensor``'s version counter: bumped by each in-place operation on its storage.

    Raises ``RuntimeError`` on an inference tensor, which has no counter: check
    ``tensor.is_inference()`` first.

    Relies on: ``Tensor._version``.
    """
    return tensor._version


# --- compiled modules --------------------------------------------------------------


def compiled_in_place(module: nn.Module) -> bool:
    """True once ``module.compile()`` was called: its whole call, hooks included, is compiled.

    Relies on: ``nn.Module.compile`` storing the compiled call in
    ``module._compiled_call_impl`` (``None`` until then).
    """
    return getattr(module, "_compiled_call_impl", None) is not None


def is_compile_wrapper(module: nn.Module) -> bool:
    """True when ``module`` is the wrapper ``torch.compile(m)`` returns for a module ``m``.

    Dynamo is looked up only when it was imported: without it nothing was compiled, and
    importing it costs seconds.

    Relies on: ``torch.compile`` returning an instance of ``torch._dynamo.OptimizedModule``.
    """
    dynamo = sys.modules.get("torch._dynamo")
    wrapper = getattr(dynamo, "OptimizedModule", None) if dynamo is not None else None
    return wrapper is not None and isinstance(module, wrapper)
