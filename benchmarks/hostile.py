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
import json
import multiprocessing
import os
import random
import re
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from load import (
    HOST,
    KeepAliveClient,
    cpu_seconds,
    drive,
    free_port,
    load_texts,
    tree_cpu_seconds,
    wait_ready,
)

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


async def repeat(
    port: int, stop: asyncio.Event, clients: int, method: Callable[[], str], body: bytes = b""
) -> None:
    """``clients`` loops sending ``method() /v1/predict`` with ``body`` as fast as they are
    answered, ignoring what they are told (``Retry-After`` included). The minimal client
    of ``load.py`` keeps the attacker's own CPU low: what it costs is what it sends."""

    async def one() -> None:
        http = KeepAliveClient(HOST, port)
        while not stop.is_set():
            try:
                await http.request(method(), "/v1/predict", body)
            except (OSError, asyncio.IncompleteReadError, ValueError):
                await asyncio.sleep(0.01)  # refused a connection: the server is at its cap
        await http.close()

    await asyncio.gather(*(one() for _ in range(clients)))


async def retry_storm(url: str, port: int, stop: asyncio.Event) -> None:
    body = {"texts": ["this is a retry storm of a client ignoring Retry-After"] * 64}
    await repeat(port, stop, 300, lambda: "POST", json.dumps(body).encode())


async def made_up_methods(url: str, port: int, stop: asyncio.Event) -> None:
    def method() -> str:
        return "".join(random.choices("ABCDEFGHIJKLMNOPQRSTUVWXYZ", k=8))

    await repeat(port, stop, 8, method)


async def long_texts(url: str, port: int, stop: asyncio.Event) -> None:
    body = {"texts": ["a long text that costs the model many tokens " * 33] * 64}
    await repeat(port, stop, 16, lambda: "POST", json.dumps(body).encode())


ATTACKS: dict[str, Attack] = {
    "endless-header": endless_header,
    "slowloris": slowloris,
    "retry-storm": retry_storm,
    "made-up-methods": made_up_methods,
    "long-texts": long_texts,
}


def burn(cores: float, seconds: float) -> None:
    """Spin for a ``cores`` fraction of each 10 ms for ``seconds``: the control that takes
    the CPU an attacker took, sending nothing."""
    end = time.perf_counter() + seconds
    while (now := time.perf_counter()) < end:
        busy_until = now + 0.01 * cores
        while time.perf_counter() < busy_until:
            pass
        time.sleep(0.01 * (1 - cores))


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


@dataclass
class Run:
    """One measured run of the good clients."""

    rate: float  # their texts/s
    p99_ms: float
    errors: int
    model_rate: float  # texts/s the model ran for anyone
    late: float  # 504s answered to anyone
    other_cores: float  # cores the attacker's (or the control's) process used
    http_cores: float  # cores the server's HTTP process used
    model_cores: float  # cores its model worker processes used


def measure(
    url: str,
    server: int,
    texts: list[str],
    args: argparse.Namespace,
    attack: str | None,
    burn_cores: float = 0.0,
) -> Run:
    """The good clients' run with ``attack`` (or, with ``burn_cores``, a process that only
    takes that much CPU) running alongside on the same machine."""
    other = None
    spawn = multiprocessing.get_context("spawn")
    if attack:
        port = int(url.rsplit(":", 1)[1])
        other = spawn.Process(target=run_attack, args=(attack, url, port, args.duration + 3))
    elif burn_cores:
        other = spawn.Process(target=burn, args=(min(burn_cores, 1.0), args.duration + 3))
    if other:
        other.start()
        time.sleep(3)  # let the attack build up
    served, late = served_and_late(url)
    other_cpu = cpu_seconds(other.pid) if other and other.pid else 0.0
    http_cpu, tree_cpu = cpu_seconds(server), tree_cpu_seconds(server)
    result = asyncio.run(drive(url, texts, args.clients, args.duration, 1))
    served_after, late_after = served_and_late(url)
    if other and other.pid:
        other_cpu = cpu_seconds(other.pid) - other_cpu
    http_cpu, tree_cpu = cpu_seconds(server) - http_cpu, tree_cpu_seconds(server) - tree_cpu
    if other:
        other.join(60)
        if other.is_alive():
            other.kill()
    return Run(
        rate=result.texts / args.duration,
        p99_ms=result.percentile(99),
        errors=result.errors,
        model_rate=(served_after - served) / args.duration,
        late=late_after - late,
        other_cores=other_cpu / args.duration,
        http_cores=http_cpu / args.duration,
        model_cores=(tree_cpu - http_cpu) / args.duration,
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--duration", type=float, default=15.0)
    parser.add_argument("--model-dir", type=Path, default=None)
    parser.add_argument("--attacks", default=",".join(ATTACKS), help="comma-separated")
    parser.add_argument(
        "--no-control",
        dest="control",
        action="store_false",
        help="skip the control runs (a process taking the attacker's CPU, sending nothing)",
    )
    parser.add_argument("--server-args", default="", help="extra gradfence serve arguments")
    args = parser.parse_args()
    texts = load_texts(1024)
    port = free_port()
    url = f"http://{HOST}:{port}"
    command = [sys.executable, "-m", "gradfence", "serve", "--port", str(port)]
    command += ["--log-level", "warning", *args.server_args.split()]
    if args.model_dir:
        command += ["--model-dir", str(args.model_dir)]
    process = subprocess.Popen(command)
    try:
        wait_ready(f"{url}/health/ready", process)
        measure(url, process.pid, texts, argparse.Namespace(clients=8, duration=3), None)
        print(f"{args.clients} good clients, {args.duration:g} s each, {os.cpu_count()} CPUs")
        header = "attack", "texts/s", "p99 ms", "errors", "goodput", "model", "504s"
        header += "attacker", "http", "workers", "control", "vs control"
        print(
            "{:16} {:>8} {:>8} {:>6} {:>8} {:>6} {:>5} {:>8} {:>5} {:>7} {:>10} {:>10}".format(
                *header
            )
        )
        row = "{:16} {:8.1f} {:8.1f} {:6d} {:8.2f} {:6.1f} {:5.0f} {:>8} {:5.2f} {:7.2f} "
        row += "{:>10} {:>10}"
        base = measure(url, process.pid, texts, args, None)
        print(
            row.format(
                "none",
                base.rate,
                base.p99_ms,
                base.errors,
                1.0,
                base.model_rate,
                base.late,
                "-",
                base.http_cores,
                base.model_cores,
                "-",
                "-",
            )
        )
        for name in args.attacks.split(","):
            run = measure(url, process.pid, texts, args, name)
            control, versus = "-", "-"
            if args.control and run.other_cores >= 0.05:
                same_cpu = measure(url, process.pid, texts, args, None, run.other_cores)
                control = f"{same_cpu.rate:.0f}@{same_cpu.other_cores:.2f}"
                versus = f"{run.rate / same_cpu.rate:.2f}"
            print(
                row.format(
                    name,
                    run.rate,
                    run.p99_ms,
                    run.errors,
                    run.rate / base.rate,
                    run.model_rate,
                    run.late,
                    f"{run.other_cores:.2f}",
                    run.http_cores,
                    run.model_cores,
                    control,
                    versus,
                )
            )
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
