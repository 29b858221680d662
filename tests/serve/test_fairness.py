"""Fairness without knowing the clients: small requests are not locked out or starved by
a flood of big ones (a retry storm of 64-text requests, long texts)."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Sequence

import httpx
import pytest
from torch import Tensor

from gradfence.serve.app import WorkAdmission
from gradfence.serve.batcher import Batcher, QueueFullError

from .conftest import ServerFactory, StubClassifier, started, stub_label


def server_queue_depth(url: str) -> float:
    for line in httpx.get(f"{url}/metrics").text.splitlines():
        if line.startswith("gradfence_queue_depth "):
            return float(line.split()[1])
    raise AssertionError("no queue depth in /metrics")


def test_a_one_text_request_is_batched_before_the_rest_of_big_ones_and_alone() -> None:
    model = StubClassifier()
    batcher = started(model, max_batch_size=4, max_wait_ms=300)
    model.gate.clear()  # the first batch stalls in the model
    big = [batcher.submit([f"a{i:02d}" for i in range(12)])]
    while batcher.queue_depth > 8:  # the worker took A's first 4 texts and waits
        pass
    big.append(batcher.submit([f"b{i:02d}" for i in range(12)]))
    small = batcher.submit(["c00"])
    model.gate.set()
    assert small.result(30)[0].label == stub_label("c00")
    for future in big:
        assert len(future.result(30)) == 12
    # the batch after the stalled one: the small request alone, not padded to big texts
    assert model.batches[1] == ["c00"]
    # then the big ones, oldest first, in short batches (an eighth of the size limit)
    # for a second after a small request
    assert model.batches[2] == ["a04"]
    assert sum(len(batch) for batch in model.batches) == 25
    batcher.stop()


class SlowBigStub(StubClassifier):
    """Takes 30 ms for a batch of big requests' texts (named ``a..``)."""

    def forward(self, texts: Sequence[str]) -> Tensor:
        if texts[0].startswith("a"):
            time.sleep(0.03)
        return super().forward(texts)


def test_small_requests_are_still_batched_while_big_ones_wait() -> None:
    model = SlowBigStub()
    batcher = started(model, workers=1, max_batch_size=8, max_wait_ms=400)
    model.gate.clear()  # the first batch stalls in the model
    big = batcher.submit([f"a{i:02d}" for i in range(24)])
    while batcher.queue_depth > 16:
        pass
    first = batcher.submit(["s0"])
    time.sleep(0.45)  # the big texts are long overdue, and so is the first small one...
    model.gate.set()
    time.sleep(0.05)
    others = [batcher.submit(["s1"])]  # ... the next small batch is not: it waits for
    time.sleep(0.1)  # more small texts (up to 0.4 s), not for the big ones to run
    others.append(batcher.submit(["s2"]))
    for future in (first, *others):
        assert len(future.result(30)) == 1
    assert len(big.result(30)) == 24
    small_batches = [batch for batch in model.batches if batch[0].startswith("s")]
    assert small_batches == [["s0"], ["s1", "s2"]], model.batches
    batcher.stop()


def test_requests_of_one_kind_are_still_batched_by_length() -> None:
    model = StubClassifier()
    batcher = started(model, max_batch_size=3, max_wait_ms=10_000)
    model.gate.clear()
    first = batcher.submit(["x" * 30] * 3)  # a full batch: taken at once, then stalls
    while batcher.queue_depth:
        pass
    texts = ["y" * 30, "z" * 3, "w" * 30, "v" * 3, "u" * 3, "t" * 30]
    futures = [batcher.submit([text]) for text in texts]
    model.gate.set()
    for future in [first, *futures]:
        future.result(30)
    # the oldest long text with the two other long ones; the short ones together
    assert sorted(model.batches[1]) == sorted(["y" * 30, "w" * 30, "t" * 30])
    assert sorted(model.batches[2]) == sorted(["z" * 3, "v" * 3, "u" * 3])
    batcher.stop()


def test_the_last_quarter_of_the_queue_is_for_small_requests() -> None:
    model = StubClassifier()
    batcher = started(model, max_batch_size=64, max_queue=16, max_wait_ms=10_000)
    model.gate.clear()
    queued = [batcher.submit([f"a{i}" for i in range(8)])]  # 8 of 16
    with pytest.raises(QueueFullError, match="small requests"):
        batcher.submit([f"b{i}" for i in range(5)])  # 13 > 12 for a big request
    queued.append(batcher.submit([f"c{i}" for i in range(4)]))  # small: 12 of 16
    queued += [batcher.submit([f"d{i}"]) for i in range(4)]  # small: 16 of 16
    with pytest.raises(QueueFullError):
        batcher.submit(["e"])
    model.gate.set()
    assert [len(future.result(30)) for future in queued] == [8, 4, 1, 1, 1, 1]
    batcher.stop()


def test_small_requests_are_admitted_against_the_small_work_only() -> None:
    admission = WorkAdmission(timeout_s=1.0)  # budget: 0.6 s of model work
    admission.admit(512)
    admission.observe_batch(size=8, seconds=0.512)
    admission.finish(512, served=True)  # measured: 1 ms per token
    admission.admit(500)  # a big request: 0.5 s queued
    with pytest.raises(QueueFullError):
        admission.admit(200)  # another big one would wait 0.7 s
    assert admission.saturated() is False and admission.saturated(small=True) is False
    admission.admit(200, small=True)  # the small ones run first: 0.2 s
    admission.admit(300, small=True)  # 0.5 s
    with pytest.raises(QueueFullError):
        admission.admit(200, small=True)  # 0.7 s of small work
    admission.finish(300, served=False, small=True)
    assert admission.outstanding_small == 200 and admission.outstanding == 700
    assert admission.saturated() is True  # a big body is refused before it is read
    assert admission.saturated(small=True) is False


class Stalling(StubClassifier):
    """Sets ``entered`` when a batch reaches the model (where the gate holds it)."""

    def __init__(self) -> None:
        super().__init__()
        self.entered = threading.Event()

    def forward(self, texts: Sequence[str]) -> Tensor:
        self.entered.set()
        return super().forward(texts)


def test_a_flood_of_big_requests_does_not_lock_out_one_text_requests(
    serve_model: ServerFactory,
) -> None:
    model = Stalling()
    server = serve_model(model, max_batch_size=8, max_queue=64, max_wait_ms=1)
    model.gate.clear()  # the model stalls: big requests pile up
    model.entered.clear()

    async def flood_then_small() -> tuple[list[int], httpx.Response, httpx.Response]:
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:
            body = {"texts": [f"g{i}" for i in range(8)]}
            flood = [asyncio.create_task(client.post("/v1/predict", json=body))]
            await asyncio.to_thread(model.entered.wait, 30)  # its batch holds the model
            flood += [asyncio.create_task(client.post("/v1/predict", json=body)) for _ in range(9)]
            # 6 more big requests fill the 48 places they may take; 3 are refused
            for _ in range(200):
                if sum(task.done() for task in flood) == 3:
                    break
                await asyncio.sleep(0.05)
            assert server_queue_depth(server.url) == 48
            small = asyncio.create_task(client.post("/v1/predict", json={"texts": ["b b"]}))
            await asyncio.sleep(0.5)
            refused = await client.post("/v1/predict", json=body)  # a big one: still 503
            model.gate.set()
            return [r.status_code for r in await asyncio.gather(*flood)], await small, refused

    codes, small, refused = asyncio.run(flood_then_small())
    assert codes.count(503) == 3 and codes.count(200) == 7
    assert refused.status_code == 503 and "small requests" in refused.json()["detail"]
    assert small.status_code == 200
    assert small.json()["predictions"][0]["label"] == stub_label("b b")


def test_while_small_requests_run_a_big_one_gets_short_batches() -> None:
    model = StubClassifier()
    batcher = started(model, workers=2, max_batch_size=16, max_wait_ms=1)
    model.gate.clear()  # both workers stall in the model
    small = batcher.submit(["b"])
    while batcher.queue_depth:  # one worker runs the small request
        pass
    big = batcher.submit([f"g{i:02d}" for i in range(16)])
    while batcher.queue_depth > 14:  # the other takes a short batch of the big one
        pass
    model.gate.set()
    assert small.result(30)[0].label == stub_label("b")
    assert len(big.result(30)) == 16
    assert ["b"] in model.batches
    first_big = next(batch for batch in model.batches if "g00" in batch)
    assert first_big == ["g00", "g01"]  # an eighth of 16
    # (with no small request left, batches are full again: see the first test here)
    batcher.stop()


def _busy_small_past_big_share(batcher: Batcher) -> None:
    """As if small requests had kept both workers busy for the last half second, and big
    ones had half of that model time (far past their share)."""
    with batcher._cond:
        batcher._model_time = {True: 4.0, False: 4.0}
        batcher._shares_since = time.monotonic() - 0.5


def test_past_their_share_big_requests_wait_for_the_next_small_one() -> None:
    model = StubClassifier()
    # a hold longer than the checks below take
    batcher = started(model, workers=2, max_batch_size=16, max_wait_ms=1, small_hold_s=3)
    model.gate.clear()
    small = batcher.submit(["b"])
    while batcher.queue_depth:  # one worker runs the small request
        pass
    _busy_small_past_big_share(batcher)
    big = batcher.submit([f"g{i:02d}" for i in range(16)])
    time.sleep(0.3)
    assert batcher.queue_depth == 16  # the free worker holds the big work back
    second = batcher.submit(["bb"])  # and takes the next small request at once
    deadline = time.monotonic() + 10
    while batcher.queue_depth > 16 and time.monotonic() < deadline:
        time.sleep(0.001)
    assert batcher.queue_depth == 16  # "bb" went to the model; every big text is still queued
    with batcher._cond:  # no more holding: the rest of the test need not wait for it
        batcher.small_hold_s = 0
        batcher._cond.notify_all()
    model.gate.set()
    assert [len(f.result(30)) for f in (small, second, big)] == [1, 1, 16]
    batcher.stop()


@pytest.mark.parametrize("every_s", [0.2, 0.01])
def test_a_trickle_of_small_requests_does_not_starve_big_ones(every_s: float) -> None:
    model = StubClassifier()
    batcher = started(model, workers=2, max_batch_size=16, max_wait_ms=1, small_hold_s=0.05)
    stop = threading.Event()

    def trickle() -> None:  # small requests stay active, far apart or closer than the hold
        while not stop.wait(every_s):
            batcher.submit(["b"]).result(30)

    assert len(batcher.submit(["b"]).result(30)) == 1  # small requests are active
    with batcher._cond:  # and the big requests are far past their share
        batcher._model_time = {True: 1.0, False: 9.0}
    thread = threading.Thread(target=trickle)
    thread.start()
    try:
        # the small requests leave the workers mostly idle: a free worker takes big work
        assert len(batcher.submit([f"g{i:02d}" for i in range(16)]).result(30)) == 16
    finally:
        stop.set()
        thread.join()
    batcher.stop()


def test_a_small_request_a_moment_ago_still_keeps_big_batches_short() -> None:
    model = StubClassifier()
    batcher = started(model, max_batch_size=16, max_wait_ms=1)
    assert len(batcher.submit(["b"]).result(30)) == 1  # answered: neither queued nor running
    assert len(batcher.submit([f"g{i:02d}" for i in range(16)]).result(30)) == 16
    # its client is about to send the next one: the big request runs in short batches
    assert [len(batch) for batch in model.batches] == [1, *[2] * 8]
    batcher.stop()
