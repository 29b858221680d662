"""The same model as a Ray Serve deployment: ``gradfence serve --backend ray --replicas N``.

Each replica loads the model and runs it in its own :class:`~gradfence.serve.batcher.Batcher`
thread (which holds ``gf.inference(model)``). Ray's ``@serve.batch`` merges the texts of
concurrent requests into batches of at most ``max_batch_size`` texts; the deployment sets
``max_ongoing_requests`` above ``max_batch_size``, since Ray would otherwise silently cap
every batch at its default of 5 ongoing requests (ray#43288). The batch function always
returns exactly one result per text or raises, so no caller is left hanging (ray#42593).

By default a local Ray instance is started. To use a multi-node cluster, start Ray on
the nodes (``ray start --head`` on one, ``ray start --address HEAD:6379`` on the others),
then run ``RAY_ADDRESS=auto gradfence serve --backend ray --replicas N`` on a node of
the cluster: replicas are placed on any node with a free CPU.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import threading
from collections.abc import Callable
from types import FrameType
from typing import Any

import ray
from ray import serve
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from gradfence.serve.app import (
    RequestError,
    ServeSettings,
    check_auth,
    guarded,
    model_body,
    parse_predict,
    predictions_body,
)
from gradfence.serve.batcher import Batcher, Prediction
from gradfence.serve.model import TextClassifier

log = logging.getLogger("gradfence.serve")

APP_NAME = "gradfence"


@serve.deployment(name="SentimentModel")
class SentimentDeployment:
    """One replica: the model, its inference thread, and the HTTP routes."""

    def __init__(self, load: Callable[[], TextClassifier], settings: ServeSettings) -> None:
        self.settings = settings
        self.model = load()
        # Ray has already merged the batch: the thread runs each one as it comes
        self.batcher = Batcher(
            self.model,
            max_batch_size=settings.max_batch_size,
            max_wait_ms=0.0,
            max_queue=max(settings.max_queue, settings.max_batch_size),
        )
        self.batcher.start(warmup=settings.warmup)
        batched: Any = self.predict_texts
        batched.set_max_batch_size(settings.max_batch_size)
        batched.set_batch_wait_timeout_s(settings.max_wait_ms / 1000.0)

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.005)
    async def predict_texts(self, texts: list[str]) -> list[Prediction | Exception]:
        """One batch of single texts, from any number of requests: exactly one result
        (a prediction or the error of that text) per text."""
        futures = self.batcher.submit_many([[text] for text in texts])
        results = await asyncio.gather(
            *(asyncio.wrap_future(f) for f in futures), return_exceptions=True
        )
        out: list[Prediction | Exception] = []
        for result in results:
            if isinstance(result, list):
                out.append(result[0])
            else:  # keep its type: the HTTP answer depends on it
                out.append(result if isinstance(result, Exception) else RuntimeError(result))
        return out

    async def predict(self, texts: list[str]) -> list[Prediction]:
        """Predictions for ``texts``, each text a batch item (also callable on a handle)."""
        results = await asyncio.gather(*(self.predict_texts(text) for text in texts))
        for result in results:
            if isinstance(result, Exception):
                raise result
        return [r for r in results if isinstance(r, Prediction)]

    def check_health(self) -> None:
        """Ray restarts the replica when this raises."""
        if not self.batcher.alive:
            raise RuntimeError("the inference thread is not running")

    async def __call__(self, request: Request) -> Response:
        """The HTTP routes of the uvicorn backend except /metrics (Ray exports its own)."""
        path, method = request.url.path.rstrip("/") or "/", request.method
        try:
            if path == "/health/live" and method == "GET":
                return JSONResponse({"status": "live"})
            if path == "/health/ready" and method == "GET":
                status = "ready" if self.batcher.alive else "stopping"
                return JSONResponse(
                    {"status": status}, status_code=200 if status == "ready" else 503
                )
            check_auth(request, self.settings.api_key)
            if path == "/v1/model" and method == "GET":
                timeout = self.settings.request_timeout_s
                state = await guarded(self.batcher.inspect_thread(timeout), self.settings)
                return JSONResponse(model_body(self.model, state, self.settings, "ray"))
            if path == "/v1/predict" and method == "POST":
                texts = await parse_predict(request)
                timeout = self.settings.request_timeout_s
                predictions = await guarded(
                    asyncio.wait_for(self.predict(texts), timeout), self.settings
                )
                return JSONResponse(predictions_body(predictions, self.model.model_id))
            raise RequestError(404, f"no route {method} {path}")
        except RequestError as error:
            return error.response()


def deployment(
    load: Callable[[], TextClassifier], settings: ServeSettings, replicas: int = 1
) -> Any:
    """The bound Ray Serve application for ``serve.run``.

    ``max_ongoing_requests`` is at least ``2 * max_batch_size`` so a replica can hold
    enough requests to fill a batch; ``max_queued_requests`` bounds the waiting room
    (Ray answers 503 beyond it).
    """
    app: Any = SentimentDeployment
    options = app.options(
        num_replicas=replicas,
        max_ongoing_requests=max(2 * settings.max_batch_size, 64),
        max_queued_requests=settings.max_queue,
        ray_actor_options={
            "num_cpus": 1,
            "runtime_env": {"env_vars": {"OMP_WAIT_POLICY": "PASSIVE"}},
        },
    )
    return options.bind(load, settings)


def serve_ray(
    load: Callable[[], TextClassifier],
    settings: ServeSettings,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    replicas: int = 1,
) -> int:
    """Serve on Ray Serve until SIGTERM/SIGINT, then shut Serve down gracefully; return 0.

    Connects to ``RAY_ADDRESS`` if set, else starts a local Ray instance.
    """
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        log.info("%s: shutting down Ray Serve", signal.Signals(signum).name)
        stop.set()

    ray.init(address=os.environ.get("RAY_ADDRESS"), include_dashboard=False)
    # after ray.init, which installs handlers of its own; a signal that arrives while
    # the replicas start is acted on once serve.run returns
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, on_signal)
    try:
        serve.start(http_options={"host": host, "port": port})
        serve.run(deployment(load, settings, replicas), name=APP_NAME, route_prefix="/")
        log.info("Ray Serve: %d replica(s) on http://%s:%d", replicas, host, port)
        stop.wait()
        serve.shutdown()  # type: ignore[no-untyped-call]
    finally:
        ray.shutdown()
    return 0
