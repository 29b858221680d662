"""Bytes saved for backward, checked exactly against tensors counted by hand (torch 2.13).

What autograd saves, per op, for the models below (float32 unless said):
* ``addmm`` (nn.Linear on a 2-D input) saves ``mat1`` (its input) when the weight
  requires grad, and ``mat2`` (``weight.t()``, a parameter) when the input does;
* ``relu``, ``sigmoid`` and ``tanh`` save their result; ``sin`` saves its input;
* ``mul`` saves each operand for the other's gradient.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from gradfence.bench.builtins import build_cnn, build_mlp, cnn_input, mlp_input
from gradfence.bench.measure import SavedForBackward, saved_for_backward
from gradfence.modes import BENCH_MODES as MODES

F32 = 4


def stack() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 6), nn.Sigmoid(), nn.Linear(6, 3))


@pytest.mark.parametrize("training", [False, True])
def test_linear_stack_saves_exactly_its_activations(training: bool) -> None:
    # Linear(4,8) saves the input x (the caller's: not counted); ReLU saves its result
    # r (5x8); Linear(8,6) saves r again (same storage, counted once) and W2.t()
    # (a parameter); Sigmoid saves s (5x6); Linear(6,3) saves s again and W3.t().
    saved = saved_for_backward(stack(), torch.randn(5, 4), "grad", training=training)
    assert saved == SavedForBackward(bytes=5 * 8 * F32 + 5 * 6 * F32, storages=2)
    assert saved.bytes == 280


@pytest.mark.parametrize("mode", ["no_grad", "inference_mode"])
@pytest.mark.parametrize("training", [False, True])
def test_nothing_is_saved_without_grad(mode: str, training: bool) -> None:
    assert saved_for_backward(stack(), torch.randn(5, 4), mode, training=training) == (
        SavedForBackward(bytes=0, storages=0)
    )


def test_storages_the_caller_holds_are_not_counted() -> None:
    # ReLU saves its result, which is the output: held by the caller in every mode
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU())
    assert saved_for_backward(model, torch.randn(5, 4), "grad", training=False) == (
        SavedForBackward(bytes=0, storages=0)
    )


class SliceThenScale(nn.Module):
    """``h = lin(x)``; ``mul`` saves the view ``h[:, :2]``, which keeps all of h alive."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 8).double()
        self.scale = nn.Parameter(torch.ones(2, dtype=torch.float64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (self.lin(x)[:, :2] * self.scale).sum(dim=1)


def test_a_saved_view_counts_its_whole_storage() -> None:
    saved = saved_for_backward(
        SliceThenScale(), torch.randn(5, 4, dtype=torch.float64), "grad", training=False
    )
    assert saved == SavedForBackward(bytes=5 * 8 * 8, storages=1)  # all of h, float64


def test_mlp_builtin_by_hand() -> None:
    # eval: Dropout is the identity, so the saved storages are the two ReLU results
    batch = 2
    saved = saved_for_backward(build_mlp(), mlp_input(batch), "grad", training=False)
    assert saved == SavedForBackward(bytes=2 * batch * 1024 * F32, storages=2)


def test_mlp_builtin_in_train_mode_by_hand() -> None:
    # train, on CPU: each Dropout multiplies by a float noise tensor (saved by mul) and
    # yields a new tensor (saved by the next addmm): 3 storages of batch x 1024 per layer
    batch = 2
    saved = saved_for_backward(build_mlp(), mlp_input(batch), "grad", training=True)
    assert saved == SavedForBackward(bytes=6 * batch * 1024 * F32, storages=6)


def test_cnn_builtin_by_hand() -> None:
    # per sample: BN1 input and ReLU1 result (32x32x32 f32 each), MaxPool1 indices
    # (32x16x16 int64); conv2 input (32x16x16), BN2 input and ReLU2 result (64x16x16
    # each), MaxPool2 indices (64x8x8 int64); Linear input (4096). BN's running stats
    # are buffers and its save_mean/save_invstd are empty in eval: not counted.
    per_sample = (
        2 * 32 * 32 * 32 * F32
        + 32 * 16 * 16 * 8
        + 32 * 16 * 16 * F32
        + 2 * 64 * 16 * 16 * F32
        + 64 * 8 * 8 * 8
        + 4096 * F32
    )
    saved = saved_for_backward(build_cnn(), cnn_input(2), "grad", training=False)
    assert saved == SavedForBackward(bytes=2 * per_sample, storages=8)
    assert saved.bytes == 1_081_344


@pytest.mark.parametrize("mode", MODES)
def test_counting_leaves_modes_and_model_as_they_were(mode: str) -> None:
    model = stack()
    model[1].eval()
    flags = [m.training for m in model.modules()]
    with torch.no_grad():
        saved_for_backward(model, torch.randn(5, 4), mode, training=False)
        assert not torch.is_grad_enabled()
    assert torch.is_grad_enabled()
    assert not torch.is_inference_mode_enabled()
    assert [m.training for m in model.modules()] == flags
