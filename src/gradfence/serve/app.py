"""The HTTP API of ``gradfence serve``: one FastAPI app for the uvicorn and Ray backends.

Routes: ``POST /v1/predict``, ``GET /v1/model``, ``GET /health/live``,
``GET /health/ready``, ``GET /metrics`` (and ``GET /openapi.json`` with
``ServeSettings.openapi``). Every error answer is JSON with a ``detail`` string (and
``field`` when one field of the request is at fault). Request and response bodies are
pydantic models, so ``/openapi.json`` documents them, every error answer and the bearer
auth.

The edge (:class:`_Edge`, in front of every route): bounded metric labels, the Host
check (DNS rebinding), the API key, ``415`` for a body that is not JSON, cheap ``503``
refusals before a body is read, ``nosniff`` / ``no-store`` on every answer. The HTTP
layer under it (head size and time, idle connections) is :mod:`gradfence.serve.server`.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import math
import threading
import time
from collections.abc import Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Annotated, Any, TypeVar

from fastapi import Depends, FastAPI, Request
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, Response
from fastapi.security import HTTPBearer
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError
from starlette.datastructures import Headers
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gradfence.serve.batcher import (
    Batcher,
    BatcherStoppedError,
    Prediction,
    QueueFullError,
    available_cores,
    is_small_request,
)
from gradfence.serve.metrics import ServiceMetrics
from gradfence.serve.model import TextClassifier

log = logging.getLogger("gradfence.serve")

T = TypeVar("T")

MAX_TEXTS = 64
MAX_TEXT_CHARS = 10_000
MAX_BODY_BYTES = 1 << 20
PUBLIC_ROUTES = ("/health/live", "/health/ready")
ROUTES = ("/v1/predict", "/v1/model", *PUBLIC_ROUTES, "/metrics", "/openapi.json")
# anything else is counted as method="other": made-up methods must not grow /metrics
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"})
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")
SECURITY_HEADERS = ((b"x-content-type-options", b"nosniff"), (b"cache-control", b"no-store"))
# admit a request while the model work queued before it is estimated to take at most
# this fraction of --request-timeout-s (the rest is headroom for estimation error,
# batching and HTTP)
ADMIT_FRACTION = 0.6
# a body this small may be a small request (SMALL_REQUEST_TEXTS texts): not refused
# before it is read by the limits that protect small requests from big ones
SMALL_BODY_BYTES = 2 * 1024
# tokens the service must have run before its measured cost per token is trusted; the
# cost is then re-measured over every window of this many tokens (a moving average)
MIN_OBSERVED_TOKENS = 512


@dataclass(frozen=True)
class ServeSettings:
    """Everything the app and its server need besides the model (``gradfence serve`` flags).

    ``allowed_hosts``: Host header names accepted (``None``: any; the CLI sets the
    loopback names when it binds to loopback). ``metrics_public``: ``/metrics`` without
    the API key. ``openapi``: serve ``/openapi.json``. The ``max_head_bytes`` to
    ``max_connections`` limits apply to the uvicorn backend's HTTP layer.
    """

    max_batch_size: int = 32
    max_wait_ms: float = 5.0
    max_queue: int = 1024
    request_timeout_s: float = 30.0
    api_key: str | None = None
    retry_after_s: int = 1
    warmup: tuple[str, ...] = ("gradfence warm-up batch",)
    allowed_hosts: tuple[str, ...] | None = None
    metrics_public: bool = False
    openapi: bool = False
    shutdown_body_grace_s: float = 2.0
    max_head_bytes: int = 16 * 1024
    head_timeout_s: float = 10.0
    idle_timeout_s: float = 5.0
    max_connections: int = 512
    # refusals only a retry can answer (busy, a made-up method, a bad head) wait this long
    refusal_pause_s: float = 1.0
    workers: int | None = None  # model workers; None: one per core available
    # each worker's model in a process of its own (``load`` must then be picklable)
    worker_processes: bool = False


# --- request and response bodies ---------------------------------------------------


def _utf8_encodable(text: str) -> str:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # JSON allows "\ud800"; tokenizers refuse it
        raise ValueError("is not valid Unicode (a lone surrogate)") from None
    return text


Text = Annotated[str, Field(max_length=MAX_TEXT_CHARS), AfterValidator(_utf8_encodable)]


class PredictRequest(BaseModel):
    """``POST /v1/predict`` body: 1 to 64 texts of at most 10,000 characters each."""

    model_config = ConfigDict(extra="forbid", strict=True)

    texts: Annotated[list[Text], Field(min_length=1, max_length=MAX_TEXTS)]


class PredictionBody(BaseModel):
    """One text's prediction: the most probable label, its probability, every label's."""

    label: str
    score: float
    scores: dict[str, float]


class PredictResponse(BaseModel):
    """``POST /v1/predict`` answer: one prediction per text, in order."""

    predictions: list[PredictionBody]
    model: str


class ErrorBody(BaseModel):
    """Every error answer; ``field`` names the offending field when there is one
    (``body``, ``texts``, ``texts[i]``, an unknown key, ``content-type``, ``host``)."""

    detail: str
    field: str | None = None


class HealthBody(BaseModel):
    """``/health/*`` answer; ``detail`` says why loading failed."""

    status: str
    detail: str | None = None


class ModelInfo(BaseModel):
    """``GET /v1/model`` answer."""

    model: str
    labels: list[str]
    runtime: str = Field(
        description="what computes the logits: torch or onnx (in every worker; where "
        "worker processes resolved --runtime auto differently, each one, e.g. 'onnx + torch')"
    )
    backend: str
    inference_thread: dict[str, Any]
    batching: dict[str, float | str]
    limits: dict[str, float]


def _errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    return {status: {"model": ErrorBody} for status in statuses}


class RequestError(Exception):
    """An HTTP error answer: status, message, and optionally the offending field."""

    def __init__(
        self,
        status: int,
        detail: str,
        field: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail
        self.field = field
        self.headers = headers or {}

    def response(self) -> JSONResponse:
        body: dict[str, Any] = {"detail": self.detail}
        if self.field is not None:
            body["field"] = self.field
        return JSONResponse(body, status_code=self.status, headers=self.headers)


class Flag:
    """A flag set once (draining, aborting) that requests wait on without a task each.

    ``asyncio.Event.wait()`` needs a task of its own to be raced against other work;
    :meth:`future` is a plain future of the running loop, which ``asyncio.wait`` takes
    as it is. Use it on the event loop's thread (set it from others through
    ``call_soon_threadsafe``).
    """

    def __init__(self) -> None:
        self._set = False
        self._future: asyncio.Future[None] | None = None

    def is_set(self) -> bool:
        return self._set

    def set(self) -> None:
        self._set = True
        if self._future is not None and not self._future.done():
            self._future.set_result(None)

    def future(self) -> asyncio.Future[None]:
        """Done once the flag is set (one future per flag, made on first use)."""
        if self._future is None:
            self._future = asyncio.get_running_loop().create_future()
            if self._set:
                self._future.set_result(None)
        return self._future


# set in a request's ASGI scope while its refusal waits: the HTTP layer may then close
# the connection to make room, as it closes idle ones
REFUSAL_PAUSE_KEY = "gradfence.refusal_paused"


# refusals answered per second at most while they pause: a bound on what clients that
# retry at once can make the server do, however many they are (each costs ~0.5 ms here)
REFUSALS_PER_S = 100.0


class RefusalPause:
    """A pause before refusals that a client can only answer by retrying.

    A client told "busy" (503), or sending a made-up method or a head it must not send,
    gains nothing by an immediate answer, and a client that ignores ``Retry-After``
    retries at once: answered immediately, a few such clients keep a core busy (theirs
    and the server's) for nothing. Each such refusal waits ``seconds``, and longer when
    more than ``per_second`` would be answered in a second, so clients in a retry loop
    send one request per pause, whatever their number. The wait costs no CPU: a refused
    head is no longer read (the client's writes block), and a request refused by the app
    is read no further than the HTTP layer's buffer. One instance serves the app and the
    HTTP layer of a server. At most ``limit`` refusals wait at once; beyond that they are
    answered at once. ``seconds`` 0 turns the pause off.
    """

    def __init__(self, seconds: float, limit: int, per_second: float = REFUSALS_PER_S) -> None:
        self.seconds = seconds
        self.limit = limit
        self.per_second = per_second
        self.waiting = 0
        self._last = -math.inf  # when the latest pausing refusal is answered

    def take(self) -> float | None:
        """How long one more refusal waits (then :meth:`release` it), or None when it is
        answered at once (the pause is off, or ``limit`` refusals wait already)."""
        if self.seconds <= 0 or self.waiting >= self.limit:
            return None
        now = time.monotonic()
        # spaced 1/per_second apart after the latest; a refusal released early (its client
        # left) frees its place in that schedule too: never further out than the number
        # waiting needs
        latest = min(self._last, now + self.seconds + self.waiting / self.per_second)
        self._last = max(now + self.seconds, latest + 1 / self.per_second)
        self.waiting += 1
        return self._last - now

    def release(self) -> None:
        self.waiting -= 1

    async def wait(self, scope: Scope, until: Flag) -> None:
        """Sleep before a refusal is sent, or until ``until`` is set (shutting down)."""
        delay = self.take()
        if delay is None:
            return
        scope[REFUSAL_PAUSE_KEY] = True
        try:
            await asyncio.wait((until.future(),), timeout=delay)
        finally:
            self.release()


def _field_name(loc: Sequence[int | str]) -> str:
    """pydantic's error location as the client wrote it: ``("texts", 1)`` -> ``texts[1]``."""
    name = ""
    for part in loc:
        name += f"[{part}]" if isinstance(part, int) else (f".{part}" if name else str(part))
    return name or "body"


def validate_texts(body: Any) -> list[str]:
    """The ``texts`` of a predict body, or a 422 :class:`RequestError` naming the field.

    >>> validate_texts({"texts": ["great phone"]})
    ['great phone']
    """
    try:
        return PredictRequest.model_validate(body).texts
    except ValidationError as exc:
        error = exc.errors(include_url=False)[0]
        if error["type"] == "model_type":
            raise RequestError(
                422, 'the body must be a JSON object {"texts": [...]}', "body"
            ) from None
        field = _field_name(error["loc"])
        message = error["msg"]
        if error["type"] == "extra_forbidden":
            message = "unknown field"
        elif error["type"] == "value_error":
            message = message.removeprefix("Value error, ")
        raise RequestError(422, f"{field}: {message[:1].lower()}{message[1:]}", field) from None


async def read_body(
    request: Request,
    limit: int = MAX_BODY_BYTES,
    timeout_s: float | None = None,
    draining: Flag | None = None,
    grace_s: float = 2.0,
) -> bytes:
    """The request body, or a :class:`RequestError`: 413 as soon as it exceeds ``limit``,
    408 when it has not fully arrived within ``timeout_s`` (a client that sends less than
    its ``Content-Length`` would otherwise hold the request, and a graceful shutdown,
    forever), 503 when it has not arrived ``grace_s`` after ``draining`` was set (the
    server is shutting down), 499 when the client closed the connection before sending
    all of it."""
    declared = request.headers.get("content-length", "").strip()
    if declared.isdigit() and int(declared) > limit:
        raise RequestError(413, f"body of {declared} bytes exceeds {limit} bytes")
    reading = asyncio.ensure_future(_read_chunks(request, limit))
    waits: list[asyncio.Future[Any]] = [reading]
    if draining is not None:
        waits.append(draining.future())
    try:
        done, _ = await asyncio.wait(waits, timeout=timeout_s, return_when="FIRST_COMPLETED")
        if reading not in done and len(done) == 1:  # draining: a short grace, then stop
            await asyncio.wait([reading], timeout=grace_s)
            if not reading.done():
                raise RequestError(
                    503,
                    "shutting down: the body did not arrive in time",
                    headers={"Connection": "close"},
                )
        if not reading.done():
            raise RequestError(408, f"the body did not arrive within {timeout_s:g} s")
        return reading.result()
    except ClientDisconnect as exc:
        raise RequestError(499, "the client closed the connection before its body") from exc
    finally:
        reading.cancel()
        with contextlib.suppress(BaseException):
            await reading


async def _read_chunks(request: Request, limit: int) -> bytes:
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise RequestError(413, f"body exceeds {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def check_auth(headers: Any, api_key: str | None) -> None:
    """Raise a 401 :class:`RequestError` unless the bearer token equals ``api_key``.

    ``headers``: the request's headers (a mapping). The comparison takes constant time
    (``hmac.compare_digest``); no key, no check.
    """
    if api_key is None:
        return
    scheme, _, token = headers.get("authorization", "").partition(" ")
    # header values arrive decoded as latin-1: back to the bytes the client sent (UTF-8)
    ok = scheme.lower() == "bearer" and hmac.compare_digest(
        token.strip().encode("latin-1"), api_key.encode()
    )
    if not ok:
        raise RequestError(401, "missing or wrong API key", headers={"WWW-Authenticate": "Bearer"})


def check_host(headers: Any, allowed: tuple[str, ...] | None) -> None:
    """Raise a 400 :class:`RequestError` unless the Host header names an allowed host.

    A service bound to loopback is reachable from any web page the user visits through
    DNS rebinding (``evil.example`` resolving to 127.0.0.1): the browser then sends
    ``Host: evil.example``, which this refuses.
    """
    if allowed is None:
        return
    host = headers.get("host", "").strip().lower()
    if _host_name(host) not in allowed:
        names = ", ".join(allowed)
        raise RequestError(400, f"Host {host!r} is not served here (allowed: {names})", "host")


def _host_name(host: str) -> str:
    """``name:port`` -> ``name``; ``[::1]:8000`` -> ``::1``."""
    if host.startswith("["):
        return host[1:].partition("]")[0]
    return host.partition(":")[0] if host.count(":") == 1 else host


def check_json_content_type(headers: Any) -> None:
    """Raise a 415 :class:`RequestError` unless the body is declared as JSON.

    Browsers send cross-origin ``text/plain`` or form bodies without a preflight; a JSON
    content type cannot be sent that way.
    """
    media = headers.get("content-type", "").partition(";")[0].strip().lower()
    if media != "application/json":
        shown = media or "none"
        raise RequestError(415, f"content-type {shown}: send application/json", "content-type")


async def parse_predict(
    request: Request,
    timeout_s: float | None = None,
    draining: Flag | None = None,
    grace_s: float = 2.0,
) -> list[str]:
    """The texts of a ``POST /v1/predict`` request, or a 408/413/422/499/503
    :class:`RequestError` (see :func:`read_body`)."""
    raw = await read_body(request, timeout_s=timeout_s, draining=draining, grace_s=grace_s)
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError) as exc:  # bad JSON, bad UTF-8, absurd nesting
        raise RequestError(422, f"the body is not valid JSON: {exc}", "body") from exc
    return validate_texts(body)


def failure_answer(exc: BaseException, settings: ServeSettings) -> RequestError:
    """The HTTP answer (503/504/500) to the failure of a prediction or model query."""
    retry = {"Retry-After": str(settings.retry_after_s)}
    if isinstance(exc, QueueFullError):
        return RequestError(503, f"busy: {exc}", headers=retry)
    if isinstance(exc, asyncio.TimeoutError):  # the builtin TimeoutError from 3.11 on
        return RequestError(504, f"no answer within {settings.request_timeout_s:g} s")
    if isinstance(exc, BatcherStoppedError):
        return RequestError(503, str(exc), headers=retry)
    log.error("prediction failed: %r", exc)
    return RequestError(500, f"inference failed: {type(exc).__name__}")


async def guarded(work: Awaitable[T], settings: ServeSettings) -> T:
    """Await ``work`` (a model query, say), mapping its failures to HTTP answers."""
    try:
        return await work
    except Exception as exc:
        raise failure_answer(exc, settings) from exc


async def await_answer(
    batcher: Batcher,
    texts: Sequence[str],
    request: Request,
    settings: ServeSettings,
    aborting: Flag | None = None,
) -> list[Prediction]:
    """The predictions of ``texts``, or a :class:`RequestError`: 503 when the queue
    cannot take them (or, with ``aborting`` set first, a second Ctrl+C), 504 after
    ``settings.request_timeout_s``, 499 when the client goes away first, 500 when the
    model fails.

    Call once the body has been read: the ASGI ``receive`` then only reports the
    disconnect. A request given up drops its queued texts, so a client that left does
    not leave work for the model (nor places in the queue) behind. The answer, the
    timeout and ``aborting`` are raced as plain futures: the only task is the one that
    watches for the disconnect.
    """
    try:
        queued = await batcher.enqueue(texts)
    except Exception as exc:
        raise failure_answer(exc, settings) from exc
    answer = asyncio.wrap_future(queued)

    async def disconnected() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    gone = asyncio.ensure_future(disconnected())
    waits: list[asyncio.Future[Any]] = [answer, gone]
    if aborting is not None:
        waits.append(aborting.future())
    try:
        await asyncio.wait(waits, timeout=settings.request_timeout_s, return_when="FIRST_COMPLETED")
    finally:
        gone.cancel()
        # a receive that failed means the client is gone too; its error is read on any path
        gone.add_done_callback(lambda task: task.cancelled() or task.exception())
        if not answer.done():
            batcher.cancel(queued)
            answer.cancel()
    if not answer.cancelled():
        try:
            return answer.result()
        except Exception as exc:
            raise failure_answer(exc, settings) from exc
    if aborting is not None and aborting.is_set():
        raise RequestError(503, "shutting down", headers={"Connection": "close"})
    if gone.done() and not gone.cancelled():
        raise RequestError(499, "the client closed the connection before its answer")
    raise failure_answer(asyncio.TimeoutError(), settings)


def predictions_body(predictions: list[Prediction], model_id: str) -> dict[str, Any]:
    """The JSON answer of ``POST /v1/predict``."""
    rows = [{"label": p.label, "score": p.score, "scores": p.scores} for p in predictions]
    return {"predictions": rows, "model": model_id}


def model_body(
    model: TextClassifier,
    state: dict[str, Any],
    settings: ServeSettings,
    backend: str,
    runtimes: Sequence[str | None] = (),
) -> dict[str, Any]:
    """The JSON answer of ``GET /v1/model``; ``state`` is :func:`thread_state` as seen
    from the thread that runs the model, ``runtimes`` what runs it in each worker."""
    seen = sorted({runtime for runtime in runtimes if runtime}) or [model.runtime]
    return {
        "model": model.model_id,
        "labels": list(model.labels),
        "runtime": " + ".join(seen),
        "backend": backend,
        "inference_thread": state,
        "batching": {
            "max_batch_size": settings.max_batch_size,
            "max_wait_ms": settings.max_wait_ms,
            "max_queue": settings.max_queue,
            "workers": settings.workers or available_cores(),
            "worker_kind": "process" if settings.worker_processes else "thread",
        },
        "limits": {
            "max_texts": MAX_TEXTS,
            "max_text_chars": MAX_TEXT_CHARS,
            "max_body_bytes": MAX_BODY_BYTES,
            "request_timeout_s": settings.request_timeout_s,
        },
    }


# --- admission by estimated work ---------------------------------------------------


class WorkAdmission:
    """Admits a request only if the model can answer it within the request timeout.

    It counts the estimated tokens (``TextClassifier.estimate_tokens``) of every admitted request
    not yet answered, and measures the model's seconds per token from the batches run
    (``observe_batch``) and the tokens of the requests they answered (``finish``), over
    windows of ``MIN_OBSERVED_TOKENS`` tokens, as a moving average that follows a
    machine getting busier. A request is refused (503) when the work queued ahead of
    it, plus its own, would take longer than ``ADMIT_FRACTION`` of the timeout; a
    request alone is always admitted. Until the first window is measured, only the
    queue's text count limits admission.

    >>> admission = WorkAdmission(timeout_s=30.0)
    >>> admission.estimated_wait_s(1000)
    0.0
    """

    def __init__(self, timeout_s: float, parallelism: int = 1) -> None:
        self.budget_s = ADMIT_FRACTION * timeout_s
        self.parallelism = max(1, parallelism)
        self.outstanding = 0
        self.outstanding_small = 0  # of that, the tokens of small requests
        self._cost: float | None = None  # seconds per token, moving average
        self._window_seconds = 0.0
        self._window_tokens = 0
        self._lock = threading.Lock()  # batches are observed from the inference thread

    def seconds_per_token(self) -> float | None:
        """The measured model cost of one token, once a window of tokens has run."""
        return None if self._cost is None else self._cost / self.parallelism

    def estimated_wait_s(self, tokens: int = 0, small: bool = False) -> float:
        """Model seconds until ``tokens`` more would be answered; a small request (the
        batcher runs them first) waits only for the other small ones."""
        cost = self.seconds_per_token()
        ahead = self.outstanding_small if small else self.outstanding
        return 0.0 if cost is None else cost * (ahead + tokens)

    def saturated(self, small: bool = False) -> bool:
        """True when the admitted work alone already fills the budget (of a small
        request, with ``small``)."""
        return self.estimated_wait_s(small=small) > self.budget_s

    def admit(self, tokens: int, small: bool = False) -> None:
        """Count ``tokens`` as admitted, or raise :class:`QueueFullError`."""
        wait = self.estimated_wait_s(tokens, small)
        ahead = self.outstanding_small if small else self.outstanding
        if ahead and wait > self.budget_s:
            raise QueueFullError(
                f"about {wait:.1f} s of model work queued with this request "
                f"(limit {self.budget_s:.1f} s)"
            )
        self.outstanding += tokens
        if small:
            self.outstanding_small += tokens

    def finish(self, tokens: int, served: bool, small: bool = False) -> None:
        """The admitted request of ``tokens`` ended (``served``: the model answered it)."""
        self.outstanding -= tokens
        if small:
            self.outstanding_small -= tokens
        if not served:
            return
        with self._lock:
            self._window_tokens += tokens
            if self._window_tokens >= MIN_OBSERVED_TOKENS:
                cost = self._window_seconds / self._window_tokens
                self._cost = cost if self._cost is None else 0.5 * (self._cost + cost)
                self._window_seconds, self._window_tokens = 0.0, 0

    def observe_batch(self, size: int, seconds: float) -> None:
        """Count the model time of one batch (called from the inference thread)."""
        with self._lock:
            self._window_seconds += seconds


class _Throttle:
    """At most one log line per ``every_s`` for a repeated event, with the count since.

    A retry storm must not turn into thousands of WARNING lines a second.
    """

    def __init__(self, every_s: float = 10.0) -> None:
        self.every_s = every_s
        self._last = -math.inf
        self._suppressed = 0

    def warning(self, message: str) -> None:
        now = time.monotonic()
        if now - self._last < self.every_s:
            self._suppressed += 1
            return
        more = f" ({self._suppressed} more like it since the last line)" if self._suppressed else ""
        log.warning("%s%s", message, more)
        self._last, self._suppressed = now, 0


class _Service:
    """The app's state: the model, its batcher, readiness, admission, shutdown events."""

    def __init__(
        self,
        load: Callable[[], TextClassifier],
        settings: ServeSettings,
        metrics: ServiceMetrics,
        on_fatal: Callable[[BaseException], None] | None,
    ) -> None:
        self.load = load
        self.settings = settings
        self.metrics = metrics
        self.on_fatal = on_fatal
        self.model: TextClassifier | None = None
        self.batcher: Batcher | None = None
        self.status = "loading"
        self.error: str | None = None
        self.loader: threading.Thread | None = None
        self.admission = WorkAdmission(
            settings.request_timeout_s, parallelism=settings.workers or available_cores()
        )
        self.refusals = _Throttle()
        self.pause = RefusalPause(settings.refusal_pause_s, settings.max_connections)
        self.loop: asyncio.AbstractEventLoop | None = None
        self.draining = Flag()
        self.aborting = Flag()

    def start(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.loader = threading.Thread(target=self._load, name="gradfence-loader", daemon=True)
        self.loader.start()

    def _load(self) -> None:
        try:
            started = time.perf_counter()
            model = self.load()
            settings = self.settings
            batcher = Batcher(
                model,
                max_batch_size=settings.max_batch_size,
                max_wait_ms=settings.max_wait_ms,
                max_queue=settings.max_queue,
                on_batch=self._on_batch,
                workers=settings.workers or available_cores(),
                loader=self.load if settings.worker_processes else None,
            )
            self.metrics.track(lambda: batcher.queue_depth)
            batcher.start(warmup=settings.warmup)
            self.model, self.batcher = model, batcher
            if self.status == "loading":
                self.status = "ready"
            log.info(
                "model %s ready in %.1f s (labels %s)",
                model.model_id,
                time.perf_counter() - started,
                ",".join(model.labels),
            )
        except BaseException as exc:
            self.status, self.error = "failed", f"{type(exc).__name__}: {exc}"
            log.error("loading the model failed: %s", self.error)
            if self.on_fatal is not None:
                self.on_fatal(exc)

    def _on_batch(self, size: int, seconds: float) -> None:
        self.metrics.observe_batch(size, seconds)
        self.admission.observe_batch(size, seconds)

    def begin_drain(self) -> None:
        """The server is shutting down (first signal): not ready any more, bodies still
        arriving get a short grace. Safe to call from a signal handler."""
        self._set_soon(self.draining)

    def abort(self) -> None:
        """Stop waiting for the model (second signal): requests still waiting get 503."""
        self._set_soon(self.draining)
        self._set_soon(self.aborting)

    def _set_soon(self, flag: Flag) -> None:
        if self.status in ("loading", "ready"):
            self.status = "stopping"
        if self.loop is not None and not self.loop.is_closed():
            self.loop.call_soon_threadsafe(flag.set)

    def stop(self) -> None:
        if self.loader is not None:
            self.loader.join()
        if self.status != "failed":
            self.status = "stopping"
        if self.batcher is not None:
            self.batcher.stop()

    def ready_batcher(self) -> Batcher:
        if self.status != "ready" or self.batcher is None or not self.batcher.alive:
            detail = f"model not ready ({self.status})"
            raise RequestError(
                503, detail, headers={"Retry-After": str(self.settings.retry_after_s)}
            )
        return self.batcher

    async def refuse(self, error: RequestError, scope: Scope) -> None:
        """Log a 503 (throttled) and, for one that asks for a retry, pause before it is
        sent (:class:`RefusalPause`, cut short when shutting down)."""
        if error.status != 503:
            return
        self.refusals.warning(f"{scope['method']} {scope['path']} -> 503: {error.detail}")
        if "Retry-After" in error.headers:
            await self.pause.wait(scope, self.draining)

    def check_capacity(self, batcher: Batcher, body_bytes: int | None) -> None:
        """The cheap refusal before a body is read: 503 when the queue is full or the
        admitted work already fills the time budget. A body of at most
        ``SMALL_BODY_BYTES`` may be a small request, which has places and work budget
        of its own."""
        small = body_bytes is not None and body_bytes <= SMALL_BODY_BYTES
        limit = self.settings.max_queue - (0 if small else batcher.reserved)
        full = batcher.queue_depth >= limit
        if full or self.admission.saturated(small):
            what = "the queue is full" if full else "the queued model work fills the timeout"
            raise RequestError(
                503,
                f"busy: {what}",
                headers={"Retry-After": str(self.settings.retry_after_s), "Connection": "close"},
            )


class _Edge:
    """ASGI layer in front of every route: metrics with bounded labels, one debug line
    per request, security headers, then the Host check, the API key, the content type
    and the cheap capacity check of ``POST /v1/predict``.

    ``POST /v1/predict`` then goes straight to ``predict``: the framework's layers
    (routing, dependencies, exception middleware) cost more of the server's CPU than the
    handler itself, on the one route where requests come by the hundred a second. Every
    other request goes on to ``app`` (FastAPI), where the OpenAPI schema of the predict
    route lives too.
    """

    def __init__(
        self,
        app: ASGIApp,
        service: _Service,
        predict: Callable[[Request], Awaitable[Response]],
    ) -> None:
        self.app = app
        self.service = service
        self.predict = predict
        settings = service.settings
        self.public = PUBLIC_ROUTES + (("/metrics",) if settings.metrics_public else ())

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500

        async def send_and_record(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", ()), *SECURITY_HEADERS]
            await send(message)

        path, method = scope["path"], scope["method"]
        try:
            try:
                self._check(scope, path, method)
            except RequestError as error:
                await self.service.refuse(error, scope)
                await error.response()(scope, receive, send_and_record)
                return
            if path == "/v1/predict" and method == "POST":
                await self._predict(scope, receive, send_and_record)
                return
            if method not in METHODS:  # a made-up method: its 405 or 404 after the pause
                await self.service.pause.wait(scope, self.service.draining)
            await self.app(scope, receive, send_and_record)
        finally:
            seconds = time.perf_counter() - start
            route = path if path in ROUTES else "other"
            label = method if method in METHODS else "other"
            self.service.metrics.observe_request(route, label, status, seconds)
            log.debug("%s %s %d %.1fms", label, route, status, seconds * 1000)

    async def _predict(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            response = await self.predict(Request(scope, receive))
        except Exception:  # a bug: one JSON 500 and one traceback in the log
            log.exception("POST /v1/predict failed")
            response = RequestError(500, "internal error").response()
        await response(scope, receive, send)

    def _check(self, scope: Scope, path: str, method: str) -> None:
        settings = self.service.settings
        headers = Headers(scope=scope)
        check_host(headers, settings.allowed_hosts)
        if path not in self.public:
            check_auth(headers, settings.api_key)
        if path == "/v1/predict" and method == "POST":
            check_json_content_type(headers)
            declared = headers.get("content-length", "")
            size = int(declared) if declared.isdigit() else None
            self.service.check_capacity(self.service.ready_batcher(), size)


def create_app(
    load: Callable[[], TextClassifier],
    settings: ServeSettings | None = None,
    *,
    on_fatal: Callable[[BaseException], None] | None = None,
    backend: str = "uvicorn",
) -> FastAPI:
    """The service as an ASGI app; ``load()`` runs in a background thread at startup.

    ``/health/ready`` answers 503 until the model is loaded, verified in eval mode from
    the inference thread, and a warm-up batch has run. ``on_fatal`` is called if that
    fails (the CLI uses it to exit). ``backend`` is reported by ``GET /v1/model``; the
    Ray backend serves this same app in each replica.
    """
    settings = settings or ServeSettings()
    metrics = ServiceMetrics()
    service = _Service(load, settings, metrics, on_fatal)
    retry = {"Retry-After": str(settings.retry_after_s)}

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> Any:
        service.start()
        yield
        # every accepted request is answered by now; the thread drains the rest
        await asyncio.to_thread(service.stop)

    app = _App(
        title="gradfence serve",
        version="1",
        lifespan=lifespan,
        docs_url=None,  # Swagger UI and ReDoc load their assets from a CDN
        redoc_url=None,
        openapi_url="/openapi.json" if settings.openapi else None,
    )
    app.state.service = service
    app.state.metrics = metrics
    bearer = HTTPBearer(auto_error=False, description="--api-key-env: the service's key")
    keyed = [Depends(bearer)] if settings.api_key is not None else []
    metrics_keyed = keyed if not settings.metrics_public else []
    edge_errors = _errors(400, 401) if settings.api_key is not None else _errors(400)

    @app.post(
        "/v1/predict",
        response_model=PredictResponse,
        dependencies=keyed,
        responses={**edge_errors, **_errors(408, 413, 415, 422, 500, 503, 504)},
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {
                    "application/json": {"schema": {"$ref": "#/components/schemas/PredictRequest"}}
                },
            }
        },
    )
    async def predict(request: Request) -> Response:
        """One prediction per text, in order: label, its probability, every label's."""
        tokens = 0
        served = small = False
        refused: RequestError | None = None
        try:
            batcher = service.ready_batcher()
            texts = await parse_predict(
                request,
                settings.request_timeout_s,
                service.draining,
                settings.shutdown_body_grace_s,
            )
            if len(texts) > settings.max_queue:  # a 503 would invite retries that never fit
                raise RequestError(
                    422,
                    f"'texts' holds {len(texts)} items; this server queues at most "
                    f"{settings.max_queue} texts (--max-queue)",
                    "texts",
                )
            needed = batcher.estimate_tokens(texts)
            small = is_small_request(texts)
            try:
                service.admission.admit(needed, small)
            except QueueFullError as exc:
                raise failure_answer(exc, settings) from exc
            tokens = needed
            predictions = await await_answer(batcher, texts, request, settings, service.aborting)
            served = True
        except RequestError as error:
            refused = error
        finally:  # the admitted work is freed before a refusal pauses
            service.admission.finish(tokens, served, small)
        if refused is not None:
            await service.refuse(refused, request.scope)
            if refused.status >= 500 and refused.status != 503:
                log.warning("POST /v1/predict -> %d: %s", refused.status, refused.detail)
            return refused.response()
        return JSONResponse(predictions_body(predictions, batcher.model.model_id))

    @app.get(
        "/v1/model",
        response_model=ModelInfo,
        dependencies=keyed,
        responses={**edge_errors, **_errors(503, 504)},
    )
    async def model_info() -> Response:
        """Model id, labels, and eval/grad mode as seen from the inference thread."""
        try:
            batcher = service.ready_batcher()
            timeout = settings.request_timeout_s
            state = await guarded(batcher.inspect_thread(timeout), settings)
        except RequestError as error:
            return error.response()
        body = model_body(batcher.model, state, settings, backend, batcher.runtimes)
        return JSONResponse(body)

    @app.get("/health/live", response_model=HealthBody, responses=_errors(400))
    async def live() -> Response:
        """200 while the process is up."""
        return JSONResponse({"status": "live"})

    @app.get(
        "/health/ready",
        response_model=HealthBody,
        responses={400: {"model": ErrorBody}, 503: {"model": HealthBody}},
    )
    async def ready() -> Response:
        """200 once the model serves; 503 while loading, after a failure, when stopping."""
        ok = service.status == "ready" and service.batcher is not None and service.batcher.alive
        if ok:
            return JSONResponse({"status": "ready"})
        body: dict[str, Any] = {"status": service.status}
        if service.error:
            body["detail"] = service.error
        return JSONResponse(body, status_code=503, headers=retry)

    @app.get(
        "/metrics",
        dependencies=metrics_keyed,
        responses={
            200: {"content": {CONTENT_TYPE_LATEST: {}}, "description": "Prometheus text"},
            **(edge_errors if not settings.metrics_public else _errors(400)),
        },
    )
    async def prometheus() -> Response:
        """Prometheus text format."""
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(
                title=app.title, version=app.version, routes=app.routes, description=__doc__
            )
            schemas = schema.setdefault("components", {}).setdefault("schemas", {})
            schemas["PredictRequest"] = PredictRequest.model_json_schema()
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    app.edge = _Edge(app.framework, service, predict)
    return app


class _App(FastAPI):
    """The FastAPI app behind :class:`_Edge` (set as ``edge`` once the routes exist)."""

    edge: _Edge | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.edge is None or scope["type"] != "http":  # lifespan, or not built yet
            await self.framework(scope, receive, send)
        else:
            await self.edge(scope, receive, send)

    async def framework(self, scope: Scope, receive: Receive, send: Send) -> None:
        """The request through FastAPI's own layers (every route but the predict POST)."""
        await super().__call__(scope, receive, send)
