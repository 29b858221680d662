"""``gradfence serve``: the sentiment service (imports torch only when it runs)."""

from __future__ import annotations

import argparse
import functools
import importlib.util
import ipaddress
import logging
import os
import signal
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import FrameType
from typing import Any

from gradfence.errors import UsageError
from gradfence.serve.signals import stop_signals_to

log = logging.getLogger("gradfence.serve")


def register(subparsers: Any) -> None:
    """Add the ``serve`` subcommand."""
    parser = subparsers.add_parser(
        "serve",
        help="serve a sentiment model over HTTP with dynamic batching",
        description=(
            "Serve the embedded default sentiment model (or --model-dir) over HTTP: "
            "POST /v1/predict, GET /v1/model, /health/live, /health/ready, /metrics."
        ),
    )
    parser.add_argument(
        "--model-dir",
        type=Path,
        default=None,
        metavar="DIR",
        help="a local Hugging Face sequence-classification checkpoint "
        "(safetensors only) instead of the embedded default",
    )
    parser.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    parser.add_argument(
        "--max-batch-size", type=int, default=32, help="texts per model batch at most (default 32)"
    )
    parser.add_argument(
        "--max-wait-ms",
        type=float,
        default=5.0,
        help="flush a batch this long after its first text arrived (default 5)",
    )
    parser.add_argument(
        "--max-queue",
        type=int,
        default=1024,
        help="texts waiting for a batch at most; beyond: 503 (default 1024)",
    )
    parser.add_argument(
        "--request-timeout-s",
        type=float,
        default=30.0,
        help="answer 504 after this long (default 30)",
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=None,
        metavar="N",
        help="model workers, each single-threaded on its share of the cores "
        "(default: one per core available)",
    )
    parser.add_argument(
        "--worker-kind",
        choices=("process", "thread"),
        default="process",
        help="run each worker's model in a process of its own (default: no shared "
        "interpreter lock, one model copy per worker) or in a thread of the server "
        "(one copy, starts faster)",
    )
    parser.add_argument(
        "--runtime",
        choices=("auto", "torch", "onnx"),
        default="auto",
        help="run the model with ONNX Runtime fp32 (extra 'onnx'; exported on first use, "
        "cached, its scores checked against torch at start-up) or torch; auto (default): "
        "ONNX Runtime when the extra is installed and the check passes, else torch",
    )
    parser.add_argument(
        "--api-key-env",
        metavar="NAME",
        default=None,
        help="require 'Authorization: Bearer <key>', the key read from env NAME",
    )
    parser.add_argument(
        "--metrics-public",
        action="store_true",
        help="serve /metrics without the API key (default: the key protects it)",
    )
    parser.add_argument(
        "--openapi",
        action="store_true",
        help="serve the OpenAPI schema at /openapi.json (no /docs: it needs a CDN)",
    )
    parser.add_argument(
        "--allowed-host",
        action="append",
        default=[],
        metavar="NAME",
        help="also accept this Host header name (loopback binds accept only "
        "127.0.0.1, localhost and ::1 otherwise); repeatable",
    )
    parser.add_argument(
        "--max-connections",
        type=int,
        default=512,
        metavar="N",
        help="open connections at most; beyond, the longest idle one is closed (default 512)",
    )
    parser.add_argument(
        "--max-head-bytes",
        type=int,
        default=16384,
        metavar="N",
        help="request line + headers at most; beyond: 431 (default 16384)",
    )
    parser.add_argument(
        "--head-timeout-s",
        type=float,
        default=10.0,
        help="a request head must arrive within this; else 408 (default 10)",
    )
    parser.add_argument(
        "--idle-timeout-s",
        type=float,
        default=5.0,
        help="close a kept-alive connection idle this long (default 5)",
    )
    parser.add_argument(
        "--refusal-pause-s",
        type=float,
        default=1.0,
        help="answer refusals only a retry can answer (503 busy, a made-up method, a "
        "malformed or oversized head) this much later, so clients retrying in a loop "
        "cost little; 0: at once (default 1)",
    )
    parser.add_argument(
        "--backend",
        choices=("uvicorn", "ray"),
        default="uvicorn",
        help="uvicorn (default) or Ray Serve (extra 'ray')",
    )
    parser.add_argument(
        "--replicas",
        type=int,
        default=1,
        metavar="N",
        help="Ray Serve replicas (--backend ray only; default 1)",
    )
    parser.add_argument(
        "--log-level",
        default="info",
        choices=("debug", "info", "warning", "error"),
        help="debug logs one line per request (default info)",
    )
    parser.set_defaults(handler=_handle)


LOOPBACK_NAMES = ("127.0.0.1", "localhost", "::1")
PICKLE_WEIGHTS = ("*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl")


def is_loopback(host: str) -> bool:
    """True for an address only this machine can reach (``127.0.0.1``, ``::1``, ...)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_model_dir(directory: Path) -> None:
    """A one-line :class:`UsageError` unless ``directory`` holds safetensors weights."""
    if not directory.is_dir():
        raise UsageError(f"--model-dir {directory} is not a directory")
    if any(directory.glob("*.safetensors")):
        return
    pickles = sorted(p.name for pattern in PICKLE_WEIGHTS for p in directory.glob(pattern))
    if pickles:
        raise UsageError(
            f"--model-dir {directory} holds only pickle weights ({', '.join(pickles[:3])}), "
            "which can run code when loaded: save it with safetensors "
            "(model.save_pretrained(dir, safe_serialization=True))"
        )
    raise UsageError(f"--model-dir {directory} holds no *.safetensors weights")


def _settings_from(args: argparse.Namespace) -> Any:
    for name in ("max_batch_size", "max_queue", "replicas", "max_connections"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be at least 1")
    if args.workers is not None and args.workers < 1:
        raise UsageError("--workers must be at least 1")
    if args.runtime == "onnx" and importlib.util.find_spec("onnxruntime") is None:
        raise UsageError("--runtime onnx needs onnxruntime: pip install 'gradfence[onnx]'")
    if args.max_wait_ms < 0 or args.request_timeout_s <= 0:
        raise UsageError("--max-wait-ms must be >= 0 and --request-timeout-s > 0")
    if args.head_timeout_s <= 0 or args.idle_timeout_s <= 0:
        raise UsageError("--head-timeout-s and --idle-timeout-s must be > 0")
    if not 0 <= args.refusal_pause_s <= 60:
        raise UsageError("--refusal-pause-s must be between 0 and 60")
    if args.max_head_bytes < 1024:
        raise UsageError("--max-head-bytes must be at least 1024")
    if not 0 <= args.port <= 65535:
        raise UsageError(f"--port {args.port} is not a TCP port")
    if args.backend == "uvicorn" and args.replicas != 1:
        raise UsageError("--replicas needs --backend ray")
    if args.model_dir is not None:
        check_model_dir(args.model_dir)
    api_key = None
    if args.api_key_env is not None:
        api_key = os.environ.get(args.api_key_env)
        if not api_key:
            raise UsageError(f"--api-key-env: environment variable {args.api_key_env} is empty")
    allowed = tuple(name.lower() for name in args.allowed_host)
    if is_loopback(args.host):
        allowed = LOOPBACK_NAMES + allowed
    from gradfence.serve.app import ServeSettings

    return ServeSettings(
        max_batch_size=args.max_batch_size,
        max_wait_ms=args.max_wait_ms,
        max_queue=args.max_queue,
        request_timeout_s=args.request_timeout_s,
        api_key=api_key,
        allowed_hosts=allowed or None,
        metrics_public=args.metrics_public,
        openapi=args.openapi,
        max_head_bytes=args.max_head_bytes,
        head_timeout_s=args.head_timeout_s,
        idle_timeout_s=args.idle_timeout_s,
        max_connections=args.max_connections,
        refusal_pause_s=args.refusal_pause_s,
        workers=args.workers,
        worker_processes=args.worker_kind == "process" and args.backend == "uvicorn",
    )


class _Interrupted(BaseException):
    """SIGTERM/SIGINT before the server took over the signals (while importing)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.name = signal.Signals(signum).name


@contextmanager
def _signals_stop_startup() -> Iterator[None]:
    """Until the server installs its own handlers, SIGTERM/SIGINT end the command
    cleanly (exit 0, one log line) instead of killing it mid-import (exit 143) or
    raising KeyboardInterrupt with a traceback. The previous handlers come back after."""

    def interrupt(signum: int, frame: FrameType | None) -> None:
        raise _Interrupted(signum)

    with stop_signals_to(interrupt):
        yield


# GNU OpenMP's worker threads spin after every parallel region by default; on a small
# machine they starve the event-loop thread (measured here on 2 cores: 12 vs 52 texts/s
# under load). Must be set before torch loads; an explicit setting wins.
OPENMP_ENV = {"OMP_WAIT_POLICY": "PASSIVE"}


def _handle(args: argparse.Namespace) -> int:
    for name, value in OPENMP_ENV.items():
        os.environ.setdefault(name, value)
    logging.basicConfig(
        level=args.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
    )
    try:
        with _signals_stop_startup():
            settings = _settings_from(args)
            if not is_loopback(args.host) and settings.api_key is None:
                log.warning(
                    "serving on %s without an API key: anyone who can reach this address "
                    "can use the service (set --api-key-env)",
                    args.host,
                )
            return _serve(args, settings)
    except _Interrupted as stop:
        log.info("stopped by %s before serving", stop.name)
        return 0


def _serve(args: argparse.Namespace, settings: Any) -> int:
    try:
        from gradfence.serve.model import load_model
    except ImportError as exc:
        raise UsageError(f"{exc.name} is missing: pip install 'gradfence[serve]'") from exc
    load = functools.partial(load_model, args.model_dir, args.runtime)
    if args.backend == "ray":
        try:
            from gradfence.serve.ray import serve_ray
        except ImportError as exc:
            raise UsageError(f"{exc.name} is missing: pip install 'gradfence[ray]'") from exc
        return serve_ray(load, settings, host=args.host, port=args.port, replicas=args.replicas)
    from gradfence.serve.server import serve_uvicorn

    return serve_uvicorn(load, settings, host=args.host, port=args.port, log_level=args.log_level)
