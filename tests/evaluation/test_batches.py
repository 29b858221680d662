"""Batches of every common shape reach ``device=``; the default step reads Hugging Face batches.

The device under test is ``meta``: moving a tensor there is visible and costs nothing.
"""

from __future__ import annotations

import dataclasses
from collections import OrderedDict, defaultdict, namedtuple
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader
from torchmetrics.classification import MulticlassAccuracy

import gradfence as gf
from gradfence.batches import to_device
from gradfence.errors import EvaluationError

META = torch.device("meta")


@dataclasses.dataclass(frozen=True)
class Sample:
    x: torch.Tensor
    name: str
    cached: torch.Tensor = dataclasses.field(init=False, default_factory=lambda: torch.zeros(1))


class ReadOnly(Mapping[str, Any]):
    """A Mapping that is not a dict, built from one."""

    def __init__(self, data: dict[str, Any]) -> None:
        self._data = dict(data)

    def __getitem__(self, key: str) -> Any:
        return self._data[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)


class Graph:
    """A batch type with its own .to(), returning a moved copy."""

    def __init__(self, nodes: torch.Tensor) -> None:
        self.nodes = nodes

    def to(self, device: torch.device) -> Graph:
        return Graph(self.nodes.to(device))


class InPlace:
    """A .to() that moves in place and returns None."""

    def __init__(self, nodes: torch.Tensor) -> None:
        self.nodes = nodes

    def to(self, device: torch.device) -> None:
        self.nodes = self.nodes.to(device)


Pair = namedtuple("Pair", "x y")


def test_every_container_is_moved_with_its_type() -> None:
    t = torch.ones(2)
    counts: defaultdict[str, Any] = defaultdict(list, {"a": t})
    moved = to_device(
        {
            "pair": Pair(t, 3),
            "sample": Sample(t, "s"),
            "readonly": ReadOnly({"a": t, "b": "text"}),
            "ordered": OrderedDict(a=t),
            "counts": counts,
            "graph": Graph(t),
            "inplace": InPlace(t),
            "nested": [(t, {"deep": t})],
        },
        META,
    )
    assert isinstance(moved["pair"], Pair) and moved["pair"].x.is_meta and moved["pair"].y == 3
    sample = moved["sample"]
    assert isinstance(sample, Sample) and sample.x.is_meta and sample.name == "s"
    assert sample.cached.is_meta  # a field outside __init__ too
    readonly = moved["readonly"]
    assert isinstance(readonly, ReadOnly) and readonly["a"].is_meta and readonly["b"] == "text"
    assert isinstance(moved["ordered"], OrderedDict) and moved["ordered"]["a"].is_meta
    assert isinstance(moved["counts"], defaultdict) and moved["counts"]["a"].is_meta
    assert moved["counts"]["missing"] == []  # the default factory kept
    assert isinstance(moved["graph"], Graph) and moved["graph"].nodes.is_meta
    assert isinstance(moved["inplace"], InPlace) and moved["inplace"].nodes.is_meta
    assert moved["nested"][0][0].is_meta and moved["nested"][0][1]["deep"].is_meta
    assert not t.is_meta  # the batch itself is left alone


# --- Hugging Face: a real BertForSequenceClassification from a small config ----------

SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
WORDS = [*SPECIAL, "good", "bad", "movie", "the", "was", "great", "awful", "not", "plot"]
TEXTS = [
    "good movie",
    "the movie was awful",
    "bad",
    "great plot",
    "not good not great",
    "the plot was bad",
    "movie",
]
LABELS = [1, 0, 0, 1, 0, 0, 1]


@pytest.fixture(scope="module")
def hf(tmp_path_factory: pytest.TempPathFactory) -> Any:
    transformers = pytest.importorskip("transformers")
    vocab = Path(tmp_path_factory.mktemp("vocab")) / "vocab.txt"
    vocab.write_text("\n".join(WORDS) + "\n")
    tokenizer = transformers.BertTokenizerFast(vocab_file=str(vocab))
    features = [
        {**tokenizer(text), "label": label} for text, label in zip(TEXTS, LABELS, strict=True)
    ]
    loader = DataLoader(
        features,  # type: ignore[arg-type]
        batch_size=3,
        collate_fn=transformers.DataCollatorWithPadding(tokenizer),
    )
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=len(WORDS),
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        num_labels=2,
        hidden_dropout_prob=0.5,  # evaluated in train mode, results would be random
    )
    model = transformers.BertForSequenceClassification(config)
    return transformers, loader, model


def test_a_hf_model_on_collated_batches(hf: Any) -> None:
    transformers, loader, model = hf
    first = next(iter(loader))
    assert isinstance(first, transformers.BatchEncoding) and not isinstance(first, dict)

    acc = MulticlassAccuracy(num_classes=2, average="micro")
    results = gf.evaluate(model, loader, {"acc": acc})

    # by hand: eval mode, no grad, the model's own loss weighted by the batch size
    model.eval()
    right, loss_sum = 0, 0.0
    with torch.no_grad():
        for batch in loader:
            out = model(**batch)
            right += int((out.logits.argmax(1) == batch["labels"]).sum())
            loss_sum += float(out.loss) * len(batch["labels"])
    model.train()
    assert list(results) == ["acc", "loss"]  # .logits for the metrics, .loss as "loss"
    assert results["acc"] == pytest.approx(right / len(TEXTS), abs=1e-7)
    assert results["loss"] == pytest.approx(loss_sum / len(TEXTS), rel=1e-6)
    assert model.training  # and dropout was off inside: the hand results match


def test_a_loss_function_wins_over_the_models_loss(hf: Any) -> None:
    _, loader, model = hf
    results = gf.evaluate(model, loader, loss=lambda p, t: torch.zeros(len(t)))
    assert results == {"loss": 0.0}


def test_collated_batches_are_moved_to_the_device(hf: Any) -> None:
    transformers, loader, model = hf
    seen: list[Any] = []
    gf.evaluate(
        model,
        loader,
        device="meta",
        step=lambda m, batch: (torch.zeros(2), torch.zeros(2)),
        callback=lambda index, batch, preds, target: seen.append(batch),
    )
    assert len(seen) == 3
    for batch in seen:
        assert isinstance(batch, transformers.BatchEncoding)
        assert all(value.is_meta for value in batch.values())


class DictOutput(nn.Module):
    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"scores": x}


def test_what_the_default_step_cannot_read_names_step() -> None:
    x, y = torch.eye(3), torch.arange(3)
    acc = MulticlassAccuracy(num_classes=3)
    with pytest.raises(EvaluationError, match=r"got a dict from the model.*pass step="):
        gf.evaluate(DictOutput(), [(x, y)], {"acc": acc})
    with pytest.raises(EvaluationError, match=r"no 'labels' \(keys: 'x', 'y'\).*pass step="):
        gf.evaluate(nn.Identity(), [{"x": x, "y": y}], {"acc": acc})
    with pytest.raises(EvaluationError, match=r"expects batches of.*got a list of 3.*pass step="):
        gf.evaluate(nn.Identity(), [[x, y, y]], {"acc": acc})
    with pytest.raises(EvaluationError, match=r"step= returned a Tensor"):
        gf.evaluate(nn.Identity(), [(x, y)], {"acc": acc}, step=lambda m, b: m(b[0]))


def test_a_custom_step_giving_a_metric_no_tensors_is_an_evaluation_error() -> None:
    # torchmetrics itself raises AttributeError: 'dict' object has no attribute ...
    x, y = torch.eye(3), torch.arange(3)
    acc = MulticlassAccuracy(num_classes=3)
    with pytest.raises(EvaluationError, match=r"metric 'acc' .*preds of type dict.*step="):
        gf.evaluate(nn.Identity(), [(x, y)], {"acc": acc}, step=lambda m, b: ({"p": b[0]}, b[1]))


def test_a_step_may_return_its_loss() -> None:
    x, y = torch.eye(3), torch.arange(3)
    data = [(x, y), (x[:1], y[:1])]

    def step(m: nn.Module, batch: Any) -> tuple[Any, Any, Any]:
        logits = m(batch[0])
        return logits, batch[1], F.cross_entropy(logits, batch[1])

    results = gf.evaluate(nn.Identity(), data, step=step)
    expected = (3 * float(F.cross_entropy(x, y)) + float(F.cross_entropy(x[:1], y[:1]))) / 4
    assert results == {"loss": pytest.approx(expected, rel=1e-6)}
