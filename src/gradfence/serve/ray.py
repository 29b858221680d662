"""The same app on Ray Serve: ``gradfence serve --backend ray --replicas N``.

Each replica serves the very FastAPI app of the uvicorn backend (``serve.ingress``,
built in the replica by :func:`~gradfence.serve.app.create_app`): the same routes,
pydantic models, status codes, edge checks (Host, API key, 415, body-read timeout,
cheap 503s, admission by tokens) and its own :class:`~gradfence.serve.batcher.Batcher`
thread holding ``gf.inference(model)``. ``max_ongoing_requests`` is set above
``max_batch_size`` so a replica sees enough concurrent requests to fill a batch (Ray's
default of 5 would cap every batch at 5: ray#43288).

What differs is the HTTP layer: Ray's proxy runs its own uvicorn (httptools), so the
head size and head time limits and the connection cap of
:mod:`gradfence.serve.server` do not apply there; ``--idle-timeout-s`` does.

By default a local Ray instance is started; with a loopback ``--host`` its processes
are bound to 127.0.0.1 too. To use a multi-node cluster, start Ray on the nodes
(``ray start --head`` on one, ``ray start --address HEAD:6379`` on the others), then
run ``RAY_ADDRESS=auto gradfence serve --backend ray --replicas N --host 0.0.0.0`` on a
node of the cluster: replicas are placed on any node with a free CPU.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from collections.abc import Callable, Generator
from contextlib import contextmanager
from types import FrameType
from typing import Any

import ray
from fastapi import FastAPI
from ray import serve

from gradfence.serve.app import ServeSettings, create_app
from gradfence.serve.model import TextClassifier
from gradfence.serve.signals import stop_signals_to

log = logging.getLogger("gradfence.serve")

APP_NAME = "gradfence"


@serve.deployment(name="SentimentModel")
@serve.ingress()
class SentimentDeployment:
    """One replica: :func:`create_app` with its own model and inference thread."""

    def __init__(self, load: Callable[[], TextClassifier], settings: ServeSettings) -> None:
        self.service_app = create_app(load, settings, backend="ray")

    def __serve_build_asgi_app__(self) -> FastAPI:
        return self.service_app

    def check_health(self) -> None:
        """Ray restarts the replica when this raises."""
        service = self.service_app.state.service
        if service.status == "failed":
            raise RuntimeError(f"loading the model failed: {service.error}")
        if service.status == "ready" and not service.batcher.alive:
            raise RuntimeError("the inference thread is not running")


def deployment(
    load: Callable[[], TextClassifier], settings: ServeSettings, replicas: int = 1
) -> Any:
    """The bound Ray Serve application for ``serve.run``.

    ``max_ongoing_requests`` is at least ``2 * max_batch_size`` so a replica can hold
    enough requests to fill a batch; ``max_queued_requests`` bounds the waiting room
    in Ray's proxy (Ray answers 503 beyond it).
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


@contextmanager
def _signals_set(stop: threading.Event) -> Generator[None, None, None]:
    """SIGTERM/SIGINT set ``stop``; the previous handlers come back on exit."""

    def on_signal(signum: int, frame: FrameType | None) -> None:
        log.info("%s: shutting down Ray Serve", signal.Signals(signum).name)
        stop.set()

    with stop_signals_to(on_signal):
        yield


def ray_init_options(host: str) -> dict[str, Any]:
    """``ray.init`` options: a local instance started for a loopback ``host`` binds its
    own processes to 127.0.0.1 as well (Ray binds them to the machine's address)."""
    options: dict[str, Any] = {
        "address": os.environ.get("RAY_ADDRESS"),
        "include_dashboard": False,
    }
    if options["address"] is None and host in ("127.0.0.1", "localhost"):
        options["_node_ip_address"] = "127.0.0.1"
    return options


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
    ray.init(**ray_init_options(host))
    # after ray.init, which installs handlers of its own; a signal that arrives while
    # the replicas start is acted on once serve.run returns
    try:
        with _signals_set(stop):
            http_options = {
                "host": host,
                "port": port,
                "keep_alive_timeout_s": max(1, round(settings.idle_timeout_s)),
            }
            serve.start(http_options=http_options)
            serve.run(deployment(load, settings, replicas), name=APP_NAME, route_prefix="/")
            log.info("Ray Serve: %d replica(s) on http://%s:%d", replicas, host, port)
            stop.wait()
            serve.shutdown()  # type: ignore[no-untyped-call]
    finally:
        ray.shutdown()
    return 0
