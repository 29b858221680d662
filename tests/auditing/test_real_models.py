"""gf.audit on models people really run: Hugging Face BERT (SDPA attention), torch.compile."""

from __future__ import annotations

import pytest
import torch

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
