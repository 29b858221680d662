"""Distributed gf.evaluate on 1, 2 and 3 spawned CPU processes (gloo) equals one process.

The dataset has 23 samples, so with 2 or 3 ranks the shards are uneven. Counting
metrics (accuracy, micro and macro) must match EXACTLY. Sample-weighted means (the
loss, a per-sample callable) are compared to 1e-6 relative: each rank's batches hold
different samples than the single-process batches, so the float32 batch means are
rounded differently (float32 epsilon ~1.2e-7, times a few for the mean of <= 4
values); the sums across batches and ranks are float64 and add nothing visible.
"""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

HERE = Path(__file__).parent

pytestmark = pytest.mark.skipif(
    not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed gloo"
)


@pytest.fixture
def worker(monkeypatch: pytest.MonkeyPatch) -> Any:
    # Spawned children inherit sys.path, so they can import the worker module by name.
    monkeypatch.syspath_prepend(str(HERE))
    import dist_worker

    return dist_worker


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="module")
def single_process() -> dict[str, Any]:
    import sys

    sys.path.insert(0, str(HERE))
    try:
        import dist_worker

        torch.manual_seed(0)
        return dist_worker.evaluate_all()
    finally:
        sys.path.remove(str(HERE))


def assert_same_results(got: dict[str, Any], expected: dict[str, Any]) -> None:
    assert got.keys() == expected.keys()
    assert got["acc"] == expected["acc"]  # counts: exact
    assert got["macro_acc"] == expected["macro_acc"]
    assert got["loss"] == pytest.approx(expected["loss"], rel=1e-6)
    assert got["error"] == pytest.approx(expected["error"], rel=1e-6)
    assert got["error"] == pytest.approx(1.0 - expected["acc"], rel=1e-6)


@pytest.mark.timeout(240)
@pytest.mark.filterwarnings("ignore:No positive samples:UserWarning")  # AUROC on 2 samples
@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_distributed_equals_single_process(
    world_size: int, worker: Any, single_process: dict[str, Any], tmp_path: Path
) -> None:
    mp.spawn(
        worker.run_rank,
        args=(world_size, free_port(), str(tmp_path)),
        nprocs=world_size,
        join=True,
    )
    for rank in range(world_size):
        got = torch.load(tmp_path / f"rank{rank}.pt", weights_only=False)
        for mode in ("no_grad", "inference_mode", "nested_inference_mode"):
            assert_same_results(got[mode], single_process[mode])
        assert got["training_after"] is True
        # 2 samples on up to 3 ranks: list states of an empty shard synchronise too
        tiny, expected = got["tiny"], single_process["tiny"]
        assert torch.equal(tiny["multiclass"]["auroc"], expected["multiclass"]["auroc"])
        assert tiny["multiclass"]["acc"] == expected["multiclass"]["acc"]
        assert tiny["multiclass"]["loss"] == pytest.approx(expected["multiclass"]["loss"], rel=1e-6)
        assert tiny["binary"] == pytest.approx(expected["binary"], rel=1e-6)  # auroc and loss
        assert torch.equal(tiny["binary_preds"], expected["binary_preds"])
        # predictions: in dataset order, gathered from every rank, the padding left out
        for sampler in ("sharded", "padded"):
            predictions = got["predictions"][sampler]
            assert predictions.shape == (worker.DATASET_SIZE, worker.NUM_CLASSES)
            assert torch.allclose(predictions, single_process["predictions"][sampler], atol=1e-6)

        failed = got["failed_sync"]
        assert failed["raised"] == "compute failed on purpose"
        assert failed["synced_flag"] is False  # left unsynchronised ...
        assert failed["local_count"] == failed["shard_size"]  # ... with this rank's own states
        assert failed["acc_after"] == single_process["no_grad"]["acc"]  # and it syncs again

        # DistributedSampler pads 23 samples to 24 on 2 or 3 ranks (not on 1): rank 0 warns.
        assert got["rank"] == rank
        assert got["padding_warned"] is (world_size > 1 and rank == 0)
