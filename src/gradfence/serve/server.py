"""Run the app on uvicorn: a hard HTTP edge and a graceful shutdown.

The HTTP layer is pinned to uvicorn's httptools protocol (the same everywhere, whatever
else is installed; the C parser costs about a third less CPU per request than h11's),
with limits no hostile client can get around:

* a request head (request line + headers) over ``max_head_bytes`` is answered ``431``
  once the limit is reached (the parser is never given more of a head), so an endless
  header or URL costs neither CPU nor memory; that answer, like a ``400`` for a
  malformed head or a made-up method, is sent after the
  :class:`~gradfence.serve.app.RefusalPause` with the connection no longer read, so a
  client repeating such heads sends one per pause;
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

import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

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

# requests one connection may have waiting behind the one in progress (pipelining): llhttp
# parses every head of a read at once, and each queued request holds its scope and cycle
MAX_PIPELINED = 16


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


class GuardedProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with head size/time limits and a connection cap.

    The parser is never given more than ``max_head_bytes`` of a head: the bytes of a head
    are counted as they arrive, and a chunk that would take the head past the limit is
    fed only up to it; a head still not complete there is refused with ``431``. A head
    that starts in the read that ends the request before it (pipelining) is counted from
    the next read, so it can pass the limit by at most one read (uvloop reads at most
    256 KiB at a time). The framing of a chunked body (chunk sizes, extensions, trailers:
    the bytes fed since its last body bytes) is bounded by the same limit (``400``); the
    rest of a body its answer did not wait for must come within ``head_timeout_s``.

    Pipelined requests (llhttp parses every head of a read at once): at most
    :data:`MAX_PIPELINED` wait behind the one in progress (the rest of the read is
    ignored and refused with ``503``); a head or body refused behind requests still in
    progress is answered after them, with nothing more read meanwhile; a head waiting
    behind them is timed from when they are answered. A request asking to upgrade is
    answered as HTTP/1.1 and its connection closed (the parser reads nothing after such a
    head; one declaring a body is refused with ``400``). Use
    :func:`protocol_for` to get one bound to a :class:`ServeSettings`.
    """

    settings = ServeSettings()
    pause = RefusalPause(0, 0)  # shared by the connections of one server

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.logger = http_log
        self._in_head = True  # the next bytes belong to a request head
        self._head_bytes = 0  # of the current head, so far
        self._heads = 0  # heads parsed on this connection
        self._head_begun = False  # the parser has seen the start of the current head
        self._framing = 0  # bytes fed in a body since its last body bytes
        self._ignoring = False  # the parser's callbacks are ignored (a refused request)
        # what to do once the requests in progress are answered (refuse a head that came
        # behind them, close after an upgrade request); no more is read meanwhile
        self._after_response: Callable[[], None] | None = None
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
        idle = [c for c in self.connections if isinstance(c, GuardedProtocol) and c.idle]
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
        if self._refusal is not None or self._after_response or self.transport.is_closing():
            self.transport.pause_reading()  # (uvicorn's flow control may have resumed it)
            return  # a refused head, or a request that asked to upgrade: nothing more is read
        if self._in_head and self._head_timer is None:
            self._arm_head_timer()  # a new head starts on a kept-alive connection
        # a chunk that would take a head past the limit is fed up to it: the head (or
        # one of the pipelined heads in it) must end there
        while self._in_head and len(data) > (
            room := self.settings.max_head_bytes - self._head_bytes
        ):
            heads = self._heads
            self._head_bytes += room
            super().data_received(data[:room])
            if self._refusal is not None or self._after_response or self.transport.is_closing():
                return
            if self._in_head and self._heads == heads:
                self.logger.warning("Request head over the size limit.")
                limit = self.settings.max_head_bytes
                detail = f"request head over {limit} bytes (request line and headers)"
                self._refuse_after_pause(431, detail)
                return
            data = data[room:]
        if self._in_head:
            self._head_bytes += len(data)
        else:
            self._framing += len(data)
        if data:
            super().data_received(data)
        # chunk sizes, extensions and trailers (bytes fed since the last body bytes) are
        # parsed like a head: bounded the same way (to within one read)
        if not self._in_head and self._framing > self.settings.max_head_bytes:
            self._refuse_body(400, "chunked framing (chunk sizes, extensions, trailers) too long")

    def on_message_begin(self) -> None:
        if self._ignoring:
            return
        self._head_begun = True
        if self._head_timer is None:  # a head pipelined after the one before
            self._arm_head_timer()
        super().on_message_begin()

    def on_url(self, url: bytes) -> None:
        if not self._ignoring:
            super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        if not self._ignoring:
            super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self._in_head = self._head_begun = False
        self._framing = 0
        self._heads += 1
        self._cancel_head_timer()
        if self._ignoring:
            return
        if len(self.pipeline) >= MAX_PIPELINED:  # the rest of the read is ignored
            self._ignoring = True
            too_many = f"more than {MAX_PIPELINED} requests pipelined on one connection"
            self._defer(lambda: self._refuse(503, too_many))
            return
        if self.parser.should_upgrade():
            # this service upgrades to nothing: the request is answered as plain HTTP and
            # the connection closed (the parser reads no further than such a head, so a
            # body it declares would never be read: refused instead)
            if any(
                name in (b"content-length", b"transfer-encoding") and value.strip() != b"0"
                for name, value in self.headers
            ):
                self._ignoring = True
                self._defer(lambda: self._refuse(400, "a request asking to upgrade has a body"))
                return
            super().on_headers_complete()
            self.cycle.keep_alive = False
            self._defer(self.transport.close)
            return
        super().on_headers_complete()

    def on_body(self, body: bytes) -> None:
        self._framing = 0
        if not self._ignoring:
            super().on_body(body)

    def on_message_complete(self) -> None:
        self._in_head, self._head_bytes = True, 0
        self._cancel_head_timer()  # (a body that came after its answer)
        if self._ignoring:
            return
        super().on_message_complete()
        if self.cycle.response_complete and not (self.pipeline or self._after_response):
            # a body that came after its answer: the connection is idle from now on
            self.timeout_keep_alive_task = self.loop.call_later(
                self.timeout_keep_alive, self.timeout_keep_alive_handler
            )

    def on_response_complete(self) -> None:
        self.idle_since = self.loop.time()
        starts_next = bool(self.pipeline)  # a request read after this one is started
        super().on_response_complete()
        if starts_next or self.transport.is_closing():
            return
        if self._after_response is not None:
            # every request read before a refused or late one is answered: now its turn
            self._unset_keepalive_if_required()
            action, self._after_response = self._after_response, None
            action()
        elif not self._in_head:
            # answered before its body was read: the rest may still come (a client writes
            # a head and its body apart), within the head time
            self._arm_head_timer()

    def _defer(self, action: Callable[[], None]) -> None:
        """Run ``action`` once the requests in progress are answered (at once if none
        is); read nothing more."""
        self.transport.pause_reading()
        if self.idle and not self.pipeline:
            action()
        else:
            self._after_response = action

    def send_400_response(self, msg: str) -> None:
        self._refuse_after_pause(400, "invalid HTTP request")

    def _refuse_after_pause(self, status: int, detail: str) -> None:
        """:meth:`_refuse` after the refusal pause, reading nothing more meanwhile; a
        head refused while requests before it are still answered waits for them."""
        self._cancel_head_timer()
        if self.transport.is_closing() or self._refusal is not None:
            return
        if not self._in_head:  # a body gone wrong
            self._refuse_body(status, detail)
            return
        if not self.idle:  # a bad head pipelined behind a request still in progress
            self._defer(lambda: self._refuse_after_pause(status, detail))
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

    def _refuse_body(self, status: int, detail: str) -> None:
        """Refuse the request whose body went wrong: at once if the app is reading it, or,
        pipelined behind requests still in progress, after them (it never starts)."""
        queued = [entry for entry in self.pipeline if entry[0] is self.cycle]
        if not queued:
            self._refuse(status, detail)
            return
        self.pipeline.remove(queued[0])
        self._defer(lambda: self._refuse(status, detail))

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
        if self.transport.is_closing():
            return
        if not self._in_head:  # a body that did not end within the head time of its answer
            self.transport.close()
            return
        if not self.idle:
            # pipelined behind requests in progress: timed from when they are answered
            # (the server may not read on meanwhile: not the client's delay)
            self._arm_head_timer()
            return
        if self._head_begun or self._head_bytes:
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


def protocol_for(settings: ServeSettings, pause: RefusalPause) -> type[GuardedProtocol]:
    """The protocol class uvicorn runs, bound to ``settings``' limits and to the app's
    :class:`RefusalPause` (one schedule for the refusals of both)."""
    return type("GuardedProtocol", (GuardedProtocol,), {"settings": settings, "pause": pause})


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
