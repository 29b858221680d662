"""The ``toy`` built-ins of ``gradfence eval``: three Gaussian blobs and a classifier for them.

Small and deterministic, so ``gradfence eval --model toy --data toy`` shows the
command without any download or training.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import TensorDataset

CENTRES = torch.tensor([[2.0, 0.0], [-1.0, 1.7], [-1.0, -1.7]])


def toy_model() -> nn.Module:
    """A nearest-centre classifier for the toy blobs (logits = c·x - |c|²/2), with dropout.

    The dropout is there to make the point: evaluating it in train mode gives different,
    worse, random results.
    """
    linear = nn.Linear(2, len(CENTRES))
    with torch.no_grad():
        linear.weight.copy_(CENTRES)
        linear.bias.copy_(-(CENTRES**2).sum(dim=1) / 2)
    return nn.Sequential(nn.Dropout(0.5), linear)


def toy_dataset(size: int = 500, seed: int = 0) -> TensorDataset:
    """``size`` points around the three centres (unit variance), labelled by their centre."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, len(CENTRES), (size,), generator=generator)
    points = CENTRES[labels] + torch.randn(size, 2, generator=generator)
    return TensorDataset(points, labels)
