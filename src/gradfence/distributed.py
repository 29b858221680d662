"""World size and rank of the default process group: one place to ask, without torch at import.

Outside a process group (torch.distributed missing, or not initialised) the answer is
one process of rank 0, so single-process code needs no special case.
"""

from __future__ import annotations

from typing import NamedTuple


class World(NamedTuple):
    """How many processes take part, and which one this is."""

    size: int
    rank: int


def world() -> World:
    """``World(size, rank)`` of the default process group, or ``World(1, 0)`` without one.

    >>> world()
    World(size=1, rank=0)
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return World(dist.get_world_size(), dist.get_rank())
    return World(1, 0)
