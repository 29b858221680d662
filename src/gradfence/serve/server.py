"""Run the app on uvicorn: a hard HTTP edge and a graceful shutdown.

The HTTP layer is pinned to uvicorn's h11 protocol (the same everywhere, whatever else
is installed), with limits no hostile client can get around:

* a request head (request line + headers) over ``max_head_bytes`` is answered ``431``
  as soon as the buffered bytes exceed the limit, so an endless header or URL costs
  neither CPU nor memory; that answer, like a ``400`` for a malformed head, is sent
  after the :class:`~gradfence.serve.app.RefusalPause` with the connection no longer
  read, so a client repeating such heads sends one per pause;
* a head not complete ``head_timeout_s`` after its first byte (or after the connection
  opened) is answered ``408`` and the connection closed (slowloris);
* an idle keep-alive connection is closed after ``idle_timeout_s``;
* at ``max_connections`` open connections, a new one closes the connection that has
  been idle longest (one without a request in progress, or whose refusal is pausing),
  or is answered ``503`` if none is idle: idle connections cannot lock clients out.

Signals: the first SIGTERM/SIGINT stops accepting connections and answers every
accepted request (a body still arriving gets ``shutdown_body_grace_s``); a second one
answers the requests still waiting for the model with ``503`` at once. The previous
signal handlers are restored when :func:`serve_uvicorn` returns.
"""

from __future__ import annotations

import asyncio
import contextlib
import http
import json
import logging
import math
import resource
import signal
import threading
import time
from collections.abc import Callable, Generator
from dataclasses import replace
from types import FrameType
from typing import Any

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from gradfence.serve.app import (
    REFUSAL_PAUSE_KEY,
    SECURITY_HEADERS,
    RefusalPause,
    ServeSettings,
    create_app,
)
from gradfence.serve.model import TextClassifier
from gradfence.serve.signals import stop_signals_to

log = logging.getLogger("gradfence.serve")

# file descriptors kept free for the model's files, logs and the listening socket
RESERVED_FDS = 64


def raw_answer(status: int, detail: str) -> bytes:
    """A complete HTTP/1.1 answer with a JSON ``detail``, closing the connection.

    Written straight to the socket where the request never reached the app (its head
    was refused), with the same security headers as the app's answers.
    """
    body = json.dumps({"detail": detail}).encode()
    lines = [
        f"HTTP/1.1 {status} {http.HTTPStatus(status).phrase}",
        "content-type: application/json",
        f"content-length: {len(body)}",
        "connection: close",
        *(f"{name.decode()}: {value.decode()}" for name, value in SECURITY_HEADERS),
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


class _ThrottledLog(logging.Filter):
    """At most one record per message text per ``every_s``, with the count since.

    uvicorn logs one WARNING per refused request head; a flood of bad heads must not
    turn into a flood of log lines.
    """

    def __init__(self, every_s: float = 10.0) -> None:
        super().__init__()
        self.every_s = every_s
        self._last: dict[str, tuple[float, int]] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        now = time.monotonic()
        key = str(record.msg)
        last, suppressed = self._last.get(key, (-math.inf, 0))
        if now - last < self.every_s:
            self._last[key] = (last, suppressed + 1)
            return False
        if suppressed:
            record.msg = f"{record.msg} ({suppressed} more like it since the last line)"
        self._last[key] = (now, 0)
        return True


# what uvicorn's protocol logs about connections (bad heads, upgrades), throttled
http_log = logging.getLogger("gradfence.serve.http")
http_log.addFilter(_ThrottledLog())


class _HeadLimitedConnection(h11.Connection):
    """h11's connection, remembering the status h11 suggests for a refused request."""

    refused_status = 400

    def next_event(self) -> Any:
        try:
            return super().next_event()
        except h11.RemoteProtocolError as exc:
            self.refused_status = exc.error_status_hint
            raise


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with head size/time limits and a connection cap.

    Use :func:`protocol_for` to get one bound to a :class:`ServeSettings`.
    """

    settings = ServeSettings()
    pause = RefusalPause(0, 0)  # shared by the connections of one server

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.logger = http_log
        self.head_limited = _HeadLimitedConnection(h11.SERVER, self.settings.max_head_bytes)
        self.conn = self.head_limited
        self._head_timer: asyncio.TimerHandle | None = None
        self._refusal: asyncio.TimerHandle | None = None
        self.idle_since = self.loop.time()

    # --- the connection cap -----------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if len(self.connections) >= self.settings.max_connections and not self._evict_idle():
            log.warning("connection refused: %d connections open", len(self.connections))
            assert isinstance(transport, asyncio.Transport)
            transport.write(raw_answer(503, "too many connections"))
            transport.close()
            self.transport = transport
            return
        super().connection_made(transport)  # type: ignore[arg-type]
        self._arm_head_timer()

    def _evict_idle(self) -> bool:
        idle = [c for c in self.connections if isinstance(c, GuardedH11Protocol) and c.idle]
        if not idle:
            return False
        oldest = min(idle, key=lambda c: c.idle_since)
        oldest.transport.close()
        self.connections.discard(oldest)
        return True

    @property
    def idle(self) -> bool:
        """No request in progress (waiting for (the rest of) a head, or kept alive), or
        one whose refusal is pausing."""
        if self.cycle is None or self.cycle.response_complete:
            return True
        return bool(self.cycle.scope.get(REFUSAL_PAUSE_KEY))

    # --- head size and time -----------------------------------------------------

    def data_received(self, data: bytes) -> None:
        if self._head_timer is None and self.conn.their_state is h11.IDLE:
            self._arm_head_timer()  # a new head starts on a kept-alive connection
        super().data_received(data)
        if self.conn.their_state is not h11.IDLE:
            self._cancel_head_timer()

    def on_response_complete(self) -> None:
        self.idle_since = self.loop.time()
        super().on_response_complete()

    def send_400_response(self, msg: str) -> None:
        if self.head_limited.refused_status == 431:
            limit = self.settings.max_head_bytes
            detail = f"request head over {limit} bytes (request line and headers)"
            self._refuse_after_pause(431, detail)
        else:
            self._refuse_after_pause(400, "invalid HTTP request")

    def _refuse_after_pause(self, status: int, detail: str) -> None:
        """:meth:`_refuse` after the refusal pause, reading nothing more meanwhile."""
        self._cancel_head_timer()
        if self.transport.is_closing() or self._refusal is not None:
            return
        if not self.idle:  # a body gone wrong mid-request: the app is reading it
            self._refuse(status, detail)
            return
        delay = self.pause.take()
        if delay is None:
            self._refuse(status, detail)
            return
        self.transport.pause_reading()
        self.idle_since = self.loop.time()

        def answer() -> None:
            self._refusal = None
            self.pause.release()
            self._refuse(status, detail)

        self._refusal = self.loop.call_later(delay, answer)

    def _refuse(self, status: int, detail: str) -> None:
        self._cancel_head_timer()
        if not self.transport.is_closing():
            self.transport.write(raw_answer(status, detail))
            self.transport.close()

    def _arm_head_timer(self) -> None:
        self._cancel_head_timer()
        self._head_timer = self.loop.call_later(self.settings.head_timeout_s, self._head_late)

    def _cancel_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_late(self) -> None:
        self._head_timer = None
        if self.transport.is_closing() or self.conn.their_state is not h11.IDLE:
            return
        if self.conn.trailing_data[0]:
            timeout = self.settings.head_timeout_s
            self._refuse(408, f"the request head did not arrive within {timeout:g} s")
        else:
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_head_timer()
        if self._refusal is not None:
            self._refusal.cancel()
            self._refusal = None
            self.pause.release()
        super().connection_lost(exc)


def protocol_for(settings: ServeSettings, pause: RefusalPause) -> type[GuardedH11Protocol]:
    """The protocol class uvicorn runs, bound to ``settings``' limits and to the app's
    :class:`RefusalPause` (one schedule for the refusals of both)."""
    return type("GuardedH11Protocol", (GuardedH11Protocol,), {"settings": settings, "pause": pause})


def raise_fd_limit(settings: ServeSettings) -> ServeSettings:
    """Raise the soft file-descriptor limit to the hard one; cap ``max_connections``
    below it so a full connection table still leaves descriptors for everything else."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
    room = soft - RESERVED_FDS if soft != resource.RLIM_INFINITY else settings.max_connections
    if settings.max_connections > room:
        log.warning(
            "--max-connections %d lowered to %d (file descriptor limit %d)",
            settings.max_connections,
            max(1, room),
            soft,
        )
        return replace(settings, max_connections=max(1, room))
    return settings


def uvicorn_config(app: Any, settings: ServeSettings, **options: Any) -> uvicorn.Config:
    """The uvicorn configuration of the service's edge (also used by the tests)."""
    return uvicorn.Config(
        app,
        http=protocol_for(settings, app.state.service.pause),
        ws="none",
        access_log=False,
        lifespan="on",
        timeout_keep_alive=max(1, round(settings.idle_timeout_s)),
        # every request ends by itself (request timeout, body grace); this is a backstop
        timeout_graceful_shutdown=round(
            settings.request_timeout_s + settings.shutdown_body_grace_s + 5
        ),
        **options,
    )


class _Server(uvicorn.Server):
    """uvicorn's server with this service's signal handling (see the module docstring)."""

    def __init__(self, config: uvicorn.Config, app: Any) -> None:
        super().__init__(config)
        self.app = app
        self.signals: list[str] = []

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        # uvicorn re-raises the signal once it has shut down; the shutdown was graceful
        # and complete, so the process exits normally (status 0) instead.
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        with stop_signals_to(self.handle_exit):
            yield

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        name = signal.Signals(sig).name
        self.signals.append(name)
        service = self.app.state.service
        if not self.should_exit:
            log.info("%s: shutting down, answering every accepted request", name)
            self.should_exit = True
            service.begin_drain()
        else:
            log.info("%s again: answering the requests still waiting with 503", name)
            service.abort()


def serve_uvicorn(
    load: Callable[[], TextClassifier],
    settings: ServeSettings,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    log_level: str = "info",
) -> int:
    """Serve until SIGTERM/SIGINT; return 0 after a graceful shutdown, 1 if loading failed.

    On the signal uvicorn stops listening, waits for every request in progress (each
    ends within its own ``request_timeout_s``), then the app's shutdown drains the
    batcher's queue and ends the inference thread.
    """
    failures: list[BaseException] = []
    server: _Server | None = None

    def on_fatal(exc: BaseException) -> None:
        failures.append(exc)
        if server is not None:
            server.should_exit = True

    settings = raise_fd_limit(settings)
    app = create_app(load, settings, on_fatal=on_fatal)
    config = uvicorn_config(app, settings, host=host, port=port, log_level=log_level)
    server = _Server(config, app)
    server.run()
    if server.signals:
        log.info("shut down after %s", server.signals[0])
    return 1 if failures else 0
