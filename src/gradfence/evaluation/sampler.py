"""``gf.ShardedSampler``: split a dataset across ranks with no padding and no duplicates."""

from __future__ import annotations

from collections.abc import Iterator, Sized

import torch
from torch.utils.data import Sampler

from gradfence.distributed import world


class ShardedSampler(Sampler[int]):
    """Each rank gets every ``num_replicas``-th index, starting at its ``rank``; nothing is padded.

    Unlike ``torch.utils.data.DistributedSampler``, shards are allowed to differ in
    length by one, so every sample is seen by exactly one rank, exactly once: metrics
    synchronised across ranks then equal the single-process result for any dataset
    size and world size (``DistributedSampler`` repeats samples to even the shards
    out, pytorch/pytorch#25162). Meant for evaluation: a training loop whose ranks must
    run the same number of steps still wants ``DistributedSampler``.

    ``num_replicas`` and ``rank`` default to the default process group's world size and
    rank, or to a single replica when ``torch.distributed`` is not initialised, so the
    same code runs on one process. With ``shuffle=True`` the order is a permutation
    seeded by ``seed + epoch`` (call :meth:`set_epoch`), identical on every rank.

    >>> import gradfence as gf
    >>> [list(gf.ShardedSampler(range(7), num_replicas=3, rank=r)) for r in range(3)]
    [[0, 3, 6], [1, 4], [2, 5]]
    """

    def __init__(
        self,
        dataset: Sized,
        num_replicas: int | None = None,
        rank: int | None = None,
        shuffle: bool = False,
        seed: int = 0,
    ) -> None:
        if num_replicas is None or rank is None:
            world_size, world_rank = world()
            num_replicas = world_size if num_replicas is None else num_replicas
            rank = world_rank if rank is None else rank
        if num_replicas < 1:
            raise ValueError(f"ShardedSampler: num_replicas must be >= 1, got {num_replicas}")
        if not 0 <= rank < num_replicas:
            raise ValueError(f"ShardedSampler: rank must be in [0, {num_replicas - 1}], got {rank}")
        self.dataset = dataset
        self.num_replicas = num_replicas
        self.rank = rank
        self.shuffle = shuffle
        self.seed = seed
        self.epoch = 0

    def __iter__(self) -> Iterator[int]:
        size = len(self.dataset)
        if self.shuffle:
            generator = torch.Generator()
            generator.manual_seed(self.seed + self.epoch)
            order: list[int] = torch.randperm(size, generator=generator).tolist()
            return iter(order[self.rank :: self.num_replicas])
        return iter(range(self.rank, size, self.num_replicas))

    def __len__(self) -> int:
        return len(range(self.rank, len(self.dataset), self.num_replicas))

    def set_epoch(self, epoch: int) -> None:
        """Reshuffle for this epoch (with ``shuffle=True``), as ``DistributedSampler`` does."""
        self.epoch = epoch
