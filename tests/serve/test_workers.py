"""Several model workers: each in its own scope and thread, same answers as one."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import httpx
import pytest
import torch
from torch import Tensor

from gradfence.serve.batcher import Batcher, available_cores
from gradfence.serve.model import load_model_dir

from .conftest import WORDS, ServerFactory, StubClassifier


class Concurrent(StubClassifier):
    """Each forward waits until another forward runs at the same time (or times out)."""

    def __init__(self, parties: int) -> None:
        super().__init__()
        self.barrier = threading.Barrier(parties)
        self.threads_seen: list[int] = []
        self.idents: list[int] = []

    def forward(self, texts: Sequence[str]) -> Tensor:
        if texts != ["warm-up"]:
            self.threads_seen.append(torch.get_num_threads())
            self.idents.append(threading.get_ident())
            self.barrier.wait(30)
        return super().forward(texts)


def test_each_worker_runs_in_eval_and_grad_off_in_its_own_thread() -> None:
    model = Concurrent(parties=2)
    assert model.training  # the batcher's scopes put it in eval mode
    batcher = Batcher(model, workers=2, max_wait_ms=0)  # type: ignore[arg-type]
    batcher.start()
    first = batcher.submit(["b"])
    while batcher.queue_depth:  # taken by one worker, which waits for a second forward
        time.sleep(0.001)
    second = batcher.submit(["g"])  # only the other worker can take it
    assert first.result(30)[0].label == "negative"
    assert second.result(30)[0].label == "positive"
    batcher.stop()
    assert len(set(model.idents)) == 2 and threading.get_ident() not in model.idents
    runs = model.seen
    assert len(runs) == 4  # each worker warmed up in its own scope, then ran one batch
    assert all(
        seen == {"grad": False, "training": False, "thread": "gradfence-inference"} for seen in runs
    )
    # each worker runs with its share of the cores
    assert model.threads_seen == [max(1, available_cores() // 2)] * 2
    assert model.training  # both scopes closed: the module is as it was


def test_workers_1_and_2_give_the_same_scores(tiny_model_dir: Path) -> None:
    model = load_model_dir(tiny_model_dir)
    texts = [" ".join(WORDS[(i * 7 + k) % len(WORDS)] for k in range(1 + i % 9)) for i in range(60)]
    answers = []
    for workers in (1, 2):
        batcher = Batcher(model, workers=workers, max_batch_size=8, max_wait_ms=2)
        batcher.start()
        futures = [batcher.submit([text]) for text in texts]
        answers.append([f.result(30)[0] for f in futures])
        batcher.stop()
    one, two = answers
    assert [p.label for p in one] == [p.label for p in two]
    for a, b in zip(one, two, strict=True):
        # batches differ in padding between runs: equal to float rounding
        assert list(a.scores.values()) == pytest.approx(list(b.scores.values()), abs=1e-6)


def test_service_runs_one_worker_per_core_by_default(serve_model: ServerFactory) -> None:
    server = serve_model(StubClassifier(), workers=None)  # the service default, not the fixture's
    info = httpx.get(f"{server.url}/v1/model").json()
    assert info["batching"]["workers"] == available_cores()
    assert info["inference_thread"]["thread"].startswith("gradfence-inference")
    assert not info["inference_thread"]["grad_enabled"]


def test_importing_the_model_module_leaves_the_environment_alone() -> None:
    env = {k: v for k, v in os.environ.items() if "OFFLINE" not in k}
    code = (
        "import os, gradfence.serve.model; "
        "print([k for k in os.environ if k in ('HF_HUB_OFFLINE', 'TRANSFORMERS_OFFLINE')])"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--workers", "0"], "--workers must be at least 1"),
        (["--workers", "-3"], "--workers must be at least 1"),
    ],
)
def test_bad_workers_flag_is_one_line_exit_2(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from gradfence.cli import main

    assert main(["serve", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("gradfence: error: ") and err.count("\n") == 1
    assert message in err


def test_onnx_runtime_without_onnxruntime_is_one_line_exit_2(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import importlib.util

    from gradfence.cli import main

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "onnxruntime" else real(name)
    )
    assert main(["serve", "--runtime", "onnx"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pip install 'gradfence[onnx]'" in err
