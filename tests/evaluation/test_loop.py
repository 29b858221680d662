"""gf.evaluate on one process: modes, exceptions, exact metrics, detached accumulation, progress."""

from __future__ import annotations

import io
import math
import sys
from collections.abc import Iterator
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset
from torchmetrics.classification import MulticlassAccuracy

import gradfence as gf
from gradfence.errors import DuplicateSamplesWarning, EvaluationError, ScopeError

# Logits chosen by hand: the model is the identity, so predictions are these rows.
LOGITS = torch.tensor(
    [
        [2.0, 0.0, 0.0],
        [0.0, 1.0, 0.0],
        [0.0, 0.0, 3.0],
        [1.0, 2.0, 0.0],
        [0.5, 0.0, 0.0],
        [0.0, 0.0, -1.0],
        [0.0, 4.0, 0.0],
        [3.0, 0.0, 1.0],
        [0.0, 0.0, 0.5],
        [1.0, 0.0, 2.0],
    ]
)
TARGETS = torch.tensor([0, 1, 2, 0, 0, 2, 1, 2, 2, 1])
# argmax:               0  1  2  1  0  0  1  0  2  2  -> correct: 1,1,1,0,1,0,1,0,1,0 = 6 of 10
HAND_ACCURACY = 6 / 10


def hand_cross_entropy() -> float:
    """Mean cross-entropy over the 10 samples, in plain float64 Python."""
    total = 0.0
    for row, label in zip(LOGITS.tolist(), TARGETS.tolist(), strict=True):
        log_sum = math.log(sum(math.exp(v) for v in row))
        total += log_sum - row[label]
    return total / len(TARGETS)


def identity_loader(batch_size: int = 4) -> DataLoader[Any]:
    # batches of 4, 4 and 2: an unweighted mean of batch means would be wrong
    return DataLoader(TensorDataset(LOGITS, TARGETS), batch_size=batch_size)


class ModeProbe(nn.Module):
    """Records the module and grad modes its forward runs under."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[tuple[bool, bool, bool]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append(
            (self.training, torch.is_grad_enabled(), torch.is_inference_mode_enabled())
        )
        return x


def model_with_frozen_bn() -> nn.Sequential:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Dropout(0.5), nn.Linear(4, 3), ModeProbe()
    )
    model[1].eval()  # frozen BatchNorm inside a model in train mode
    return model


def modes(model: nn.Module) -> list[bool]:
    return [m.training for m in model.modules()]


@pytest.mark.parametrize("mode", ["no_grad", "inference_mode"])
def test_modes_restored_with_frozen_batchnorm(mode: str) -> None:
    model = model_with_frozen_bn()
    before = modes(model)
    assert before[2] is False and before[0] is True
    running_mean = model[1].running_mean.clone()

    results = gf.evaluate(model, identity_loader(), mode=mode, loss=F.cross_entropy)  # type: ignore[arg-type]

    assert modes(model) == before  # the frozen BN stays frozen, the rest stays in train
    assert torch.is_grad_enabled() and not torch.is_inference_mode_enabled()
    probe = model[4]
    assert probe.seen == [(False, False, mode == "inference_mode")] * 3  # eval inside
    assert torch.equal(model[1].running_mean, running_mean)
    assert isinstance(results["loss"], float)


def test_grad_mode_of_the_caller_is_kept() -> None:
    model = model_with_frozen_bn()
    with torch.no_grad():
        gf.evaluate(model, identity_loader())
        assert not torch.is_grad_enabled()
    assert torch.is_grad_enabled()


class Boom(Exception):
    pass


@pytest.mark.parametrize("mode", ["no_grad", "inference_mode"])
def test_exception_mid_loop_restores_and_propagates(mode: str) -> None:
    model = model_with_frozen_bn()
    before = modes(model)
    calls = 0

    def step(m: nn.Module, batch: Any) -> tuple[Any, Any]:
        nonlocal calls
        calls += 1
        if calls == 2:
            raise Boom("batch 2")
        x, y = batch
        return m(x), y

    metric = MulticlassAccuracy(num_classes=3)
    with pytest.raises(Boom, match="batch 2"):
        gf.evaluate(model, identity_loader(), {"acc": metric}, mode=mode, step=step)  # type: ignore[arg-type]
    assert calls == 2
    assert modes(model) == before
    assert torch.is_grad_enabled() and not torch.is_inference_mode_enabled()


def test_metrics_equal_hand_computed_reference() -> None:
    per_class = MulticlassAccuracy(num_classes=3, average=None)
    metrics: dict[str, Any] = {
        "acc": MulticlassAccuracy(num_classes=3, average="micro"),
        "per_class": per_class,
        "error": lambda p, t: (p.argmax(1) != t).float(),  # one value per sample
        "batch_error": lambda p, t: (p.argmax(1) != t).float().mean(),  # a batch mean
    }
    results = gf.evaluate(nn.Identity(), identity_loader(), metrics, loss=F.cross_entropy)

    assert list(results) == ["acc", "per_class", "error", "batch_error", "loss"]
    assert results["acc"] == pytest.approx(HAND_ACCURACY, abs=1e-7)
    assert results["error"] == pytest.approx(1 - HAND_ACCURACY, abs=1e-12)
    assert results["batch_error"] == pytest.approx(1 - HAND_ACCURACY, abs=1e-12)
    assert results["loss"] == pytest.approx(hand_cross_entropy(), rel=1e-6)
    # class 0 (samples 0, 3, 4): 2 right; class 1 (1, 6, 9): 2; class 2 (2, 5, 7, 8): 2
    expected = torch.tensor([2 / 3, 2 / 3, 2 / 4])
    assert isinstance(results["per_class"], torch.Tensor)
    assert torch.allclose(results["per_class"], expected)


def test_metrics_are_reset_before_use_and_left_computed() -> None:
    metric = MulticlassAccuracy(num_classes=3, average="micro")
    metric.update(torch.eye(3), torch.tensor([2, 2, 0]))  # stale state from an earlier run
    results = gf.evaluate(nn.Identity(), identity_loader(), {"acc": metric})
    assert results["acc"] == pytest.approx(HAND_ACCURACY, abs=1e-7)
    assert float(metric.compute()) == results["acc"]


def test_loss_and_metrics_are_detached_numbers() -> None:
    model = nn.Linear(3, 3)

    def step_with_grad(m: nn.Module, batch: Any) -> tuple[Any, Any]:
        x, y = batch
        with torch.enable_grad():  # e.g. a saliency step: preds carry a graph
            return m(x), y

    metric = MulticlassAccuracy(num_classes=3, average="micro")
    seen: list[bool] = []

    def mean_logit(p: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        seen.append(p.requires_grad)
        return p.mean()

    results = gf.evaluate(
        model,
        identity_loader(),
        {"acc": metric, "mean_logit": mean_logit},
        step=step_with_grad,
        loss=F.cross_entropy,
    )
    assert all(isinstance(v, float) for v in results.values())
    assert seen == [False, False, False]  # callables get detached predictions
    for state in metric.metric_state.values():
        assert isinstance(state, torch.Tensor) and state.grad_fn is None


def test_inference_mode_leaves_usable_metric_states() -> None:
    metric = MulticlassAccuracy(num_classes=3, average="micro")
    gf.evaluate(nn.Identity(), identity_loader(), {"acc": metric}, mode="inference_mode")
    for state in metric.metric_state.values():
        assert isinstance(state, torch.Tensor) and not state.is_inference()
    metric.update(LOGITS, TARGETS)  # outside inference mode, after the evaluation
    assert float(metric.compute()) == pytest.approx(HAND_ACCURACY, abs=1e-7)


def test_device_defaults_to_the_first_parameter() -> None:
    from gradfence.evaluation.loop import resolve_device

    assert resolve_device(nn.Identity(), None) == torch.device("cpu")
    assert resolve_device(nn.Linear(2, 2, device="meta"), None) == torch.device("meta")
    assert resolve_device(nn.Linear(2, 2, device="meta"), "cpu") == torch.device("cpu")


def test_batches_are_moved_with_their_structure() -> None:
    from collections import namedtuple

    from gradfence.evaluation.loop import to_device

    Pair = namedtuple("Pair", "x y")
    moved = to_device({"a": [Pair(torch.ones(1), 3)], "b": "text"}, torch.device("meta"))
    assert isinstance(moved["a"][0], Pair)
    assert moved["a"][0].x.device == torch.device("meta") and moved["a"][0].y == 3
    assert moved["b"] == "text"


def test_custom_step_with_dict_batches() -> None:
    data = [
        {"logits": LOGITS[:6], "label": TARGETS[:6]},
        {"logits": LOGITS[6:], "label": TARGETS[6:]},
    ]
    results = gf.evaluate(
        nn.Identity(),
        data,
        {"acc": MulticlassAccuracy(num_classes=3, average="micro")},
        step=lambda m, b: (m(b["logits"]), b["label"]),
    )
    assert results["acc"] == pytest.approx(HAND_ACCURACY, abs=1e-7)


def test_padding_distributed_sampler_warns_once() -> None:
    dataset = TensorDataset(LOGITS[:9], TARGETS[:9])
    loader = DataLoader(
        dataset, batch_size=2, sampler=DistributedSampler(dataset, num_replicas=2, rank=0)
    )
    with pytest.warns(DuplicateSamplesWarning, match="1 duplicate") as record:
        gf.evaluate(nn.Identity(), loader, loss=F.cross_entropy)
    assert len(record) == 1


def test_dropping_distributed_sampler_warns() -> None:
    dataset = TensorDataset(LOGITS[:9], TARGETS[:9])
    sampler = DistributedSampler(dataset, num_replicas=2, rank=1, drop_last=True)
    with pytest.warns(DuplicateSamplesWarning, match="drops 1 of 9"):
        gf.evaluate(nn.Identity(), DataLoader(dataset, sampler=sampler))


def test_sharded_sampler_does_not_warn() -> None:
    dataset = TensorDataset(LOGITS[:9], TARGETS[:9])
    loader = DataLoader(dataset, sampler=gf.ShardedSampler(dataset, num_replicas=2, rank=1))
    # GradfenceWarning is an error in this test suite: a warning would fail here
    results = gf.evaluate(nn.Identity(), loader, {"err": lambda p, t: (p.argmax(1) != t).float()})
    assert results["err"] == 3 / 4  # rank 1 sees samples 1, 3, 5, 7: only sample 1 is right


class FakeTerminal(io.StringIO):
    def __init__(self, tty: bool) -> None:
        super().__init__()
        self._tty = tty

    def isatty(self) -> bool:
        return self._tty


@pytest.fixture
def stderr(monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    def install(tty: bool) -> FakeTerminal:
        stream = FakeTerminal(tty)
        monkeypatch.setattr(sys, "stderr", stream)
        return stream

    yield install


def run_quietly_or_not(progress: bool | None) -> None:
    gf.evaluate(
        nn.Identity(),
        identity_loader(batch_size=1),
        {"acc": MulticlassAccuracy(num_classes=3, average="micro")},
        loss=F.cross_entropy,
        progress=progress,
    )


def test_progress_is_off_when_stderr_is_not_a_terminal(stderr: Any) -> None:
    stream = stderr(False)
    run_quietly_or_not(None)
    assert stream.getvalue() == ""


def test_progress_bar_on_a_terminal(stderr: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    from gradfence.evaluation import progress

    monkeypatch.setattr(progress, "REDRAW_INTERVAL_S", 0.0)  # draw every batch
    monkeypatch.setattr(progress, "POSTFIX_INTERVAL_S", 0.0)
    stream = stderr(True)
    run_quietly_or_not(None)
    out = stream.getvalue()
    assert "evaluate" in out and "batch/s" in out
    assert "10/10" in out
    assert "loss=" in out and "acc=" in out  # running values in the postfix


@pytest.mark.parametrize(("tty", "forced"), [(False, True), (True, False)])
def test_progress_can_be_forced(stderr: Any, tty: bool, forced: bool) -> None:
    stream = stderr(tty)
    run_quietly_or_not(forced)
    assert ("batch/s" in stream.getvalue()) is forced


def test_bad_inputs_are_reported() -> None:
    with pytest.raises(EvaluationError, match="expects batches of"):
        gf.evaluate(nn.Identity(), [torch.ones(2, 3)])
    with pytest.raises(EvaluationError, match="named 'loss'"):
        gf.evaluate(nn.Identity(), [], {"loss": F.cross_entropy}, loss=F.cross_entropy)
    with pytest.raises(EvaluationError, match="pass a torchmetrics Metric"):
        gf.evaluate(nn.Identity(), [], {"acc": 0.5})  # type: ignore[dict-item]
    with pytest.raises(EvaluationError, match="shape"):
        gf.evaluate(nn.Identity(), identity_loader(), {"bad": lambda p, t: p})
    with pytest.raises(ScopeError, match="unknown mode"):
        gf.evaluate(nn.Identity(), [], mode="eval")  # type: ignore[arg-type]


@pytest.mark.parametrize("loader", [[], DataLoader(TensorDataset(LOGITS[:0], TARGETS[:0]))])
def test_an_empty_loader_is_an_error(loader: Any) -> None:
    # not {'acc': 0.0, 'loss': nan}: nothing was evaluated
    acc = MulticlassAccuracy(num_classes=3, average="micro")
    with pytest.raises(EvaluationError, match="the loader gave no batch"):
        gf.evaluate(nn.Identity(), loader, {"acc": acc}, loss=F.cross_entropy)


def test_one_metric_object_under_two_names_is_refused() -> None:
    metric = MulticlassAccuracy(num_classes=3)
    with pytest.raises(EvaluationError, match="same Metric object"):
        gf.evaluate(nn.Identity(), identity_loader(), {"a": metric, "b": metric})


def test_a_metric_collection_as_the_metrics_mapping() -> None:
    from torchmetrics import MetricCollection

    collection = MetricCollection({"acc": MulticlassAccuracy(num_classes=3, average="micro")})
    with pytest.raises(EvaluationError, match="MetricCollection"):
        gf.evaluate(nn.Identity(), identity_loader(), {"all": collection})
    results = gf.evaluate(nn.Identity(), identity_loader(), collection)  # type: ignore[arg-type]
    assert results == {"acc": pytest.approx(HAND_ACCURACY, abs=1e-7)}


def test_means_over_many_batches_of_different_sizes() -> None:
    # more batches than MeanSlot.CHUNK: the means are handed to MeanMetric in chunks
    generator = torch.Generator().manual_seed(0)
    sizes = [1 + i % 3 for i in range(150)]
    values = torch.randn(sum(sizes), generator=generator, dtype=torch.float64)
    batches = [(part, part) for part in values.split(sizes)]
    results = gf.evaluate(
        nn.Identity(),
        batches,
        {"per_sample": lambda p, t: p, "batch_mean": lambda p, t: p.mean()},
    )
    assert results["per_sample"] == pytest.approx(float(values.mean()), rel=1e-12)
    assert results["batch_mean"] == pytest.approx(float(values.mean()), rel=1e-12)


def test_a_nan_loss_is_reported_not_dropped() -> None:
    batches = [(torch.ones(2), torch.ones(2)), (torch.full((2,), math.nan), torch.ones(2))]
    results = gf.evaluate(nn.Identity(), batches, loss=lambda p, t: p)
    assert math.isnan(results["loss"])  # type: ignore[arg-type]


def test_called_inside_the_callers_inference_mode() -> None:
    # metric states created there are inference tensors: the results are read outside it
    acc = MulticlassAccuracy(num_classes=3, average="micro")
    with torch.inference_mode():
        metrics = {"acc": acc}
        mode = "inference_mode"
        results = gf.evaluate(
            nn.Identity(), identity_loader(), metrics, loss=F.cross_entropy, mode=mode
        )
        assert torch.is_inference_mode_enabled()
    assert results["acc"] == pytest.approx(HAND_ACCURACY, abs=1e-7)
    assert results["loss"] == pytest.approx(hand_cross_entropy(), rel=1e-6)
