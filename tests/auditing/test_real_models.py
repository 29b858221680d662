"""gf.audit on models people really run: Hugging Face BERT (SDPA attention), torch.compile."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gradfence as gf

transformers = pytest.importorskip("transformers")


def tiny_bert() -> torch.nn.Module:
    """A 2-layer BERT from a small config (no download), SDPA attention, dropout 0.1."""
    config = transformers.BertConfig(
        vocab_size=100,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
        attn_implementation="sdpa",
    )
    torch.manual_seed(0)
    return transformers.BertModel(config)


@pytest.fixture(scope="module")
def bert() -> torch.nn.Module:
    return tiny_bert()


def test_sdpa_dropout_is_one_finding_per_layer(bert: torch.nn.Module) -> None:
    bert.train()  # evaluated in train mode: every layer's attention drops
    ids = torch.randint(0, 100, (2, 8))
    with gf.audit(bert, ignore=["GFR003"]) as report, torch.no_grad():
        bert(ids)
        bert(ids)
    bert.eval()
    function = "F.scaled_dot_product_attention"
    sdpa = [f for f in report.findings if f.detail.get("function") == function]
    assert [f.module for f in sdpa] == [
        "encoder.layer.0.attention.self",
        "encoder.layer.1.attention.self",
    ], report.format()
    for finding in sdpa:
        assert f"in the forward of {finding.module} (" in finding.message
        assert finding.detail["count"] == 2  # once per call, in its own layer only
        assert "[seen 2 times]" in finding.message


def test_bert_in_eval_has_no_findings(bert: torch.nn.Module) -> None:
    ids = torch.randint(0, 100, (2, 8))
    with gf.audit(bert) as report, gf.inference(bert):
        bert(ids)
    assert report.ok, report.format()


# --- torch.compile ---------------------------------------------------------------------
# backend="eager": the hooks are traced by dynamo whatever the backend (inductor only
# compiles the captured graph, and takes a minute here), so this is what users run
# as far as the audit is concerned, at a tenth of the time.


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.bn = nn.BatchNorm1d(4)
        self.drop = nn.Dropout(0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.dropout(self.drop(self.bn(self.fc(x))), 0.3, training=self.training)


def test_compiled_fullgraph_wrong_evaluation_runs_and_says_what_was_blind() -> None:
    torch.manual_seed(0)
    net = Net()
    compiled = torch.compile(net, fullgraph=True, backend="eager")
    x = torch.randn(3, 4)
    for _ in range(9):  # more audits than dynamo's recompile limit (8): no hard failure
        with gf.audit(net) as report, torch.no_grad():
            compiled(x)  # train mode: dropout and BatchNorm statistics, compiled in the audit
    assert sorted(report.blind) == ["GFR003", "GFR005", "GFR006"], report.format()
    assert "torch.compile" in report.blind["GFR005"]
    assert "not checked: GFR003, GFR005, GFR006" in report.format()
    # what the audit sees from outside the graph still counts
    assert "GFR004" in report.codes(), report.format()


def test_compiled_wrapper_audited_keeps_its_results_and_outer_checks() -> None:
    torch.manual_seed(0)
    compiled = torch.compile(Net().eval(), fullgraph=True, backend="eager")
    x = torch.randn(3, 4)
    with torch.no_grad():
        expected = compiled(x)
    with gf.audit(compiled) as report:  # grad on: the wrapper's own forward is eager
        out = compiled(x)
    assert torch.equal(out.detach(), expected)
    assert report.codes() == ["GFR003"], report.format()
    assert sorted(report.blind) == ["GFR005", "GFR006"]  # inside the graph only


class Outer(nn.Module):
    """A user model around a compiled part: the op watch is on when the graph runs."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = torch.compile(Net(), fullgraph=True, backend="eager")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.dropout(self.inner(x), 0.2) + 1


def test_op_watch_around_a_compiled_submodule() -> None:
    torch.manual_seed(0)
    model = Outer()  # train mode: the graph's own dropout drops while the op watch is on
    x = torch.randn(3, 4)
    for _ in range(3):  # audited again and again: no recompilation limit is reached
        with gf.audit(model, ignore=["GFR004"]) as report, torch.no_grad():
            model(x)
        # the F.dropout outside the graph is seen; inside it, the report says blind
        # (backend="eager" runs the graph's F.dropout calls as Python: seen there too)
        outside = [f for f in report.findings if f.module == ""]
        assert [f.code for f in outside] == ["GFR005"], report.format()
        assert "F.dropout" in outside[0].message
        assert str(outside[0].detail["site"]).startswith(__file__)
        assert sorted(report.blind) == ["GFR005", "GFR006"]
        assert "inner (OptimizedModule), a torch.compile wrapper" in report.blind["GFR005"]
