"""What each spawned rank of test_distributed.py runs (importable by name in the children).

The parent puts this folder on sys.path, which spawned children inherit, so
``torch.multiprocessing.spawn`` can find :func:`run_rank` by its module name.
"""

from __future__ import annotations

import datetime
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset
from torchmetrics.classification import BinaryAUROC, MulticlassAccuracy, MulticlassAUROC

import gradfence as gf
from gradfence.errors import DuplicateSamplesWarning
from gradfence.modes import GradMode

DATASET_SIZE = 23  # divisible by neither 2 nor 3: shards are uneven
NUM_CLASSES = 3
BATCH_SIZE = 4


def build() -> tuple[nn.Module, TensorDataset]:
    """The same tiny model and data on every rank (and in the single-process reference)."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(DATASET_SIZE, 5, generator=generator)
    y = torch.randint(0, NUM_CLASSES, (DATASET_SIZE,), generator=generator)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, NUM_CLASSES))
    return model, TensorDataset(x, y)


def per_sample_error(preds: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """A plain callable with one value per sample: 1.0 where the top class is wrong."""
    return (preds.argmax(dim=1) != target).float()


def evaluate_once(model: nn.Module, loader: Any, mode: GradMode) -> dict[str, Any]:
    metrics: dict[str, Any] = {
        "acc": MulticlassAccuracy(num_classes=NUM_CLASSES, average="micro"),
        "macro_acc": MulticlassAccuracy(num_classes=NUM_CLASSES, average="macro"),
        "error": per_sample_error,
    }
    return gf.evaluate(model, loader, metrics, mode=mode, loss=F.cross_entropy, progress=False)


def evaluate_all() -> dict[str, Any]:
    """Every result the parent compares with the single-process one (also run there)."""
    model, dataset = build()
    loader = DataLoader(dataset, batch_size=BATCH_SIZE, sampler=gf.ShardedSampler(dataset))
    out: dict[str, Any] = {
        "no_grad": evaluate_once(model, loader, "no_grad"),
        "inference_mode": evaluate_once(model, loader, "inference_mode"),
    }
    # Called from inside the caller's own inference_mode: the sync must still leave it.
    with torch.inference_mode():
        out["nested_inference_mode"] = evaluate_once(model, loader, "inference_mode")
    out["tiny"] = evaluate_tiny()
    out["predictions"] = predictions_in_dataset_order(model, dataset)
    out["training_after"] = model.training
    return out


class FailingAccuracy(MulticlassAccuracy):
    """Accuracy whose compute() raises after the states were synchronised."""

    fail = True

    def compute(self) -> torch.Tensor:
        if self.fail:
            raise RuntimeError("compute failed on purpose")
        return super().compute()


def check_failed_sync_is_undone(model: nn.Module, dataset: TensorDataset) -> dict[str, Any]:
    sampler = gf.ShardedSampler(dataset)
    loader = DataLoader(dataset, batch_size=BATCH_SIZE, sampler=sampler)
    metric = FailingAccuracy(num_classes=NUM_CLASSES, average="micro")
    try:
        gf.evaluate(model, loader, {"acc": metric}, progress=False)
    except RuntimeError as exc:
        raised = str(exc)
    else:
        raised = ""
    tp, fn = metric.metric_state["tp"], metric.metric_state["fn"]
    local_count = int((tp + fn).sum())  # micro accuracy: every sample is a tp or an fn
    metric.fail = False  # it must sync again, to the global result
    return {
        "raised": raised,
        "synced_flag": metric._is_synced,
        "local_count": local_count,
        "shard_size": len(sampler),
        "acc_after": float(metric.compute()),
    }


def check_padding_warning(dataset: TensorDataset, model: nn.Module) -> bool:
    loader = DataLoader(dataset, batch_size=BATCH_SIZE, sampler=DistributedSampler(dataset))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        gf.evaluate(model, loader, progress=False)
    return any(issubclass(w.category, DuplicateSamplesWarning) for w in caught)


TINY_SIZE = 2  # fewer samples than ranks with 3 ranks: rank 2's shard is empty


def evaluate_tiny() -> dict[str, Any]:
    """List-state metrics (AUROC keeps every prediction) on 2 samples, sharded.

    A rank with an empty shard has empty list states: their sync must still match the
    other ranks' shapes and dtypes (gloo aborts the job otherwise).
    """
    model, dataset = build()
    tiny = TensorDataset(dataset.tensors[0][:TINY_SIZE], torch.tensor([0, 2]))
    loader = DataLoader(tiny, batch_size=BATCH_SIZE, sampler=gf.ShardedSampler(tiny))
    multiclass = gf.evaluate(
        model,
        loader,
        {
            "auroc": MulticlassAUROC(num_classes=NUM_CLASSES, thresholds=None, average=None),
            "acc": MulticlassAccuracy(num_classes=NUM_CLASSES, average="micro"),
        },
        loss=F.cross_entropy,
        progress=False,
    )

    def binary_step(m: nn.Module, batch: Any) -> tuple[torch.Tensor, ...]:
        x, y = batch
        p, t = m(x)[:, 0].sigmoid(), (y == 0).long()
        return p, t, F.binary_cross_entropy(p, t.float())  # a loss from the step: on every rank

    binary = gf.evaluate(
        model,
        loader,
        {"auroc": BinaryAUROC(thresholds=None)},
        step=binary_step,
        progress=False,
        return_predictions=True,
    )
    return {"multiclass": multiclass, "binary": binary, "binary_preds": binary.predictions}


def predictions_in_dataset_order(model: nn.Module, dataset: TensorDataset) -> dict[str, Any]:
    """return_predictions with shuffled shards, and with DistributedSampler's padding."""
    initialized = dist.is_initialized()
    world_size, rank = (dist.get_world_size(), dist.get_rank()) if initialized else (1, 0)
    out = {}
    samplers = {
        "sharded": gf.ShardedSampler(dataset, shuffle=True, seed=1),
        "padded": DistributedSampler(dataset, num_replicas=world_size, rank=rank, seed=1),
    }
    for name, sampler in samplers.items():
        loader = DataLoader(dataset, batch_size=BATCH_SIZE, sampler=sampler)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DuplicateSamplesWarning)  # the padding: known
            results = gf.evaluate(model, loader, progress=False, return_predictions=True)
        out[name] = results.predictions
    return out


def run_rank(rank: int, world_size: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world_size,
        timeout=datetime.timedelta(seconds=60),
    )
    try:
        results = evaluate_all()
        model, dataset = build()
        results["failed_sync"] = check_failed_sync_is_undone(model, dataset)
        results["padding_warned"] = check_padding_warning(dataset, model)
        results["rank"] = rank
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()
