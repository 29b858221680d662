"""Nested batches: tensors inside tuples, lists, namedtuples and mappings, walked in one place.

A model input or a batch is often a structure of tensors (``(x, mask)``,
``{"input_ids": ..., "attention_mask": ...}``, a namedtuple). :func:`map_tensors` is the
one walk over such a structure, and :func:`tensors_in` is built on it; :func:`to_device`
also moves dataclasses, any ``Mapping`` and objects with a ``.to()`` method.
torch is imported only when a function runs.
"""

from __future__ import annotations

import dataclasses
import types
from collections import defaultdict
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


def to_device(value: Any, device: torch.device | str) -> Any:
    """``value`` with every tensor in it on ``device``, its structure kept.

    Tensors; tuples, lists, namedtuples; dicts and any other ``Mapping``; dataclass
    instances; and objects with a ``.to()`` method (Hugging Face ``BatchEncoding``, a
    graph batch), moved by that method. Anything else is left as it is. A copy towards
    an accelerator is non-blocking; one towards the CPU is not (it may be read before it
    has landed).

    >>> import torch
    >>> to_device({"x": (torch.ones(1), "id")}, "cpu")
    {'x': (tensor([1.]), 'id')}
    """
    import torch

    return _to_device(value, torch.device(device), torch.Tensor)


def _to_device(batch: Any, device: torch.device, tensor_type: type[torch.Tensor]) -> Any:
    if isinstance(batch, tensor_type):
        if batch.device == device:  # the common case, checked first: it runs per batch
            return batch
        return batch.to(device, non_blocking=device.type != "cpu")
    batch_type = type(batch)
    if batch_type is tuple or batch_type is list:
        return batch_type([_to_device(item, device, tensor_type) for item in batch])
    if batch_type is dict:
        return {key: _to_device(value, device, tensor_type) for key, value in batch.items()}
    if isinstance(batch, str | bytes | int | float | bool | types.NoneType):
        return batch
    if isinstance(batch, tuple):
        items = [_to_device(item, device, tensor_type) for item in batch]
        return batch_type(*items) if hasattr(batch, "_fields") else batch_type(items)
    if isinstance(batch, list):
        return [_to_device(item, device, tensor_type) for item in batch]
    to = getattr(batch, "to", None)
    if callable(to) and not isinstance(batch, type):
        moved = to(device)
        return batch if moved is None else moved  # a .to() that moves in place
    if dataclasses.is_dataclass(batch) and not isinstance(batch, type):
        return _dataclass_to_device(batch, device, tensor_type)
    if isinstance(batch, Mapping):
        return _mapping_to_device(batch, device, tensor_type)
    return batch


def _dataclass_to_device(batch: Any, device: torch.device, tensor_type: type[torch.Tensor]) -> Any:
    fields = dataclasses.fields(batch)
    moved = dataclasses.replace(
        batch,
        **{
            f.name: _to_device(getattr(batch, f.name), device, tensor_type)
            for f in fields
            if f.init
        },
    )
    for f in fields:
        if not f.init:  # not a constructor argument: copy it over (frozen ones too)
            object.__setattr__(
                moved, f.name, _to_device(getattr(batch, f.name), device, tensor_type)
            )
    return moved


def _mapping_to_device(
    batch: Mapping[Any, Any], device: torch.device, tensor_type: type[torch.Tensor]
) -> Any:
    items = {key: _to_device(value, device, tensor_type) for key, value in batch.items()}
    if isinstance(batch, defaultdict):
        return defaultdict(batch.default_factory, items)
    mapping_type: Any = type(batch)
    try:
        return mapping_type(items)
    except TypeError:  # a mapping type that is not built from a dict: a plain dict then
        return items


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
