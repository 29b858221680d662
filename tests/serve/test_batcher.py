"""The dynamic batcher on its own: flush rules, request splitting, errors, draining."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Sequence

import pytest
from torch import Tensor

from gradfence.serve.batcher import (
    Batcher,
    BatcherStoppedError,
    BatchMismatchError,
    BatchStats,
    QueueFullError,
)

from .conftest import StubClassifier, started, stub_label


def test_flushes_at_max_batch_size_and_splits_large_requests() -> None:
    model = StubClassifier()
    batcher = started(model, max_batch_size=4, max_wait_ms=10_000)
    model.gate.clear()
    first = batcher.submit(first_texts())  # 5 texts: a big request
    texts = [f"{'g' * (i % 3)}{'b' * (i % 2)} {i}" for i in range(11)]
    second = batcher.submit(texts)
    model.gate.set()
    assert [p.label for p in second.result(30)] == [stub_label(t) for t in texts]
    assert [p.label for p in first.result(30)] == [stub_label(t) for t in first_texts()]
    # 16 texts, a 10 s wait: only the size rule can have flushed these batches; the
    # oldest text is in the first, the rest chosen by length (see test_token_budget.py;
    # small requests are batched apart: test_fairness.py)
    assert [len(batch) for batch in model.batches] == [4, 4, 4, 4]
    assert model.batches[0][0] == "b"
    assert sorted(t for batch in model.batches for t in batch) == sorted(first_texts() + texts)
    batcher.stop()


def first_texts() -> list[str]:
    return ["b", "g b", "b g", "g g", "b b"]


def test_max_wait_flushes_a_partial_batch() -> None:
    model = StubClassifier()
    batcher = started(model, max_batch_size=32, max_wait_ms=20)
    assert [p.label for p in batcher.submit(["ggg"]).result(30)] == ["positive"]
    assert model.batches == [["ggg"]]
    batcher.stop()


def test_wrong_number_of_rows_fails_every_request_in_the_batch() -> None:
    model = StubClassifier(rows_delta=1)
    batcher = started(model, max_batch_size=8, max_wait_ms=50)
    futures = [batcher.submit(["a", "b"]), batcher.submit(["c"])]
    for future in futures:
        with pytest.raises(BatchMismatchError, match="model returned shape"):
            future.result(30)
    assert batcher.alive
    batcher.stop()


def test_queue_bound_and_stop_drains_accepted_work() -> None:
    model = StubClassifier()
    batcher = started(model, max_batch_size=2, max_queue=4, max_wait_ms=0)
    model.gate.clear()
    stalled = batcher.submit(["b"])  # taken by the thread, which then waits on the gate
    while batcher.queue_depth:
        time.sleep(0.001)
    accepted = [batcher.submit(["g", "g"]), batcher.submit(["b", "b"])]
    with pytest.raises(QueueFullError):
        batcher.submit(["x"])
    model.gate.set()
    batcher.stop()  # finishes everything queued before the thread ends
    assert [p.label for p in stalled.result(0)] == ["negative"]
    assert [p.label for f in accepted for p in f.result(0)] == ["positive"] * 2 + ["negative"] * 2
    with pytest.raises(BatcherStoppedError):
        batcher.submit(["b"])


def test_timed_out_request_is_dropped_from_the_queue() -> None:
    model = StubClassifier()
    batcher = started(model, max_batch_size=1, max_wait_ms=0)
    model.gate.clear()
    blocker = batcher.submit(["b"])

    async def give_up() -> None:
        with pytest.raises(asyncio.TimeoutError):  # the builtin TimeoutError from 3.11 on
            await batcher.predict(["dropped"], timeout_s=0.05)

    asyncio.run(give_up())
    model.gate.set()
    assert blocker.result(30)[0].label == "negative"
    assert batcher.submit(["g"]).result(30)[0].label == "positive"
    assert ["dropped"] not in model.batches
    batcher.stop()


def test_model_left_in_train_mode_cannot_start() -> None:
    class StaysInTrain(StubClassifier):
        def train(self, mode: bool = True) -> StaysInTrain:
            return super().train(True)  # ignores eval(): e.g. a misbehaving override

    batcher = Batcher(StaysInTrain())
    with pytest.raises(RuntimeError, match="train mode"):
        batcher.start()
    assert not batcher.alive


def test_one_bad_request_does_not_fail_the_others_in_its_batch() -> None:
    attempts: list[list[str]] = []

    class Poisoned(StubClassifier):
        def forward(self, texts: Sequence[str]) -> Tensor:
            attempts.append(list(texts))
            if "poison" in texts:
                raise ValueError("cannot encode 'poison'")
            return super().forward(texts)

    model = Poisoned()
    batcher = started(model, max_batch_size=8, max_wait_ms=0)
    model.gate.clear()  # hold the thread so that the next three requests share a batch
    first = batcher.submit(["g"])
    while batcher.queue_depth:
        time.sleep(0.001)
    good, bad, other = (
        batcher.submit(["bb"]),
        batcher.submit(["poison", "g"]),
        batcher.submit(["g"]),
    )
    model.gate.set()
    assert first.result(30)[0].label == "positive"
    assert good.result(30)[0].label == "negative"
    assert other.result(30)[0].label == "positive"
    with pytest.raises(ValueError, match="poison"):
        bad.result(30)
    # all three shared one batch, which failed; then each ran alone
    assert attempts == [["g"], ["bb", "poison", "g", "g"], ["bb"], ["poison", "g"], ["g"]]


def test_timed_out_texts_leave_the_queue_and_free_their_places() -> None:
    model = StubClassifier()
    batcher = started(model, max_batch_size=1, max_queue=4, max_wait_ms=0)
    model.gate.clear()
    blocker = batcher.submit(["b"])  # taken by the thread, which then waits on the gate
    while batcher.queue_depth:
        time.sleep(0.001)

    async def give_up() -> None:
        with pytest.raises(asyncio.TimeoutError):  # the builtin TimeoutError from 3.11 on
            await batcher.predict(["dropped"] * 4, timeout_s=0.05)

    asyncio.run(give_up())
    assert batcher.queue_depth == 0  # what /metrics reports
    accepted = batcher.submit(["g"] * 4)  # the abandoned texts do not hold the queue full
    model.gate.set()
    assert blocker.result(30)[0].label == "negative"
    assert [p.label for p in accepted.result(30)] == ["positive"] * 4
    assert ["dropped"] not in model.batches
    batcher.stop()


def test_batch_stats_keep_only_their_window() -> None:
    stats = BatchStats(window_s=10.0)
    for second in range(100):  # one batch of 2 texts a second, for 100 s
        stats.record(2, now=float(second))
    assert len(stats.recent) == 11  # seconds 89 to 99, not all 100 batches
    assert stats.texts_per_second(now=99.0) == pytest.approx(2.2)
    assert (stats.batches, stats.texts) == (100, 200)


def test_batch_stats_read_while_the_inference_thread_records() -> None:
    """A metrics scrape reads the stats while batches are recorded: no
    'deque mutated during iteration'."""
    stats = BatchStats(window_s=60.0)
    done = threading.Event()

    def record() -> None:
        while not done.is_set():
            stats.record(1)

    writer = threading.Thread(target=record)
    writer.start()
    try:
        while len(stats.recent) < 2000:
            time.sleep(0.001)
        rates = [stats.texts_per_second() for _ in range(300)]
    finally:
        done.set()
        writer.join()
    assert all(rate > 0 for rate in rates)
