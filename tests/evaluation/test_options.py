"""What Lightning's and Hugging Face's loops offer: limit_batches, return_predictions, autocast,
callback, and a warning when the loader leaves samples out; and metrics= in every form."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset
from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassAccuracy, MulticlassF1Score

import gradfence as gf
from gradfence.errors import DuplicateSamplesWarning, EvaluationError

LOGITS = torch.randn(10, 3, generator=torch.Generator().manual_seed(0))
TARGETS = torch.tensor([0, 1, 2, 0, 0, 2, 1, 2, 2, 1])
DATA = TensorDataset(LOGITS, TARGETS)


def loader(**kwargs: Any) -> DataLoader[Any]:
    kwargs.setdefault("batch_size", 4)
    return DataLoader(DATA, **kwargs)


def accuracy(logits: torch.Tensor, target: torch.Tensor) -> float:
    return float((logits.argmax(1) == target).float().mean())


def acc() -> MulticlassAccuracy:
    return MulticlassAccuracy(num_classes=3, average="micro")


# --- limit_batches ---------------------------------------------------------------------


@pytest.mark.parametrize(("limit", "samples"), [(1, 4), (2, 8), (5, 10), (0.5, 4), (1.0, 10)])
def test_limit_batches(limit: float, samples: int) -> None:
    results = gf.evaluate(nn.Identity(), loader(), {"acc": acc()}, limit_batches=limit)
    assert results["acc"] == pytest.approx(accuracy(LOGITS[:samples], TARGETS[:samples]))


@pytest.mark.parametrize("limit", [0, -1, 1.5, 0.0, True, "2"])
def test_a_bad_limit_is_an_error(limit: Any) -> None:
    with pytest.raises(EvaluationError, match="limit_batches="):
        gf.evaluate(nn.Identity(), loader(), limit_batches=limit)


def test_a_fraction_needs_a_length() -> None:
    batches = iter([(LOGITS, TARGETS)])
    with pytest.raises(EvaluationError, match="has no len"):
        gf.evaluate(nn.Identity(), batches, limit_batches=0.5)


# --- return_predictions ------------------------------------------------------------------


def test_predictions_are_not_returned_unless_asked() -> None:
    assert gf.evaluate(nn.Identity(), loader(), {"acc": acc()}).predictions is None


@pytest.mark.parametrize(
    "sampler",
    [
        None,
        gf.ShardedSampler(DATA, num_replicas=1, rank=0, shuffle=True, seed=3),
        DistributedSampler(DATA, num_replicas=1, rank=0, shuffle=True, seed=3),
    ],
)
def test_predictions_come_back_in_dataset_order(sampler: Any) -> None:
    results = gf.evaluate(
        nn.Identity(), loader(sampler=sampler), {"acc": acc()}, return_predictions=True
    )
    assert results.predictions is not None
    assert torch.equal(results.predictions, LOGITS)  # the identity model: preds == inputs
    assert results == {"acc": pytest.approx(accuracy(LOGITS, TARGETS))}  # still a plain dict


def test_predictions_of_a_plain_iterable_keep_its_order() -> None:
    batches = [(LOGITS[4:], TARGETS[4:]), (LOGITS[:4], TARGETS[:4])]
    results = gf.evaluate(nn.Identity(), batches, return_predictions=True)
    assert results.predictions is not None
    assert torch.equal(results.predictions, torch.cat([LOGITS[4:], LOGITS[:4]]))


def test_predictions_of_a_shuffling_loader_are_refused() -> None:
    # a RandomSampler's order cannot be replayed: the rows could not be matched to samples
    with pytest.raises(EvaluationError, match=r"a RandomSampler cannot be replayed: use shuffle"):
        gf.evaluate(nn.Identity(), loader(shuffle=True), return_predictions=True)


def test_predictions_with_limit_batches() -> None:
    results = gf.evaluate(nn.Identity(), loader(), limit_batches=2, return_predictions=True)
    assert results.predictions is not None and torch.equal(results.predictions, LOGITS[:8])


def test_predictions_must_be_tensors_of_one_shape() -> None:
    with pytest.raises(EvaluationError, match="one row per sample"):
        gf.evaluate(
            nn.Identity(),
            loader(),
            step=lambda m, b: ([1, 2], b[1]),
            return_predictions=True,
        )
    ragged = [(torch.ones(2, 3), torch.zeros(2)), (torch.ones(2, 4), torch.zeros(2))]
    with pytest.raises(EvaluationError, match="cannot be concatenated"):
        gf.evaluate(nn.Identity(), ragged, return_predictions=True)


# --- autocast --------------------------------------------------------------------------


class DtypeProbe(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.linear = nn.Linear(3, 3)
        self.seen: list[torch.dtype] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.linear(x)
        self.seen.append(out.dtype)
        return out


def test_autocast_bfloat16_on_cpu() -> None:
    model = DtypeProbe()
    full = gf.evaluate(model, loader(), {"acc": acc()}, loss=F.cross_entropy)
    assert model.seen == [torch.float32] * 3
    model.seen.clear()
    half = gf.evaluate(
        model,
        loader(),
        {"acc": acc()},
        loss=F.cross_entropy,
        autocast=torch.bfloat16,
        return_predictions=True,
    )
    assert model.seen == [torch.bfloat16] * 3  # the forward ran in bfloat16
    assert half.predictions is not None and half.predictions.dtype == torch.float32
    assert half["loss"] == pytest.approx(full["loss"], rel=2e-2)  # bfloat16: ~3 digits
    assert not torch.is_autocast_enabled("cpu")


@pytest.mark.parametrize("dtype", [torch.float32, torch.int8, "bfloat16", True])
def test_autocast_takes_a_half_precision_dtype(dtype: Any) -> None:
    with pytest.raises(EvaluationError, match="autocast="):
        gf.evaluate(nn.Identity(), loader(), autocast=dtype)


# --- callback ----------------------------------------------------------------------------


def test_callback_per_batch_inside_the_evaluation_modes() -> None:
    model = nn.Sequential(nn.Dropout(0.5))
    seen: list[tuple[int, int, bool, bool]] = []

    def callback(index: int, batch: Any, preds: Any, target: Any) -> None:
        assert preds is not batch[0] or not model.training
        seen.append((index, len(target), model.training, torch.is_grad_enabled()))

    gf.evaluate(model, loader(), callback=callback)
    assert seen == [(0, 4, False, False), (1, 4, False, False), (2, 2, False, False)]
    assert model.training


# --- samples left out ----------------------------------------------------------------------


def test_drop_last_that_drops_warns() -> None:
    with pytest.warns(DuplicateSamplesWarning, match=r"leaves out its last 2 of 10 samples"):
        results = gf.evaluate(nn.Identity(), loader(drop_last=True), {"acc": acc()})
    assert results["acc"] == pytest.approx(accuracy(LOGITS[:8], TARGETS[:8]))


def test_drop_last_that_drops_nothing_is_quiet() -> None:
    # GradfenceWarning is an error in this test suite: a warning would fail here
    gf.evaluate(nn.Identity(), loader(batch_size=5, drop_last=True), {"acc": acc()})


# --- metrics= in every form --------------------------------------------------------------


def test_one_metric_a_list_or_a_collection_named_from_the_class() -> None:
    expected = accuracy(LOGITS, TARGETS)
    assert gf.evaluate(nn.Identity(), loader(), acc()) == {
        "MulticlassAccuracy": pytest.approx(expected)
    }
    listed = gf.evaluate(nn.Identity(), loader(), [acc(), MulticlassF1Score(num_classes=3)])
    assert list(listed) == ["MulticlassAccuracy", "MulticlassF1Score"]
    collection = MetricCollection([acc(), MulticlassF1Score(num_classes=3)])
    assert gf.evaluate(nn.Identity(), loader(), collection) == pytest.approx(listed)


def test_metrics_of_the_wrong_kind_say_what_to_pass() -> None:
    with pytest.raises(EvaluationError, match=r"metrics= is a function: pass a dict"):
        gf.evaluate(nn.Identity(), loader(), F.cross_entropy)  # type: ignore[arg-type]
    with pytest.raises(EvaluationError, match=r"metrics= has two MulticlassAccuracys"):
        gf.evaluate(nn.Identity(), loader(), [acc(), acc()])
    with pytest.raises(EvaluationError, match=r"metrics\[1\] is a function: .*metrics=\{"):
        gf.evaluate(nn.Identity(), loader(), [acc(), F.cross_entropy])  # type: ignore[list-item]
    with pytest.raises(EvaluationError, match=r"metrics= is a int"):
        gf.evaluate(nn.Identity(), loader(), 3)  # type: ignore[arg-type]


def test_a_model_that_is_not_a_module_says_what_to_pass() -> None:
    with pytest.raises(EvaluationError, match=r"model= is a function, not a torch.nn.Module"):
        gf.evaluate(lambda x: x, loader())  # type: ignore[arg-type]
    with pytest.raises(EvaluationError, match=r"the order is gf.evaluate\(model, loader"):
        gf.evaluate(loader(), nn.Identity())  # type: ignore[arg-type]
    with pytest.raises(EvaluationError, match=r"loader= is a int: pass an iterable"):
        gf.evaluate(nn.Identity(), 3)  # type: ignore[arg-type]
