"""The built-in models of ``gradfence bench``: a registry of name -> model and input factory.

Factories are given as ``"module:callable"`` strings, resolved only when a benchmark
uses them, so listing the names (``gradfence bench --help``) imports no torch. Adding a
model is one entry::

    BUILTINS["sentiment"] = Builtin(
        "DistilBERT-size sentiment classifier of gradfence serve",
        model="gradfence.serve.model:build_model",
        input="gradfence.serve.model:example_batch",
    )

``model`` is called with no arguments and returns an ``nn.Module``; ``input`` is called
with the batch size and returns the model input (a tensor, a list of texts, a tuple of
positional arguments, or a mapping of keyword arguments: see
:func:`gradfence.bench.measure.call`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch
    from torch import nn


@dataclass(frozen=True)
class Builtin:
    """One built-in model: a description and its two factories as ``module:callable``."""

    description: str
    model: str
    input: str


BUILTINS: dict[str, Builtin] = {
    "mlp": Builtin(
        "MLP 784-1024-1024-10 with ReLU and Dropout(0.1), float32 inputs of shape (B, 784)",
        model="gradfence.bench.builtins:build_mlp",
        input="gradfence.bench.builtins:mlp_input",
    ),
    "cnn": Builtin(
        "CNN conv32-BN-ReLU-pool, conv64-BN-ReLU-pool, Dropout(0.1), Linear(4096, 10); "
        "inputs of shape (B, 3, 32, 32)",
        model="gradfence.bench.builtins:build_cnn",
        input="gradfence.bench.builtins:cnn_input",
    ),
    "sentiment": Builtin(
        "gradfence serve's default sentiment model (all-MiniLM-L6-v2 encoder and a linear "
        "head; needs gradfence[serve]), inputs: lists of held-out tweets",
        model="gradfence.serve.model:load_default",
        input="gradfence.bench.builtins:sentiment_input",
    ),
}


def build_mlp() -> nn.Module:
    """The ``mlp`` built-in: two hidden layers of 1024 units."""
    from torch import nn

    return nn.Sequential(
        nn.Linear(784, 1024),
        nn.ReLU(),
        nn.Dropout(0.1),
        nn.Linear(1024, 1024),
        nn.ReLU(),
        nn.Dropout(0.1),
        nn.Linear(1024, 10),
    )


def mlp_input(batch_size: int) -> torch.Tensor:
    """A random batch for ``mlp``: shape ``(batch_size, 784)``."""
    import torch

    return torch.randn(batch_size, 784)


def build_cnn() -> nn.Module:
    """The ``cnn`` built-in: a small CIFAR-sized convolutional classifier."""
    from torch import nn

    return nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1),
        nn.BatchNorm2d(32),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1),
        nn.BatchNorm2d(64),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Dropout(0.1),
        nn.Linear(64 * 8 * 8, 10),
    )


def cnn_input(batch_size: int) -> torch.Tensor:
    """A random batch for ``cnn``: shape ``(batch_size, 3, 32, 32)``."""
    import torch

    return torch.randn(batch_size, 3, 32, 32)


def sentiment_input(batch_size: int) -> list[str]:
    """A batch for ``sentiment``: the first ``batch_size`` held-out tweets (repeated if needed)."""
    from gradfence.serve.data import load_tweets

    texts = [tweet.text for tweet in load_tweets("heldout")]
    return [texts[index % len(texts)] for index in range(batch_size)]
