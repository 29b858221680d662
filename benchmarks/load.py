"""Load test of ``gradfence serve`` against LitServe on the same model, side by side.

Starts each server in turn as a subprocess on a free 127.0.0.1 port, drives it with N
concurrent asyncio/httpx clients (one text per request, whole held-out tweets by
default) for a fixed duration after a short unmeasured warm-up, and reports texts/s,
p50/p95/p99 latency, errors, texts per server CPU-second (user + system time of the
server's whole process tree during the measured phase) and the batch sizes. Configs:

* ``batched``:   ``gradfence serve --runtime torch``, otherwise its defaults (one
  single-threaded worker process per core);
* ``workers1``:  the same with ``--workers 1`` (one worker using every core);
* ``unbatched``: the same with ``--max-batch-size 1``;
* ``onnx``:      ``gradfence serve --runtime onnx``: what its default, ``--runtime auto``,
  serves when the ``onnx`` extra is installed (as ``make serve`` does);
* ``litserve``:  LitServe serving the same model (same encoder, head, tokenization,
  eval + inference mode) with batching at the same 32 texts / 5 ms, in its best layout
  here: ``workers_per_device`` = cores, one torch thread each (extra ``bench-peers``);
* ``litserve1``: LitServe with one worker using every core;
* ``plain``:     a plain FastAPI app, sync ``def`` endpoint, model called per request;
* ``ceiling`` / ``ceiling-onnx``: no server: the model alone, the same runtime and
  worker layout as ``batched`` / ``onnx`` (one single-threaded model process per core),
  texts tokenized beforehand, taken ``--clients`` at a time (what the server's queue
  holds at most) and split into the same token-budget batches. The server's texts/s
  over this is what the HTTP layer and batching leave.

    .venv/bin/python benchmarks/load.py --clients 32 --duration 20

The client runs on the same machine as the servers and competes with them for CPU;
``--budget-s`` bounds the whole run (configs that would start after it are skipped).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psutil
from pydantic import BaseModel

HOST = "127.0.0.1"
DEFAULT_CONFIGS = "ceiling,batched,litserve,workers1,unbatched,onnx,ceiling-onnx,litserve1"
MAX_BATCH_SIZE = 32
MAX_WAIT_S = 0.005


class PredictBody(BaseModel):
    """The plain baseline's request body (module level: FastAPI resolves it by name)."""

    texts: list[str]


@dataclass
class Result:
    """What one configuration measured."""

    name: str
    clients: int
    duration_s: float
    requests: int = 0
    texts: int = 0
    errors: int = 0
    latencies_ms: list[float] = field(default_factory=list)
    batch_sizes: dict[str, float] = field(default_factory=dict)
    model_busy: float = float("nan")  # worker-seconds in model batches per second
    cpu_s: float = float("nan")  # server CPU seconds (user + system) in the measured phase
    client_cpu_s: float = float("nan")  # the load generator's CPU seconds in that phase

    def percentile(self, q: float) -> float:
        ordered = sorted(self.latencies_ms)
        if not ordered:
            return float("nan")
        return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]

    def summary(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "clients": self.clients,
            "requests_per_s": self.requests / self.duration_s,
            "texts_per_s": self.texts / self.duration_s,
            "p50_ms": self.percentile(50),
            "p95_ms": self.percentile(95),
            "p99_ms": self.percentile(99),
            "errors": self.errors,
            "server_cpu_s": self.cpu_s,
            "client_cpu_s": self.client_cpu_s,
            "texts_per_cpu_s": self.texts / self.cpu_s if self.cpu_s > 0 else float("nan"),
            "batch_size_histogram": self.batch_sizes,
            "model_busy_worker_s_per_s": self.model_busy,
        }


def cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        port: int = sock.getsockname()[1]
        return port


def load_texts(n: int, max_words: int | None = None) -> list[str]:
    """Held-out tweets of the default model, optionally cut to their first words."""
    from gradfence.serve.data import load_tweets

    texts = [t.text for t in load_tweets("heldout")[:n]]
    if max_words is not None:
        texts = [" ".join(t.split()[:max_words]) for t in texts]
    return texts


def batch_histogram(metrics_text: str) -> dict[float, float]:
    """Cumulative ``gradfence_batch_size`` bucket counts by upper bound."""
    buckets: dict[float, float] = {}
    pattern = r'^gradfence_batch_size_bucket\{le="([^"]+)"\} (\S+)$'
    for le, count in re.findall(pattern, metrics_text, re.M):
        buckets[float(le)] = float(count)
    return buckets


def model_seconds(metrics_text: str) -> float:
    """Total worker-seconds spent in model batches so far."""
    match = re.search(r"^gradfence_batch_duration_seconds_sum (\S+)$", metrics_text, re.M)
    return float(match.group(1)) if match else float("nan")


def histogram_delta(before: dict[float, float], after: dict[float, float]) -> dict[str, float]:
    """Batches per size range during the run: '<=1', '2-2', '3-4', ..."""
    out: dict[str, float] = {}
    previous_bound, previous_count = 0.0, 0.0
    for bound in sorted(after):
        cumulative = after[bound] - before.get(bound, 0.0)
        count = cumulative - previous_count
        low = int(previous_bound) + 1
        label = f"{low}-{int(bound)}" if bound != float("inf") else f">{int(previous_bound)}"
        if count:
            out[label] = count
        previous_bound, previous_count = bound, cumulative
    return out


def cpu_seconds(process: psutil.Process | int) -> float:
    """User + system CPU seconds of a live process (0 if it is gone)."""
    try:
        times = (
            process if isinstance(process, psutil.Process) else psutil.Process(process)
        ).cpu_times()
    except psutil.NoSuchProcess:
        return 0.0
    return float(times.user + times.system)


def tree_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process and all its live descendants."""
    try:
        root = psutil.Process(pid)
        return sum(cpu_seconds(process) for process in [root, *root.children(recursive=True)])
    except psutil.NoSuchProcess:
        return 0.0


# --- servers ------------------------------------------------------------------------


def start_server(name: str, port: int, model_dir: Path | None) -> subprocess.Popen[bytes]:
    extra = ["--model-dir", str(model_dir)] if model_dir else []
    me = [sys.executable, __file__, "--port", str(port), *extra]
    if name == "plain":
        return subprocess.Popen([*me, "--plain-server"])
    if name.startswith("litserve"):
        workers = 1 if name == "litserve1" else cores()
        return subprocess.Popen([*me, "--litserve-server", "--workers", str(workers)])
    command = [sys.executable, "-m", "gradfence", "serve", "--port", str(port), *extra]
    command += {
        "batched": ["--runtime", "torch"],
        "workers1": ["--runtime", "torch", "--workers", "1"],
        "unbatched": ["--runtime", "torch", "--max-batch-size", "1"],
        "onnx": ["--runtime", "onnx"],
    }[name]
    return subprocess.Popen([*command, "--log-level", "warning"])


def ready_path(name: str) -> str:
    return "/health" if name.startswith("litserve") else "/health/ready"


def wait_ready(url: str, process: subprocess.Popen[bytes], timeout_s: float = 300) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode}")
        try:
            if httpx.get(url, timeout=5).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise RuntimeError("server did not get ready")


class KeepAliveClient:
    """A minimal HTTP/1.1 client on one kept-alive connection: the load generator shares
    the server's cores, so it does as little as it can (its CPU time is reported)."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def post(self, path: str, body: bytes) -> tuple[int, bytes]:
        """POST ``body`` (JSON) to ``path``; returns the status and the response body."""
        return await self.request("POST", path, body)

    async def request(self, method: str, path: str, body: bytes = b"") -> tuple[int, bytes]:
        """Send ``method path`` with ``body`` (JSON; reconnecting when the server closed
        the connection); returns the status and the response body."""
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        assert self.reader is not None
        head = (
            f"{method} {path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
        )
        try:
            self.writer.write(head.encode() + body)
            raw = await self.reader.readuntil(b"\r\n\r\n")
            status = int(raw[9:12])
            headers = raw.decode("latin-1").lower()
            if "transfer-encoding: chunked" in headers:
                payload = b""
                while size := int((await self.reader.readline()).split(b";")[0], 16):
                    payload += await self.reader.readexactly(size)
                    await self.reader.readline()
                await self.reader.readline()
            else:
                length = re.search(r"content-length: *(\d+)", headers)
                payload = await self.reader.readexactly(int(length.group(1)) if length else 0)
            if "connection: close" in headers:
                await self.close()
            return status, payload
        except (OSError, asyncio.IncompleteReadError, ValueError):
            await self.close()
            raise

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            with contextlib.suppress(OSError):
                await self.writer.wait_closed()
        self.reader = self.writer = None


async def drive(
    url: str, texts: Sequence[str], clients: int, duration_s: float, per_request: int
) -> Result:
    """``clients`` loops posting requests until ``duration_s`` has passed."""
    result = Result("", clients, duration_s)
    stop_at = time.perf_counter() + duration_s
    port = int(url.rsplit(":", 1)[1])

    async def client(worker: int) -> None:
        http = KeepAliveClient(HOST, port)
        i = worker
        while time.perf_counter() < stop_at:
            batch = [texts[(i + k) % len(texts)] for k in range(per_request)]
            i += clients
            start = time.perf_counter()
            try:
                status, body = await http.post("/v1/predict", json.dumps({"texts": batch}).encode())
                ok = status == 200 and len(json.loads(body)["predictions"]) == len(batch)
            except (OSError, asyncio.IncompleteReadError, ValueError, KeyError):
                ok = False
            if ok:
                result.requests += 1
                result.texts += per_request
                result.latencies_ms.append((time.perf_counter() - start) * 1000)
            else:
                result.errors += 1
        await http.close()

    await asyncio.gather(*(client(w) for w in range(clients)))
    return result


def run_server_config(name: str, args: argparse.Namespace, texts: list[str]) -> Result:
    port = free_port()
    url = f"http://{HOST}:{port}"
    process = start_server(name, port, args.model_dir)
    gradfence = name in ("batched", "workers1", "unbatched", "onnx")
    try:
        wait_ready(url + ready_path(name), process)
        asyncio.run(drive(url, texts, args.clients, args.warmup, args.texts_per_request))
        before = httpx.get(f"{url}/metrics").text if gradfence else ""
        cpu_before = tree_cpu_seconds(process.pid)
        client_before = time.process_time()
        result = asyncio.run(drive(url, texts, args.clients, args.duration, args.texts_per_request))
        result.client_cpu_s = time.process_time() - client_before
        result.cpu_s = tree_cpu_seconds(process.pid) - cpu_before
        if gradfence:
            after = httpx.get(f"{url}/metrics").text
            result.batch_sizes = histogram_delta(batch_histogram(before), batch_histogram(after))
            result.model_busy = (model_seconds(after) - model_seconds(before)) / args.duration
        result.name = name
        return result
    finally:
        stop(process)


def stop(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM, then SIGKILL after 60 s; every descendant left behind is killed too."""
    try:
        children = psutil.Process(process.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        children = []
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(60)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
    for child in children:
        with contextlib.suppress(psutil.NoSuchProcess):
            child.kill()


def plain_server(port: int, model_dir: Path | None) -> None:
    """The baseline: FastAPI, a sync endpoint, the model called once per request."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    import uvicorn
    from fastapi import FastAPI

    import gradfence as gf
    from gradfence.serve.model import load_model

    model = load_model(model_dir)
    app = FastAPI()

    @app.get("/health/ready")
    def ready() -> dict[str, str]:
        return {"status": "ready"}

    @app.post("/v1/predict")
    def predict(body: PredictBody) -> dict[str, Any]:
        with gf.inference(model, mode="inference_mode"):  # in this worker thread
            probs = model(body.texts).softmax(-1).tolist()
        return {"predictions": _predictions(model.labels, probs), "model": model.model_id}

    uvicorn.run(app, host=HOST, port=port, log_level="warning")


def _predictions(labels: Sequence[str], probs: list[list[float]]) -> list[dict[str, Any]]:
    out = []
    for row in probs:
        best = max(range(len(row)), key=row.__getitem__)
        scores = dict(zip(labels, row, strict=True))
        out.append({"label": labels[best], "score": row[best], "scores": scores})
    return out


try:  # the optional extra 'bench-peers'; module level: LitServe pickles the API object
    from litserve import LitAPI
except ImportError:  # pragma: no cover - litserve configs then fail with the reason
    LitAPI = object


class SentimentLitAPI(LitAPI):  # type: ignore[misc, valid-type]
    """The same model under LitServe: same tokenization, eval + inference mode."""

    def __init__(self, model_dir: Path | None, threads: int, **options: Any) -> None:
        super().__init__(**options)
        self.model_dir = model_dir
        self.threads = threads

    def setup(self, device: str) -> None:
        import torch

        from gradfence.serve.model import load_model

        torch.set_num_threads(self.threads)
        self.model = load_model(self.model_dir)

    def decode_request(self, request: PredictBody) -> list[str]:
        return request.texts  # LitServe builds the body from this annotation

    def predict(self, batch: list[list[str]]) -> list[dict[str, Any]]:
        import gradfence as gf

        texts = [text for request in batch for text in request]
        with gf.inference(self.model, mode="inference_mode"):
            probs = self.model(texts).softmax(-1).tolist()
        out, start = [], 0
        for request in batch:
            rows = probs[start : start + len(request)]
            start += len(request)
            predictions = _predictions(self.model.labels, rows)
            out.append({"predictions": predictions, "model": self.model.model_id})
        return out

    def encode_response(self, output: dict[str, Any]) -> dict[str, Any]:
        return output


# LitServe reads these annotations to build its endpoint; with postponed annotations they
# are strings it cannot resolve: give it the classes (the request body; no response model)
SentimentLitAPI.decode_request.__annotations__["request"] = PredictBody
del SentimentLitAPI.encode_response.__annotations__["return"]


def litserve_server(port: int, model_dir: Path | None, workers: int) -> None:
    """LitServe serving the same model, batching at 32 texts / 5 ms; each worker process
    runs cores // workers torch threads."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    import litserve as ls

    api = SentimentLitAPI(
        model_dir,
        max(1, cores() // workers),
        max_batch_size=MAX_BATCH_SIZE,
        batch_timeout=MAX_WAIT_S,
        api_path="/v1/predict",
    )
    server = ls.LitServer(api, accelerator="cpu", workers_per_device=workers, timeout=60)
    server.run(host=HOST, port=port, log_level="warning", generate_client_file=False)


# --- the in-process ceiling ---------------------------------------------------------


def ceiling_batches(model: Any, clients: int, max_words: int | None) -> list[Any]:
    """The held-out tweets tokenized beforehand and split into the server's token-budget
    batches, ``clients`` texts at a time (what the server's queue holds at most)."""
    from gradfence.serve.batcher import DEFAULT_MAX_BATCH_TOKENS, WINDOW_BATCHES, plan_batch

    encoded = model.encode(load_texts(2000, max_words))
    batches = []
    step = min(clients, WINDOW_BATCHES * MAX_BATCH_SIZE)  # the server's window at most
    for start in range(0, len(encoded), step):
        window = list(encoded[start : start + step])
        while window:
            chosen = plan_batch(
                [e.tokens for e in window], MAX_BATCH_SIZE, DEFAULT_MAX_BATCH_TOKENS
            )
            batches.append([window[i] for i in chosen])
            window = [e for i, e in enumerate(window) if i not in set(chosen)]
    return batches


def ceiling_process(
    args: argparse.Namespace, index: int, workers: int, barrier: Any, out: Any
) -> None:
    """One model process of the ceiling: its share of the batches until the deadline."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    import torch

    import gradfence as gf
    from gradfence.serve.model import load_model

    torch.set_num_threads(max(1, cores() // workers))
    model = load_model(args.model_dir, args.runtime)
    batches = ceiling_batches(model, args.clients, args.max_words)[index::workers]
    me = psutil.Process()
    with gf.inference(model):
        model.forward_encoded(batches[0]).softmax(-1).tolist()  # warm-up
        barrier.wait()
        started = time.perf_counter()
        cpu_before = sum(me.cpu_times()[:2])
        done, position = 0, 0
        while time.perf_counter() < started + args.duration:
            batch = batches[position % len(batches)]
            position += 1
            model.forward_encoded(batch).softmax(-1).tolist()
            done += len(batch)
        elapsed = time.perf_counter() - started
    out.put({"texts": done, "elapsed_s": elapsed, "cpu_s": sum(me.cpu_times()[:2]) - cpu_before})


def ceiling_worker(args: argparse.Namespace) -> None:
    """Print one JSON line: texts/s and CPU seconds of the model alone (see module doc):
    one single-threaded model process per core, as the server's default workers."""
    import multiprocessing

    from gradfence.serve.batcher import available_cores

    workers = available_cores()
    context = multiprocessing.get_context("spawn")
    barrier, out = context.Barrier(workers), context.Queue()
    processes = [
        context.Process(target=ceiling_process, args=(args, i, workers, barrier, out))
        for i in range(workers)
    ]
    for process in processes:
        process.start()
    measured = [out.get(timeout=600) for _ in processes]
    for process in processes:
        process.join()
    elapsed = max(m["elapsed_s"] for m in measured)
    texts = sum(m["texts"] for m in measured)
    cpu = sum(m["cpu_s"] for m in measured)
    print(json.dumps({"texts": texts, "elapsed_s": elapsed, "cpu_s": cpu}), flush=True)


def run_ceiling(name: str, args: argparse.Namespace) -> Result:
    runtime = "onnx" if name == "ceiling-onnx" else "torch"
    command = [sys.executable, __file__, "--ceiling-worker", "--runtime", runtime]
    command += ["--clients", str(args.clients), "--duration", str(args.duration)]
    if args.model_dir:
        command += ["--model-dir", str(args.model_dir)]
    if args.max_words:
        command += ["--max-words", str(args.max_words)]
    out = subprocess.run(command, capture_output=True, text=True, timeout=600, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"{name} failed: {out.stderr.strip().splitlines()[-1:]}")
    measured = json.loads(out.stdout.strip().splitlines()[-1])
    result = Result(name, args.clients, measured["elapsed_s"], texts=measured["texts"])
    result.cpu_s = measured["cpu_s"]
    return result


# --- report -------------------------------------------------------------------------


def median_run(results: list[Result], name: str) -> dict[str, Any]:
    """The summary of ``name``'s run with the median texts/s (the lower of two middles)."""
    runs = sorted((r for r in results if r.name == name), key=lambda r: r.texts / r.duration_s)
    return runs[(len(runs) - 1) // 2].summary()


def print_table(results: list[Result]) -> None:
    header = f"{'config':<13} {'texts/s':>8} {'p50 ms':>8} {'p95 ms':>8} {'p99 ms':>8} "
    header += f"{'errors':>6} {'cpu s':>6} {'client':>6} {'texts/cpu-s':>11} {'busy':>5}"
    print(header + "  batch sizes")
    for r in results:
        s = r.summary()
        sizes = ", ".join(f"{k}: {int(v)}" for k, v in s["batch_size_histogram"].items()) or "-"
        print(
            f"{r.name:<13} {s['texts_per_s']:8.1f} {s['p50_ms']:8.1f} {s['p95_ms']:8.1f} "
            f"{s['p99_ms']:8.1f} {s['errors']:6d} {s['server_cpu_s']:6.1f} "
            f"{s['client_cpu_s']:6.1f} "
            f"{s['texts_per_cpu_s']:11.1f} {s['model_busy_worker_s_per_s']:5.2f}  {sizes}"
        )
    by_name = {name: median_run(results, name) for name in {r.name for r in results if r.texts}}
    rounds = max(Counter(r.name for r in results).values(), default=1)
    if rounds > 1:
        print(f"ratios of the median run of each config over {rounds} interleaved rounds:")

    def ratio(a: str, b: str, what: str, latency: bool = True) -> None:
        if a in by_name and b in by_name:
            x, y = by_name[a], by_name[b]
            line = f"{a} / {b}: {x['texts_per_s'] / y['texts_per_s']:.2f}x texts/s"
            if latency:
                line += f", p99 {x['p99_ms']:.0f} vs {y['p99_ms']:.0f} ms"
            if rounds > 1:
                each = [
                    f"{p.texts / q.texts * q.duration_s / p.duration_s:.2f}"
                    for p, q in zip(
                        [r for r in results if r.name == a],
                        [r for r in results if r.name == b],
                        strict=False,
                    )
                    if q.texts
                ]
                line += f"; per round {' '.join(each)}"
            print(f"{line}  ({what})")

    ratio("batched", "litserve", "target >= 1.3x, p99 no worse")
    ratio("batched", "ceiling", "target >= 0.9x", latency=False)
    ratio("onnx", "litserve", "")
    ratio("onnx", "ceiling-onnx", "target >= 0.9x", latency=False)
    ratio("batched", "workers1", "")
    ratio("batched", "unbatched", "")
    ratio("batched", "plain", "")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=32, help="concurrent clients (32)")
    parser.add_argument("--duration", type=float, default=20.0, help="measured seconds (20)")
    parser.add_argument("--warmup", type=float, default=3.0, help="unmeasured seconds (3)")
    parser.add_argument("--texts-per-request", type=int, default=1)
    parser.add_argument("--configs", default=DEFAULT_CONFIGS, help=f"({DEFAULT_CONFIGS})")
    parser.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="run the configs this many times, interleaved; ratios use each config's "
        "median run (1)",
    )
    parser.add_argument(
        "--budget-s", type=float, default=900.0, help="skip configs after this long (900)"
    )
    parser.add_argument(
        "--max-words", type=int, default=None, help="cut each tweet to its first N words"
    )
    parser.add_argument("--model-dir", type=Path, default=None)
    parser.add_argument("--json", type=Path, default=None, help="also write results here")
    parser.add_argument("--plain-server", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--litserve-server", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--ceiling-worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--workers", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--runtime", default="torch", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.plain_server:
        plain_server(args.port, args.model_dir)
        return 0
    if args.litserve_server:
        litserve_server(args.port, args.model_dir, args.workers)
        return 0
    if args.ceiling_worker:
        ceiling_worker(args)
        return 0
    if not 0 < args.duration <= 600 or args.clients < 1 or args.rounds < 1:
        parser.error("--duration must be in (0, 600], --clients and --rounds >= 1")
    names = args.configs.split(",")
    known = set(DEFAULT_CONFIGS.split(",")) | {"plain"}
    if unknown := [n for n in names if n not in known]:
        parser.error(f"unknown config {unknown[0]!r}; known: {', '.join(sorted(known))}")
    texts = load_texts(2000, args.max_words)
    words = sum(len(t.split()) for t in texts) / len(texts)
    print(
        f"{args.clients} clients, {args.duration:g} s each, {args.texts_per_request} text(s) "
        f"per request ({words:.1f} words on average), {cores()} CPUs, "
        f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}",
        flush=True,
    )
    results = []
    started = time.monotonic()
    for name in names * args.rounds:
        if time.monotonic() - started > args.budget_s:
            print(f"{name}: skipped (--budget-s {args.budget_s:g} spent)", flush=True)
            continue
        try:
            if name.startswith("ceiling"):
                result = run_ceiling(name, args)
            else:
                result = run_server_config(name, args, texts)
        except Exception as exc:  # report the others; say which failed and why
            print(f"{name}: failed: {exc}", flush=True)
            continue
        s = result.summary()
        print(f"{name}: {s['texts_per_s']:.1f} texts/s, p99 {s['p99_ms']:.0f} ms", flush=True)
        results.append(result)
    print(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print_table(results)
    if args.json:
        args.json.write_text(json.dumps([r.summary() for r in results], indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
