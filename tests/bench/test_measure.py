"""The measuring pieces of ``gradfence bench``: scopes, inputs, latency, peak RSS, train vs eval."""

from __future__ import annotations

import collections
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from gradfence.batches import map_tensors, tensors_in, to_device
from gradfence.bench.measure import (
    Latency,
    MeasurementError,
    call,
    compare_train_eval,
    peak_cpu_in_child,
    peak_rss,
    scope,
    time_modes,
)
from gradfence.bench.workload import Workload
from gradfence.modes import BENCH_MODES as MODES


def model_with_frozen_bn() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Dropout(0.5), nn.Linear(4, 2))
    model[1].eval()
    return model


@pytest.mark.parametrize(
    ("mode", "training", "grad", "inference"),
    [
        ("grad", False, True, False),
        ("no_grad", False, False, False),
        ("inference_mode", False, False, True),
        ("grad", True, True, False),
        ("no_grad", True, False, False),
        ("inference_mode", True, False, True),
    ],
)
def test_scope_sets_module_and_grad_mode_and_restores_both(
    mode: str, training: bool, grad: bool, inference: bool
) -> None:
    model = model_with_frozen_bn()
    before = [m.training for m in model.modules()]
    with torch.no_grad(), scope(model, mode, training):
        assert torch.is_grad_enabled() is grad
        assert torch.is_inference_mode_enabled() is inference
        assert model.training is training
        assert model[2].training is training
    assert [m.training for m in model.modules()] == before
    assert torch.is_grad_enabled()


def test_scope_rejects_an_unknown_mode() -> None:
    with pytest.raises(ValueError, match="unknown mode 'eval'"):
        scope(nn.Linear(1, 1), "eval", False)


def test_inputs_tuple_is_positional_mapping_is_keywords() -> None:
    class Two(nn.Module):
        def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
            return a - b

    one, two = torch.tensor([1.0]), torch.tensor([3.0])
    assert call(Two(), (one, two)).item() == -2.0
    assert call(Two(), {"b": one, "a": two}).item() == 2.0
    assert call(nn.Identity(), one) is one
    nested: Any = {"x": (one, [two, "text"]), "y": 3}
    assert tensors_in(nested) == [one, two]
    moved = to_device(nested, "cpu")
    assert moved["x"][1][1] == "text" and moved["y"] == 3
    pair = collections.namedtuple("pair", "a b")
    moved_pair = to_device(pair(one, two), "cpu")
    assert type(moved_pair) is pair and moved_pair.b is two


def test_walking_a_batch_rebuilds_only_when_mapping() -> None:
    class Odd(list[Any]):  # a list type that cannot be rebuilt from its items
        def __init__(self, first: Any, second: Any) -> None:
            super().__init__([first, second])

    one, two = torch.tensor([1.0]), torch.tensor([3.0])
    assert tensors_in(Odd(one, {"k": two})) == [one, two]
    doubled = map_tensors({"a": [one, (two, "t")]}, lambda t: t * 2)
    assert doubled["a"][0].item() == 2.0 and doubled["a"][1] == (doubled["a"][1][0], "t")
    assert doubled["a"][1][0].item() == 6.0


def test_latency_median_and_p95() -> None:
    latency = Latency(tuple(float(v) for v in range(1, 21)))  # 1..20
    assert latency.median_s == 10.5
    assert latency.p95_s == pytest.approx(19.05)
    assert Latency((0.25,)).p95_s == 0.25


def test_time_modes_interleaves_and_counts_every_call() -> None:
    calls: list[tuple[bool, bool]] = []

    class Recorder(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            calls.append((torch.is_grad_enabled(), torch.is_inference_mode_enabled()))
            return x * 2

    steps: list[int] = []
    result = time_modes(
        Recorder(), torch.ones(2), MODES, training=False, repeats=4, device="cpu",
        advance=steps.append,
    )  # fmt: skip
    assert {mode: len(lat.samples_s) for mode, lat in result.items()} == dict.fromkeys(MODES, 4)
    assert all(sample > 0 for lat in result.values() for sample in lat.samples_s)
    assert steps == [3, 3, 3, 3]
    warmup, timed = calls[:15], calls[15:]
    assert warmup == [(True, False)] * 5 + [(False, False)] * 5 + [(False, True)] * 5
    grad, no_grad, inference = (True, False), (False, False), (False, True)
    # rounds rotate the order: no mode always runs first
    assert timed == [
        grad, no_grad, inference,
        no_grad, inference, grad,
        inference, grad, no_grad,
        grad, no_grad, inference,
    ]  # fmt: skip


def test_peak_rss_sees_a_64_mib_allocation() -> None:
    size = 64 * 1024 * 1024
    peak = peak_rss(lambda: torch.ones(size // 4))
    assert peak.method in {"cpu_rss_child_vmhwm", "cpu_rss_child_ru_maxrss"}
    assert peak.baseline_bytes > 0
    assert peak.delta_bytes >= size


def test_train_eval_outputs_differ_with_dropout_and_model_is_untouched() -> None:
    model = model_with_frozen_bn()
    model[1].train()  # BN in train mode too: its running stats would move
    model[1].running_mean.fill_(0.5)
    flags = [m.training for m in model.modules()]
    batch = torch.randn(8, 4)
    rng = torch.random.get_rng_state()
    comparison = compare_train_eval(model, batch, "cpu")
    assert comparison.outputs_differ is True
    assert comparison.max_abs_diff is not None and comparison.max_abs_diff > 0
    assert comparison.mode_dependent_modules == {"BatchNorm1d": 1, "Dropout": 1}
    assert "eval() is about correctness, not speed" in comparison.note()
    assert torch.equal(model[1].running_mean, torch.full((4,), 0.5))
    assert [m.training for m in model.modules()] == flags
    assert torch.equal(torch.random.get_rng_state(), rng)


def test_train_eval_identical_without_mode_dependent_layers() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
    comparison = compare_train_eval(model, torch.randn(3, 4), "cpu")
    assert (comparison.outputs_differ, comparison.max_abs_diff) == (False, 0.0)
    assert comparison.note() == "outputs are identical in train and eval mode"


def test_train_eval_reports_a_failing_train_forward() -> None:
    # BatchNorm cannot normalise a batch of one in train mode
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))
    comparison = compare_train_eval(model, torch.randn(1, 4), "cpu")
    assert comparison.outputs_differ is None
    assert comparison.note().startswith("train-mode forward failed, outputs not compared: ")
    assert "Expected more than 1 value per channel" in comparison.note()


def test_a_failing_probe_child_is_one_measurement_error(tmp_path: Path) -> None:
    models = tmp_path / "models.py"
    models.write_text("def build():\n    raise OSError('no weights here')\n")
    workload = Workload("bad", f"{models}:build", "gradfence.bench.builtins:mlp_input")
    with pytest.raises(MeasurementError) as caught:
        peak_cpu_in_child(workload, 2, "grad", training=False, threads=1)
    assert str(caught.value) == (
        "peak-memory probe for mode grad, batch size 2 failed: gradfence bench probe: "
        f"factory {models}:build raised OSError: no weights here"
    )


def test_peak_rss_falls_back_to_getrusage_when_the_reset_does_not_take(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from gradfence.bench import measure

    # a high-water mark far above the current RSS right after the reset: it did not take
    fake = {"VmRSS": 100 * 2**20, "VmHWM": 900 * 2**20}
    monkeypatch.setattr(measure, "_proc_status", fake.__getitem__)
    peak = peak_rss(lambda: None)
    assert peak.method == "cpu_rss_child_ru_maxrss"
    assert peak.peak_bytes >= peak.baseline_bytes > 0
