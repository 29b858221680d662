"""gf.ShardedSampler: every index on exactly one rank, no padding, uneven shards allowed."""

from __future__ import annotations

import pytest

import gradfence as gf


@pytest.mark.parametrize("size", [0, 1, 2, 5, 7, 10, 23])
@pytest.mark.parametrize("world", [1, 2, 3, 4])
@pytest.mark.parametrize("shuffle", [False, True])
def test_shards_partition_the_dataset(size: int, world: int, shuffle: bool) -> None:
    shards = [
        list(gf.ShardedSampler(range(size), num_replicas=world, rank=r, shuffle=shuffle, seed=3))
        for r in range(world)
    ]
    flat = [i for shard in shards for i in shard]
    assert sorted(flat) == list(range(size))  # no duplicates, nothing missing
    lengths = [
        len(gf.ShardedSampler(range(size), num_replicas=world, rank=r)) for r in range(world)
    ]
    assert lengths == [len(shard) for shard in shards]
    assert max(lengths) - min(lengths) <= 1


def test_strided_order_without_shuffle() -> None:
    shards = [list(gf.ShardedSampler(range(7), num_replicas=3, rank=r)) for r in range(3)]
    assert shards == [[0, 3, 6], [1, 4], [2, 5]]


def test_shuffle_is_seeded_and_follows_the_epoch() -> None:
    sampler = gf.ShardedSampler(range(50), num_replicas=1, rank=0, shuffle=True, seed=1)
    first = list(sampler)
    assert first != list(range(50))
    assert list(gf.ShardedSampler(range(50), num_replicas=1, rank=0, shuffle=True, seed=1)) == first
    sampler.set_epoch(1)
    assert list(sampler) != first and sorted(sampler) == list(range(50))


def test_defaults_to_one_replica_without_torch_distributed() -> None:
    sampler = gf.ShardedSampler(range(5))
    assert (sampler.num_replicas, sampler.rank) == (1, 0)
    assert list(sampler) == [0, 1, 2, 3, 4]


@pytest.mark.parametrize(("world", "rank"), [(0, 0), (2, 2), (2, -1)])
def test_rejects_impossible_ranks(world: int, rank: int) -> None:
    with pytest.raises(ValueError, match="ShardedSampler"):
        gf.ShardedSampler(range(5), num_replicas=world, rank=rank)
