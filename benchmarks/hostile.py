"""Goodput of ``gradfence serve`` for well-behaved clients while hostile clients attack it.

Starts ``gradfence serve`` once (subprocess, free 127.0.0.1 port), measures the texts/s
and p99 of N well-behaved clients (one held-out tweet per request) alone, then with each
attack running at the same time, and prints each run's goodput as a fraction of the
unloaded one (the issue's target: >= 0.8), the texts/s the model ran in all (the
attackers' admitted texts included) and the 504s answered to anyone (admission by work
should leave none). The attacks, each from a process of its own:

* ``endless-header``: 4 connections streaming one endless header each;
* ``slowloris``: 1,100 connections sending a request head one byte per second;
* ``retry-storm``: 300 clients posting 64 texts in a loop, ignoring ``Retry-After``;
* ``made-up-methods``: 8 clients sending requests with random methods in a loop;
* ``long-texts``: 16 clients posting 64 texts of 1,500 characters in a loop.

    .venv/bin/python benchmarks/hostile.py --clients 32 --duration 15

The attackers and the good clients run on the same machine as the server and compete
with it for CPU: on 2 cores that alone costs goodput.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import multiprocessing
import os
import random
import re
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from load import HOST, drive, free_port, load_texts, wait_ready

Attack = Callable[[str, int, asyncio.Event], Awaitable[None]]


async def endless_header(url: str, port: int, stop: asyncio.Event) -> None:
    async def one() -> None:
        while not stop.is_set():
            reader, writer = await asyncio.open_connection(HOST, port)
            writer.write(b"GET /health/live HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Endless: ")
            with contextlib.suppress(OSError):
                while not stop.is_set() and not reader.at_eof():
                    writer.write(b"a" * 65536)
                    await writer.drain()
                    await asyncio.sleep(0)
            writer.close()

    await asyncio.gather(*(one() for _ in range(4)))


async def slowloris(url: str, port: int, stop: asyncio.Event) -> None:
    async def one() -> None:
        while not stop.is_set():
            with contextlib.suppress(OSError):
                _, writer = await asyncio.open_connection(HOST, port)
                for byte in b"GET /health/live HTTP/1.1\r\nHost: 127.0.0.1\r\nX-A: " * 100:
                    if stop.is_set():
                        break
                    writer.write(bytes([byte]))
                    await writer.drain()
                    await asyncio.sleep(1)
                writer.close()
            await asyncio.sleep(0.1)

    await asyncio.gather(*(one() for _ in range(1100)))


async def retry_storm(url: str, port: int, stop: asyncio.Event) -> None:
    body = {"texts": ["this is a retry storm of a client ignoring Retry-After"] * 64}
    limits = httpx.Limits(max_connections=300)
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as client:

        async def one() -> None:
            while not stop.is_set():
                with contextlib.suppress(httpx.HTTPError):
                    await client.post("/v1/predict", json=body)

        await asyncio.gather(*(one() for _ in range(300)))


async def made_up_methods(url: str, port: int, stop: asyncio.Event) -> None:
    async with httpx.AsyncClient(base_url=url, timeout=60) as client:

        async def one() -> None:
            while not stop.is_set():
                method = "".join(random.choices("ABCDEFGHIJKLMNOPQRSTUVWXYZ", k=8))
                with contextlib.suppress(httpx.HTTPError):
                    await client.request(method, "/v1/predict")

        await asyncio.gather(*(one() for _ in range(8)))


async def long_texts(url: str, port: int, stop: asyncio.Event) -> None:
    body = {"texts": ["a long text that costs the model many tokens " * 33] * 64}
    async with httpx.AsyncClient(base_url=url, timeout=60) as client:

        async def one() -> None:
            while not stop.is_set():
                with contextlib.suppress(httpx.HTTPError):
                    await client.post("/v1/predict", json=body)

        await asyncio.gather(*(one() for _ in range(16)))


ATTACKS: dict[str, Attack] = {
    "endless-header": endless_header,
    "slowloris": slowloris,
    "retry-storm": retry_storm,
    "made-up-methods": made_up_methods,
    "long-texts": long_texts,
}


def run_attack(name: str, url: str, port: int, seconds: float) -> None:
    """Run one attack for ``seconds`` (in a process of its own: the attackers must not
    slow the well-behaved clients' event loop down)."""

    async def timed() -> None:
        stop = asyncio.Event()
        asyncio.get_running_loop().call_later(seconds, stop.set)
        attack = asyncio.ensure_future(ATTACKS[name](url, port, stop))
        await stop.wait()
        await asyncio.sleep(5)
        attack.cancel()
        with contextlib.suppress(BaseException):
            await attack

    asyncio.run(timed())


def served_and_late(url: str) -> tuple[float, float]:
    """``gradfence_texts_total`` (texts the model has run) and the 504s answered so far."""
    text = httpx.get(f"{url}/metrics", timeout=30).text
    match = re.search(r"^gradfence_texts_total (\S+)$", text, re.M)
    late = re.findall(r'^gradfence_http_requests_total\{[^}]*status="504"\} (\S+)$', text, re.M)
    return float(match.group(1)) if match else float("nan"), sum(map(float, late))


def measure(
    url: str, port: int, texts: list[str], args: argparse.Namespace, attack: str | None
) -> tuple[float, float, int, float, float, float]:
    """Good clients' texts/s, p99 ms and errors, the model's texts/s, the 504s answered
    to anyone, and the cores the attacker's own process used, with ``attack`` running
    alongside (on the same machine: its CPU is CPU the server does not get)."""
    attacker = None
    if attack:
        spawn = multiprocessing.get_context("spawn")
        attacker = spawn.Process(target=run_attack, args=(attack, url, port, args.duration + 3))
        attacker.start()
        time.sleep(3)  # let the attack build up
    served, late = served_and_late(url)
    attacker_cpu = cpu_seconds(attacker.pid) if attacker and attacker.pid else 0.0
    result = asyncio.run(drive(url, texts, args.clients, args.duration, 1))
    served_after, late_after = served_and_late(url)
    if attacker and attacker.pid:
        attacker_cpu = cpu_seconds(attacker.pid) - attacker_cpu
    model_rate = (served_after - served) / args.duration
    if attacker:
        attacker.join(60)
        if attacker.is_alive():
            attacker.kill()
    latencies = sorted(result.latencies_ms) or [float("nan")]
    p99 = latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))]
    cores_taken = attacker_cpu / args.duration if attack else 0.0
    return (
        result.texts / args.duration,
        p99,
        result.errors,
        model_rate,
        late_after - late,
        cores_taken,
    )


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a live process (0 if it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--duration", type=float, default=15.0)
    parser.add_argument("--model-dir", type=Path, default=None)
    parser.add_argument("--attacks", default=",".join(ATTACKS), help="comma-separated")
    args = parser.parse_args()
    texts = load_texts(1024)
    port = free_port()
    url = f"http://{HOST}:{port}"
    command = [sys.executable, "-m", "gradfence", "serve", "--port", str(port)]
    command += ["--log-level", "warning"]
    if args.model_dir:
        command += ["--model-dir", str(args.model_dir)]
    process = subprocess.Popen(command)
    try:
        wait_ready(f"{url}/health/ready", process)
        measure(url, port, texts, argparse.Namespace(clients=8, duration=3), None)  # warm-up
        print(f"{args.clients} good clients, {args.duration:g} s each, {os.cpu_count()} CPUs")
        header = ("attack", "texts/s", "p99 ms", "errors", "goodput", "model", "504s", "attacker")
        print("{:16} {:>8} {:>8} {:>6} {:>8} {:>6} {:>5} {:>9}".format(*header))
        row = "{:16} {:8.1f} {:8.1f} {:6d} {:8.2f} {:6.1f} {:5.0f} {:9}"
        base, p99, errors, model, late, _ = measure(url, port, texts, args, None)
        print(row.format("none", base, p99, errors, 1.0, model, late, "-"))
        for name in args.attacks.split(","):
            rate, p99, errors, model, late, cores = measure(url, port, texts, args, name)
            taken = f"{cores:.2f} cpu"
            print(row.format(name, rate, p99, errors, rate / base, model, late, taken))
        metrics = httpx.get(f"{url}/metrics", timeout=10).text
        methods = set(re.findall(r'method="([^"]*)"', metrics))
        print(f"/metrics: {len(metrics)} bytes, method labels {sorted(methods)}")
        rss = Path(f"/proc/{process.pid}/status").read_text()
        print("server " + re.search(r"VmRSS:\s+(\d+ kB)", rss).group(0))  # type: ignore[union-attr]
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(60)
        except subprocess.TimeoutExpired:
            process.kill()
    return 0


if __name__ == "__main__":
    sys.exit(main())
