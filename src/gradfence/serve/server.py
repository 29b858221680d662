"""Run the app on uvicorn, with a graceful shutdown that answers every accepted request."""

from __future__ import annotations

import logging
import signal
from collections.abc import Callable
from types import FrameType

from gradfence.serve.app import ServeSettings, create_app
from gradfence.serve.model import TextClassifier

log = logging.getLogger("gradfence.serve")


def _after_shutdown(signum: int, frame: FrameType | None) -> None:
    # uvicorn re-raises the signal that stopped it once it has shut down; the
    # shutdown was graceful and complete, so the process exits normally (status 0).
    log.info("shut down after %s", signal.Signals(signum).name)


def serve_uvicorn(
    load: Callable[[], TextClassifier],
    settings: ServeSettings,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    log_level: str = "info",
) -> int:
    """Serve until SIGTERM/SIGINT; return 0 after a graceful shutdown, 1 if loading failed.

    On the signal uvicorn stops listening, waits for every request in progress (no
    time limit: each has its own ``request_timeout_s``), then the app's shutdown drains
    the batcher's queue and ends the inference thread.
    """
    import uvicorn

    failures: list[BaseException] = []
    server: uvicorn.Server | None = None

    def on_fatal(exc: BaseException) -> None:
        failures.append(exc)
        if server is not None:
            server.should_exit = True

    app = create_app(load, settings, on_fatal=on_fatal)
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level=log_level,
        access_log=False,
        lifespan="on",
        timeout_graceful_shutdown=None,
    )
    server = uvicorn.Server(config)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, _after_shutdown)
    server.run()
    return 1 if failures else 0
