"""The Ray Serve backend on a local Ray instance: same answers as the uvicorn backend.

Starting Ray is slow on 2 cores, so conftest runs this module after every other test.
"""

from __future__ import annotations

import functools
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from gradfence.serve.app import LOOPBACK_HOSTS, ServeSettings, create_app
from gradfence.serve.model import load_model_dir

from .conftest import ThreadedServer, free_port, wait_process_ready

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def ray_http_listeners(port: int) -> list[str]:
    """The IPv4/IPv6 addresses anything on this machine listens on at ``port``."""
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            address, _, hex_port = local.partition(":")
            if state == "0A" and int(hex_port, 16) == port:
                raw = bytes.fromhex(address)
                if len(raw) == 4:
                    found.append(socket.inet_ntop(socket.AF_INET, raw[::-1]))
                else:
                    words = b"".join(raw[i : i + 4][::-1] for i in range(0, 16, 4))
                    found.append(socket.inet_ntop(socket.AF_INET6, words))
    return found


TEXTS = ["the movie was very good", "awful day", "bad", "the the the", "great", "not good"]


def test_ray_backend_predictions_equal_uvicorn(tiny_model_dir: Path) -> None:
    import ray
    from ray import serve

    from gradfence.serve.ray import deployment

    settings = ServeSettings(
        max_batch_size=4, max_wait_ms=5, request_timeout_s=3.0, allowed_hosts=LOOPBACK_HOSTS
    )
    load = functools.partial(load_model_dir, tiny_model_dir)
    with ThreadedServer(create_app(load, settings)) as server:
        server.wait_ready()
        expected = httpx.post(f"{server.url}/v1/predict", json={"texts": TEXTS}).json()

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(deployment(load, settings, replicas=1), name="gradfence-test", route_prefix="/")
        url = f"http://127.0.0.1:{port}"
        with httpx.Client(base_url=url, timeout=120) as client:
            deadline = time.monotonic() + 120  # the replica loads its model in the background
            while client.get("/health/ready").status_code != 200:
                assert time.monotonic() < deadline
                time.sleep(0.1)
            got = client.post("/v1/predict", json={"texts": TEXTS})
            assert got.status_code == 200
            body = got.json()
            assert body["model"] == expected["model"]
            for mine, theirs in zip(body["predictions"], expected["predictions"], strict=True):
                assert mine["label"] == theirs["label"]
                assert mine["scores"] == pytest.approx(theirs["scores"], abs=1e-5)
            info = client.get("/v1/model").json()
            assert info["backend"] == "ray"
            state = info["inference_thread"]
            assert state["eval_mode"] is True and state["grad_enabled"] is False
            bad = client.post("/v1/predict", json={"texts": []})
            assert bad.status_code == 422 and bad.json()["field"] == "texts"
            assert client.get("/health/ready").status_code == 200
            # the same app as uvicorn's: its routes, methods, edge checks and limits
            assert client.get("/v1/predict").status_code == 405
            assert client.post("/v1/predict", content=b"{}").status_code == 415
            evil = client.post("/v1/predict", json={"texts": ["b"]}, headers={"host": "evil.x"})
            assert evil.status_code == 400 and evil.json()["field"] == "host"
            assert "gradfence_http_requests_total" in client.get("/metrics").text
            assert client.get("/docs").status_code == 404
        stuck = b'{"texts": ["b'
        head = (
            b"POST /v1/predict HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            b"Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n"
        )
        with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
            sock.sendall(head + stuck)
            answer = sock.recv(65536)
        assert answer.startswith(b"HTTP/1.1 408 "), answer
        # Serve's HTTP proxy listens where it is told, not on every interface
        assert [addr for addr in ray_http_listeners(port)] == ["127.0.0.1"]
    finally:
        serve.shutdown()
        ray.shutdown()


def test_cli_ray_backend_serves_and_exits_0_on_sigterm(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    command = [sys.executable, "-m", "gradfence", "serve", "--backend", "ray", "--replicas", "1"]
    command += ["--model-dir", str(tiny_model_dir), "--port", str(port)]
    log = (tmp_path / "serve.log").open("wb")  # Ray logs a lot: a pipe could fill up
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_process_ready(url, process)
        response = httpx.post(f"{url}/v1/predict", json={"texts": TEXTS}, timeout=60)
        assert response.status_code == 200
        assert len(response.json()["predictions"]) == len(TEXTS)
        process.send_signal(signal.SIGTERM)
        assert process.wait(120) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        log.close()
