"""Load test of ``gradfence serve``: batched vs unbatched vs a plain FastAPI endpoint.

Starts each server in turn as a subprocess on a free 127.0.0.1 port, drives it with N
concurrent asyncio/httpx clients for a fixed duration (after a short unmeasured
warm-up), and reports requests/s, texts/s, p50/p95/p99 latency, errors and the server's
batch-size histogram (from /metrics). The three servers, run one after the other:

* ``batched``:   ``gradfence serve`` with its defaults (--max-batch-size 32 --max-wait-ms 5);
* ``unbatched``: the same service with ``--max-batch-size 1``;
* ``plain``:     a plain FastAPI app whose sync ``def`` endpoint calls the same model per
  request under ``gf.inference`` (FastAPI runs it in its thread pool: the correct
  baseline, not an ``async def`` that blocks the event loop).

    .venv/bin/python benchmarks/load.py --clients 32 --duration 20

The client runs on the same machine as the server and competes with it for CPU.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from pydantic import BaseModel

HOST = "127.0.0.1"


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
    model_busy: float = float("nan")  # fraction of the run the inference thread ran batches

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
            "batch_size_histogram": self.batch_sizes,
            "model_busy_fraction": self.model_busy,
        }


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
    """Total seconds the inference thread spent in model batches so far."""
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


def start_server(name: str, port: int, model_dir: Path | None) -> subprocess.Popen[bytes]:
    extra = ["--model-dir", str(model_dir)] if model_dir else []
    if name == "plain":
        command = [sys.executable, __file__, "--plain-server", "--port", str(port), *extra]
    else:
        command = [sys.executable, "-m", "gradfence", "serve", "--port", str(port), *extra]
        if name == "unbatched":
            command += ["--max-batch-size", "1"]
        command += ["--log-level", "warning"]
    return subprocess.Popen(command)


def wait_ready(url: str, process: subprocess.Popen[bytes], timeout_s: float = 300) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode}")
        try:
            if httpx.get(f"{url}/health/ready", timeout=5).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise RuntimeError("server did not get ready")


async def drive(
    url: str, texts: Sequence[str], clients: int, duration_s: float, per_request: int
) -> Result:
    """``clients`` loops posting requests until ``duration_s`` has passed."""
    result = Result("", clients, duration_s)
    stop_at = time.perf_counter() + duration_s
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)

    async def client(worker: int, http: httpx.AsyncClient) -> None:
        i = worker
        while time.perf_counter() < stop_at:
            batch = [texts[(i + k) % len(texts)] for k in range(per_request)]
            i += clients
            start = time.perf_counter()
            try:
                response = await http.post("/v1/predict", json={"texts": batch})
                ok = response.status_code == 200
            except httpx.HTTPError:
                ok = False
            if ok:
                result.requests += 1
                result.texts += per_request
                result.latencies_ms.append((time.perf_counter() - start) * 1000)
            else:
                result.errors += 1

    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as http:
        await asyncio.gather(*(client(w, http) for w in range(clients)))
    return result


def run_config(name: str, args: argparse.Namespace, texts: list[str]) -> Result:
    port = free_port()
    url = f"http://{HOST}:{port}"
    process = start_server(name, port, args.model_dir)
    try:
        wait_ready(url, process)
        asyncio.run(drive(url, texts, args.clients, args.warmup, args.texts_per_request))
        before = httpx.get(f"{url}/metrics").text if name != "plain" else ""
        result = asyncio.run(drive(url, texts, args.clients, args.duration, args.texts_per_request))
        if name != "plain":
            after = httpx.get(f"{url}/metrics").text
            result.batch_sizes = histogram_delta(batch_histogram(before), batch_histogram(after))
            result.model_busy = (model_seconds(after) - model_seconds(before)) / args.duration
        result.name = name
        return result
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def plain_server(port: int, model_dir: Path | None) -> None:
    """The baseline: FastAPI, a sync endpoint, the model called once per request.

    Gets the same OpenMP setting as ``gradfence serve`` (set before torch loads).
    """
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
        predictions = []
        for row in probs:
            best = max(range(len(row)), key=row.__getitem__)
            scores = dict(zip(model.labels, row, strict=True))
            predictions.append({"label": model.labels[best], "score": row[best], "scores": scores})
        return {"predictions": predictions, "model": model.model_id}

    uvicorn.run(app, host=HOST, port=port, log_level="warning")


def print_table(results: list[Result]) -> None:
    header = f"{'config':<10} {'req/s':>8} {'texts/s':>8} {'p50 ms':>8} {'p95 ms':>8} "
    print(header + f"{'p99 ms':>8} {'errors':>6} {'model':>6}  batch sizes (batches)")
    for r in results:
        s = r.summary()
        sizes = ", ".join(f"{k}: {int(v)}" for k, v in s["batch_size_histogram"].items()) or "n/a"
        print(
            f"{r.name:<10} {s['requests_per_s']:8.1f} {s['texts_per_s']:8.1f} "
            f"{s['p50_ms']:8.1f} {s['p95_ms']:8.1f} {s['p99_ms']:8.1f} {s['errors']:6d} "
            f"{s['model_busy_fraction']:6.0%}  {sizes}"
        )
    by_name = {r.name: r.summary() for r in results}
    if any(s["texts_per_s"] == 0 for s in by_name.values()):
        return
    if "batched" in by_name and "unbatched" in by_name:
        b, u = by_name["batched"], by_name["unbatched"]
        print(
            f"batched / unbatched: {b['texts_per_s'] / u['texts_per_s']:.2f}x texts/s, "
            f"p99 {b['p99_ms']:.0f} ms vs {u['p99_ms']:.0f} ms"
        )
    if "batched" in by_name and "plain" in by_name:
        b, p = by_name["batched"], by_name["plain"]
        print(
            f"batched / plain FastAPI: {b['texts_per_s'] / p['texts_per_s']:.2f}x texts/s, "
            f"p99 {b['p99_ms']:.0f} ms vs {p['p99_ms']:.0f} ms"
        )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=32, help="concurrent clients (32)")
    parser.add_argument("--duration", type=float, default=20.0, help="measured seconds (20)")
    parser.add_argument("--warmup", type=float, default=3.0, help="unmeasured seconds (3)")
    parser.add_argument("--texts-per-request", type=int, default=1)
    parser.add_argument("--configs", default="batched,unbatched,plain")
    parser.add_argument(
        "--max-words", type=int, default=None, help="cut each tweet to its first N words"
    )
    parser.add_argument("--model-dir", type=Path, default=None)
    parser.add_argument("--json", type=Path, default=None, help="also write results here")
    parser.add_argument("--plain-server", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.plain_server:
        plain_server(args.port, args.model_dir)
        return 0
    if not 0 < args.duration <= 600 or args.clients < 1:
        parser.error("--duration must be in (0, 600] and --clients >= 1")
    texts = load_texts(2000, args.max_words)
    words = sum(len(t.split()) for t in texts) / len(texts)
    print(
        f"{args.clients} clients, {args.duration:g} s each, {args.texts_per_request} text(s) "
        f"per request ({words:.1f} words on average), {os.cpu_count()} CPUs",
        flush=True,
    )
    results = [run_config(name, args, texts) for name in args.configs.split(",")]
    print_table(results)
    if args.json:
        args.json.write_text(json.dumps([r.summary() for r in results], indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
