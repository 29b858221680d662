"""Model worker processes: same answers as in-process, own scope, no orphans, no hangs."""

from __future__ import annotations

import argparse
import asyncio
import functools
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

import gradfence as gf
from gradfence.serve import cli as serve_cli
from gradfence.serve.batcher import Batcher, BatcherStoppedError, score_rows
from gradfence.serve.model import load_model, load_model_dir
from gradfence.serve.processes import ModelProcess, WorkerLostError

from .conftest import WORDS, ServerFactory

TEXTS = [" ".join(WORDS[i : i + 1 + i % 5]) for i in range(len(WORDS))] + ["the", "not bad"]


def _in_process_rows(model_dir: Path, texts: list[str]) -> list[list[float]]:
    model = load_model_dir(model_dir)
    with gf.inference(model):
        return score_rows(model, model.encode(texts))


def _pid_gone(pid: int, within_s: float) -> bool:
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        try:  # our own child: reap it, or it stays a zombie
            if os.waitpid(pid, os.WNOHANG)[0] == pid:
                return True
        except ChildProcessError:
            pass
        time.sleep(0.05)
    return False


@pytest.fixture(scope="module")
def process_batcher(tiny_model_dir: Path) -> Iterator[Batcher]:
    model = load_model_dir(tiny_model_dir)
    batcher = Batcher(
        model,
        workers=2,
        max_batch_size=4,
        max_wait_ms=2,
        loader=functools.partial(load_model, tiny_model_dir),
    )
    batcher.start(warmup=["warm up"], timeout_s=120)
    yield batcher
    batcher.stop()


def test_process_workers_answer_as_the_model_does_in_process(
    process_batcher: Batcher, tiny_model_dir: Path
) -> None:
    async def predict_each() -> list[list[float]]:
        answers = await asyncio.gather(*(process_batcher.predict([t], 30) for t in TEXTS))
        return [list(answer[0].scores.values()) for answer in answers]

    rows = asyncio.run(predict_each())
    expected = _in_process_rows(tiny_model_dir, TEXTS)
    assert len(rows) == len(expected)
    for got, want in zip(rows, expected, strict=True):
        assert got == pytest.approx(want, abs=1e-5)
    # the texts were spread over several batches, not run one request at a time
    assert process_batcher.stats.batches < len(TEXTS)


def test_each_process_runs_its_model_in_eval_and_inference_mode(
    process_batcher: Batcher,
) -> None:
    async def states() -> list[dict[str, object]]:
        return [await process_batcher.inspect_thread(30) for _ in range(6)]

    seen = asyncio.run(states())
    for state in seen:
        assert state["eval_mode"] is True and state["modules_in_train_mode"] == []
        assert state["grad_enabled"] is False and state["inference_mode"] is True
        assert state["pid"] != os.getpid()
        assert str(state["thread"]).startswith("gradfence-inference-")


def test_ctrl_c_reaching_the_whole_process_group_does_not_stop_a_worker(
    process_batcher: Batcher,
) -> None:
    pid = asyncio.run(process_batcher.inspect_thread(30))["pid"]
    assert isinstance(pid, int)
    os.kill(pid, signal.SIGINT)  # what a terminal's Ctrl+C sends every process of the group
    os.kill(pid, signal.SIGTERM)
    assert not _pid_gone(pid, 1.0)
    answers = asyncio.run(process_batcher.predict(["good day"], 30))
    assert answers[0].label in ("negative", "neutral", "positive")
    assert process_batcher.alive


def test_a_worker_that_dies_fails_its_requests_and_the_batcher_at_once(
    tiny_model_dir: Path,
) -> None:
    model = load_model_dir(tiny_model_dir)
    batcher = Batcher(
        model, workers=1, max_wait_ms=0, loader=functools.partial(load_model, tiny_model_dir)
    )
    batcher.start(warmup=[], timeout_s=120)
    pid = asyncio.run(batcher.inspect_thread(30))["pid"]
    assert isinstance(pid, int)
    os.kill(pid, signal.SIGKILL)
    started = time.monotonic()
    with pytest.raises((WorkerLostError, BatcherStoppedError)):
        asyncio.run(batcher.predict(["good"], 30))
    assert time.monotonic() - started < 10  # an error, not the request timeout
    deadline = time.monotonic() + 10
    while batcher.alive and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not batcher.alive  # readiness turns 503
    batcher.stop()


def test_a_model_that_fails_to_load_in_its_process_fails_start(tmp_path: Path) -> None:
    worker = ModelProcess(functools.partial(load_model, tmp_path / "missing"), name="w")
    with pytest.raises(FileNotFoundError, match="missing"):
        worker.start()
    assert not worker.alive


def test_a_loader_that_cannot_reach_a_process_is_refused_in_one_line() -> None:
    worker = ModelProcess(lambda: load_model(None), name="w")
    with pytest.raises(TypeError, match="picklable model loader"):
        worker.start()


def test_worker_processes_end_when_the_server_is_killed(tiny_model_dir: Path) -> None:
    parent = textwrap.dedent(
        f"""
        import functools, sys
        from pathlib import Path
        from gradfence.serve.model import load_model
        from gradfence.serve.processes import ModelProcess
        worker = ModelProcess(functools.partial(load_model, Path({str(tiny_model_dir)!r})))
        worker.start()
        print(worker.state()["pid"], flush=True)
        sys.stdin.read()  # until killed
        """
    )
    server = subprocess.Popen(
        [sys.executable, "-c", parent], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert server.stdout is not None
        child = int(server.stdout.readline())
        assert not _pid_gone(child, 0.2)  # it is running
        server.kill()  # no clean-up code runs: the closed pipe must end the child
        server.wait(10)
        assert _pid_gone(child, 15)
    finally:
        server.kill()


def test_the_service_runs_worker_processes_and_says_so(
    serve_model: ServerFactory, tiny_model_dir: Path
) -> None:
    loader = functools.partial(load_model, tiny_model_dir)
    url = serve_model(loader, workers=2, worker_processes=True).url
    info = httpx.get(f"{url}/v1/model", timeout=30).json()
    assert info["batching"]["workers"] == 2
    assert info["batching"]["worker_kind"] == "process"
    state = info["inference_thread"]
    assert state["pid"] != os.getpid() and state["inference_mode"] is True
    answer = httpx.post(f"{url}/v1/predict", json={"texts": TEXTS[:3]}, timeout=30)
    assert answer.status_code == 200
    got = [list(p["scores"].values()) for p in answer.json()["predictions"]]
    for row, want in zip(got, _in_process_rows(tiny_model_dir, TEXTS[:3]), strict=True):
        assert row == pytest.approx(want, abs=1e-5)


def _settings(*argv: str) -> Any:
    parser = argparse.ArgumentParser()
    serve_cli.register(parser.add_subparsers())
    return serve_cli._settings_from(parser.parse_args(["serve", *argv]))


def test_the_command_line_runs_worker_processes_unless_told_otherwise() -> None:
    assert _settings().worker_processes is True
    assert _settings("--worker-kind", "thread").worker_processes is False
    # Ray replicas are processes already: each runs its model in threads
    assert _settings("--backend", "ray").worker_processes is False
