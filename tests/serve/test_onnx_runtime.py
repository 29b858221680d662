"""``--runtime onnx``: same scores as torch within 1e-5, export cached by weight hash;
``--runtime auto`` (the default): ONNX Runtime when it is installed and checks out."""

from __future__ import annotations

import functools
import importlib
import logging
import shutil
from pathlib import Path

import httpx
import pytest
import torch

import gradfence as gf
from gradfence.serve import model as serve_model
from gradfence.serve.batcher import Batcher
from gradfence.serve.model import load_model, load_model_dir

from .conftest import WORDS, ServerFactory

pytest.importorskip("onnxruntime", reason="onnxruntime is not available on this platform")
from gradfence.serve import onnx_runtime

TEXTS = [" ".join(WORDS[(i * 3 + k) % len(WORDS)] for k in range(1 + i % 11)) for i in range(40)]


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv(onnx_runtime.CACHE_ENV, str(tmp_path))
    return tmp_path


def test_onnx_scores_match_torch_through_the_workers(tiny_model_dir: Path, cache: Path) -> None:
    reference = load_model_dir(tiny_model_dir)
    model = load_model(tiny_model_dir, runtime="onnx")
    assert isinstance(model, onnx_runtime.OnnxClassifier)
    assert (model.labels, model.model_id) == (reference.labels, reference.model_id)
    with gf.inference(reference):
        expected = reference(TEXTS).softmax(-1)
    batcher = Batcher(model, workers=2, max_batch_size=8, max_wait_ms=2)
    batcher.start()
    futures = [batcher.submit([text]) for text in TEXTS]
    served = torch.tensor([list(f.result(30)[0].scores.values()) for f in futures])
    batcher.stop()
    assert (served - expected).abs().max().item() <= 1e-5


def test_export_is_cached_by_weight_hash(
    tiny_model_dir: Path, cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    exports: list[Path] = []
    real_export = onnx_runtime.export_onnx

    def counted(model: onnx_runtime.TokenizedClassifier, path: Path) -> None:
        exports.append(path)
        real_export(model, path)

    monkeypatch.setattr(onnx_runtime, "export_onnx", counted)
    first = onnx_runtime.load_onnx(load_model_dir(tiny_model_dir))
    again = onnx_runtime.load_onnx(load_model_dir(tiny_model_dir))
    assert exports == [first.path] and again.path == first.path  # built once, then reused
    assert first.path.parent == cache / "onnx" and first.path.is_file()

    changed = load_model_dir(tiny_model_dir)
    with torch.no_grad():
        changed.model.classifier.bias.add_(0.5)  # other weights: another export
    third = onnx_runtime.load_onnx(changed)
    assert third.path != first.path and exports == [first.path, third.path]


def test_an_export_that_disagrees_with_torch_fails_at_start(
    tiny_model_dir: Path, cache: Path
) -> None:
    other = load_model_dir(tiny_model_dir)
    with torch.no_grad():
        other.model.classifier.weight.mul_(-1.0)
    stale = onnx_runtime.load_onnx(other).path
    model = load_model_dir(tiny_model_dir)
    shutil.copyfile(stale, onnx_runtime.export_path(model))  # a damaged cache entry
    with pytest.raises(onnx_runtime.RuntimeMismatchError, match="differ from torch by"):
        onnx_runtime.load_onnx(model)


def test_auto_runs_onnx_when_installed_and_torch_otherwise(
    tiny_model_dir: Path, cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert load_model(tiny_model_dir, runtime="auto").runtime == "onnx"
    monkeypatch.setattr(serve_model, "onnx_installed", lambda: False)
    assert load_model(tiny_model_dir, runtime="auto").runtime == "torch"


def test_auto_falls_back_to_torch_when_onnx_scores_differ(
    tiny_model_dir: Path,
    cache: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.setattr(onnx_runtime, "TOLERANCE", -1.0)  # no export can pass the check
    with caplog.at_level(logging.WARNING, logger="gradfence.serve"):
        model = load_model(tiny_model_dir, runtime="auto")
    assert model.runtime == "torch" and not isinstance(model, onnx_runtime.OnnxClassifier)
    assert any(
        "serving tiny-bert" in r.getMessage() and "with torch" in r.getMessage()
        for r in caplog.records
    ), caplog.text
    with pytest.raises(onnx_runtime.RuntimeMismatchError):  # asked for by name: refused
        load_model(tiny_model_dir, runtime="onnx")


# A loader resolving its runtime differently in the second worker process, as
# ``--runtime auto`` could if ONNX Runtime failed its check in one process only. Worker
# processes import it by name, so it lives in a module of its own (tests are imported
# by path).
MIXED_LOADER = """
import multiprocessing

from gradfence.serve.model import load_model


def torch_in_worker_2(model_dir):
    second = multiprocessing.current_process().name == "gradfence-inference-2"
    return load_model(model_dir, runtime="torch" if second else "onnx")
"""


def test_workers_running_another_runtime_are_reported(
    tiny_model_dir: Path,
    cache: Path,
    serve_model: ServerFactory,
    caplog: pytest.LogCaptureFixture,
    tmp_path_factory: pytest.TempPathFactory,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    tmp_path = tmp_path_factory.mktemp("loader")
    (tmp_path / "gf_mixed_loader.py").write_text(MIXED_LOADER)
    monkeypatch.syspath_prepend(str(tmp_path))  # worker processes get this sys.path
    mixed = importlib.import_module("gf_mixed_loader")
    loader = functools.partial(mixed.torch_in_worker_2, tiny_model_dir)
    with caplog.at_level(logging.WARNING, logger="gradfence.serve"):
        server = serve_model(loader, workers=2, worker_processes=True)
    info = httpx.get(f"{server.url}/v1/model", timeout=30).json()
    assert info["runtime"] == "onnx + torch"
    warnings = [r.getMessage() for r in caplog.records if "runs the model with" in r.getMessage()]
    assert warnings == [
        "gradfence-inference-2 runs the model with torch, the server's copy with onnx"
    ]


def test_workers_running_the_servers_runtime_report_it_alone(
    tiny_model_dir: Path, cache: Path, serve_model: ServerFactory
) -> None:
    loader = functools.partial(load_model, tiny_model_dir, "onnx")
    server = serve_model(loader, workers=2, worker_processes=True)
    assert httpx.get(f"{server.url}/v1/model", timeout=30).json()["runtime"] == "onnx"
