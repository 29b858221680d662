"""What ``gf.evaluate`` needs from ``torch.distributed``: gathers that never abort.

Everything here works without an initialised process group (one process: gathers
return the local tensor), so the same evaluation code runs anywhere. The world size
and rank come from :func:`gradfence.distributed.world`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor

# dtype <-> code, to describe a tensor to the other ranks in one small int64 tensor
_DTYPES: tuple[torch.dtype, ...] = (
    torch.float32,
    torch.float64,
    torch.float16,
    torch.bfloat16,
    torch.int64,
    torch.int32,
    torch.int16,
    torch.int8,
    torch.uint8,
    torch.bool,
    torch.complex64,
    torch.complex128,
)
_MAX_DIMS = 8


@contextlib.contextmanager
def outside_inference_mode() -> Iterator[None]:
    """No grad, and *not* inference mode, even when the caller is inside ``inference_mode``.

    gloo's collectives fail inside inference mode (pytorch/pytorch#86830). Leaving it
    with ``inference_mode(False)`` turns grad on, hence the ``no_grad`` inside it.
    """
    with contextlib.ExitStack() as stack:
        if torch.is_inference_mode_enabled():
            stack.enter_context(torch.inference_mode(False))
        stack.enter_context(torch.no_grad())
        yield


def gather_tensors(tensor: Tensor, group: Any = None) -> list[Tensor]:
    """Every rank's ``tensor``, in rank order; ranks holding an *empty* tensor included.

    torchmetrics' ``gather_all_tensors`` pads tensors that differ in their sizes, but
    needs the same number of dimensions and the same dtype on every rank. A rank whose
    shard was empty has nothing to say about either (torchmetrics stands in a float32
    tensor of shape ``(0,)`` for an empty list state), and a mismatched gather makes
    gloo abort the whole job ("Received data size doesn't match"). So the ranks first
    exchange a description of their tensors, and an empty one takes the shape
    ``(0, *rest)`` and dtype of the first rank holding data. Usable as a metric's
    ``dist_sync_fn``; a world of one returns ``[tensor]``.
    """
    import torch.distributed as dist
    from torchmetrics.utilities.distributed import gather_all_tensors

    if not (dist.is_available() and dist.is_initialized()):
        return [tensor]
    size = dist.get_world_size(group)
    local = _describe(tensor)
    described = [torch.empty_like(local) for _ in range(size)]
    dist.all_gather(described, local, group=group)
    if tensor.numel() == 0:
        for other in described:
            shape_dtype = _shape_dtype(other)
            if shape_dtype is not None and shape_dtype[0][0] > 0:
                shape, dtype = shape_dtype
                tensor = torch.empty((0, *shape[1:]), dtype=dtype, device=tensor.device)
                break
    gathered: list[Tensor] = gather_all_tensors(tensor, group=group)
    return gathered


def _describe(tensor: Tensor) -> Tensor:
    """``[known, dtype code, ndim, *shape padded to _MAX_DIMS]`` as int64 on the tensor's device.

    ``known`` is 0 for a tensor that cannot be described (more dimensions than
    ``_MAX_DIMS`` or an unusual dtype) or that is empty: the others never copy it.
    """
    description = torch.zeros(3 + _MAX_DIMS, dtype=torch.int64)
    describable = tensor.ndim <= _MAX_DIMS and tensor.dtype in _DTYPES
    if describable and tensor.numel() > 0:
        description[0] = 1
        description[1] = _DTYPES.index(tensor.dtype)
        description[2] = tensor.ndim
        description[3 : 3 + tensor.ndim] = torch.tensor(tensor.shape, dtype=torch.int64)
    return description.to(tensor.device)


def _shape_dtype(description: Tensor) -> tuple[tuple[int, ...], torch.dtype] | None:
    known, code, ndim, *shape = description.tolist()
    if not known or ndim == 0:
        return None
    return tuple(shape[:ndim]), _DTYPES[code]
