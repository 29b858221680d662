"""The names ``gradfence eval`` knows: built-in models, datasets and metrics.

Models and datasets are *factories*: callables taking no argument that return an
``nn.Module`` or a dataset. ``--model``/``--data`` take a built-in name from
:data:`MODELS`/:data:`DATASETS`, or ``module.path:callable``, or
``path/to/file.py:callable``. Built-in models are registered once, for ``gradfence
bench`` too, in :data:`gradfence.builtin_models.BUILTIN_MODELS`; a built-in dataset is
its ``"module:callable"`` string here, so nothing is imported until it is used, e.g.
(the ``sentiment`` pair needs ``pip install 'gradfence[serve]'``)::

    DATASETS["sentiment-heldout"] = "gradfence.serve.model:heldout_dataset"

Batches are collated by the default ``DataLoader``: a dataset of ``(text, label)`` pairs
gives ``(list_of_texts, label_tensor)``, so such a model must take a list of strings and
return logits of shape ``(N, classes)``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from gradfence.builtin_models import BUILTIN_MODELS
from gradfence.factories import FORMS, resolve

# name -> "module:callable" returning an nn.Module (a view of the one registry)
MODELS: dict[str, str] = {name: entry.model for name, entry in BUILTIN_MODELS.items()}

# name -> "module:callable" returning a Dataset (or a DataLoader) of (inputs, target)
DATASETS: dict[str, str] = {
    "toy": "gradfence.evaluation.toy:toy_dataset",
    # its held-out tweets: (text, label) pairs never seen in training
    "sentiment-heldout": "gradfence.serve.model:heldout_dataset",
}


def load_factory(spec: str, builtins: dict[str, str], option: str) -> Callable[[], Any]:
    """Resolve a built-in name, ``module.path:callable`` or ``file.py:callable`` to a callable.

    Raises :class:`~gradfence.factories.FactoryError` with a one-line message naming
    ``option`` and ``spec``.
    """
    known = ", ".join(sorted(builtins)) or "none"
    forms = f"{FORMS} or a built-in name (built-in: {known})"
    factory: Callable[[], Any] = resolve(builtins.get(spec, spec), option, forms)
    return factory


@dataclass(frozen=True)
class NamedMetric:
    """A metric ``--metric NAME`` selects: how to build it and what it needs."""

    help: str
    build: Callable[[int | None], Any]
    needs_classes: bool = False
    is_loss: bool = False


def _accuracy(average: Literal["micro", "macro"]) -> Callable[[int | None], Any]:
    def build(num_classes: int | None) -> Any:
        from torchmetrics.classification import MulticlassAccuracy

        assert num_classes is not None
        return MulticlassAccuracy(num_classes=num_classes, average=average)

    return build


def _f1(num_classes: int | None) -> Any:
    from torchmetrics.classification import MulticlassF1Score

    assert num_classes is not None
    return MulticlassF1Score(num_classes=num_classes, average="macro")


def _cross_entropy(num_classes: int | None) -> Any:
    import torch.nn.functional as F

    return F.cross_entropy


def _mse(num_classes: int | None) -> Any:
    from torchmetrics.regression import MeanSquaredError

    return MeanSquaredError()


# name -> built-in metric; classification metrics read logits of shape (N, classes)
METRICS: dict[str, NamedMetric] = {
    "acc": NamedMetric("top-1 accuracy over all samples", _accuracy("micro"), needs_classes=True),
    "macro-acc": NamedMetric(
        "accuracy per class, averaged over classes", _accuracy("macro"), needs_classes=True
    ),
    "f1": NamedMetric("F1 score per class, averaged over classes", _f1, needs_classes=True),
    "loss": NamedMetric(
        "mean cross-entropy of the logits (reported as 'loss')", _cross_entropy, is_loss=True
    ),
    "mse": NamedMetric("mean squared error (regression)", _mse),
}

DEFAULT_METRICS: tuple[str, ...] = ("acc", "loss")
