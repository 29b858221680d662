"""Dynamic batching: requests from every client merged into model batches by workers.

Grad mode is thread-local (pytorch/pytorch#82145): a ``no_grad`` entered by the main
thread, or by an ``async def`` endpoint, does not cover the threads that run the model.
So each of the :class:`Batcher`'s workers enters ``gf.inference(model)`` itself and runs
every batch inside that scope.

Throughput per core: ``workers`` workers (default one per core available to the
process), each running the model with ``cores // workers`` intra-op threads, all fed
from one admission queue. A worker is a thread running ``model`` in this process, or,
given a picklable ``loader``, a thread that hands each batch to a model process of its
own (:class:`~gradfence.serve.processes.ModelProcess`): threads share the interpreter
lock with each other and with the event loop, processes do not. A text is tokenized
once, when it is queued, in the caller's thread
(:meth:`~gradfence.serve.model.TextClassifier.encode`); its token count decides which
texts share a batch.

A worker takes a batch when the queue holds ``max_batch_size`` texts or
``max_batch_tokens`` tokens, or ``max_wait_ms`` after the oldest queued text arrived,
whichever comes first. The batch always holds the oldest queued text of its class (no
text waits behind newer ones for ever), with the texts of about its length from a window
of the queue (:func:`plan_batch`): a batch is padded to its longest text, and on a CPU
time follows the padded tokens, so texts of unlike lengths go to different batches.
Small requests (:data:`SMALL_REQUEST_TEXTS`) and bigger ones are batched apart; while
small requests are active, the bigger ones' turn comes while their share of the model time
is under :data:`BIG_SHARE` (see :meth:`Batcher._next_pool`), so a one-text request does
not wait behind a flood of 64-text ones (nor is padded to their length) while those still
move. The last quarter of the queue is kept for small requests. A request with more
texts than a batch holds is spread over several batches. Every batch must give exactly
one row of scores per text; when it does not (or the model raises), each request of the
batch is run again alone, and a request that fails alone gets the error: none is left
waiting, and one bad request does not fail the others.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import math
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch

import gradfence as gf
from gradfence.modes import GradMode
from gradfence.serve.model import EncodedText, TextClassifier
from gradfence.serve.processes import ModelLoader, ModelProcess, WorkerLostError

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
    encoded: EncodedText


DEFAULT_MAX_BATCH_TOKENS = 2048
WINDOW_BATCHES = 4  # a batch is planned from this many batches' worth of queued texts
# What one batch costs besides its padded tokens (the runtime's call, the hand-over to a
# model process), in padded tokens: held-out tweets, 32 queued at a time, one ONNX
# Runtime thread, ran at 153 / 140 / 146 / 120 / 117 texts/s with 8 / 16 / 32 / 64 / 128,
# and at 86 texts/s taking every queued text into one batch (1.66 padded tokens per
# token, against 1.08 with 32)
BATCH_OVERHEAD_TOKENS = 32
# Fairness without knowing who the clients are: a request of at most this many texts is
# "small". Small and bigger requests never share a batch; with both queued, the small
# ones get most of the model time (the others a share, so nothing starves), and the last
# quarter of the queue is theirs alone: a flood of big requests cannot lock out everyone.
SMALL_REQUEST_TEXTS = 4
# While small requests are active, the other requests' turn comes while their share of
# the model time is under this; with small requests gone, they get the whole model.
BIG_SHARE = 0.1
SMALL_RECENT_S = 1.0  # small requests count as active this long after the last one
# With only big requests queued and their share spent, a free worker waits this long
# after the last small request arrived or was answered (its client is about to send the
# next), then takes big work; and it waits only while small requests keep the workers
# busy at least SMALL_BUSY of the time: a free worker takes big work rather than idle
# next to a trickle of small requests.
SMALL_HOLD_S = 0.05
SMALL_BUSY = 0.5
# the shares are of the model time of about the last this many worker-seconds
SHARE_HORIZON_S = 10.0
OFFLOAD_ENCODE_CHARS = 20_000  # predict() tokenizes bigger requests in a helper thread


def is_small_request(texts: Sequence[str]) -> bool:
    """Whether a request of ``texts`` is small (:data:`SMALL_REQUEST_TEXTS` at most)."""
    return len(texts) <= SMALL_REQUEST_TEXTS


def available_cores() -> int:
    """CPU cores this process may run on (its affinity mask where the OS has one)."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


def plan_batch(
    tokens: Sequence[int],
    max_texts: int,
    max_tokens: int,
    overhead: float = BATCH_OVERHEAD_TOKENS,
) -> list[int]:
    """Which of the queued texts (token counts ``tokens``, oldest first) form the next batch.

    A batch is padded to its longest text and costs about ``overhead`` + texts x longest
    padded tokens. The texts, sorted by token count, are cut into runs of neighbours
    (each within ``max_texts`` texts and ``max_tokens`` padded tokens; a text longer than
    that runs alone) so that the runs cost the least in all; the batch is the run that
    holds text 0, the oldest, so no text waits behind newer ones for ever. A long text
    does not pad a batch of short ones, and texts of one length are not split for
    nothing. Returns indices in queue order.

    >>> plan_batch([30, 12, 31, 60, 29], max_texts=3, max_tokens=1024)
    [0, 2, 4]
    >>> plan_batch([30, 12, 31, 60, 29], max_texts=8, max_tokens=1024, overhead=1000)
    [0, 1, 2, 3, 4]
    """
    if not tokens:
        return []
    order = sorted(range(len(tokens)), key=tokens.__getitem__)
    lengths = [tokens[i] for i in order]
    # cheapest[end]: the least cost of the shortest ``end`` texts; first[end]: where the
    # last run of that cut starts
    cheapest = [0.0] + [math.inf] * len(order)
    first = [0] * (len(order) + 1)
    for end in range(1, len(order) + 1):
        longest = lengths[end - 1]
        for size in range(1, min(max_texts, end) + 1):
            if size > 1 and size * longest > max_tokens:
                break
            cost = cheapest[end - size] + overhead + size * longest
            if cost < cheapest[end]:
                cheapest[end], first[end] = cost, end - size
    oldest = order.index(0)
    end = len(order)
    while first[end] > oldest:
        end = first[end]
    return sorted(order[first[end] : end])


@dataclass
class BatchStats:
    """Counts kept by the batcher (written by its thread), read by the metrics endpoint.

    ``recent`` holds the batches of the last ``window_s`` seconds only, and a lock guards
    it: the metrics scrape reads it from another thread while batches are recorded.
    """

    batches: int = 0
    texts: int = 0
    tokens: int = 0
    window_s: float = 10.0
    recent: deque[tuple[float, int, int]] = field(default_factory=deque)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def record(self, texts: int, now: float | None = None, tokens: int = 0) -> None:
        """Count one batch of ``texts`` texts (``tokens`` real tokens), finished at ``now``
        (monotonic seconds)."""
        now = time.monotonic() if now is None else now
        with self._lock:
            self.batches += 1
            self.texts += texts
            self.tokens += tokens
            self.recent.append((now, texts, tokens))
            self._prune(now)

    def texts_per_second(self, now: float | None = None) -> float:
        """Texts served per second over the last ``window_s`` seconds."""
        now = time.monotonic() if now is None else now
        with self._lock:
            self._prune(now)
            return sum(n for _, n, _ in self.recent) / self.window_s

    def tokens_per_second(self, now: float | None = None) -> float:
        """Real tokens served per second over the last ``window_s`` seconds."""
        now = time.monotonic() if now is None else now
        with self._lock:
            self._prune(now)
            return sum(n for _, _, n in self.recent) / self.window_s

    def _prune(self, now: float) -> None:
        while self.recent and self.recent[0][0] < now - self.window_s:
            self.recent.popleft()


BatchObserver = Callable[[int, float], None]
Scorer = Callable[[Sequence[EncodedText]], list[list[float]]]


def thread_state(model: torch.nn.Module) -> dict[str, Any]:
    """Grad mode and module modes as seen by the calling thread."""
    in_train = sorted(name or "<root>" for name, m in model.named_modules() if m.training)
    return {
        "eval_mode": not in_train,
        "modules_in_train_mode": in_train,
        "grad_enabled": torch.is_grad_enabled(),
        "inference_mode": torch.is_inference_mode_enabled(),
        "thread": threading.current_thread().name,
        "pid": os.getpid(),
    }


def check_ready(model: TextClassifier, warmup: Sequence[str]) -> dict[str, Any]:
    """Inside the worker's scope: raise unless every module is in eval mode, then run a
    warm-up batch of ``warmup`` (if any); returns :func:`thread_state`."""
    state = thread_state(model)
    if not state["eval_mode"]:
        raise RuntimeError(f"modules still in train mode: {state['modules_in_train_mode']}")
    if warmup:
        score_rows(model, model.encode(warmup))
    return state


def score_rows(model: TextClassifier, batch: Sequence[EncodedText]) -> list[list[float]]:
    """Probabilities per text, checked to be exactly one finite row per text."""
    logits = model.forward_encoded(batch)
    n_labels = len(model.labels)
    if logits.ndim != 2 or logits.shape[0] != len(batch) or logits.shape[1] != n_labels:
        raise BatchMismatchError(
            f"model returned shape {tuple(logits.shape)} for {len(batch)} texts "
            f"and {n_labels} labels"
        )
    probabilities = logits.float().softmax(dim=-1)
    if not bool(probabilities.isfinite().all()):
        raise NonFiniteScoresError(f"model returned NaN or infinite scores for {len(batch)} texts")
    rows: list[list[float]] = probabilities.tolist()
    return rows


class Batcher:
    """Owns the workers; ``await batcher.predict(texts)`` from any event loop.

    ``model`` tokenizes (in the caller's thread) and, without ``loader``, runs the
    batches in ``workers`` threads; with ``loader`` (picklable, returning the same
    model), each worker thread feeds a model process that ``loader`` built.

    >>> batcher = Batcher(model, max_batch_size=32, max_wait_ms=5, workers=2)  # doctest: +SKIP
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
        workers: int = 1,
        max_batch_tokens: int = DEFAULT_MAX_BATCH_TOKENS,
        window: int | None = None,
        loader: ModelLoader | None = None,
        small_hold_s: float = SMALL_HOLD_S,
    ) -> None:
        if max_batch_size < 1 or max_queue < 1 or max_wait_ms < 0:
            raise ValueError("max_batch_size and max_queue must be >= 1, max_wait_ms >= 0")
        if workers < 1 or max_batch_tokens < 1 or (window is not None and window < 1):
            raise ValueError("workers, max_batch_tokens and window must be >= 1")
        self.model = model
        self.loader = loader
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_ms / 1000.0
        self.max_queue = max_queue
        self.mode = mode
        self.on_batch = on_batch
        self.workers = workers
        self.max_batch_tokens = max_batch_tokens
        # never past the time small requests count as active (the hold would outlast them)
        self.small_hold_s = min(small_hold_s, SMALL_RECENT_S)
        # texts sorted by length to complete a batch: a few batches' worth
        self.window = window or WINDOW_BATCHES * max_batch_size
        # one intra-op thread per core: N single-threaded workers beat one N-threaded one
        self.threads_per_worker = max(1, available_cores() // workers)
        # queue places only small requests may take (see SMALL_REQUEST_TEXTS)
        self.reserved = max_queue // 4
        self.stats = BatchStats()
        self._items: deque[_Item] = deque()
        self._queued_tokens = 0
        self._state_requests: deque[concurrent.futures.Future[dict[str, Any]]] = deque()
        # model seconds of small requests' batches (True) and the others' (False) while
        # small requests were active, over about SHARE_HORIZON_S, and since when
        self._model_time = {True: 0.0, False: 0.0}
        self._shares_since = time.monotonic()
        self._small_running = 0  # small requests' batches in the model now
        self._last_small = -math.inf  # when a small request was last queued or answered
        self._cond = threading.Condition()
        self._stopping = False
        self._threads: list[threading.Thread] = []
        self._started = 0
        self._failed: BaseException | None = None
        # what computes the logits in each worker, once started (a worker process loads
        # the model, and resolves ``--runtime auto``, for itself)
        self.runtimes: list[str | None] = [None] * workers

    # --- lifecycle ---------------------------------------------------------------

    def start(self, warmup: Sequence[str] = ("warm-up",), timeout_s: float | None = None) -> None:
        """Start the workers, each running a warm-up batch in its own scope; wait for them.

        Raises whatever a worker's start raised (e.g. a model that stays in train mode).
        """
        barrier = threading.Barrier(self.workers + 1)
        for index in range(self.workers):
            thread = threading.Thread(
                target=self._run,
                args=(list(warmup), barrier, index),
                name="gradfence-inference",  # every worker: one role, one name in logs
                daemon=True,
            )
            self._threads.append(thread)
            thread.start()
        try:
            barrier.wait(timeout_s)
        except threading.BrokenBarrierError:
            if self._failed is None:
                raise TimeoutError("the inference threads did not get ready in time") from None
        if self._failed is not None:
            self.stop()
            raise self._failed

    def stop(self, timeout_s: float | None = None) -> None:
        """Stop accepting work, finish every text already queued, and end the workers."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        for thread in self._threads:
            thread.join(timeout_s)

    @property
    def queue_depth(self) -> int:
        """Texts waiting for a batch."""
        return len(self._items)

    @property
    def queued_tokens(self) -> int:
        """Tokens of the texts waiting for a batch (counted by the model's tokenizer)."""
        return self._queued_tokens

    @property
    def alive(self) -> bool:
        """True while every worker runs and the batcher is not stopping."""
        return (
            bool(self._threads)
            and all(thread.is_alive() for thread in self._threads)
            and not self._stopping
        )

    def estimate_tokens(self, texts: Sequence[str]) -> int:
        """A cheap estimate of the tokens ``texts`` would add to the queue (no tokenizer
        run): compare ``queued_tokens + estimate`` with ``stats.tokens_per_second()``
        to admit by work rather than by texts."""
        return self.model.estimate_tokens(texts)

    # --- submitting work ---------------------------------------------------------

    def submit(
        self, texts: Sequence[str], encoded: Sequence[EncodedText] | None = None
    ) -> concurrent.futures.Future[list[Prediction]]:
        """Queue ``texts`` as one request; its future gets one prediction per text, in order.

        The texts are tokenized here, in the caller's thread, unless ``encoded`` (what
        ``model.encode(texts)`` returned) is given. Raises :class:`QueueFullError` when
        the queue cannot take all of them now.
        """
        return self.submit_many([texts], None if encoded is None else [encoded])[0]

    def submit_many(
        self,
        requests: Sequence[Sequence[str]],
        encoded: Sequence[Sequence[EncodedText]] | None = None,
    ) -> list[concurrent.futures.Future[list[Prediction]]]:
        """Queue several requests at once (all or none), e.g. a batch another server formed."""
        total = sum(len(texts) for texts in requests)
        small = all(is_small_request(texts) for texts in requests)
        with self._cond:  # refuse before tokenizing
            self._check_room(total, small)
        if encoded is None:
            flat = self.model.encode([text for texts in requests for text in texts])
            encoded, start = [], 0
            for texts in requests:
                encoded.append(flat[start : start + len(texts)])
                start += len(texts)
        pending = [
            _Request(texts, concurrent.futures.Future(), [None] * len(texts), len(texts))
            for texts in requests
        ]
        now = time.monotonic()
        with self._cond:
            self._check_room(total, small)
            if any(is_small_request(texts) for texts in requests):
                self._last_small = now
            for request, prepared in zip(pending, encoded, strict=True):
                for i, item in enumerate(prepared):
                    self._items.append(_Item(request, i, now, item))
                    self._queued_tokens += item.tokens
            self._cond.notify_all()
        return [request.future for request in pending]

    def _check_room(self, total: int, small: bool) -> None:
        if self._stopping or not self.alive:
            raise BatcherStoppedError("the inference thread is not running")
        limit = self.max_queue if small else self.max_queue - self.reserved
        if len(self._items) + total > limit:
            raise QueueFullError(
                f"queue holds {len(self._items)} of {self.max_queue} texts; {total} more do not "
                f"fit" + ("" if small else f" (the last {self.reserved} are for small requests)")
            )

    async def predict(
        self, texts: Sequence[str], timeout_s: float | None = None
    ) -> list[Prediction]:
        """Await the predictions for ``texts`` (:meth:`enqueue`); on timeout or
        cancellation their queued texts are dropped."""
        future = await self.enqueue(texts)
        try:
            return await asyncio.wait_for(asyncio.wrap_future(future), timeout_s)
        except (asyncio.TimeoutError, asyncio.CancelledError):
            self.cancel(future)
            raise

    async def enqueue(self, texts: Sequence[str]) -> concurrent.futures.Future[list[Prediction]]:
        """:meth:`submit` ``texts`` from an event loop, tokenizing big requests in a
        helper thread so that the loop stays free."""
        encoded = None
        if sum(len(text) for text in texts) > OFFLOAD_ENCODE_CHARS:
            encoded = await asyncio.to_thread(self.model.encode, texts)
        return self.submit(texts, encoded)

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
                    self._queued_tokens -= item.encoded.tokens
                else:
                    kept.append(item)
            self._items = kept

    async def inspect_thread(self, timeout_s: float | None = None) -> dict[str, Any]:
        """:func:`thread_state` of the model as a worker sees it, taken between two
        batches (in the worker's process when workers are processes)."""
        future: concurrent.futures.Future[dict[str, Any]] = concurrent.futures.Future()
        with self._cond:
            if not self.alive:
                raise BatcherStoppedError("the inference thread is not running")
            self._state_requests.append(future)
            self._cond.notify_all()
        return await asyncio.wait_for(asyncio.wrap_future(future), timeout_s)

    # --- the worker threads ------------------------------------------------------

    def _run(self, warmup: list[str], barrier: threading.Barrier, index: int) -> None:
        ready = False
        try:
            if self.loader is None:
                # process-wide in torch, the same value from every worker
                torch.set_num_threads(self.threads_per_worker)
                model = self.model
                self.runtimes[index] = model.runtime
                with gf.inference(model, mode=self.mode):
                    check_ready(model, warmup)
                    ready = True
                    if self._wait_for_all(barrier):
                        self._loop(
                            lambda batch: score_rows(model, batch), lambda: thread_state(model)
                        )
            else:
                name = f"gradfence-inference-{index + 1}"
                worker = ModelProcess(
                    self.loader,
                    mode=self.mode,
                    threads=self.threads_per_worker,
                    warmup=warmup,
                    name=name,
                )
                with worker:
                    if worker.model_id != self.model.model_id:
                        raise RuntimeError(
                            f"{name} loaded {worker.model_id}, not {self.model.model_id}"
                        )
                    self.runtimes[index] = worker.runtime
                    if worker.runtime != self.model.runtime:
                        log.warning(
                            "%s runs the model with %s, the server's copy with %s",
                            name,
                            worker.runtime,
                            self.model.runtime,
                        )
                    ready = True
                    if self._wait_for_all(barrier):
                        self._loop(worker.scores, worker.state)
        except BaseException as exc:
            if self._failed is None:
                self._failed = exc
            log.exception("inference worker failed")
        finally:
            if not ready:
                barrier.abort()
            with self._cond:
                self._stopping = True
                pending, self._items = self._items, deque()
                self._queued_tokens = 0
                asked, self._state_requests = self._state_requests, deque()
                self._cond.notify_all()
            error = BatcherStoppedError("the inference thread stopped")
            for item in pending:
                _fail(item.request, error)
            for future in asked:
                with contextlib.suppress(concurrent.futures.InvalidStateError):
                    future.set_exception(error)

    @staticmethod
    def _wait_for_all(barrier: threading.Barrier) -> bool:
        """Wait until every worker is ready; False if one failed or start() gave up."""
        try:
            barrier.wait()
        except threading.BrokenBarrierError:
            return False
        return True

    def _answer_state_requests(self, state: Callable[[], dict[str, Any]]) -> None:
        """Answer the queued :meth:`inspect_thread` requests (holding the condition on
        entry and exit)."""
        while self._state_requests:
            future = self._state_requests.popleft()
            if not future.set_running_or_notify_cancel():
                continue  # its caller gave up
            self._cond.release()
            try:
                future.set_result(state())
            except Exception as exc:
                future.set_exception(exc)
            finally:
                self._cond.acquire()

    def _next_batch(self, state: Callable[[], dict[str, Any]]) -> list[_Item] | None:
        """Wait for work; return the next batch, or None when stopping with nothing left."""
        with self._cond:
            while True:
                self._answer_state_requests(state)
                if not self._items:  # (cancel() takes abandoned texts out at once)
                    if self._stopping:
                        return None
                    self._cond.wait()
                    continue
                items = list(self._items)
                pool, max_texts, max_tokens = self._next_pool(items)
                if not pool:  # big work held back for a moment
                    self._cond.wait(self._last_small + self.small_hold_s - time.monotonic())
                    continue
                full = len(pool) >= max_texts or (
                    sum(items[i].encoded.tokens for i in pool) >= max_tokens
                )
                remaining = items[pool[0]].arrived + self.max_wait_s - time.monotonic()
                if full or remaining <= 0 or self._stopping:
                    return self._take_batch(items, pool, max_texts, max_tokens)
                self._cond.wait(remaining)  # then look again: another worker may have taken it

    def _small_busy(self) -> bool:
        """Small requests kept the workers busy :data:`SMALL_BUSY` of the time or more
        since the shares were last reset (holding the condition)."""
        capacity = self.workers * (time.monotonic() - self._shares_since)
        return self._model_time[True] >= SMALL_BUSY * capacity

    def _small_recent(self, within_s: float = SMALL_RECENT_S) -> bool:
        """A small request was queued or answered within ``within_s`` (clients that wait
        for each answer send their next request a moment later)."""
        return time.monotonic() - self._last_small < within_s

    def _next_pool(self, items: list[_Item]) -> tuple[list[int], int, int]:
        """Which queued texts the next batch comes from, and its size and token limits
        (holding the condition): the indices in ``items`` of one class of request, small
        requests' or the others'; none when the worker is to wait for small requests.

        While small requests are active (queued, running, or one a moment ago), the others
        get a batch only while their share of the recent model time is under
        :data:`BIG_SHARE`, and a short one (an eighth of the size and token limits), so a
        worker is soon back for the small requests: a flood of big requests cannot take
        the model from one-text requests. With only big requests queued and their share
        spent, and small requests keeping the workers busy at least :data:`SMALL_BUSY` of
        the time, a free worker waits up to ``small_hold_s`` after the last small request
        was queued or answered (their clients send the next one a moment later), then
        takes the big ones: a trickle of small requests neither starves them nor leaves a
        worker idle, and with small requests gone they get the whole model. A batch is
        due by its own class's count, tokens and oldest text, so small requests are still
        batched while big ones wait.
        """
        small = [_is_small(item) for item in items]
        small_active = any(small) or self._small_running > 0 or self._small_recent()
        max_texts, max_tokens = self.max_batch_size, self.max_batch_tokens
        if not small_active:  # one class: no shares to keep
            self._model_time = {True: 0.0, False: 0.0}
            self._shares_since = time.monotonic()
        spent = self._model_time[True] + self._model_time[False]
        big_turn = not small_active or self._model_time[False] <= BIG_SHARE * spent
        if all(small):
            pool = list(range(len(items)))
        elif not any(small):
            held = (
                not (big_turn or self._stopping)
                and self._small_recent(self.small_hold_s)
                and self._small_busy()
            )
            pool = [] if held else list(range(len(items)))
        else:
            pool = [i for i, is_small in enumerate(small) if is_small != big_turn]
        if not pool:
            return pool, max_texts, max_tokens
        if small_active and not small[pool[0]]:
            # a short batch: the worker is soon back for the small requests
            max_texts = max(1, max_texts // 8)
            max_tokens = max(1, max_tokens // 8)
        return pool, max_texts, max_tokens

    def _take_batch(
        self, items: list[_Item], pool: list[int], max_texts: int, max_tokens: int
    ) -> list[_Item]:
        """Remove the next batch from the queue (holding the condition): planned by length
        (:func:`plan_batch`) from a window of the oldest texts of ``pool``
        (:meth:`_next_pool`)."""
        window = pool[: self.window]
        chosen = plan_batch([items[i].encoded.tokens for i in window], max_texts, max_tokens)
        taken = {window[i] for i in chosen}
        self._items = deque(item for i, item in enumerate(items) if i not in taken)
        batch = [items[i] for i in sorted(taken)]
        self._queued_tokens -= sum(item.encoded.tokens for item in batch)
        batch = [item for item in batch if not item.request.cancelled]
        if batch and _is_small(batch[0]):
            self._small_running += 1
        return batch

    def _loop(self, scores: Scorer, state: Callable[[], dict[str, Any]]) -> None:
        while (batch := self._next_batch(state)) is not None:
            if not batch:
                continue
            try:
                self._run_batch(batch, scores)
            finally:
                if _is_small(batch[0]):
                    with self._cond:
                        self._small_running -= 1
                        self._last_small = time.monotonic()  # its clients send more soon
                        self._cond.notify_all()  # a worker holding big work back

    def _run_batch(self, batch: list[_Item], scores: Scorer) -> None:
        start = time.perf_counter()
        try:
            rows = scores([item.encoded for item in batch])
        except WorkerLostError as exc:  # every later batch would fail too: stop this worker
            for item in batch:
                _fail(item.request, exc)
            raise
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
                self._run_batch([item for item in batch if item.request is request], scores)
            return
        elapsed = time.perf_counter() - start
        with self._cond:  # the model time each class of request got (see _next_pool)
            self._model_time[_is_small(batch[0])] += elapsed
            if sum(self._model_time.values()) > SHARE_HORIZON_S:  # keep the recent half
                self._model_time = {k: v / 2 for k, v in self._model_time.items()}
                now = time.monotonic()
                self._shares_since = now - (now - self._shares_since) / 2
        labels = self.model.labels
        for item, row in zip(batch, rows, strict=True):
            best = max(range(len(row)), key=row.__getitem__)
            prediction = Prediction(labels[best], row[best], dict(zip(labels, row, strict=True)))
            _deliver(item.request, item.index, prediction)
        self.stats.record(len(batch), tokens=sum(item.encoded.tokens for item in batch))
        if self.on_batch is not None:
            self.on_batch(len(batch), elapsed)


def _is_small(item: _Item) -> bool:
    return is_small_request(item.request.texts)


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
