"""The names ``gradfence eval`` knows: built-in models, datasets and metrics.

Models and datasets are *factories*: callables taking no argument that return an
``nn.Module`` or a dataset. ``--model``/``--data`` take a built-in name from
:data:`MODELS`/:data:`DATASETS`, or ``module.path:callable``, or
``path/to/file.py:callable``. A built-in is registered by adding its
``"module:callable"`` string here, so nothing is imported until it is used, e.g.
(the ``sentiment`` pair needs ``pip install 'gradfence[serve]'``)::

    MODELS["sentiment"] = "gradfence.serve.model:load_default"
    DATASETS["sentiment-heldout"] = "gradfence.serve.model:heldout_dataset"

Batches are collated by the default ``DataLoader``: a dataset of ``(text, label)`` pairs
gives ``(list_of_texts, label_tensor)``, so such a model must take a list of strings and
return logits of shape ``(N, classes)``.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from gradfence.errors import GradfenceError

# name -> "module:callable" returning an nn.Module
MODELS: dict[str, str] = {
    "toy": "gradfence.evaluation.toy:toy_model",
    # gradfence serve's default model: texts -> logits (negative, neutral, positive)
    "sentiment": "gradfence.serve.model:load_default",
}

# name -> "module:callable" returning a Dataset (or a DataLoader) of (inputs, target)
DATASETS: dict[str, str] = {
    "toy": "gradfence.evaluation.toy:toy_dataset",
    # its held-out tweets: (text, label) pairs never seen in training
    "sentiment-heldout": "gradfence.serve.model:heldout_dataset",
}


class FactoryError(GradfenceError, ValueError):
    """A ``--model``/``--data`` factory cannot be found, imported or called as given."""


def load_factory(spec: str, builtins: dict[str, str], option: str) -> Callable[[], Any]:
    """Resolve a built-in name, ``module.path:callable`` or ``file.py:callable`` to a callable.

    Raises :class:`FactoryError` with a one-line message naming ``option`` and ``spec``.
    """
    target = builtins.get(spec, spec)
    location, colon, attribute = target.rpartition(":")
    if not colon or not location or not attribute:
        known = ", ".join(sorted(builtins)) or "none"
        raise FactoryError(
            f"{option} {spec!r}: expected MODULE:FACTORY, path/to/file.py:FACTORY or a "
            f"built-in name (built-in: {known})"
        )
    module = _import(location, option, spec)
    value: Any = module
    for part in attribute.split("."):
        try:
            value = getattr(value, part)
        except AttributeError:
            raise FactoryError(
                f"{option} {spec!r}: {location!r} has no attribute {attribute!r}"
            ) from None
    if not callable(value):
        raise FactoryError(
            f"{option} {spec!r}: {attribute!r} is a {type(value).__name__}, not a callable"
        )
    factory: Callable[[], Any] = value
    return factory


def _import(location: str, option: str, spec: str) -> Any:
    is_file = location.endswith(".py") or "/" in location or os.sep in location
    try:
        if is_file:
            return _import_file(Path(location))
        # Like `python -m`, let MODULE be a module in the current directory.
        if "" not in sys.path and os.getcwd() not in sys.path:
            sys.path.insert(0, os.getcwd())
        return importlib.import_module(location)
    except Exception as exc:  # any failure to import is bad input: one line, exit 2
        detail = str(exc).splitlines()[0] if str(exc) else ""
        raise FactoryError(
            f"{option} {spec!r}: cannot import {location!r}: {type(exc).__name__}: {detail}"
        ) from None


def _import_file(path: Path) -> Any:
    if not path.is_file():
        raise FileNotFoundError(f"no such file: {path}")
    name = f"gradfence_eval_factory_{path.stem}"
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load {path} as a Python module")
    module = importlib.util.module_from_spec(spec)
    # Registered before running it (dataclasses and pickling look modules up by name),
    # and its folder importable, so the file can import its neighbours.
    sys.modules[name] = module
    folder = str(path.resolve().parent)
    if folder not in sys.path:
        sys.path.insert(0, folder)
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(name, None)
        raise
    return module


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
