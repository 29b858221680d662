"""Model worker processes: one model per process, each inside its own ``gf.inference``.

Threads that run a model in one process share its interpreter lock: a small encoder
spends much of a batch in Python (module calls, hooks, dispatch), so two worker threads
and the event loop that feeds them used under one core of two here. A
:class:`ModelProcess` runs the model in a process of its own instead: started with
``spawn`` (no copy of the server's threads or locks), it builds the model with a
picklable loader, sets its intra-op threads, enters ``gf.inference(model)`` in its
main thread, checks that every module is in eval mode, runs a warm-up batch and then
answers batches of :class:`~gradfence.serve.model.EncodedText` over a pipe until it
is told to stop or the server goes away.

The process ignores SIGINT and SIGTERM (Ctrl+C in a terminal reaches the whole process
group): the server decides when it stops, after its queue is drained. When the server
dies, the pipe closes and the process ends at its next read.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import multiprocessing.connection
import os
import pickle
import signal
import threading
from collections.abc import Callable, Sequence
from typing import Any

from gradfence.modes import GradMode
from gradfence.serve.model import EncodedText, TextClassifier
from gradfence.serve.signals import STOP_SIGNALS

ModelLoader = Callable[[], TextClassifier]
"""A picklable function that builds the model, e.g. ``functools.partial(load_model, path)``."""

STOP_TIMEOUT_S = 10.0


class WorkerLostError(RuntimeError):
    """The model process ended (crashed, was killed, or its pipe broke)."""


class ModelProcess:
    """One model worker process; :meth:`scores` and :meth:`state` talk to it.

    Use it from one thread at a time (the batcher gives each process its own thread).

    >>> from functools import partial  # doctest: +SKIP
    >>> with ModelProcess(partial(load_model, None), threads=1, name="w1") as worker:
    ...     worker.scores(model.encode(["great product"]))  # doctest: +SKIP
    [[0.01, 0.04, 0.95]]
    """

    def __init__(
        self,
        loader: ModelLoader,
        *,
        mode: GradMode = "inference_mode",
        threads: int = 1,
        warmup: Sequence[str] = (),
        name: str = "gradfence-inference",
    ) -> None:
        self.loader = loader
        self.mode = mode
        self.threads = threads
        self.warmup = list(warmup)
        self.name = name
        self.model_id: str | None = None
        self.runtime: str | None = None  # what computes the logits in the process
        self._conn: multiprocessing.connection.Connection | None = None
        self._process: multiprocessing.process.BaseProcess | None = None

    def start(self) -> ModelProcess:
        """Start the process and wait until it is ready; raise what its start raised."""
        try:
            pickle.dumps(self.loader)
        except Exception as exc:
            raise TypeError(
                f"worker processes need a picklable model loader, not {self.loader!r} ({exc})"
            ) from None
        context = multiprocessing.get_context("spawn")
        ours, theirs = context.Pipe()
        process = context.Process(
            target=_serve,
            args=(theirs, self.loader, self.mode, self.threads, self.warmup, self.name),
            name=self.name,
            daemon=True,  # never outlives the server
        )
        process.start()
        theirs.close()  # only the child holds its end: its exit closes the pipe
        self._conn, self._process = ours, process
        kind, value = self._receive()
        if kind == "failed":
            self.stop()
            raise value
        self.model_id = value["model_id"]
        self.runtime = value["runtime"]
        return self

    def scores(self, batch: Sequence[EncodedText]) -> list[list[float]]:
        """Probabilities per text, one checked row each (see ``score_rows``)."""
        kind, value = self._ask(("batch", list(batch)))
        if kind == "error":
            raise value
        rows: list[list[float]] = value
        return rows

    def state(self) -> dict[str, Any]:
        """Grad mode and module modes as the process's inference thread sees them."""
        _, value = self._ask(("state", None))
        state: dict[str, Any] = value
        return state

    @property
    def alive(self) -> bool:
        return self._process is not None and self._process.is_alive()

    def stop(self, timeout_s: float = STOP_TIMEOUT_S) -> None:
        """Ask the process to end (it finishes the batch it runs), then make sure it did."""
        conn, process = self._conn, self._process
        if conn is not None:
            with contextlib.suppress(OSError, ValueError):
                conn.send(("stop", None))
            conn.close()
            self._conn = None
        if process is not None:
            process.join(timeout_s)
            if process.is_alive():
                process.kill()
                process.join(timeout_s)
            self._process = None

    def __enter__(self) -> ModelProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _ask(self, message: tuple[str, Any]) -> tuple[str, Any]:
        if self._conn is None:
            raise WorkerLostError(f"{self.name} is not running")
        try:
            self._conn.send(message)
        except (OSError, ValueError) as exc:
            raise WorkerLostError(f"{self.name} is gone: {exc}") from None
        return self._receive()

    def _receive(self) -> tuple[str, Any]:
        assert self._conn is not None and self._process is not None
        try:
            kind, value = self._conn.recv()
        except (EOFError, OSError) as exc:
            code = self._process.exitcode if not self._process.is_alive() else None
            reason = f"exit code {code}" if code is not None else type(exc).__name__
            raise WorkerLostError(f"{self.name} ended ({reason})") from None
        return str(kind), value


def _portable(exc: BaseException) -> BaseException:
    """``exc`` if it survives pickling, else a RuntimeError that says what it was."""
    try:
        pickle.loads(pickle.dumps(exc))
    except Exception:
        return RuntimeError(f"{type(exc).__name__}: {exc}")
    return exc


def _serve(
    conn: multiprocessing.connection.Connection,
    loader: ModelLoader,
    mode: GradMode,
    threads: int,
    warmup: list[str],
    name: str,
) -> None:
    """The worker process's main function."""
    for sig in STOP_SIGNALS:  # the server decides when we stop
        signal.signal(sig, signal.SIG_IGN)
    threading.current_thread().name = name
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    try:
        import torch

        import gradfence as gf
        from gradfence.serve.batcher import check_ready, score_rows, thread_state

        torch.set_num_threads(threads)
        model = loader()
    except BaseException as exc:
        _send(conn, ("failed", _portable(exc)))
        return
    with gf.inference(model, mode=mode):
        try:
            state = check_ready(model, warmup)
        except BaseException as exc:
            _send(conn, ("failed", _portable(exc)))
            return
        ready = {"model_id": model.model_id, "runtime": model.runtime, "state": state}
        if not _send(conn, ("ready", ready)):
            return
        while True:
            try:
                kind, value = conn.recv()
            except (EOFError, OSError):
                return  # the server went away
            if kind == "stop":
                return
            try:
                if kind == "batch":
                    answer: tuple[str, Any] = ("rows", score_rows(model, value))
                else:
                    answer = ("state", thread_state(model))
            except Exception as exc:
                answer = ("error", _portable(exc))
            if not _send(conn, answer):
                return


def _send(conn: multiprocessing.connection.Connection, message: tuple[str, Any]) -> bool:
    """Send ``message``; False when the server is gone."""
    try:
        conn.send(message)
    except OSError:
        return False
    return True
