"""The embedded default model, end to end, and the loading guards (hash, safetensors only)."""

from __future__ import annotations

import shutil
from pathlib import Path

import httpx
import pytest
import torch

import gradfence as gf
from gradfence.serve.data import LABELS, load_tweets
from gradfence.serve.model import (
    DEFAULT_ENCODER_SHA256,
    ModelIntegrityError,
    default_encoder_dir,
    heldout_dataset,
    load_default,
    load_encoder,
    load_model_dir,
    sha256_of,
)

from .conftest import ServerFactory

CLEAR = {
    "I love this phone, it is absolutely wonderful! The screen is bright, the battery lasts "
    "for days and the camera takes beautiful pictures even at night.": "positive",
    "This is the worst customer service ever, I hate it.": "negative",
    "Great job, thank you so much, amazing work": "positive",
    "terrible, broken again, what a disaster": "negative",
}


def test_default_model_served_end_to_end(serve_model: ServerFactory) -> None:
    server = serve_model(load_default)
    response = httpx.post(f"{server.url}/v1/predict", json={"texts": list(CLEAR)}, timeout=60)
    assert response.status_code == 200
    body = response.json()
    assert body["model"].startswith("all-MiniLM-L6-v2+head-")
    assert [p["label"] for p in body["predictions"]] == list(CLEAR.values())
    info = httpx.get(f"{server.url}/v1/model").json()
    assert info["labels"] == list(LABELS)
    state = info["inference_thread"]
    assert state["eval_mode"] and not state["grad_enabled"] and state["inference_mode"]


def test_default_model_is_a_plain_module_for_benchmarks() -> None:
    model = load_default()
    assert not model.training
    texts = list(CLEAR)
    with gf.inference(model):
        logits = model(texts)
    assert logits.shape == (len(texts), len(LABELS)) and not logits.requires_grad
    assert [LABELS[i] for i in logits.argmax(1).tolist()] == list(CLEAR.values())
    with gf.inference(model):  # texts of different lengths run in length groups
        alone = torch.cat([model([t]) for t in texts])
    assert torch.allclose(logits, alone, atol=1e-5)
    loader = torch.utils.data.DataLoader(heldout_dataset(), batch_size=4)
    batch_texts, labels = next(iter(loader))
    assert isinstance(batch_texts[0], str) and labels.dtype == torch.int64


def test_heldout_split_is_fixed_and_disjoint() -> None:
    heldout = heldout_dataset()
    assert len(heldout) == 3812
    train_texts = {t.text for t in load_tweets("train")}
    assert not {text for text, _ in heldout.items} & train_texts
    assert {label for _, label in heldout.items} == {0, 1, 2}


def test_pinned_hash_matches_installed_encoder() -> None:
    assert sha256_of(default_encoder_dir() / "model.safetensors") == DEFAULT_ENCODER_SHA256


def test_tampered_encoder_is_refused(tmp_path: Path) -> None:
    source = default_encoder_dir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "vocab.txt"):
        shutil.copy(source / name, tmp_path / name)
    (tmp_path / "model.safetensors").write_bytes(b"not the pinned weights")
    with pytest.raises(ModelIntegrityError, match="differs from pinned 53aa5117"):
        load_encoder(tmp_path)


def test_model_dir_refuses_pickled_weights(tiny_model_dir: Path, tmp_path: Path) -> None:
    for path in tiny_model_dir.iterdir():
        if path.name != "model.safetensors":
            shutil.copy(path, tmp_path / path.name)
    state = load_model_dir(tiny_model_dir).model.state_dict()
    torch.save(state, tmp_path / "pytorch_model.bin")
    with pytest.raises(OSError, match=r"safetensors|model\.safetensors"):
        load_model_dir(tmp_path)
