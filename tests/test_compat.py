"""Pins the PyTorch behaviour gradfence.compat relies on, on the installed torch.

When a PyTorch upgrade fails one of these, the fix goes in ``gradfence/compat.py`` (the
function named in the test), and nowhere else.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from gradfence import compat


def tree() -> nn.Module:
    root = nn.Module()
    root.add_module("a", nn.Linear(1, 1))
    root.add_module("none", None)
    root.add_module("b", nn.Sequential(nn.Dropout()))
    return root


# children ---------------------------------------------------------------------------


def test_children_are_the_registered_modules_in_order_with_none() -> None:
    root = tree()
    assert list(compat.children(root)) == [root.a, None, root.b]
    assert [m for m in compat.children(root) if m is not None] == list(root.children())
    root.c = nn.ReLU()  # assignment registers too
    assert list(compat.children(root))[-1] is root.c


def test_children_list_a_module_registered_twice_twice() -> None:
    root = nn.Module()
    shared = nn.ReLU()
    root.add_module("x", shared)
    root.add_module("y", shared)
    assert list(compat.children(root)) == [shared, shared]
    assert list(root.children()) == [shared]  # the public one de-duplicates


# the training flag --------------------------------------------------------------------


def test_training_is_an_instance_attribute_not_a_class_attribute() -> None:
    assert not any("training" in vars(klass) for klass in nn.Module.__mro__)
    assert nn.Dropout().__dict__["training"] is True


def test_assigning_training_only_stores_it_in_the_instance_dict() -> None:
    assigned, written = nn.BatchNorm1d(2), nn.BatchNorm1d(2)
    assigned.training = False
    compat.write_training(written, False)
    assert assigned.__dict__.keys() == written.__dict__.keys()
    assert assigned.training is written.training is False


def test_plain_training_attribute_detection() -> None:
    class Plain(nn.Linear):
        pass

    class Property(nn.Module):
        @property  # type: ignore[override]
        def training(self) -> bool:
            return True

        @training.setter
        def training(self, mode: bool) -> None:
            pass

    class Setattr(nn.Module):
        def __setattr__(self, name: str, value: object) -> None:
            super().__setattr__(name, value)

    assert compat.has_plain_training_attribute(nn.Module)
    assert compat.has_plain_training_attribute(Plain)
    assert not compat.has_plain_training_attribute(Property)
    assert not compat.has_plain_training_attribute(Setattr)


# how nn.Module.train recurses ----------------------------------------------------------


def test_module_train_sets_itself_then_calls_each_child_train_on_the_instance() -> None:
    assert compat.train_recursion_looks_up_instances()
    root = tree()
    calls: list[tuple[str, bool, bool]] = []

    def recorder(name: str, module: nn.Module) -> object:
        def train(mode: bool = True) -> nn.Module:
            calls.append((name, mode, root.training))
            return module

        return train

    for name, child in root.named_children():
        child.__dict__["train"] = recorder(name, child)
    nn.Module.train(root, False)
    assert calls == [("a", False, False), ("b", False, False)]


def test_module_eval_is_train_false() -> None:
    class Recording(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.modes: list[bool] = []

        def train(self, mode: bool = True) -> Recording:
            self.modes.append(mode)
            return super().train(mode)

    module = Recording()
    module.eval()
    assert module.modes == [False]


def test_module_train_rejects_non_bool() -> None:
    with pytest.raises(ValueError, match="boolean"):
        nn.Module.train(nn.ReLU(), 1)  # type: ignore[arg-type]


# module state ------------------------------------------------------------------------


def test_direct_parameters_and_buffers_are_one_level_with_none() -> None:
    bn = nn.BatchNorm1d(2, affine=False)
    assert dict(compat.direct_parameters(bn)) == {"weight": None, "bias": None}
    assert set(dict(compat.direct_buffers(bn))) == {
        "running_mean",
        "running_var",
        "num_batches_tracked",
    }
    seq = nn.Sequential(nn.Linear(1, 1))
    assert dict(compat.direct_parameters(seq)) == {}
    assert dict(compat.direct_buffers(seq)) == {}
    linear = seq[0]
    assert dict(compat.direct_parameters(linear)) == {
        "weight": linear.weight,
        "bias": linear.bias,
    }


def test_forward_pre_hooks_are_the_registered_objects_in_order() -> None:
    linear = nn.Linear(2, 2)
    assert not compat.forward_pre_hooks(linear)

    def first(module: nn.Module, args: object) -> None:
        return None

    def second(module: nn.Module, args: object) -> None:
        return None

    linear.register_forward_pre_hook(first)
    handle = linear.register_forward_pre_hook(second)
    assert list(compat.forward_pre_hooks(linear)) == [first, second]
    handle.remove()
    assert list(compat.forward_pre_hooks(linear)) == [first]


def test_weight_norm_registers_its_weight_norm_object_as_the_pre_hook() -> None:
    from torch.nn.utils.weight_norm import WeightNorm

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # deprecated for parametrizations
        linear = torch.nn.utils.weight_norm(nn.Linear(2, 2))
    (hook,) = compat.forward_pre_hooks(linear)
    assert isinstance(hook, WeightNorm) and hook.name == "weight"


# tensor versions ------------------------------------------------------------------


def test_version_counts_in_place_operations_only() -> None:
    tensor = torch.zeros(2)
    before = compat.version(tensor)
    _ = tensor + 1
    assert compat.version(tensor) == before
    tensor.add_(1)
    assert compat.version(tensor) == before + 1
    tensor.view(2).mul_(2)  # a view shares the counter
    assert compat.version(tensor) == before + 2


def test_inference_tensors_have_no_version() -> None:
    with torch.inference_mode():
        tensor = torch.zeros(2)
    with pytest.raises(RuntimeError):
        compat.version(tensor)


# compiled modules -----------------------------------------------------------------


def test_compiled_in_place_after_module_compile() -> None:
    linear = nn.Linear(1, 1)
    assert not compat.compiled_in_place(linear)
    linear.compile()  # compiles lazily, at the first call: nothing is traced here
    assert compat.compiled_in_place(linear)
    assert not compat.is_compile_wrapper(linear)


def test_torch_compile_of_a_module_returns_the_wrapper() -> None:
    linear = nn.Linear(1, 1)
    wrapper = torch.compile(linear)
    assert isinstance(wrapper, nn.Module)
    assert compat.is_compile_wrapper(wrapper)
    assert not compat.is_compile_wrapper(linear)
    assert not compat.compiled_in_place(wrapper)


# public grad-mode behaviour the scope builds on (not private, but load-bearing) ------


def test_set_grad_enabled_as_a_call_applies_the_mode() -> None:
    torch.set_grad_enabled(False)
    try:
        assert not torch.is_grad_enabled()
    finally:
        torch.set_grad_enabled(True)
    assert torch.is_grad_enabled()


def test_exiting_inference_mode_restores_the_grad_mode_before_it() -> None:
    with torch.no_grad():
        guard = torch.inference_mode()
        guard.__enter__()
        assert torch.is_inference_mode_enabled()
        guard.__exit__(None, None, None)
        assert not torch.is_grad_enabled() and not torch.is_inference_mode_enabled()
