"""gf.inference / gf.training: exact restore of module trees and grad modes, overrides,
errors, generators, async, threads and out-of-order exits."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import inspect
import threading
import warnings
from collections.abc import AsyncIterator, Iterator

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import gradfence as gf
from gradfence.scope import ModeSnapshot


def flags(model: nn.Module) -> dict[str, bool]:
    return {name: m.training for name, m in model.named_modules()}


def grad_state() -> tuple[bool, bool]:
    return torch.is_grad_enabled(), torch.is_inference_mode_enabled()


def frozen_bn_model() -> nn.Sequential:
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.Dropout(0.5))
    model[1].eval()
    return model


# 1. exact restore of every submodule's own flag ------------------------------------


def test_frozen_batchnorm_stays_frozen_after_exit() -> None:
    model = frozen_bn_model()
    with gf.inference(model):
        assert not any(flags(model).values())
    assert model.training and model[0].training and model[3].training
    assert not model[1].training, "the frozen BatchNorm was switched back to train"


def test_mixed_tree_restored_exactly() -> None:
    model = nn.Sequential(nn.Sequential(nn.Linear(2, 2), nn.Dropout()), nn.Dropout())
    model[0].eval()
    model[0][1].train()  # eval child holding a train grandchild
    before = flags(model)
    with gf.inference(model):
        pass
    assert flags(model) == before


@pytest.mark.parametrize("start_training", [True, False])
def test_uniform_tree_returns_to_its_mode(start_training: bool) -> None:
    model = nn.Sequential(nn.Linear(2, 2), nn.Dropout()).train(start_training)
    with gf.inference(model):
        assert not model.training
    assert all(v is start_training for v in flags(model).values())
    with gf.training(model):
        assert all(flags(model).values())
    assert all(v is start_training for v in flags(model).values())


def build_tree(shape: list[int], modes: list[bool]) -> nn.Module:
    """A tree from a list of fan-outs (breadth first) with the given per-node modes."""
    root = nn.Module()
    level = [root]
    nodes = [root]
    for fan_out in shape:
        nxt = []
        for parent in level:
            for i in range(fan_out):
                child = nn.Dropout() if i % 2 else nn.Module()
                parent.add_module(f"c{i}", child)
                nxt.append(child)
                nodes.append(child)
        level = nxt or level
    for node, mode in zip(nodes, modes * (len(nodes) // max(len(modes), 1) + 1), strict=False):
        node.training = mode
    return root


@settings(max_examples=60, deadline=None)
@given(
    shape=st.lists(st.integers(min_value=0, max_value=3), min_size=1, max_size=3),
    modes=st.lists(st.booleans(), min_size=1, max_size=30),
    use_training=st.booleans(),
)
def test_any_tree_any_modes_restored_exactly(
    shape: list[int], modes: list[bool], use_training: bool
) -> None:
    model = build_tree(shape, modes)
    before = flags(model)
    scope = gf.training(model) if use_training else gf.inference(model)
    with scope:
        assert all(v is use_training for v in flags(model).values())
    assert flags(model) == before


# 2. overrides, shared modules, identity, added/removed modules -----------------------


class PinnedFrozen(nn.Module):
    """A block whose train() keeps its frozen normalisation in eval, as users write it."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(3, 3)
        self.norm = nn.BatchNorm1d(3)
        self.calls: list[bool] = []
        self.fused = False  # reparameterised path, switched by train()

    def train(self, mode: bool = True) -> PinnedFrozen:
        self.calls.append(mode)
        super().train(mode)
        self.norm.train(False)
        self.fused = not mode
        return self


def test_entering_runs_train_override() -> None:
    block = PinnedFrozen().train()
    block.calls.clear()
    model = nn.Sequential(block, nn.Dropout())
    with gf.inference(model):
        assert block.calls == [False]
        assert block.fused
    assert block.calls == [False, True], "restore must run the override with the restored flag"
    assert block.training and not block.fused
    assert not block.norm.training


def test_restore_runs_override_then_fixes_descendants_exactly() -> None:
    block = PinnedFrozen()
    block.norm.train()  # the user chose to unfreeze it after all: restore that exactly
    with gf.inference(block):
        assert not block.norm.training
    assert block.calls[-1] is True and not block.fused
    assert block.norm.training


def test_shared_module_handled_once_and_keyed_by_identity() -> None:
    shared = PinnedFrozen()
    model = nn.Module()
    model.a = nn.Sequential(shared)
    model.b = nn.Sequential(shared)
    with gf.inference(model):
        assert shared.calls == [False]
    assert shared.calls == [False, True]

    # restore follows the objects, not the attribute names they sit under
    model = nn.Module()
    model.x = nn.Dropout().train()
    model.y = nn.Dropout().eval()
    x, y = model.x, model.y
    with gf.inference(model):
        model.x, model.y = y, x
    assert x.training and not y.training


def test_modules_added_inside_are_left_alone_and_removed_ignored() -> None:
    model = nn.Sequential(nn.Linear(2, 2), nn.Dropout())
    removed = model[1]
    with gf.inference(model):
        added_train = nn.Dropout().train()
        added_eval = nn.Dropout().eval()
        model.add_module("added_train", added_train)
        model.add_module("added_eval", added_eval)
        del model[1]
    assert model.training and model[0].training
    assert added_train.training and not added_eval.training
    assert not removed.training, "a module removed from the tree must not be touched"


# 3. grad mode and inference mode restored to their prior values ----------------------


@pytest.mark.parametrize("mode", ["no_grad", "inference_mode"])
@pytest.mark.parametrize("outer", ["none", "no_grad", "inference_mode", "enable_grad"])
def test_grad_and_inference_mode_restored(mode: str, outer: str) -> None:
    outer_ctx = {
        "none": torch.enable_grad(),
        "no_grad": torch.no_grad(),
        "inference_mode": torch.inference_mode(),
        "enable_grad": torch.enable_grad(),
    }[outer]
    with outer_ctx:
        before = grad_state()
        with gf.inference(mode=mode):  # type: ignore[arg-type]
            assert not torch.is_grad_enabled()
            if mode == "inference_mode":
                assert torch.is_inference_mode_enabled()
        assert grad_state() == before


def test_inference_mode_exit_never_forces_grad_on() -> None:
    with torch.no_grad():
        with gf.inference(mode="inference_mode"):
            pass
        assert not torch.is_grad_enabled(), "left inference mode by entering inference_mode(False)"


def test_training_enables_grad_and_restores_it() -> None:
    model = nn.Linear(2, 1).eval()
    with torch.no_grad():
        with gf.training(model):
            assert torch.is_grad_enabled() and model.training
            out = model(torch.ones(1, 2))
        assert not torch.is_grad_enabled() and not model.training
    assert out.requires_grad


def test_training_inside_inference_mode_raises_and_changes_nothing() -> None:
    model = nn.Linear(2, 1).eval()
    with torch.inference_mode():
        with pytest.raises(gf.ScopeError, match="inference_mode"), gf.training(model):
            pytest.fail("body must not run")
        assert grad_state() == (False, True)
    assert not model.training


# 4. exception safety ---------------------------------------------------------------


@pytest.mark.parametrize("error", [ValueError("boom"), KeyboardInterrupt(), GeneratorExit()])
def test_exception_in_body_restores_and_propagates_unchanged(error: BaseException) -> None:
    model = frozen_bn_model()
    before = flags(model)
    with pytest.raises(type(error)) as caught, gf.inference(model, mode="inference_mode"):
        raise error
    assert caught.value is error
    assert flags(model) == before
    assert grad_state() == (True, False)


class FailsToRestore(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inner = nn.Dropout()

    def train(self, mode: bool = True) -> FailsToRestore:
        super().train(mode)
        if mode:
            raise RuntimeError("cannot switch back")
        return self


def test_one_failing_restore_does_not_stop_the_others() -> None:
    model = nn.Sequential(nn.Dropout(), FailsToRestore(), nn.Dropout())
    model[2].eval()
    before = flags(model)
    with pytest.raises(RuntimeError, match="cannot switch back"), gf.inference(model):
        pass
    assert flags(model) == before
    assert torch.is_grad_enabled()


def test_decorated_function_exception_restores() -> None:
    model = frozen_bn_model()
    before = flags(model)

    @gf.inference(model)
    def predict() -> None:
        raise KeyError("x")

    with pytest.raises(KeyError):
        predict()
    assert flags(model) == before and torch.is_grad_enabled()


# 5. no side effects before entry; re-entrancy ----------------------------------------


def test_creating_a_scope_changes_nothing() -> None:
    model = frozen_bn_model()
    before = flags(model)
    scope = gf.inference(model, mode="inference_mode")
    decorated = scope(lambda: None)
    assert flags(model) == before and grad_state() == (True, False)
    del decorated


def test_same_scope_object_nested() -> None:
    model = frozen_bn_model()
    before = flags(model)
    scope = gf.inference(model)
    with scope:
        with scope:
            assert not model.training
        assert not model.training and not torch.is_grad_enabled()
        model[0].train()  # changed inside the outer entry only
    assert flags(model) == before and torch.is_grad_enabled()


def test_recursive_decorated_function_restores_at_every_depth() -> None:
    model = frozen_bn_model()
    before = flags(model)
    seen: list[tuple[bool, bool]] = []

    @gf.inference(model)
    def walk(depth: int) -> None:
        seen.append((torch.is_grad_enabled(), model.training))
        if depth:
            walk(depth - 1)
            # after the inner call returned, this level is still inside its own scope
            seen.append((torch.is_grad_enabled(), model.training))

    walk(3)
    assert seen == [(False, False)] * 7
    assert flags(model) == before and torch.is_grad_enabled()


# 6. generators ---------------------------------------------------------------------


def test_generator_grad_only_while_body_runs_modules_held_until_done() -> None:
    model = frozen_bn_model()
    before = flags(model)

    @gf.inference(model)
    def batches() -> Iterator[tuple[bool, bool]]:
        for _ in range(3):
            received = yield torch.is_grad_enabled(), model.training
            assert received in (None, "ping")

    gen = batches()
    assert inspect.isgeneratorfunction(batches)
    for inside in gen:
        assert inside == (False, False)
        # between next() calls the caller has its own grad mode (thread-local), while
        # the module flags (process-global) stay held until the generator is done
        assert torch.is_grad_enabled() and not any(flags(model).values())
    assert flags(model) == before


def test_generator_send_throw_close() -> None:
    model = nn.Dropout()
    log: list[object] = []

    @gf.inference(model)
    def echo() -> Iterator[object]:
        value: object = None
        try:
            while True:
                try:
                    value = yield value
                    log.append((value, torch.is_grad_enabled(), model.training))
                except ValueError as exc:
                    log.append(("caught", str(exc), torch.is_grad_enabled()))
                    value = "recovered"
        finally:
            log.append(("closing", torch.is_grad_enabled(), model.training))

    gen = echo()
    next(gen)
    assert gen.send("a") == "a"
    assert gen.throw(ValueError("bad")) == "recovered"
    assert torch.is_grad_enabled() and not model.training
    gen.close()
    assert log == [
        ("a", False, False),
        ("caught", "bad", False),
        ("closing", False, False),
    ]
    assert torch.is_grad_enabled() and model.training


def test_abandoned_generator_leaks_nothing_once_collected() -> None:
    model = frozen_bn_model()
    before = flags(model)

    @gf.inference(model, mode="inference_mode")
    def forever() -> Iterator[int]:
        i = 0
        while True:
            yield i
            i += 1

    gen = forever()
    assert next(gen) == 0
    assert grad_state() == (True, False) and not any(flags(model).values())
    del gen
    gc.collect()
    assert grad_state() == (True, False) and flags(model) == before


# 7. async def and async generators -----------------------------------------------------


def test_async_body_keeps_scope_across_awaits_other_tasks_keep_their_grad() -> None:
    model = frozen_bn_model()
    before = flags(model)
    inside: list[tuple[bool, bool]] = []
    outside: list[tuple[bool, bool]] = []

    @gf.inference(model)
    async def handler() -> str:
        for _ in range(3):
            inside.append((torch.is_grad_enabled(), model.training))
            await asyncio.sleep(0)
        inside.append((torch.is_grad_enabled(), model.training))
        return "done"

    async def bystander() -> None:
        for _ in range(4):
            outside.append((torch.is_grad_enabled(), model.training))
            await asyncio.sleep(0)

    async def main() -> str:
        result, _ = await asyncio.gather(handler(), bystander())
        return result

    assert inspect.iscoroutinefunction(handler)
    assert asyncio.run(main()) == "done"
    assert inside == [(False, False)] * 4
    # grad mode is per task here (stepped per resumption); module flags are
    # process-global and held from the handler's first step (gather starts it first)
    # to its end (before the bystander's last step)
    assert outside == [(True, False)] * 3 + [(True, True)]
    assert flags(model) == before and torch.is_grad_enabled()


def test_torch_no_grad_on_coroutine_is_a_no_op_but_gf_is_not() -> None:
    """The gap gf.inference closes: checked on the installed torch."""

    @torch.no_grad()
    async def torch_decorated() -> bool:
        return torch.is_grad_enabled()

    @gf.inference()
    async def gf_decorated() -> bool:
        return torch.is_grad_enabled()

    assert asyncio.run(torch_decorated()) is True
    assert asyncio.run(gf_decorated()) is False


def test_async_exception_and_cancellation_restore() -> None:
    model = nn.Dropout()

    @gf.inference(model)
    async def fails() -> None:
        await asyncio.sleep(0)
        raise ValueError("inner")

    @gf.inference(model)
    async def waits(started: asyncio.Event) -> None:
        started.set()
        try:
            await asyncio.sleep(10)
        finally:
            assert not torch.is_grad_enabled() and not model.training

    async def main() -> None:
        with pytest.raises(ValueError, match="inner"):
            await fails()
        started = asyncio.Event()
        task = asyncio.create_task(waits(started))
        await started.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
    assert model.training and torch.is_grad_enabled()


def test_async_generator() -> None:
    model = frozen_bn_model()
    before = flags(model)

    @gf.inference(model)
    async def stream() -> AsyncIterator[tuple[bool, bool]]:
        for _ in range(2):
            await asyncio.sleep(0)
            yield torch.is_grad_enabled(), model.training

    async def main() -> list[tuple[bool, bool]]:
        got = []
        async for item in stream():
            assert torch.is_grad_enabled() and not any(flags(model).values())
            got.append(item)
        agen = stream()
        await agen.__anext__()
        await agen.aclose()
        return got

    assert inspect.isasyncgenfunction(stream)
    assert asyncio.run(main()) == [(False, False), (False, False)]
    assert flags(model) == before


# 8. nested enable_grad ---------------------------------------------------------------


def test_enable_grad_inside_no_grad_scope_records_again() -> None:
    model = nn.Linear(2, 1)
    with gf.inference(model), torch.enable_grad():
        out = model(torch.ones(1, 2))
    assert out.requires_grad and out.grad_fn is not None


def test_enable_grad_inside_inference_mode_scope_cannot() -> None:
    model = nn.Linear(2, 1)
    with gf.inference(model, mode="inference_mode"), torch.enable_grad():
        assert torch.is_grad_enabled()  # the flag flips...
        out = model(torch.ones(1, 2))
    assert not out.requires_grad and out.grad_fn is None  # ...but no graph is recorded
    assert out.is_inference()


# 9. threads --------------------------------------------------------------------------


def test_grad_mode_is_per_thread() -> None:
    seen: dict[str, bool] = {}
    inside = threading.Event()
    release = threading.Event()

    def other_thread() -> None:
        inside.wait()
        seen["other"] = torch.is_grad_enabled()
        release.set()

    thread = threading.Thread(target=other_thread)
    thread.start()
    with gf.inference():
        inside.set()
        release.wait(5)
        seen["main"] = torch.is_grad_enabled()
    thread.join()
    assert seen == {"other": True, "main": False}


def test_out_of_order_exits_never_leave_the_model_stuck() -> None:
    model = frozen_bn_model()
    before = flags(model)
    first, second = gf.inference(model), gf.inference(model)
    first.__enter__()
    second.__enter__()  # records the in-scope (eval) flags as its "before"
    first.__exit__(None, None, None)  # closes first: must not yank eval from under second
    assert not model.training and not torch.is_grad_enabled()
    second.__exit__(None, None, None)
    assert flags(model) == before, "the model stayed in eval after both scopes closed"
    assert torch.is_grad_enabled(), "grad mode leaked from the out-of-order exits"


def test_out_of_order_inference_mode_exits_unwind_in_order() -> None:
    with torch.no_grad():
        first = gf.inference(mode="inference_mode")
        second = gf.inference()
        first.__enter__()
        second.__enter__()
        first.__exit__(None, None, None)
        assert grad_state() == (False, True), "second is still open"
        second.__exit__(None, None, None)
        assert grad_state() == (False, False)
    assert grad_state() == (True, False)


def test_with_spanning_await_in_two_tasks_restores_grad() -> None:
    """The GF105 misuse: entries close out of order on one thread; grad still ends right."""
    scope = gf.inference()

    async def task(delay: float) -> None:
        with scope:
            await asyncio.sleep(delay)

    async def main() -> None:
        await asyncio.gather(task(0.01), task(0.02))

    asyncio.run(main())
    assert torch.is_grad_enabled()


def test_overlapping_scopes_in_two_threads_restore_the_original() -> None:
    model = frozen_bn_model()
    before = flags(model)
    a_in, b_in, a_out = threading.Event(), threading.Event(), threading.Event()

    def thread_a() -> None:
        with gf.inference(model):
            a_in.set()
            b_in.wait(5)
        a_out.set()

    def thread_b() -> None:
        a_in.wait(5)
        with gf.inference(model):
            b_in.set()
            a_out.wait(5)  # A exits first: not LIFO
            assert not model.training

    threads = [threading.Thread(target=thread_a), threading.Thread(target=thread_b)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert flags(model) == before


@contextlib.contextmanager
def inference_held_by_another_thread(model: nn.Module) -> Iterator[None]:
    """Another thread sits inside ``gf.inference(model)`` for the duration of the block."""
    entered, done = threading.Event(), threading.Event()

    def evaluator() -> None:
        with gf.inference(model):
            entered.set()
            done.wait(5)

    thread = threading.Thread(target=evaluator)
    thread.start()
    entered.wait(5)
    try:
        yield
    finally:
        done.set()
        thread.join()


def test_conflicting_scopes_in_two_threads_warn() -> None:
    model = frozen_bn_model()
    with (
        inference_held_by_another_thread(model),
        pytest.warns(gf.ScopeOverlapWarning, match="process-global"),
        gf.training(model),
    ):
        pass
    assert model.training and not model[1].training


def test_same_target_overlap_in_threads_does_not_warn() -> None:
    model = nn.Dropout()
    with inference_held_by_another_thread(model), warnings.catch_warnings():
        warnings.simplefilter("error")
        with gf.inference(model):
            pass
    assert model.training


# 10. outputs and requires_grad ---------------------------------------------------------


def test_outputs_per_mode_and_requires_grad_untouched() -> None:
    model = nn.Sequential(nn.Linear(3, 3), nn.ReLU())
    model[0].bias.requires_grad_(False)
    before = [p.requires_grad for p in model.parameters()]
    x = torch.randn(2, 3)
    with gf.inference(model):
        plain = model(x)
        assert [p.requires_grad for p in model.parameters()] == before
    with gf.inference(model, mode="inference_mode"):
        inferred = model(x)
    assert not plain.requires_grad and not plain.is_inference()
    assert inferred.is_inference() and not inferred.requires_grad
    assert [p.requires_grad for p in model.parameters()] == before


# 11. bit-identical to the hand-written pattern ------------------------------------------


@pytest.mark.parametrize("mode", ["no_grad", "inference_mode"])
def test_results_bit_identical_to_hand_written(mode: str) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Dropout(0.3), nn.Linear(16, 4)
    )
    model(torch.randn(32, 8))  # move the running statistics away from their init
    x = torch.randn(5, 8)
    model.eval()
    with torch.no_grad():
        expected = model(x)
    model.train()
    stats = model[1].running_mean.clone()
    with gf.inference(model, mode=mode):  # type: ignore[arg-type]
        got = model(x)
    assert torch.equal(got, expected)
    assert torch.equal(model[1].running_mean, stats)


# misuse ------------------------------------------------------------------------------


def test_misuse_raises_scope_error_with_a_fix() -> None:
    model = nn.Linear(1, 1)
    with pytest.raises(gf.ScopeError, match=r"\*modules"):
        gf.inference([model])  # type: ignore[arg-type]
    with pytest.raises(gf.ScopeError, match="parentheses"):

        @gf.inference  # type: ignore[arg-type]
        def f() -> None: ...

    with pytest.raises(gf.ScopeError, match="'no_grad'"):
        gf.inference(model, mode="eval")  # type: ignore[arg-type]
    with pytest.raises(gf.ScopeError, match="decorate its methods"):

        @gf.inference(model)
        class Predictor:
            pass

    with pytest.raises(gf.ScopeError, match="argument 2 is int"):
        gf.training(model, 3)  # type: ignore[arg-type]


def test_snapshot_is_pre_order_and_deduplicated() -> None:
    shared = nn.Linear(1, 1)
    model = nn.Sequential(nn.Sequential(shared), shared)
    snap = ModeSnapshot([model, model[0]])
    assert snap.modules == [model, model[0], shared]
    assert snap.index == {id(model): 0, id(model[0]): 1, id(shared): 2}


def test_repr_names_the_scope() -> None:
    assert repr(gf.inference(nn.Linear(1, 1), mode="inference_mode")) == (
        "gf.inference(Linear, mode='inference_mode')"
    )
    assert repr(gf.training(nn.ReLU())) == "gf.training(ReLU)"


def test_one_scope_object_shared_by_threads() -> None:
    model = nn.Dropout()
    scope = gf.inference(model)
    barrier = threading.Barrier(2)
    seen: list[bool] = []

    def worker() -> None:
        for _ in range(50):
            with scope:
                barrier.wait(5)
                seen.append(torch.is_grad_enabled())
            barrier.wait(5)

    threads = [threading.Thread(target=worker) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert seen == [False] * 100
    assert model.training
