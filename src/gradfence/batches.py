"""Nested batches: tensors inside tuples, lists, namedtuples and mappings, walked in one place.

A model input or a batch is often a structure of tensors (``(x, mask)``,
``{"input_ids": ..., "attention_mask": ...}``, a namedtuple). :func:`map_tensors` is the
one walk over such a structure; :func:`tensors_in` and :func:`to_device` are built on it.
torch is imported only when a function runs.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch


def map_tensors(value: Any, apply: Callable[[torch.Tensor], Any]) -> Any:
    """``value`` with ``apply`` applied to every tensor in it, the structure rebuilt.

    Tuples, lists and namedtuples keep their type, mappings become dicts, anything
    else is returned as it is.

    >>> import torch
    >>> map_tensors({"x": (torch.ones(2), 3)}, lambda t: t * 2)
    {'x': (tensor([2., 2.]), 3)}
    """
    import torch

    return _walk(value, apply, torch.Tensor, rebuild=True)


def tensors_in(value: Any) -> list[torch.Tensor]:
    """Every tensor in ``value``, in order (the walk of :func:`map_tensors`, nothing rebuilt).

    >>> import torch
    >>> [t.tolist() for t in tensors_in([torch.zeros(1), {"b": torch.ones(2)}, "text"])]
    [[0.0], [1.0, 1.0]]
    """
    import torch

    found: list[torch.Tensor] = []
    _walk(value, found.append, torch.Tensor, rebuild=False)
    return found


def to_device(value: Any, device: str) -> Any:
    """``value`` with every tensor moved to ``device`` (see :func:`map_tensors`)."""
    return map_tensors(value, lambda tensor: tensor.to(device))


def _walk(item: Any, apply: Callable[[Any], Any], tensor_type: type, *, rebuild: bool) -> Any:
    if isinstance(item, tensor_type):
        return apply(item)
    if isinstance(item, Mapping):
        mapped = {key: _walk(sub, apply, tensor_type, rebuild=rebuild) for key, sub in item.items()}
        return mapped if rebuild else None
    if isinstance(item, tuple | list):
        items = [_walk(sub, apply, tensor_type, rebuild=rebuild) for sub in item]
        if not rebuild:
            return None
        if hasattr(item, "_fields"):  # a namedtuple takes its fields as arguments
            return type(item)(*items)
        return type(item)(items)
    return item
