"""gf.inference / gf.training on real models (issue 12, items 1-3).

Hugging Face models override ``train()``/``eval()`` on the class; latent-diffusion code
overrides ``train`` on an instance; MC-dropout code overrides ``eval`` on an instance;
some wrappers make ``training`` a property. Wherever a module says otherwise, the scope
must do exactly what ``model.eval()`` / ``model.train()`` do, and still restore every
flag exactly, also when scopes close out of order and while decorated coroutines and
generators are suspended.
"""

from __future__ import annotations

import asyncio
import copy
import gc
import threading
import types
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import gradfence as gf

transformers = pytest.importorskip("transformers")


def small_bert(dropout: float = 0.1) -> nn.Module:
    config = transformers.BertConfig(
        vocab_size=64,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=24,
        max_position_embeddings=32,
        hidden_dropout_prob=dropout,
        attention_probs_dropout_prob=dropout,
    )
    torch.manual_seed(0)
    model: nn.Module = transformers.BertModel(config)
    return model.train()


def flags(model: nn.Module) -> dict[str, bool]:
    return {name: m.training for name, m in model.named_modules()}


def held_flags(model: nn.Module, prefix: str) -> dict[str, bool]:
    return {name: v for name, v in flags(model).items() if name.startswith(prefix)}


def after(model: nn.Module, switch: Callable[[nn.Module], Any]) -> dict[str, bool]:
    """The flags ``switch`` (e.g. ``nn.Module.eval``) leaves on a copy of ``model``."""
    twin = copy.deepcopy(model)
    switch(twin)
    return flags(twin)


def ids() -> torch.Tensor:
    return torch.tensor([[1, 5, 9, 13, 2, 7, 3, 11]])


# 1. out-of-order close on models that override train() -------------------------------


def test_bert_overrides_train_so_restore_goes_through_the_class() -> None:
    model = small_bert()
    assert type(model).train is not nn.Module.train  # PreTrainedModel.train


def test_bert_out_of_order_close_in_two_threads_keeps_the_open_scope() -> None:
    model = small_bert()
    model.encoder.layer[1].output.dropout.eval()  # a frozen part, restored exactly
    before = flags(model)
    a_in, b_in, a_out, b_checked = (threading.Event() for _ in range(4))
    seen: dict[str, object] = {}

    def thread_a() -> None:
        with gf.inference(model):
            a_in.set()
            b_in.wait(5)
        a_out.set()

    def thread_b() -> None:
        a_in.wait(5)
        with gf.inference(model.encoder):
            b_in.set()
            a_out.wait(5)  # A has closed, through BertModel.train(True)
            seen["encoder"] = held_flags(model, "encoder")
            seen["root"] = model.training
            seen["grad"] = torch.is_grad_enabled()
        b_checked.set()

    threads = [threading.Thread(target=thread_a), threading.Thread(target=thread_b)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert seen["encoder"] == dict.fromkeys(held_flags(model, "encoder"), False), (
        "A's restore flipped modules of B's open scope back to train"
    )
    assert seen["root"] is True, "A closed: the parts only A held are A's again"
    assert seen["grad"] is False
    assert flags(model) == before


def test_bert_out_of_order_close_in_one_thread() -> None:
    model = small_bert()
    model.pooler.eval()
    before = flags(model)
    outer, inner = gf.inference(model), gf.inference(model.encoder)
    outer.__enter__()
    inner.__enter__()
    outer.__exit__(None, None, None)
    try:
        assert not any(held_flags(model, "encoder").values()), "inner scope lost its eval"
        assert model.training and model.embeddings.training and not model.pooler.training
        assert not torch.is_grad_enabled()
    finally:
        inner.__exit__(None, None, None)
    assert flags(model) == before and torch.is_grad_enabled()


def test_out_of_order_close_never_flips_a_held_module_even_briefly() -> None:
    """A's restore runs BertModel.train(True); B's modules are not switched at all."""
    model = small_bert()
    watched = FlagProperty()  # records every assignment to its flag
    model.encoder.layer[0].output.add_module("watched", watched)
    outer, inner = gf.inference(model), gf.inference(model.encoder)
    outer.__enter__()
    inner.__enter__()
    watched.switches.clear()
    outer.__exit__(None, None, None)
    try:
        assert watched.switches == [], "a module held by the open scope was switched"
    finally:
        inner.__exit__(None, None, None)
    assert watched.switches == [True] and model.encoder.training


def test_bert_out_of_order_close_of_training_scopes() -> None:
    model = small_bert().eval()
    before = flags(model)
    outer, inner = gf.training(model), gf.training(model.encoder.layer[0])
    outer.__enter__()
    inner.__enter__()
    outer.__exit__(None, None, None)  # restores eval through BertModel.eval()
    try:
        assert all(held_flags(model, "encoder.layer.0").values()), "inner scope lost its train"
        assert not model.training and not model.encoder.layer[1].training
        assert torch.is_grad_enabled()
    finally:
        inner.__exit__(None, None, None)
    assert flags(model) == before


# 2. instance overrides and training properties ---------------------------------------


def disabled_train(self: nn.Module, mode: bool = True) -> nn.Module:
    """The latent-diffusion helper: assigned as ``module.train`` to pin a part in eval."""
    return self


def latent_diffusion_shaped() -> nn.Module:
    model = nn.Module()
    model.first_stage_model = nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.5)).eval()
    model.first_stage_model.train = disabled_train  # as in ldm/models/diffusion/ddpm.py
    model.head = nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.5))
    return model.eval()


def bert_with_disabled_encoder() -> nn.Module:
    model = small_bert().eval()
    model.encoder.train = disabled_train
    return model


@pytest.mark.parametrize("build", [latent_diffusion_shaped, bert_with_disabled_encoder])
def test_instance_train_override_is_honoured_by_training(build: Callable[[], nn.Module]) -> None:
    model = build()
    before = flags(model)
    expected = after(model, nn.Module.train)
    assert not all(expected.values()), "the override pins a part in eval under model.train()"
    with gf.training(model):
        assert flags(model) == expected
    assert flags(model) == before


def mc_dropout_eval(self: nn.Module) -> nn.Module:
    """MC dropout: eval() everywhere except the dropout layers."""
    nn.Module.train(self, False)
    for module in self.modules():
        if isinstance(module, nn.Dropout):
            module.train()
    return self


def mc_dropout_mlp() -> nn.Module:
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Dropout(0.5))
    model.eval = types.MethodType(mc_dropout_eval, model)
    return model


def mc_dropout_bert() -> nn.Module:
    model = small_bert()
    model.eval = types.MethodType(mc_dropout_eval, model)
    return model


@pytest.mark.parametrize("build", [mc_dropout_mlp, mc_dropout_bert])
def test_instance_eval_override_is_honoured_by_inference(build: Callable[[], nn.Module]) -> None:
    model = build()
    before = flags(model)
    expected = after(model, lambda m: m.eval())
    assert any(expected.values()), "MC dropout keeps dropout on under model.eval()"
    with gf.inference(model):
        assert flags(model) == expected
    assert flags(model) == before


class FlagProperty(nn.Module):
    """A module whose ``training`` is a property (stored elsewhere, with a side effect)."""

    def __init__(self) -> None:
        self.switches: list[bool] = []
        super().__init__()
        self.inner = nn.Dropout(0.5)

    @property  # type: ignore[override]
    def training(self) -> bool:
        return bool(self.__dict__["_mode"])

    @training.setter
    def training(self, mode: bool) -> None:
        self.__dict__["_mode"] = mode
        self.switches.append(mode)


def property_model() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 4), FlagProperty())


def bert_with_property_pooler() -> nn.Module:
    model = small_bert()
    model.pooler.activation = FlagProperty()
    return model


@pytest.mark.parametrize("build", [property_model, bert_with_property_pooler])
def test_training_property_is_set_through_the_property(build: Callable[[], nn.Module]) -> None:
    model = build()
    prop = next(m for m in model.modules() if isinstance(m, FlagProperty))
    before = flags(model)
    with gf.inference(model):
        assert not prop.training, "the property still says train inside gf.inference"
        assert flags(model) == after(model, nn.Module.eval)
    assert prop.training and flags(model) == before
    model.eval()
    with gf.training(model):
        assert prop.training
    assert not prop.training and flags(model) == after(model, nn.Module.eval)


def test_instance_override_on_a_child_of_an_overriding_class() -> None:
    """BertModel.train (class override) recursing into an instance override below it."""
    model = small_bert().eval()
    calls: list[bool] = []

    def recording_train(mode: bool = True) -> nn.Module:
        calls.append(mode)
        return model.pooler  # and leaves the pooler as it is

    model.pooler.train = recording_train
    with gf.training(model):
        assert calls == [True] and not model.pooler.training and model.embeddings.training
    assert not model.training


# 3. decorated coroutines and generators hold module flags for their whole life -----


def test_async_to_thread_forward_runs_in_eval() -> None:
    model = small_bert(dropout=0.5)
    x = ids()
    with gf.inference(model):
        expected = model(x).last_hidden_state
    seen: dict[str, object] = {}

    def forward() -> torch.Tensor:
        seen["training"] = model.training
        seen["grad"] = torch.is_grad_enabled()
        out: torch.Tensor = model(x).last_hidden_state
        return out

    @gf.inference(model)
    async def predict() -> torch.Tensor:
        await asyncio.sleep(0)
        return await asyncio.to_thread(forward)

    got = asyncio.run(predict())
    assert seen["training"] is False, "the worker thread's forward ran in train mode"
    assert torch.equal(got.detach(), expected), "dropout was on in the worker thread"
    assert seen["grad"] is True and got.requires_grad  # grad mode is the thread's own
    got = got.detach()
    assert model.training and torch.is_grad_enabled()


def test_async_run_in_executor_forward_runs_in_eval() -> None:
    model = small_bert(dropout=0.5)
    x = ids()
    with gf.inference(model):
        expected = model(x).last_hidden_state

    def forward() -> torch.Tensor:
        with gf.inference():  # the worker disables grad for itself
            out: torch.Tensor = model(x).last_hidden_state
            return out

    @gf.inference(model)
    async def predict() -> torch.Tensor:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(None, forward)

    got = asyncio.run(predict())
    assert torch.equal(got, expected) and not got.requires_grad
    assert model.training


def test_coroutine_holds_module_flags_while_suspended_but_steps_grad() -> None:
    model = small_bert()
    before = flags(model)
    inside: list[tuple[bool, bool]] = []
    outside: list[tuple[bool, bool]] = []

    @gf.inference(model)
    async def handler() -> None:
        for _ in range(3):
            inside.append((torch.is_grad_enabled(), model.training))
            await asyncio.sleep(0)

    async def bystander() -> None:
        for _ in range(2):
            await asyncio.sleep(0)
            outside.append((torch.is_grad_enabled(), model.training))

    async def main() -> None:
        await asyncio.gather(handler(), bystander())

    asyncio.run(main())
    assert inside == [(False, False)] * 3
    assert outside == [(True, False)] * 2, "module flags are process-global: held while suspended"
    assert flags(model) == before and torch.is_grad_enabled()


def test_coroutine_never_started_changes_nothing() -> None:
    model = small_bert()

    @gf.inference(model)
    async def handler() -> None:
        pass

    coro = handler()
    assert model.training
    coro.close()
    assert model.training


def test_generator_holds_module_flags_between_items() -> None:
    model = small_bert()
    before = flags(model)

    @gf.inference(model)
    def batches() -> Iterator[tuple[bool, bool]]:
        for _ in range(2):
            yield torch.is_grad_enabled(), model.training

    gen = batches()
    assert model.training, "nothing happens before the first next()"
    for inside in gen:
        assert inside == (False, False)
        assert torch.is_grad_enabled() and not model.training
    assert flags(model) == before


def test_abandoned_generator_releases_module_flags_when_collected() -> None:
    model = small_bert()
    before = flags(model)

    @gf.inference(model, mode="inference_mode")
    def forever() -> Iterator[int]:
        while True:
            yield 1

    gen = forever()
    next(gen)
    assert not model.training and not torch.is_inference_mode_enabled()
    del gen
    gc.collect()
    assert flags(model) == before


def test_async_generator_holds_module_flags_between_items() -> None:
    model = small_bert()
    before = flags(model)

    @gf.inference(model)
    async def stream() -> AsyncIterator[tuple[bool, bool]]:
        for _ in range(2):
            await asyncio.sleep(0)
            yield torch.is_grad_enabled(), model.training

    async def main() -> list[tuple[bool, bool]]:
        got = []
        async for item in stream():
            assert torch.is_grad_enabled() and not model.training
            got.append(item)
        assert flags(model) == before
        agen = stream()
        await agen.__anext__()
        assert not model.training
        await agen.aclose()
        assert flags(model) == before
        return got

    assert asyncio.run(main()) == [(False, False)] * 2
    assert flags(model) == before


def test_two_decorated_coroutines_on_one_model_close_in_any_order() -> None:
    model = small_bert()
    model.pooler.eval()
    before = flags(model)

    @gf.inference(model)
    async def slow() -> None:
        await asyncio.sleep(0.02)

    @gf.inference(model.encoder)
    async def fast() -> bool:
        await asyncio.sleep(0.01)
        return model.encoder.training

    async def main() -> None:
        task = asyncio.ensure_future(slow())
        await asyncio.sleep(0)
        assert await fast() is False
        await task

    asyncio.run(main())
    assert flags(model) == before


# the stand-ins that make overriding classes cheap ----------------------------------


def test_no_stand_in_is_left_behind() -> None:
    model = bert_with_property_pooler()
    with gf.inference(model):
        pass
    with gf.training(model):
        pass
    assert not [name for name, m in model.named_modules() if "train" in vars(m)]


def test_stand_in_called_from_another_thread_is_the_class_train() -> None:
    from gradfence.scope import _TrainStandIn

    child = nn.Sequential(nn.Dropout())
    calls: list[nn.Module] = []
    stand_in = _TrainStandIn(child, lambda module, mode: calls.append(module))
    with pytest.raises(ValueError, match="boolean"):
        stand_in(1)  # type: ignore[arg-type]
    worker = threading.Thread(target=stand_in, args=(False,))
    worker.start()
    worker.join()
    assert not child.training and not child[0].training and calls == []
    assert stand_in(True) is child and calls == [child]


class PinsAGrandchild(nn.Module):
    """An override that, after its own recursion, pins a grandchild in eval."""

    def __init__(self) -> None:
        super().__init__()
        self.block = nn.Sequential(nn.Linear(2, 2), nn.Dropout(0.5))

    def train(self, mode: bool = True) -> PinsAGrandchild:
        super().train(mode)
        self.block[1].train(False)
        return self


def test_override_switching_a_grandchild_after_its_recursion() -> None:
    model = nn.Sequential(PinsAGrandchild(), nn.Dropout())
    model[0].block[1].train()  # unpinned by hand: restore must bring that back
    before = flags(model)
    with gf.training(model):
        assert flags(model) == after(model, nn.Module.train)
        assert not model[0].block[1].training
    assert flags(model) == before
    model.eval()
    before = flags(model)
    with gf.training(model):
        assert flags(model) == after(model, nn.Module.train)
    assert flags(model) == before


# any tree of these shapes, any flags: the scope does what eval()/train() do -----------


def make_node(kind: int) -> nn.Module:
    if kind == 0:
        return nn.Sequential()
    if kind == 1:
        return nn.Sequential(nn.Dropout())
    if kind == 2:
        return PinsAGrandchild()
    if kind == 3:
        return FlagProperty()
    node = nn.Sequential(nn.Dropout())
    if kind == 4:
        node.train = types.MethodType(disabled_train, node)
    else:
        node.eval = types.MethodType(mc_dropout_eval, node)
    return node


@settings(max_examples=80, deadline=None)
@given(
    kinds=st.lists(st.integers(min_value=0, max_value=5), min_size=1, max_size=8),
    parents=st.lists(st.integers(min_value=0, max_value=7), min_size=8, max_size=8),
    modes=st.lists(st.booleans(), min_size=1, max_size=40),
    use_training=st.booleans(),
)
def test_any_tree_of_overrides_behaves_like_eval_and_train(
    kinds: list[int], parents: list[int], modes: list[bool], use_training: bool
) -> None:
    nodes = [make_node(kind) for kind in kinds]
    for position, node in enumerate(nodes[1:], start=1):
        nodes[parents[position] % position].add_module(f"n{position}", node)
    root = nodes[0]
    for module, mode in zip(root.modules(), modes * 40, strict=False):
        if isinstance(module, FlagProperty):
            module.training = mode
        else:
            module.__dict__["training"] = mode
    before = flags(root)
    expected = after(root, (lambda m: m.train()) if use_training else (lambda m: m.eval()))
    scope = gf.training(root) if use_training else gf.inference(root)
    with scope:
        assert flags(root) == expected
    assert flags(root) == before


def test_worker_wrapped_in_its_own_scope_gets_eval_and_no_grad() -> None:
    """The fix docs/scope.md and GF107 give: the worker enters a scope itself."""
    model = small_bert(dropout=0.5)
    x = ids()
    with gf.inference(model):
        expected = model(x).last_hidden_state

    @gf.inference(model)
    async def predict() -> torch.Tensor:
        out = await asyncio.to_thread(gf.inference()(model), x)
        return out.last_hidden_state  # type: ignore[no-any-return]

    got = asyncio.run(predict())
    assert torch.equal(got, expected) and not got.requires_grad
    assert model.training


def test_tree_changed_inside_the_scope_of_an_overriding_class() -> None:
    model = small_bert()
    model.pooler.eval()
    removed = model.encoder.layer[1]
    before = {k: v for k, v in flags(model).items() if not k.startswith("encoder.layer.1")}
    with gf.inference(model):
        added = nn.Dropout().train()  # added inside: keeps its flag
        model.extra = added
        del model.encoder.layer[1]  # removed inside: not touched
        inner = gf.inference(model.encoder)
        inner.__enter__()
    try:  # closed out of order, with a changed tree: the open scope keeps its modules
        assert not any(held_flags(model, "encoder").values())
        assert model.training and model.embeddings.training and not model.pooler.training
    finally:
        inner.__exit__(None, None, None)
    assert added.training and not removed.training
    assert {k: v for k, v in flags(model).items() if k != "extra"} == before
