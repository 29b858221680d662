"""Factories of the built-in models that ``gradfence bench`` measures, and their inputs.

The registry naming them is :data:`gradfence.builtin_models.BUILTIN_MODELS` (shared with
``gradfence eval``). An input factory takes the batch size and returns the model input
(see :func:`gradfence.bench.measure.call`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch
    from torch import nn


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


def toy_input(batch_size: int) -> torch.Tensor:
    """A random batch for ``toy``: points of shape ``(batch_size, 2)``."""
    import torch

    return torch.randn(batch_size, 2)


def sentiment_input(batch_size: int) -> list[str]:
    """A batch for ``sentiment``: the first ``batch_size`` held-out tweets (repeated if needed)."""
    from gradfence.serve.data import load_tweets

    texts = [tweet.text for tweet in load_tweets("heldout")]
    return [texts[index % len(texts)] for index in range(batch_size)]
