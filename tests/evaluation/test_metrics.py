"""Metric sync made exception-safe, and progress peeks that never sync, in one process.

A torchmetrics Metric takes ``distributed_available_fn`` and ``dist_sync_fn``: with a
gather that pretends two identical ranks, the sync path runs without spawning.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn
from torchmetrics import Metric
from torchmetrics.classification import MulticlassAccuracy

import gradfence as gf

LOGITS = torch.eye(3).repeat(4, 1)  # 12 samples, predictions 0, 1, 2, 0, ...
TARGETS = torch.tensor([0, 1, 2] * 3 + [1, 1, 1])  # the last 3: one right of 3


def loader() -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(LOGITS[i : i + 5], TARGETS[i : i + 5]) for i in range(0, 12, 5)]


class TwoRanks:
    """A dist_sync_fn that gathers each state from two ranks holding the same value."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, tensor: torch.Tensor, group: Any = None) -> list[torch.Tensor]:
        self.calls += 1
        return [tensor, tensor.clone()]


def fake_distributed() -> dict[str, Any]:
    return {"distributed_available_fn": lambda: True, "dist_sync_fn": TwoRanks()}


class FailingAccuracy(MulticlassAccuracy):
    fail = True

    def compute(self) -> torch.Tensor:
        if self.fail:
            raise RuntimeError("compute failed on purpose")
        return super().compute()


def test_a_failing_compute_leaves_the_metric_unsynced() -> None:
    metric = FailingAccuracy(num_classes=3, average="micro", **fake_distributed())
    with pytest.raises(RuntimeError, match="on purpose"):
        gf.evaluate(nn.Identity(), loader(), {"acc": metric})
    assert metric.dist_sync_fn.calls > 0  # the sync did happen before compute raised
    assert metric._is_synced is False
    tp, fn = metric.metric_state["tp"], metric.metric_state["fn"]
    assert int(tp + fn) == 12  # local states back, not the doubled global ones
    metric.update(LOGITS[:3], TARGETS[:3])  # raises "already synced" without the fix
    metric.fail = False
    assert float(metric.compute()) == pytest.approx(13 / 15)  # (10 + 3) right of 15, twice


def test_a_failing_sync_is_undone() -> None:
    def broken_gather(tensor: torch.Tensor, group: Any = None) -> list[torch.Tensor]:
        raise ConnectionError("rank 1 went away")

    metric = MulticlassAccuracy(
        num_classes=3, average="micro", distributed_available_fn=lambda: True
    )
    metric.dist_sync_fn = broken_gather
    with pytest.raises(ConnectionError):
        gf.evaluate(nn.Identity(), loader(), {"acc": metric})
    assert int(metric.metric_state["tp"] + metric.metric_state["fn"]) == 12  # local states
    metric.update(LOGITS[:3], TARGETS[:3])  # not marked synced: updates go on
    metric.dist_sync_fn = TwoRanks()  # rank 1 is back: the next compute syncs for real
    assert float(metric.compute()) == pytest.approx(13 / 15)


class SampleCount(Metric):
    """Counts samples; summed across ranks, so a missed sync is visible."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.add_state("count", default=torch.tensor(0), dist_reduce_fx="sum")

    def update(self, preds: torch.Tensor, target: torch.Tensor) -> None:
        self.count += target.numel()

    def compute(self) -> torch.Tensor:
        return self.count


def test_progress_peeks_do_not_sync_and_do_not_stale_the_result(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from gradfence.evaluation import progress

    monkeypatch.setattr(progress, "POSTFIX_INTERVAL_S", 0.0)  # peek after every batch
    metric = SampleCount(**fake_distributed())
    peeks: list[float | None] = []
    original = progress.Progress.advance

    def advance(self: progress.Progress) -> None:
        original(self)
        peeks.append(self._slots[0].running())

    monkeypatch.setattr(progress.Progress, "advance", advance)
    calls_during_loop: list[int] = []

    def step(model: nn.Module, batch: Any) -> Any:
        calls_during_loop.append(metric.dist_sync_fn.calls)
        return batch

    results = gf.evaluate(nn.Identity(), loader(), {"n": metric}, step=step, progress=True)
    assert peeks == [5.0, 10.0, 12.0]  # local running values
    assert calls_during_loop == [0, 0, 0]  # no collective inside the loop
    assert results["n"] == 24.0  # the final compute did sync (two pretend ranks)
