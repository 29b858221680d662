"""``gradfence serve`` as a process: signals at any moment, shutdown bounds, CLI refusals."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from gradfence.cli import main
from gradfence.serve import cli as serve_cli
from gradfence.serve.app import ServeSettings
from gradfence.serve.server import serve_uvicorn

from .conftest import free_port, read_all, wait_process_ready


def start(model_dir: Path, log_path: Path, *flags: str) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    command = [sys.executable, "-m", "gradfence", "serve", "--model-dir", str(model_dir)]
    command += ["--port", str(port), *flags]
    log = log_path.open("wb")
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    log.close()
    return process, f"http://127.0.0.1:{port}"


def stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.kill()
        process.wait()


def test_sigterm_while_importing_exits_0_in_one_line(tiny_model_dir: Path, tmp_path: Path) -> None:
    process, _ = start(tiny_model_dir, tmp_path / "serve.log")
    try:
        maps = Path(f"/proc/{process.pid}/maps")
        deadline = time.monotonic() + 30
        while "libtorch" not in maps.read_text():  # torch is being imported
            assert time.monotonic() < deadline and process.poll() is None
            time.sleep(0.005)
        process.send_signal(signal.SIGTERM)
        assert process.wait(30) == 0
    finally:
        stop(process)
    output = (tmp_path / "serve.log").read_text()
    assert "Traceback" not in output
    assert "stopped by SIGTERM before serving" in output


def test_double_ctrl_c_answers_everyone_in_json_and_exits_0(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    # a long batch wait keeps the requests queued while the signals arrive
    process, url = start(
        tiny_model_dir, tmp_path / "serve.log", "--max-wait-ms", "20000", "--max-batch-size", "64"
    )
    try:
        wait_process_ready(url, process)

        async def in_flight() -> list[httpx.Response]:
            async with httpx.AsyncClient(base_url=url, timeout=60) as client:
                tasks = [
                    asyncio.create_task(client.post("/v1/predict", json={"texts": [f"good {i}"]}))
                    for i in range(20)
                ]
                await asyncio.sleep(0.5)
                process.send_signal(signal.SIGINT)
                await asyncio.sleep(0.2)
                process.send_signal(signal.SIGINT)
                return await asyncio.gather(*tasks)

        started = time.monotonic()
        responses = asyncio.run(in_flight())
        assert {r.status_code for r in responses} <= {200, 503}
        assert all(r.headers["content-type"] == "application/json" for r in responses)
        assert process.wait(30) == 0
        assert time.monotonic() - started < 12  # not the 20 s batch wait
    finally:
        stop(process)
    output = (tmp_path / "serve.log").read_text()
    assert "Traceback" not in output and "Exception" not in output
    assert "SIGINT again: answering the requests still waiting with 503" in output


def test_a_stuck_body_holds_shutdown_only_briefly(tiny_model_dir: Path, tmp_path: Path) -> None:
    process, url = start(tiny_model_dir, tmp_path / "serve.log", "--request-timeout-s", "120")
    try:
        wait_process_ready(url, process)
        port = int(url.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
            sock.sendall(
                b"POST /v1/predict HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                b"Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n"
                b'{"texts": ["b'
            )
            time.sleep(0.3)
            started = time.monotonic()
            process.send_signal(signal.SIGTERM)
            answer = read_all(sock)
            assert process.wait(30) == 0
            assert time.monotonic() - started < 10  # not the 120 s request timeout
        assert answer.startswith(b"HTTP/1.1 503 "), answer
        assert b"shutting down" in answer
    finally:
        stop(process)
    assert "Traceback" not in (tmp_path / "serve.log").read_text()


def test_signal_handlers_are_restored_after_serving() -> None:
    def failing_load() -> object:
        raise FileNotFoundError("no weights here")

    before = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    status = serve_uvicorn(failing_load, ServeSettings(), port=free_port(), log_level="error")  # type: ignore[arg-type]
    assert status == 1
    assert {sig: signal.getsignal(sig) for sig in before} == before


def test_pickle_only_model_dir_is_refused_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x04")
    assert main(["serve", "--model-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("gradfence: error: ")
    assert "holds only pickle weights (pytorch_model.bin)" in err and "safetensors" in err
    (tmp_path / "pytorch_model.bin").unlink()
    assert main(["serve", "--model-dir", str(tmp_path)]) == 2
    assert "holds no *.safetensors weights" in capsys.readouterr().err


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    serve_cli.register(parser.add_subparsers())
    return parser.parse_args(["serve", *argv])


def test_loopback_binds_check_the_host_and_others_warn_without_a_key(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    settings = serve_cli._settings_from(parse())
    assert settings.allowed_hosts == ("127.0.0.1", "localhost", "::1")
    settings = serve_cli._settings_from(parse("--host", "::1", "--allowed-host", "Box.lan"))
    assert settings.allowed_hosts == ("127.0.0.1", "localhost", "::1", "box.lan")
    assert serve_cli._settings_from(parse("--host", "0.0.0.0")).allowed_hosts is None
    monkeypatch.setattr(serve_cli, "_serve", lambda args, settings: 0)
    with caplog.at_level(logging.WARNING, logger="gradfence.serve"):
        assert main(["serve", "--host", "127.0.0.1"]) == 0
        assert not caplog.records
        assert main(["serve", "--host", "0.0.0.0"]) == 0
    assert "serving on 0.0.0.0 without an API key" in caplog.text
    caplog.clear()
    monkeypatch.setenv("GRADFENCE_TEST_KEY", "k")
    with caplog.at_level(logging.WARNING, logger="gradfence.serve"):
        assert main(["serve", "--host", "0.0.0.0", "--api-key-env", "GRADFENCE_TEST_KEY"]) == 0
    assert not caplog.records
    os.environ.pop("GRADFENCE_TEST_KEY", None)
