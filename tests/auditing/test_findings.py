"""Each finding code, produced by realistic user code, next to a look-alike that is correct."""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gradfence as gf


class Classifier(nn.Module):
    """A small training-style model: an encoder block with BatchNorm and dropout, a head."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU())
        self.drop = nn.Dropout(0.3)
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.drop(self.encoder(x)))


@pytest.fixture
def model() -> Classifier:
    torch.manual_seed(0)
    return Classifier()


@pytest.fixture
def batches() -> list[torch.Tensor]:
    torch.manual_seed(1)
    return [torch.randn(4, 6) for _ in range(3)]


# --- GFR001: grad mode / inference mode leaked ---------------------------------------


def setup_for_inference(model: nn.Module) -> None:
    """A helper from a serving module: 'turn off autograd' the wrong way."""
    model.eval()
    torch.set_grad_enabled(False)


def test_gfr001_leaked_set_grad_enabled(model: Classifier) -> None:
    try:
        with gf.audit(model, ignore=["GFR002"]) as report:
            setup_for_inference(model)
    finally:
        torch.set_grad_enabled(True)  # keep the leak out of the next test
    assert report.codes() == ["GFR001"]
    message = report.findings[0].message
    assert "grad enabled on entry, grad disabled on exit" in message
    assert "MainThread" in message and "Fix:" in message
    assert report.findings[0].detail["grad_enabled"] == [True, False]


def test_gfr001_look_alike_scoped_set_grad_enabled(model: Classifier) -> None:
    with gf.audit(model) as report, gf.inference(model), torch.set_grad_enabled(False):
        model(torch.randn(4, 6))
    assert report.ok, report.format()


def test_gfr001_leaked_inference_mode_guard(model: Classifier) -> None:
    guard = torch.inference_mode()
    with gf.audit() as report:
        guard.__enter__()  # entered by hand and never exited in the block
    guard.__exit__(None, None, None)
    assert report.codes() == ["GFR001"]
    assert "inference mode on exit" in report.findings[0].message


# --- GFR002: module mode changed and not restored ------------------------------------


def evaluate_accuracy(model: nn.Module, batches: list[torch.Tensor]) -> float:
    """The classic evaluation helper: switches to eval and never switches back."""
    model.eval()
    with torch.no_grad():
        hits = sum(int((model(x).argmax(1) == 0).sum()) for x in batches)
    return hits / sum(len(x) for x in batches)


def evaluate_accuracy_scoped(model: nn.Module, batches: list[torch.Tensor]) -> float:
    with gf.inference(model):
        hits = sum(int((model(x).argmax(1) == 0).sum()) for x in batches)
    return hits / sum(len(x) for x in batches)


def test_gfr002_helper_leaves_model_in_eval(model: Classifier, batches: list[torch.Tensor]) -> None:
    with gf.audit(model) as report:
        evaluate_accuracy(model, batches)
    assert report.codes() == ["GFR002"]
    finding = report.findings[0]
    assert finding.module == ""
    assert "train -> eval" in finding.message and "Classifier" in finding.message
    assert set(finding.detail["modules"]) == {name for name, _ in model.named_modules()}  # type: ignore[arg-type]


def test_gfr002_look_alike_scoped_helper(model: Classifier, batches: list[torch.Tensor]) -> None:
    with gf.audit(model) as report:
        evaluate_accuracy_scoped(model, batches)
    assert report.ok, report.format()
    assert model.training


def test_gfr002_names_the_unfrozen_submodule(model: Classifier) -> None:
    model.encoder[1].eval()  # a frozen BatchNorm the training code relies on
    with gf.audit(model, ignore=["GFR003"]) as report:
        model.train()  # "back to training" re-enables the frozen BatchNorm
    assert report.codes() == ["GFR002"]
    assert report.findings[0].module == "encoder.1"
    assert "encoder.1 (BatchNorm1d): eval -> train" not in report.findings[0].message
    assert report.findings[0].message.startswith("encoder.1: eval -> train")


# --- GFR003: a forward built an autograd graph during evaluation ---------------------


def predict_parallel(model: nn.Module, batches: list[torch.Tensor]) -> list[torch.Tensor]:
    """no_grad in the caller does not reach the worker threads (grad mode is per thread)."""
    with torch.no_grad(), ThreadPoolExecutor(max_workers=2) as pool:
        return list(pool.map(model, batches))


def predict_parallel_correct(model: nn.Module, batches: list[torch.Tensor]) -> list[torch.Tensor]:
    def work(x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return model(x)

    with ThreadPoolExecutor(max_workers=2) as pool:
        return list(pool.map(work, batches))


def test_gfr003_forward_in_worker_thread(model: Classifier, batches: list[torch.Tensor]) -> None:
    model.eval()
    with gf.audit(model) as report:
        outputs = predict_parallel(model, batches)
    assert any(out.requires_grad for out in outputs)  # the graphs are really there
    assert report.codes() == ["GFR003"]
    finding = report.findings[0]
    assert finding.detail["other_thread"] is True
    assert "not the thread that entered the audit" in finding.message
    assert "ThreadPoolExecutor" in finding.message
    assert finding.detail["count"] == len(batches)


def test_gfr003_audit_built_in_one_thread_entered_in_another(model: Classifier) -> None:
    model.eval()
    checker = gf.audit(model)  # built ahead, e.g. by a test fixture or a job scheduler

    def job() -> list[str]:
        with checker as report:
            model(torch.randn(4, 6))
        return [*report.codes(), report.findings[0].message]

    with ThreadPoolExecutor(max_workers=1) as pool:
        codes_and_message = pool.submit(job).result()
    assert codes_and_message[:-1] == ["GFR003"]
    assert "(the audit's own thread)" in codes_and_message[-1]


def test_gfr003_look_alike_worker_disables_grad(
    model: Classifier, batches: list[torch.Tensor]
) -> None:
    model.eval()
    with gf.audit(model) as report:
        outputs = predict_parallel_correct(model, batches)
    assert not any(out.requires_grad for out in outputs)
    assert report.ok, report.format()


def test_gfr003_eval_is_not_no_grad(model: Classifier, batches: list[torch.Tensor]) -> None:
    model.eval()
    with gf.audit(model) as report:
        predictions = [model(x) for x in batches]  # eval() alone: graphs kept alive
    assert report.codes() == ["GFR003"]
    assert report.findings[0].detail["other_thread"] is False
    assert "(the audit's own thread)" in report.findings[0].message
    assert predictions[0].grad_fn is not None


def test_gfr003_look_alike_frozen_model_builds_no_graph(
    model: Classifier, batches: list[torch.Tensor]
) -> None:
    model.eval().requires_grad_(False)  # frozen feature extractor: no graph without no_grad
    with gf.audit(model) as report:
        features = [model(x) for x in batches]
    assert not features[0].requires_grad
    assert report.ok, report.format()


def test_gfr003_submodule_called_directly(model: Classifier) -> None:
    model.eval()
    with gf.audit(model) as report:
        model.encoder(torch.randn(4, 6))  # e.g. an embed() helper calling a submodule
    assert report.codes() == ["GFR003"]
    assert report.findings[0].module == "encoder"


@dataclass
class Detections:
    boxes: torch.Tensor
    scores: torch.Tensor


class Detector(nn.Module):
    """Returns an output record (a dataclass), as detection and segmentation models do."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = nn.Linear(6, 8)

    def forward(self, x: torch.Tensor) -> Detections:
        features = self.backbone(x)
        return Detections(features[:, :4], features[:, 4:].sigmoid())


def test_gfr003_output_record() -> None:
    model = Detector().eval()
    with gf.audit(model) as report:
        model(torch.randn(2, 6))  # eval() alone: the record's tensors carry a graph
    assert report.codes() == ["GFR003"]
    with gf.audit(model) as report, torch.no_grad():
        model(torch.randn(2, 6))
    assert report.ok, report.format()


# --- GFR004: parameters or buffers mutated -------------------------------------------


class Embedder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.table = nn.Embedding(10, 4)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.table(ids)


def renormalised_lookup(model: Embedder, ids: torch.Tensor) -> torch.Tensor:
    """'Normalise the embeddings before retrieval': in place, on the live weights."""
    with torch.no_grad():
        model.table.weight.div_(model.table.weight.norm(dim=1, keepdim=True))
        return model(ids)


def renormalised_lookup_correct(model: Embedder, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return F.normalize(model(ids), dim=1)


def test_gfr004_in_place_write_to_parameter() -> None:
    model = Embedder().eval()
    with gf.audit(model) as report:
        renormalised_lookup(model, torch.tensor([1, 2]))
    assert report.codes() == ["GFR004"]
    finding = report.findings[0]
    assert finding.module == "table"
    assert "parameter weight was modified in place" in finding.message


def test_gfr004_look_alike_normalises_a_copy() -> None:
    model = Embedder().eval()
    with gf.audit(model, strict=True) as report:
        renormalised_lookup_correct(model, torch.tensor([1, 2]))
    assert report.ok, report.format()


def test_gfr004_data_write_needs_strict() -> None:
    model = Embedder().eval()
    for strict in (False, True):
        with gf.audit(model, strict=strict) as report:
            model.table.weight.data.mul_(2)  # .data writes bump no version counter
        assert report.codes() == (["GFR004"] if strict else [])
    assert "changed value without a version bump" in report.findings[0].message


def test_gfr004_replaced_buffer(model: Classifier) -> None:
    bn = model.encoder[1]
    with gf.audit(model) as report:
        bn.running_var = torch.ones(8)  # "reset" statistics during evaluation
    assert report.codes() == ["GFR004"]
    assert "buffer running_var was replaced" in report.findings[0].message


# --- GFR005: dropout active -----------------------------------------------------------


class Attention(nn.Module):
    """Hand-written attention with functional dropout, the way many repos write it."""

    def __init__(self, guarded: bool) -> None:
        super().__init__()
        self.qkv = nn.Linear(8, 24)
        self.p = 0.2
        self.guarded = guarded

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        weights = torch.softmax(q @ k.transpose(-2, -1), dim=-1)
        if self.guarded:
            weights = F.dropout(weights, self.p, training=self.training)
        else:
            weights = F.dropout(weights, self.p)  # training defaults to True
        return weights @ v


class FusedAttention(nn.Module):
    def __init__(self, guarded: bool) -> None:
        super().__init__()
        self.p = 0.1
        self.guarded = guarded

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = (self.p if self.training else 0.0) if self.guarded else self.p
        return F.scaled_dot_product_attention(x, x, x, dropout_p=p)


class Block(nn.Module):
    def __init__(self, attention: nn.Module) -> None:
        super().__init__()
        self.attn = attention
        self.out = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.attn(x))


@pytest.mark.parametrize("attention", [Attention, FusedAttention])
def test_gfr005_functional_dropout_in_eval(attention: type[nn.Module]) -> None:
    model = Block(attention(guarded=False))
    with gf.audit(model) as report, gf.inference(model):
        model(torch.randn(2, 5, 8))
    assert report.codes() == ["GFR005"]
    finding = report.findings[0]
    assert finding.module == "attn"
    assert f"attn ({attention.__name__})" in finding.message
    assert "test_findings.py:" in finding.message
    function = "F.dropout" if attention is Attention else "F.scaled_dot_product_attention"
    assert finding.detail["function"] == function
    if attention is Attention:
        assert "p=0.2 with training=True (F.dropout defaults to training=True)" in finding.message
        assert "Fix: pass training=self.training" in finding.message


@pytest.mark.parametrize("attention", [Attention, FusedAttention])
def test_gfr005_look_alike_gated_on_training(attention: type[nn.Module]) -> None:
    model = Block(attention(guarded=True))
    with gf.audit(model) as report, gf.inference(model):
        model(torch.randn(2, 5, 8))
    assert report.ok, report.format()


@pytest.mark.parametrize("attention", [Attention, FusedAttention])
def test_gfr005_gated_dropout_in_a_model_left_in_train_mode(attention: type[nn.Module]) -> None:
    # "no_grad is enough for validation": the call is gated, the model is not in eval.
    model = Block(attention(guarded=True))
    with gf.audit(model) as report, torch.no_grad():
        model(torch.randn(2, 5, 8))
    assert report.codes() == ["GFR005"]
    message = report.findings[0].message
    assert f"attn ({attention.__name__}) is in training mode" in message
    assert "Fix: evaluate under gf.inference(model)" in message
    assert report.findings[0].detail["module_training"] is True


def test_gfr005_dropout_module_left_in_train_mode(model: Classifier) -> None:
    model.eval()
    model.drop.train()  # e.g. restored from a stale flag
    with gf.audit(model) as report, torch.no_grad():
        model(torch.randn(4, 6))
    assert report.codes() == ["GFR005"]
    assert report.findings[0].module == "drop"
    assert "drop (Dropout) ran with training=True" in report.findings[0].message


def test_gfr005_functional_dropout_in_worker_thread() -> None:
    model = Block(Attention(guarded=False)).eval()
    seen: list[str] = []

    def work(x: torch.Tensor) -> torch.Tensor:
        seen.append(threading.current_thread().name)
        with torch.no_grad():
            return model(x)

    with gf.audit(model) as report, ThreadPoolExecutor(max_workers=1) as pool:
        list(pool.map(work, [torch.randn(1, 3, 8)]))
    assert report.codes() == ["GFR005"]
    assert seen[0] in report.findings[0].message


# --- GFR006: BatchNorm in training mode ---------------------------------------------


def validate_in_train_mode(model: nn.Module, batches: list[torch.Tensor]) -> None:
    """'no_grad is enough for validation': BatchNorm never looks at grad mode."""
    with torch.no_grad():
        for x in batches:
            model(x)


def test_gfr006_validation_rewrites_running_stats(
    model: Classifier, batches: list[torch.Tensor]
) -> None:
    bn = model.encoder[1]
    assert isinstance(bn, nn.BatchNorm1d)
    before = bn.running_mean.clone()
    with gf.audit(model, ignore=["GFR005"]) as report:
        validate_in_train_mode(model, batches)
    assert not torch.equal(before, bn.running_mean)
    assert report.codes() == ["GFR004", "GFR006"]
    finding = report.findings[1]
    assert finding.module == "encoder.1"
    assert "running statistics were updated" in finding.message
    assert finding.detail["count"] == len(batches)


def test_gfr006_look_alike_eval_mode(model: Classifier, batches: list[torch.Tensor]) -> None:
    with gf.audit(model, strict=True) as report, gf.inference(model):
        validate_in_train_mode(model, batches)
    assert report.ok, report.format()


def test_gfr006_look_alike_norm_without_running_stats() -> None:
    # Batch statistics in train and in eval alike: train mode changes nothing here.
    model = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8, track_running_stats=False))
    x = torch.randn(4, 6)
    with gf.audit(model, strict=True) as report, torch.no_grad():
        out = model(x)
    assert report.ok, report.format()
    with torch.no_grad():
        assert torch.equal(out, model.eval()(x))


def test_gfr006_instance_norm_with_running_stats() -> None:
    norm = nn.InstanceNorm1d(3, track_running_stats=True)
    with gf.audit(norm, ignore=["GFR004"]) as report, torch.no_grad():
        norm(torch.randn(2, 3, 5))
    assert report.codes() == ["GFR006"]


# --- GFR007: inference tensor stored on the module -----------------------------------


class CachingDecoder(nn.Module):
    """Caches its last keys on self, as incremental decoders do."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(4, 4)
        self.cache: dict[str, torch.Tensor] = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        keys = self.proj(x)
        self.cache["keys"] = keys
        return keys


def test_gfr007_cache_made_in_inference_mode() -> None:
    model = CachingDecoder()
    with gf.audit(model) as report, gf.inference(model, mode="inference_mode"):
        model(torch.randn(2, 4))
    assert report.codes() == ["GFR007"]
    finding = report.findings[0]
    assert finding.detail["tensor"] == "attribute cache['keys']"
    assert "CachingDecoder" in finding.message
    # and the finding is right: training on the cached keys now fails
    with pytest.raises(RuntimeError, match=r"[Ii]nference tensor"):
        (model.cache["keys"] * model.proj.weight.sum()).sum().backward()


def test_gfr007_look_alike_no_grad_cache() -> None:
    model = CachingDecoder()
    with gf.audit(model) as report, gf.inference(model):  # no_grad: a normal tensor
        model(torch.randn(2, 4))
    assert report.ok, report.format()


@pytest.mark.filterwarnings("ignore:.*weight_norm` is deprecated:FutureWarning")
@pytest.mark.parametrize("reparametrise", [nn.utils.weight_norm, nn.utils.spectral_norm])
def test_gfr007_look_alike_old_weight_reparametrisation(
    reparametrise: Callable[[nn.Module], nn.Module],
) -> None:
    # The old API stores the weight as a plain attribute, rebuilt before every forward.
    model = nn.Sequential(reparametrise(nn.Linear(4, 4)), nn.ReLU())
    with gf.audit(model) as report, gf.inference(model, mode="inference_mode"):
        model(torch.randn(2, 4))
    assert model[0].weight.is_inference()
    assert report.ok, report.format()
    model(torch.randn(2, 4)).sum().backward()  # and training right after works


def test_gfr007_buffer_registered_in_inference_mode(model: Classifier) -> None:
    with gf.audit(model, ignore=["GFR004"]) as report, torch.inference_mode():
        model.head.register_buffer("mask", torch.ones(3))
    assert report.codes() == ["GFR007"]
    assert report.findings[0].module == "head"
    assert report.findings[0].detail["tensor"] == "buffer mask"


def test_gfr007_model_loaded_in_inference_mode_is_one_finding() -> None:
    with torch.inference_mode():  # "load for serving", then evaluated and fine-tuned later
        model = CachingDecoder()
    with gf.audit(model) as report, gf.inference(model, mode="inference_mode"):
        model(torch.randn(2, 4))
    assert report.codes() == ["GFR007", "GFR007"]
    cache, inherited = report.findings
    assert cache.detail["tensor"] == "attribute cache['keys']"  # made by this block
    assert "during the audit" in cache.message
    assert inherited.module == "proj"
    assert inherited.detail["tensors"] == ["parameter proj.weight", "parameter proj.bias"]
    assert "already inference tensors when the audit began" in inherited.message
    assert "Fix: build or load the model outside inference_mode" in inherited.message


class NoisyFeatures(nn.Module):
    """A parameter-free user layer inside torch containers (a leaf with no children)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.dropout1d(x, 0.5)


def test_gfr005_user_leaf_inside_sequential() -> None:
    model = nn.Sequential(nn.Linear(6, 6), nn.Sequential(NoisyFeatures()))
    with gf.audit(model) as report, gf.inference(model):
        model(torch.randn(2, 3, 6))
    assert report.codes() == ["GFR005"]
    assert report.findings[0].module == "1.0"
    assert report.findings[0].detail["function"] == "F.dropout1d"


def test_gfr005_recurrent_dropout_in_train_mode() -> None:
    lstm = nn.LSTM(4, 4, num_layers=2, dropout=0.3, batch_first=True)
    with gf.audit(lstm) as report, torch.no_grad():
        lstm(torch.randn(2, 3, 4))
    assert report.codes() == ["GFR005"]
    assert "dropout=0.3" in report.findings[0].message
    lstm.eval()
    with gf.audit(lstm) as report, torch.no_grad():
        lstm(torch.randn(2, 3, 4))
    assert report.ok, report.format()
