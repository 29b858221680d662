"""The audit's own promises: it computes nothing differently, cleans up, and its API."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

import gradfence as gf
from gradfence.auditing.findings import CODES


class Mixed(nn.Module):
    """Every kind of module the audit hooks, plus a fused fast-path transformer."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(8, 16)
        self.bn = nn.BatchNorm1d(5)
        self.drop = nn.Dropout(0.2)
        layer = nn.TransformerEncoderLayer(16, 4, 32, dropout=0.1, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.p = 0.1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.drop(self.bn(self.inp(x)))
        h = F.dropout(h, self.p, training=self.training)
        h = F.scaled_dot_product_attention(h, h, h, dropout_p=self.p if self.training else 0.0)
        return self.encoder(h)


_ORIGINAL_DROPOUT = F.dropout
_ORIGINAL_SDPA = F.scaled_dot_product_attention


def _hooks_left(model: nn.Module) -> int:
    return sum(
        len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._forward_hooks_always_called)
        for m in model.modules()
    )


def _global_hooks_left() -> int:
    from torch.nn.modules import module

    return len(module._global_forward_pre_hooks) + len(module._global_forward_hooks)


@pytest.fixture
def mixed() -> Mixed:
    torch.manual_seed(0)
    return Mixed()


def test_results_are_bit_identical_in_evaluation(mixed: Mixed) -> None:
    x = torch.randn(3, 5, 8)
    with gf.inference(mixed):
        plain = mixed(x)
    with gf.audit(mixed, strict=True) as report, gf.inference(mixed):
        audited = mixed(x)
    assert report.ok, report.format()
    assert torch.equal(plain, audited)


def test_results_are_bit_identical_when_findings_fire(mixed: Mixed) -> None:
    x = torch.randn(3, 5, 8)
    torch.manual_seed(7)
    plain = mixed(x)  # train mode, grad on: dropout everywhere, BN updates
    state = {k: v.clone() for k, v in mixed.state_dict().items()}
    fresh = Mixed()
    fresh.load_state_dict(state)
    torch.manual_seed(7)
    with gf.audit(fresh) as report:
        fresh_plain = fresh(x)
    assert set(report.codes()) >= {"GFR003", "GFR005", "GFR006"}
    again = Mixed()
    again.load_state_dict(state)
    torch.manual_seed(7)
    unaudited = again(x)
    assert torch.equal(fresh_plain, unaudited)
    assert plain.shape == unaudited.shape


def test_transformer_fast_path_is_kept(mixed: Mixed) -> None:
    # An active torch-function mode turns the fused path off (results then differ in the
    # last bits); the audit pops its mode around such modules.
    encoder = mixed.encoder.eval()
    x = torch.randn(4, 7, 16)
    with torch.no_grad():
        plain = encoder(x)
        with gf.audit(encoder) as report:
            audited = encoder(x)
    assert report.ok
    assert torch.equal(plain, audited)


class PaddedEncoder(nn.TransformerEncoder):
    """A user subclass of a fast-path module: its own forward, then torch's fused path."""

    def forward(self, src: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return super().forward(src, *args, **kwargs)


@pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors:UserWarning")
@pytest.mark.parametrize("nested", [False, True])
@pytest.mark.parametrize("encoder_class", [nn.TransformerEncoder, PaddedEncoder])
def test_fused_path_with_padding_mask_is_kept(
    encoder_class: type[nn.TransformerEncoder], nested: bool
) -> None:
    # TransformerEncoderLayer leaves its fused path when any module inside it has a
    # forward hook; with a padding mask the two paths differ in the last bits.
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(16, 4, 32, batch_first=True)
    encoder = encoder_class(layer, 2, enable_nested_tensor=nested).eval()
    x = torch.randn(4, 7, 16)
    padding = torch.zeros(4, 7, dtype=torch.bool)
    padding[:, 5:] = True
    with torch.no_grad():
        plain = encoder(x, src_key_padding_mask=padding)
        with gf.audit(encoder) as report:
            audited = encoder(x, src_key_padding_mask=padding)
    assert report.ok, report.format()
    assert torch.equal(plain, audited)
    assert _hooks_left(encoder) == _global_hooks_left() == 0


def test_dropout_inside_a_transformer_layer_is_still_seen() -> None:
    layer = nn.TransformerEncoderLayer(16, 4, 32, dropout=0.1, batch_first=True)
    encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
    with gf.audit(encoder) as report, torch.no_grad():  # validation left in train mode
        encoder(torch.randn(2, 5, 16))
    modules = {finding.module for finding in report.findings}
    assert report.codes() == ["GFR005"] * len(modules)
    assert {"layers.0.dropout1", "layers.1.self_attn"} <= modules
    assert _global_hooks_left() == 0


def test_every_hook_and_mode_is_removed(mixed: Mixed) -> None:
    with gf.audit(mixed, strict=True), gf.inference(mixed):
        assert _hooks_left(mixed) > 0
        assert _global_hooks_left() == 2  # for the layers of the TransformerEncoder
        mixed(torch.randn(2, 5, 8))
    assert _hooks_left(mixed) == _global_hooks_left() == 0
    assert torch._C._len_torch_function_stack() == 0
    assert F.dropout is _ORIGINAL_DROPOUT
    assert F.scaled_dot_product_attention is _ORIGINAL_SDPA


def test_cleanup_when_the_body_raises(mixed: Mixed) -> None:
    with pytest.raises(KeyError), gf.audit(mixed), gf.inference(mixed):
        mixed(torch.randn(2, 5, 8))
        raise KeyError("boom")
    assert _hooks_left(mixed) == _global_hooks_left() == 0
    assert F.dropout is _ORIGINAL_DROPOUT


class Exploding(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(2, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() < 0:
            raise ValueError("bad batch")
        return self.fc(x)


def test_a_forward_that_raises_leaves_nothing_behind() -> None:
    model = Exploding()
    with gf.audit(model) as report:
        with pytest.raises(ValueError, match="bad batch"):
            model(-torch.ones(1, 2))
        model(torch.ones(1, 2))  # grad on: still seen after the failed forward
    assert report.codes() == ["GFR003"], report.format()
    assert torch._C._len_torch_function_stack() == 0
    assert F.dropout is _ORIGINAL_DROPOUT  # the op watch's wrappers are gone


def test_raise_on_exit_lists_every_finding(mixed: Mixed) -> None:
    with pytest.raises(gf.AuditError) as info, gf.audit(mixed, raise_on_exit=True):
        mixed.eval()
        mixed(torch.randn(2, 5, 8))
    text = str(info.value)
    assert "GFR002" in text and "GFR003" in text
    assert isinstance(info.value, AssertionError)  # pytest shows it as a failed assertion


def test_raise_on_exit_keeps_the_bodys_own_error(mixed: Mixed) -> None:
    with (
        pytest.raises(RuntimeError, match="from the body") as info,
        gf.audit(mixed, raise_on_exit=True),
    ):
        mixed.eval()
        raise RuntimeError("from the body")
    assert any("GFR002" in note for note in getattr(info.value, "__notes__", []))
    mixed.train()


class Py310Error(RuntimeError):
    """An exception as Python 3.10 makes them: no ``add_note`` (PEP 678 came in 3.11)."""

    def __getattribute__(self, name: str) -> object:
        if name == "add_note":
            raise AttributeError(name)
        return super().__getattribute__(name)


def test_raise_on_exit_keeps_the_bodys_own_error_on_python_310(mixed: Mixed) -> None:
    with (
        pytest.raises(Py310Error, match="from the body") as info,
        gf.audit(mixed, raise_on_exit=True),
    ):
        mixed.eval()
        raise Py310Error("from the body")
    # the findings go where add_note would have put them (pytest shows __notes__ on 3.10 too)
    assert any("GFR002" in note for note in getattr(info.value, "__notes__", []))
    mixed.train()


def test_raise_if_findings(mixed: Mixed) -> None:
    with gf.audit(mixed) as report:
        mixed.eval()
    assert not report.ok
    with pytest.raises(gf.AuditError, match="GFR002"):
        report.raise_if_findings()
    gf.AuditReport().raise_if_findings()  # nothing to raise


def test_ignore_turns_a_check_off(mixed: Mixed) -> None:
    with gf.audit(mixed, ignore=["GFR002"]) as report:
        mixed.eval()
    assert report.ok
    with gf.audit(mixed, ignore="gfr002") as report:  # one code, any case
        mixed.train()
    assert report.ok


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="GFR999"):
        gf.audit(nn.Linear(1, 1), ignore=["GFR999"])
    with pytest.raises(gf.ScopeError, match="argument 1 is list"):
        gf.audit([nn.Linear(1, 1)])  # type: ignore[arg-type]
    audit = gf.audit(nn.Linear(1, 1))
    with audit:
        pass
    with pytest.raises(gf.ScopeError, match="already entered"), audit:
        pass


def test_several_modules_get_indexed_names() -> None:
    student, teacher = nn.Sequential(nn.Linear(2, 2)), nn.Sequential(nn.Linear(2, 2))
    with gf.audit(student, teacher) as report:
        teacher[0].eval()
    assert [f.module for f in report.findings] == ["1.0"]


def test_finding_is_data() -> None:
    finding = gf.Finding("GFR001", "msg")
    assert (finding.code, finding.message, finding.module, finding.detail) == (
        "GFR001",
        "msg",
        "",
        {},
    )
    assert str(finding) == "GFR001 msg"
    assert "no findings" in gf.AuditReport().format()


class Wrapper(nn.Module):
    """User code around a fast-path encoder, with an unguarded functional dropout."""

    def __init__(self) -> None:
        super().__init__()
        layer = nn.TransformerEncoderLayer(16, 4, 32, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 1, enable_nested_tensor=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.dropout(self.encoder(x), 0.1)


def test_nested_audits_both_see_findings_and_clean_up() -> None:
    torch.manual_seed(0)
    model = Wrapper().eval()
    x = torch.randn(2, 6, 16)
    with torch.no_grad():
        torch.manual_seed(3)
        plain = model(x)
        with gf.audit(model) as outer:
            with gf.audit(model.encoder, model) as inner:
                torch.manual_seed(3)
                audited = model(x)
            assert torch._C._len_torch_function_stack() == 0
    assert torch.equal(plain, audited)  # the fast path ran in both
    assert outer.codes() == inner.codes() == ["GFR005"]
    assert _hooks_left(model) == 0
    assert torch._C._len_torch_function_stack() == 0


def test_lazy_modules_materialised_in_the_block() -> None:
    model = nn.Sequential(nn.LazyLinear(3), nn.ReLU())
    with gf.audit(model, strict=True) as report, gf.inference(model):
        model(torch.ones(2, 4))
    assert report.ok, report.format()


class CountingMode(TorchFunctionMode):
    """A user's own torch-function mode (a FLOP counter, a tracer), entered in a forward."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def __torch_function__(
        self,
        func: Any,
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        self.calls += 1
        return func(*args, **(kwargs or {}))


class Counted(nn.Module):
    """Enters a mode of its own around torch submodules, then drops out unguarded."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.drop = nn.Dropout(0.1)
        self.counter = CountingMode()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with self.counter:
            h = self.drop(self.fc(x))  # the audit pops its op watch around nn.Dropout
        return F.dropout(h, 0.2)


def test_a_mode_entered_in_the_forward_keeps_its_place() -> None:
    model = Counted().eval()
    with gf.audit(model) as report, torch.no_grad():
        model(torch.ones(2, 4))
        assert torch._C._len_torch_function_stack() == 0  # the user's mode was popped
    assert model.counter.calls > 0
    assert report.codes() == ["GFR005"]  # the op watch was still on after the user's mode
    assert report.findings[0].detail["function"] == "F.dropout"


class Everything(nn.Module):
    """Every pitfall at once: BatchNorm, a Dropout module, functional dropout, a cache."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.bn = nn.BatchNorm1d(4)
        self.drop = nn.Dropout(0.2)
        self.cache: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.dropout(self.drop(self.bn(self.fc(x))), 0.1)
        self.cache = h
        return h


def test_every_message_is_one_line_with_what_where_and_fix() -> None:
    model = Everything()
    x = torch.randn(3, 4)
    try:
        with gf.audit(model) as report:
            model(x)  # train mode, grad on: GFR003, GFR004, GFR005 (x2), GFR006
            with torch.inference_mode():
                model(x)  # the cache becomes an inference tensor: GFR007
            model.eval()  # GFR002
            torch.set_grad_enabled(False)  # GFR001
    finally:
        torch.set_grad_enabled(True)
    assert sorted(set(report.codes())) == sorted(CODES)
    assert report.codes() == sorted(report.codes())  # ordered by code
    for finding in report.findings:
        message = finding.message
        assert "\n" not in message and message.count("Fix: ") == 1, message
        where = (finding.module or "Everything") if finding.code != "GFR001" else "MainThread"
        assert where in message.split("Fix: ")[0], message
        if finding.code in ("GFR003", "GFR005", "GFR006"):  # runtime findings name the thread
            assert "on thread 'MainThread' (the audit's own thread)" in message, message


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")
def test_torchscript_is_audited_at_entry_and_exit_with_a_warning() -> None:
    model = torch.jit.script(nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4)))
    with (
        pytest.warns(gf.GradfenceWarning, match="TorchScript.*GFR003, GFR005 and GFR006"),
        gf.audit(model) as report,
    ):
        model.eval()
        with torch.no_grad():
            model(torch.randn(2, 4))
    assert report.codes() == ["GFR002"]
    assert _hooks_left(model) == 0


# --- the decorator form ------------------------------------------------------------------


def test_decorated_function_is_audited_on_every_call(mixed: Mixed) -> None:
    @gf.audit(mixed, raise_on_exit=True)
    def validate(x: torch.Tensor) -> torch.Tensor:
        with gf.inference(mixed):
            return mixed(x)

    @gf.audit(mixed, raise_on_exit=True)
    def validate_leaky(x: torch.Tensor) -> torch.Tensor:
        mixed.eval()  # never undone
        with torch.no_grad():
            return mixed(x)

    x = torch.randn(2, 5, 8)
    assert validate(x).shape == (2, 5, 16)
    assert validate(x).shape == (2, 5, 16)  # a fresh audit per call
    with pytest.raises(gf.AuditError, match="GFR002"):
        validate_leaky(x)
    mixed.train()
    assert validate.__name__ == "validate"
    assert _hooks_left(mixed) == 0


def test_decorated_function_warns_its_findings_by_default(mixed: Mixed) -> None:
    @gf.audit(mixed, ignore=["GFR002"])
    def predict(x: torch.Tensor) -> torch.Tensor:
        return mixed.eval()(x)  # grad on: GFR003

    with pytest.warns(gf.GradfenceWarning, match="GFR003") as caught:
        out = predict(torch.randn(2, 5, 8))
    mixed.train()
    assert out.shape == (2, 5, 16)
    assert caught[0].filename == __file__  # points at the decorated function


def test_decorated_function_keeps_its_own_error(mixed: Mixed) -> None:
    @gf.audit(mixed)
    def broken() -> None:
        mixed.eval()
        raise KeyError("from the body")

    with pytest.raises(KeyError) as info:
        broken()
    mixed.train()
    assert any("GFR002" in note for note in getattr(info.value, "__notes__", []))


def test_decorated_coroutine_is_audited_until_it_completes(mixed: Mixed) -> None:
    import asyncio

    @gf.audit(mixed, raise_on_exit=True)
    async def predict(x: torch.Tensor) -> torch.Tensor:
        await asyncio.sleep(0)
        return await asyncio.to_thread(mixed.eval(), x)  # after an await, in another thread

    @gf.audit(mixed, raise_on_exit=True)
    async def predict_scoped(x: torch.Tensor) -> torch.Tensor:
        await asyncio.sleep(0)
        with gf.inference(mixed):
            return mixed(x)

    x = torch.randn(2, 5, 8)
    assert asyncio.run(predict_scoped(x)).shape == (2, 5, 16)
    with pytest.raises(gf.AuditError) as info:
        asyncio.run(predict(x))
    mixed.train()
    assert "GFR003" in str(info.value) and "not the thread that entered" in str(info.value)
    assert _hooks_left(mixed) == 0


def test_decorating_a_generator_or_a_class_is_refused(mixed: Mixed) -> None:
    def batches() -> Any:
        yield mixed(torch.randn(2, 5, 8))

    with pytest.raises(gf.ScopeError, match="generator function batches"):
        gf.audit(mixed)(batches)
    with pytest.raises(gf.ScopeError, match="cannot decorate the class Mixed"):
        gf.audit(mixed)(Mixed)


class ModeProbe(nn.Module):
    """Records how many torch-function modes are on while its forward runs."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.modes = -1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.modes = torch._C._len_torch_function_stack()
        return F.dropout(F.relu(self.fc(x)), 0.1, training=self.training)


def test_ops_other_than_dropout_pay_nothing() -> None:
    """The op watch wraps the dropout functions only: no mode puts every op through Python."""
    model = ModeProbe().eval()
    with gf.audit(model) as report, torch.no_grad():
        model(torch.ones(2, 4))
    assert model.modes == 0
    assert report.ok, report.format()
    model.train()
    with gf.audit(model) as report, torch.no_grad():
        model(torch.ones(2, 4))
    assert report.codes() == ["GFR005"]  # the functional dropout is still seen
