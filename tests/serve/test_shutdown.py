"""``python -m gradfence serve`` as a process: SIGTERM with requests in flight, CLI errors."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from gradfence.cli import main

from .conftest import free_port, wait_process_ready


def queue_depth(url: str) -> float:
    text = httpx.get(f"{url}/metrics", timeout=5).text
    match = re.search(r"^gradfence_queue_depth (\S+)$", text, re.M)
    assert match, text
    return float(match.group(1))


def test_sigterm_answers_every_accepted_request_and_exits_0(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    # a long batch wait keeps accepted requests queued when the signal arrives
    command = [sys.executable, "-m", "gradfence", "serve", "--model-dir", str(tiny_model_dir)]
    command += ["--port", str(port), "--max-wait-ms", "1500", "--max-batch-size", "64"]
    log = (tmp_path / "serve.log").open("wb")
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_process_ready(url, process)
        texts = [f"the movie was good {i}" for i in range(12)]

        async def in_flight() -> list[httpx.Response]:
            async with httpx.AsyncClient(base_url=url, timeout=60) as client:
                tasks = [
                    asyncio.create_task(client.post("/v1/predict", json={"texts": [t, "bad"]}))
                    for t in texts
                ]
                deadline = time.monotonic() + 30
                while await asyncio.to_thread(queue_depth, url) < 2 * len(texts):
                    assert time.monotonic() < deadline, "requests never reached the queue"
                    await asyncio.sleep(0.01)
                process.send_signal(signal.SIGTERM)
                return await asyncio.gather(*tasks)

        responses = asyncio.run(in_flight())
        assert [r.status_code for r in responses] == [200] * len(texts)
        assert all(len(r.json()["predictions"]) == 2 for r in responses)
        assert process.wait(60) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        log.close()
    output = (tmp_path / "serve.log").read_text()
    assert "Traceback" not in output and "shut down after SIGTERM" in output
    with pytest.raises(httpx.TransportError):
        httpx.get(f"{url}/health/live", timeout=2)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--model-dir", "/no/such/dir"], "--model-dir /no/such/dir is not a directory"),
        (["--api-key-env", "GRADFENCE_TEST_UNSET_KEY"], "GRADFENCE_TEST_UNSET_KEY is empty"),
        (["--replicas", "2"], "--replicas needs --backend ray"),
        (["--max-batch-size", "0"], "--max-batch-size must be at least 1"),
        (["--port", "70000"], "--port 70000 is not a TCP port"),
    ],
)
def test_usage_errors_are_one_line_exit_2(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    os.environ.pop("GRADFENCE_TEST_UNSET_KEY", None)
    assert main(["serve", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("gradfence: error: ") and err.count("\n") == 1
    assert message in err
