"""The HTTP API of ``gradfence serve``: a FastAPI app around a :class:`Batcher`.

Routes: ``POST /v1/predict``, ``GET /v1/model``, ``GET /health/live``,
``GET /health/ready``, ``GET /metrics``. Every error answer is JSON with a ``detail``
string (and ``field`` for validation errors).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import threading
import time
from collections.abc import Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass
from typing import Any, TypeVar

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gradfence.serve.batcher import (
    Batcher,
    BatcherStoppedError,
    Prediction,
    QueueFullError,
    available_cores,
)
from gradfence.serve.metrics import ServiceMetrics
from gradfence.serve.model import TextClassifier

log = logging.getLogger("gradfence.serve")

T = TypeVar("T")

MAX_TEXTS = 64
MAX_TEXT_CHARS = 10_000
MAX_BODY_BYTES = 1 << 20
ROUTES = ("/v1/predict", "/v1/model", "/health/live", "/health/ready", "/metrics")


@dataclass(frozen=True)
class ServeSettings:
    """Everything the app needs besides the model (the CLI flags of ``gradfence serve``)."""

    max_batch_size: int = 32
    max_wait_ms: float = 5.0
    max_queue: int = 1024
    request_timeout_s: float = 30.0
    api_key: str | None = None
    retry_after_s: int = 1
    warmup: tuple[str, ...] = ("gradfence warm-up batch",)
    workers: int | None = None  # model worker threads; None: one per core available


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


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # JSON allows "\ud800"; tokenizers refuse it
        return False
    return True


def validate_texts(body: Any) -> list[str]:
    """The ``texts`` of a predict body, or a 422 :class:`RequestError` naming the field."""
    if not isinstance(body, dict):
        raise RequestError(422, 'the body must be a JSON object {"texts": [...]}', "body")
    unknown = sorted(set(body) - {"texts"})
    if unknown:
        raise RequestError(422, f"unknown field {unknown[0]!r}", unknown[0])
    if "texts" not in body:
        raise RequestError(422, "field 'texts' is required", "texts")
    texts = body["texts"]
    if not isinstance(texts, list):
        raise RequestError(422, "'texts' must be a list of strings", "texts")
    if not texts:
        raise RequestError(422, "'texts' must not be empty", "texts")
    if len(texts) > MAX_TEXTS:
        raise RequestError(422, f"'texts' holds {len(texts)} items, at most {MAX_TEXTS}", "texts")
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            name = type(text).__name__ if text is not None else "null"
            raise RequestError(422, f"texts[{i}] must be a string, not {name}", f"texts[{i}]")
        if not _encodable(text):
            raise RequestError(
                422, f"texts[{i}] is not valid Unicode (a lone surrogate)", f"texts[{i}]"
            )
        if len(text) > MAX_TEXT_CHARS:
            raise RequestError(
                422,
                f"texts[{i}] has {len(text)} characters, at most {MAX_TEXT_CHARS}",
                f"texts[{i}]",
            )
    return texts


async def read_body(
    request: Request, limit: int = MAX_BODY_BYTES, timeout_s: float | None = None
) -> bytes:
    """The request body, or a :class:`RequestError`: 413 as soon as it exceeds ``limit``,
    408 when it has not fully arrived within ``timeout_s`` (a client that sends less than
    its ``Content-Length`` would otherwise hold the request, and a graceful shutdown,
    forever), 499 when the client closed the connection before sending all of it."""
    declared = request.headers.get("content-length", "").strip()
    if declared.isdigit() and int(declared) > limit:
        raise RequestError(413, f"body of {declared} bytes exceeds {limit} bytes")
    try:
        return await asyncio.wait_for(_read_chunks(request, limit), timeout_s)
    except asyncio.TimeoutError as exc:
        raise RequestError(408, f"the body did not arrive within {timeout_s:g} s") from exc
    except ClientDisconnect as exc:
        raise RequestError(499, "the client closed the connection before its body") from exc


async def _read_chunks(request: Request, limit: int) -> bytes:
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise RequestError(413, f"body exceeds {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def check_auth(request: Request, api_key: str | None) -> None:
    """Raise a 401 :class:`RequestError` unless the bearer token equals ``api_key``.

    The comparison takes constant time (``hmac.compare_digest``); no key, no check.
    """
    if api_key is None:
        return
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    # header values arrive decoded as latin-1: back to the bytes the client sent (UTF-8)
    ok = scheme.lower() == "bearer" and hmac.compare_digest(
        token.strip().encode("latin-1"), api_key.encode()
    )
    if not ok:
        raise RequestError(401, "missing or wrong API key", headers={"WWW-Authenticate": "Bearer"})


async def parse_predict(request: Request, timeout_s: float | None = None) -> list[str]:
    """The texts of a ``POST /v1/predict`` request, or a 408/413/422/499
    :class:`RequestError` (see :func:`read_body`)."""
    raw = await read_body(request, timeout_s=timeout_s)
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError) as exc:  # bad JSON, bad UTF-8, absurd nesting
        raise RequestError(422, f"the body is not valid JSON: {exc}", "body") from exc
    return validate_texts(body)


async def guarded(work: Awaitable[T], settings: ServeSettings) -> T:
    """Await ``work`` (a prediction, say), mapping its failures to HTTP answers (503/504/500)."""
    retry = {"Retry-After": str(settings.retry_after_s)}
    try:
        return await work
    except QueueFullError as exc:
        raise RequestError(503, f"busy: {exc}", headers=retry) from exc
    except asyncio.TimeoutError as exc:  # the builtin TimeoutError from Python 3.11 on
        raise RequestError(504, f"no answer within {settings.request_timeout_s:g} s") from exc
    except BatcherStoppedError as exc:
        raise RequestError(503, str(exc), headers=retry) from exc
    except Exception as exc:
        log.error("prediction failed: %r", exc)
        raise RequestError(500, f"inference failed: {type(exc).__name__}") from exc


async def unless_disconnected(request: Request, work: Awaitable[T]) -> T:
    """Await ``work``; if the client goes away first, cancel it and raise a 499.

    Call once the body has been read: the ASGI ``receive`` then only reports the
    disconnect. A cancelled prediction drops its queued texts, so a client that gave up
    does not leave work for the model (nor places in the queue) behind.
    """

    async def disconnected() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    task = asyncio.ensure_future(work)
    watch = asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait((task, watch), return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
        if not task.done():
            task.cancel()
            with contextlib.suppress(BaseException):
                await task
    if task.cancelled():
        raise RequestError(499, "the client closed the connection before its answer")
    return task.result()


def predictions_body(predictions: list[Prediction], model_id: str) -> dict[str, Any]:
    """The JSON answer of ``POST /v1/predict``."""
    return {"predictions": [asdict(p) for p in predictions], "model": model_id}


def model_body(
    model: TextClassifier, state: dict[str, Any], settings: ServeSettings, backend: str
) -> dict[str, Any]:
    """The JSON answer of ``GET /v1/model``; ``state`` is :func:`thread_state` as seen
    from the thread that runs the model."""
    return {
        "model": model.model_id,
        "labels": list(model.labels),
        "backend": backend,
        "inference_thread": state,
        "batching": {
            "max_batch_size": settings.max_batch_size,
            "max_wait_ms": settings.max_wait_ms,
            "max_queue": settings.max_queue,
            "workers": settings.workers or available_cores(),
        },
        "limits": {
            "max_texts": MAX_TEXTS,
            "max_text_chars": MAX_TEXT_CHARS,
            "max_body_bytes": MAX_BODY_BYTES,
            "request_timeout_s": settings.request_timeout_s,
        },
    }


class _Service:
    """The app's state: the model, its batcher, readiness."""

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

    def start(self) -> None:
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
                on_batch=self.metrics.observe_batch,
                workers=settings.workers or available_cores(),
            )
            self.metrics.track(lambda: batcher.queue_depth, batcher.stats.texts_per_second)
            batcher.start(warmup=settings.warmup)
            self.model, self.batcher = model, batcher
            self.status = "ready"
            log.info(
                "model %s ready in %.1f s (labels %s)",
                model.model_id,
                time.perf_counter() - started,
                ",".join(model.labels),
            )
        except BaseException as exc:
            self.status, self.error = "failed", f"{type(exc).__name__}: {exc}"
            log.exception("loading the model failed")
            if self.on_fatal is not None:
                self.on_fatal(exc)

    def stop(self) -> None:
        if self.loader is not None:
            self.loader.join()
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


class _Observe:
    """ASGI middleware: per-request metrics and one debug log line per request."""

    def __init__(self, app: ASGIApp, metrics: ServiceMetrics) -> None:
        self.app = app
        self.metrics = metrics

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
            await send(message)

        try:
            await self.app(scope, receive, send_and_record)
        finally:
            seconds = time.perf_counter() - start
            path = scope["path"]
            route = path if path in ROUTES else "other"
            self.metrics.observe_request(route, scope["method"], status, seconds)
            log.debug("%s %s %d %.1fms", scope["method"], path, status, seconds * 1000)


def create_app(
    load: Callable[[], TextClassifier],
    settings: ServeSettings | None = None,
    *,
    on_fatal: Callable[[BaseException], None] | None = None,
) -> FastAPI:
    """The service as an ASGI app; ``load()`` runs in a background thread at startup.

    ``/health/ready`` answers 503 until the model is loaded, verified in eval mode from
    the inference thread, and a warm-up batch has run. ``on_fatal`` is called if that
    fails (the CLI uses it to exit).
    """
    settings = settings or ServeSettings()
    metrics = ServiceMetrics()
    service = _Service(load, settings, metrics, on_fatal)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> Any:
        service.start()
        yield
        # uvicorn has answered every accepted request by now; the thread drains the rest
        await asyncio.to_thread(service.stop)

    app = FastAPI(title="gradfence serve", version="1", lifespan=lifespan)
    app.state.service = service
    app.state.metrics = metrics
    app.add_middleware(_Observe, metrics=metrics)

    @app.post("/v1/predict")
    async def predict(request: Request) -> Response:
        """One prediction per text, in order: label, its probability, every label's."""
        try:
            check_auth(request, settings.api_key)
            batcher = service.ready_batcher()
            texts = await parse_predict(request, settings.request_timeout_s)
            if len(texts) > settings.max_queue:  # a 503 would invite retries that never fit
                raise RequestError(
                    422,
                    f"'texts' holds {len(texts)} items; this server queues at most "
                    f"{settings.max_queue} texts (--max-queue)",
                    "texts",
                )
            work = guarded(batcher.predict(texts, settings.request_timeout_s), settings)
            predictions = await unless_disconnected(request, work)
        except RequestError as error:
            if error.status >= 500:
                log.warning("POST /v1/predict -> %d: %s", error.status, error.detail)
            return error.response()
        return JSONResponse(predictions_body(predictions, batcher.model.model_id))

    @app.get("/v1/model")
    async def model_info(request: Request) -> Response:
        """Model id, labels, and eval/grad mode as seen from the inference thread."""
        try:
            check_auth(request, settings.api_key)
            batcher = service.ready_batcher()
            timeout = settings.request_timeout_s
            state = await guarded(batcher.inspect_thread(timeout), settings)
        except RequestError as error:
            return error.response()
        return JSONResponse(model_body(batcher.model, state, settings, "uvicorn"))

    @app.get("/health/live")
    async def live() -> Response:
        """200 while the process is up."""
        return JSONResponse({"status": "live"})

    @app.get("/health/ready")
    async def ready() -> Response:
        """200 once the model serves; 503 while loading, after a failure, when stopping."""
        ok = service.status == "ready" and service.batcher is not None and service.batcher.alive
        if ok:
            return JSONResponse({"status": "ready"})
        body: dict[str, Any] = {"status": service.status}
        if service.error:
            body["detail"] = service.error
        headers = {"Retry-After": str(settings.retry_after_s)}
        return JSONResponse(body, status_code=503, headers=headers)

    @app.get("/metrics")
    async def prometheus() -> Response:
        """Prometheus text format."""
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app
