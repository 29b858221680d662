"""Dynamic batching: requests from every client merged into model batches in one thread.

Grad mode is thread-local (pytorch/pytorch#82145): a ``no_grad`` entered by the main
thread, or by an ``async def`` endpoint, does not cover the thread that runs the model.
So the :class:`Batcher`'s own inference thread enters ``gf.inference(model)`` itself and
runs every batch inside that scope.

A batch is flushed when it holds ``max_batch_size`` texts, or ``max_wait_ms`` after the
first of its texts arrived, whichever comes first; a request with more texts than a batch
holds is spread over consecutive batches. Every batch must give exactly one row of
scores per text; when it does not (or the model raises), each request of the batch is
run again alone, and a request that fails alone gets the error: none is left waiting,
and one bad request does not fail the others.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch

import gradfence as gf
from gradfence.scope import GradMode
from gradfence.serve.model import TextClassifier

log = logging.getLogger("gradfence.serve")

T = TypeVar("T")


class QueueFullError(RuntimeError):
    """The batcher's queue cannot take the request's texts now (HTTP 503)."""


class BatcherStoppedError(RuntimeError):
    """The batcher is stopping or stopped and accepts no new work."""


class BatchMismatchError(RuntimeError):
    """The model returned a different number of results than texts in the batch."""


class NonFiniteScoresError(RuntimeError):
    """The model's scores for a batch hold NaN or infinity (JSON cannot carry them)."""


@dataclass(frozen=True)
class Prediction:
    """The label with the highest probability, that probability, and every label's."""

    label: str
    score: float
    scores: dict[str, float]


@dataclass
class _Request:
    texts: Sequence[str]
    future: concurrent.futures.Future[list[Prediction]]
    results: list[Prediction | None]
    remaining: int
    cancelled: bool = False


@dataclass
class _Item:
    request: _Request
    index: int
    arrived: float


@dataclass
class BatchStats:
    """Counts kept by the batcher (written by its thread), read by the metrics endpoint.

    ``recent`` holds the batches of the last ``window_s`` seconds only, and a lock guards
    it: the metrics scrape reads it from another thread while batches are recorded.
    """

    batches: int = 0
    texts: int = 0
    window_s: float = 10.0
    recent: deque[tuple[float, int]] = field(default_factory=deque)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def record(self, texts: int, now: float | None = None) -> None:
        """Count one batch of ``texts`` texts, finished at ``now`` (monotonic seconds)."""
        now = time.monotonic() if now is None else now
        with self._lock:
            self.batches += 1
            self.texts += texts
            self.recent.append((now, texts))
            self._prune(now)

    def texts_per_second(self, now: float | None = None) -> float:
        """Texts served per second over the last ``window_s`` seconds."""
        now = time.monotonic() if now is None else now
        with self._lock:
            self._prune(now)
            return sum(n for _, n in self.recent) / self.window_s

    def _prune(self, now: float) -> None:
        while self.recent and self.recent[0][0] < now - self.window_s:
            self.recent.popleft()


BatchObserver = Callable[[int, float], None]


def thread_state(model: torch.nn.Module) -> dict[str, Any]:
    """Grad mode and module modes as seen by the calling thread."""
    in_train = sorted(name or "<root>" for name, m in model.named_modules() if m.training)
    return {
        "eval_mode": not in_train,
        "modules_in_train_mode": in_train,
        "grad_enabled": torch.is_grad_enabled(),
        "inference_mode": torch.is_inference_mode_enabled(),
        "thread": threading.current_thread().name,
    }


class Batcher:
    """Owns the inference thread; ``await batcher.predict(texts)`` from any event loop.

    >>> batcher = Batcher(model, max_batch_size=32, max_wait_ms=5)  # doctest: +SKIP
    >>> batcher.start(warmup=["warm-up"])  # doctest: +SKIP
    >>> await batcher.predict(["great product"])  # doctest: +SKIP
    """

    def __init__(
        self,
        model: TextClassifier,
        *,
        max_batch_size: int = 32,
        max_wait_ms: float = 5.0,
        max_queue: int = 1024,
        mode: GradMode = "inference_mode",
        on_batch: BatchObserver | None = None,
    ) -> None:
        if max_batch_size < 1 or max_queue < 1 or max_wait_ms < 0:
            raise ValueError("max_batch_size and max_queue must be >= 1, max_wait_ms >= 0")
        self.model = model
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_ms / 1000.0
        self.max_queue = max_queue
        self.mode = mode
        self.on_batch = on_batch
        self.stats = BatchStats()
        self._items: deque[_Item] = deque()
        self._calls: deque[tuple[Callable[[], Any], concurrent.futures.Future[Any]]] = deque()
        self._cond = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._failed: BaseException | None = None

    # --- lifecycle ---------------------------------------------------------------

    def start(self, warmup: Sequence[str] = ("warm-up",), timeout_s: float | None = None) -> None:
        """Start the inference thread, run a warm-up batch in it, and wait until it ran.

        Raises whatever the warm-up raised (e.g. a model that stays in train mode).
        """
        self._thread = threading.Thread(
            target=self._run, args=(list(warmup),), name="gradfence-inference", daemon=True
        )
        self._thread.start()
        if not self._ready.wait(timeout_s):
            raise TimeoutError("the inference thread did not get ready in time")
        if self._failed is not None:
            raise self._failed

    def stop(self, timeout_s: float | None = None) -> None:
        """Stop accepting work, finish every text already queued, and end the thread."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout_s)

    @property
    def queue_depth(self) -> int:
        """Texts waiting for a batch."""
        return len(self._items)

    @property
    def alive(self) -> bool:
        """True while the inference thread runs and is not stopping."""
        return self._thread is not None and self._thread.is_alive() and not self._stopping

    # --- submitting work ---------------------------------------------------------

    def submit(self, texts: Sequence[str]) -> concurrent.futures.Future[list[Prediction]]:
        """Queue ``texts`` as one request; its future gets one prediction per text, in order.

        Raises :class:`QueueFullError` when the queue cannot take all of them now.
        """
        return self.submit_many([texts])[0]

    def submit_many(
        self, requests: Sequence[Sequence[str]]
    ) -> list[concurrent.futures.Future[list[Prediction]]]:
        """Queue several requests at once (all or none), e.g. a batch another server formed."""
        pending = [
            _Request(texts, concurrent.futures.Future(), [None] * len(texts), len(texts))
            for texts in requests
        ]
        total = sum(len(texts) for texts in requests)
        now = time.monotonic()
        with self._cond:
            if self._stopping or not self.alive:
                raise BatcherStoppedError("the inference thread is not running")
            if len(self._items) + total > self.max_queue:
                raise QueueFullError(
                    f"queue holds {len(self._items)} of {self.max_queue} texts; "
                    f"{total} more do not fit"
                )
            for request in pending:
                self._items.extend(_Item(request, i, now) for i in range(len(request.texts)))
            self._cond.notify_all()
        return [request.future for request in pending]

    async def predict(
        self, texts: Sequence[str], timeout_s: float | None = None
    ) -> list[Prediction]:
        """Await the predictions for ``texts``; on timeout their queued texts are dropped."""
        future = self.submit(texts)
        try:
            return await asyncio.wait_for(asyncio.wrap_future(future), timeout_s)
        except (asyncio.TimeoutError, asyncio.CancelledError):
            self.cancel(future)
            raise

    def cancel(self, future: concurrent.futures.Future[list[Prediction]]) -> None:
        """Drop the queued texts of the request behind ``future`` (its caller gave up).

        They leave the queue at once, so they no longer count in ``queue_depth`` nor
        against ``max_queue``; texts of it that a running batch holds still run, unused.
        """
        with self._cond:
            kept: deque[_Item] = deque()
            for item in self._items:
                if item.request.future is future:
                    item.request.cancelled = True
                else:
                    kept.append(item)
            self._items = kept

    def call(self, fn: Callable[[], T]) -> concurrent.futures.Future[T]:
        """Run ``fn()`` in the inference thread, inside its scope, between two batches."""
        future: concurrent.futures.Future[T] = concurrent.futures.Future()
        with self._cond:
            if not self.alive:
                raise BatcherStoppedError("the inference thread is not running")
            self._calls.append((fn, future))
            self._cond.notify_all()
        return future

    async def inspect_thread(self, timeout_s: float | None = None) -> dict[str, Any]:
        """:func:`thread_state` of the model as the inference thread sees it."""
        model = self.model
        future = self.call(lambda: thread_state(model))
        return await asyncio.wait_for(asyncio.wrap_future(future), timeout_s)

    # --- the inference thread ----------------------------------------------------

    def _run(self, warmup: list[str]) -> None:
        try:
            with gf.inference(self.model, mode=self.mode):
                state = thread_state(self.model)
                if not state["eval_mode"]:
                    raise RuntimeError(
                        f"modules still in train mode: {state['modules_in_train_mode']}"
                    )
                if warmup:
                    self._scores(warmup)
                self._ready.set()
                self._loop()
        except BaseException as exc:
            self._failed = exc
            log.exception("inference thread failed")
        finally:
            with self._cond:
                self._stopping = True
                pending, self._items = self._items, deque()
                calls, self._calls = self._calls, deque()
            error = BatcherStoppedError("the inference thread stopped")
            for item in pending:
                _fail(item.request, error)
            for _, future in calls:
                with contextlib.suppress(concurrent.futures.InvalidStateError):
                    future.set_exception(error)
            self._ready.set()

    def _next_batch(self) -> list[_Item] | None:
        """Wait for work; return the next batch, or None when stopping with nothing left."""
        with self._cond:
            while True:
                while self._calls:
                    fn, future = self._calls.popleft()
                    if not future.set_running_or_notify_cancel():
                        continue  # its caller gave up
                    self._cond.release()
                    try:
                        future.set_result(fn())
                    except Exception as exc:
                        future.set_exception(exc)
                    finally:
                        self._cond.acquire()
                while self._items and self._items[0].request.cancelled:
                    self._items.popleft()
                if self._items:
                    break
                if self._stopping:
                    return None
                self._cond.wait()
            deadline = self._items[0].arrived + self.max_wait_s
            while len(self._items) < self.max_batch_size and not self._stopping:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._cond.wait(remaining)
            batch: list[_Item] = []
            while self._items and len(batch) < self.max_batch_size:
                item = self._items.popleft()
                if not item.request.cancelled:
                    batch.append(item)
            return batch

    def _loop(self) -> None:
        while (batch := self._next_batch()) is not None:
            if batch:
                self._run_batch(batch)

    def _scores(self, texts: list[str]) -> list[list[float]]:
        """Probabilities per text, checked to be exactly one finite row per text."""
        logits = self.model(texts)
        n_labels = len(self.model.labels)
        if logits.ndim != 2 or logits.shape[0] != len(texts) or logits.shape[1] != n_labels:
            raise BatchMismatchError(
                f"model returned shape {tuple(logits.shape)} for {len(texts)} texts "
                f"and {n_labels} labels"
            )
        probabilities = logits.float().softmax(dim=-1)
        if not bool(probabilities.isfinite().all()):
            raise NonFiniteScoresError(
                f"model returned NaN or infinite scores for {len(texts)} texts"
            )
        rows: list[list[float]] = probabilities.tolist()
        return rows

    def _run_batch(self, batch: list[_Item]) -> None:
        start = time.perf_counter()
        try:
            rows = self._scores([item.request.texts[item.index] for item in batch])
        except Exception as exc:
            requests = list({id(item.request): item.request for item in batch}.values())
            if len(requests) == 1:
                log.error("batch of %d texts failed: %r", len(batch), exc)
                for item in batch:
                    _fail(item.request, exc)
                return
            # one request's text must not fail the others': run each request alone
            log.error("batch of %d requests failed (%r): retrying each alone", len(requests), exc)
            for request in requests:
                self._run_batch([item for item in batch if item.request is request])
            return
        elapsed = time.perf_counter() - start
        labels = self.model.labels
        for item, row in zip(batch, rows, strict=True):
            best = max(range(len(row)), key=row.__getitem__)
            prediction = Prediction(labels[best], row[best], dict(zip(labels, row, strict=True)))
            _deliver(item.request, item.index, prediction)
        self.stats.record(len(batch))
        if self.on_batch is not None:
            self.on_batch(len(batch), elapsed)


def _deliver(request: _Request, index: int, prediction: Prediction) -> None:
    if request.future.done():
        return
    request.results[index] = prediction
    request.remaining -= 1
    if request.remaining == 0:
        results = [r for r in request.results if r is not None]
        if len(results) != len(request.texts):
            _fail(request, BatchMismatchError("a prediction went missing"))
            return
        # the caller may cancel the future from its own thread at any moment
        with contextlib.suppress(concurrent.futures.InvalidStateError):
            request.future.set_result(results)


def _fail(request: _Request, error: BaseException) -> None:
    with contextlib.suppress(concurrent.futures.InvalidStateError):
        request.future.set_exception(error)
