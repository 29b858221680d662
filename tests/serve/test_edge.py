"""The service's HTTP edge against hostile clients (127.0.0.1 only, each bounded in time).

Each test here is one scenario of a client trying to knock the service over or to reach
it from where it should not: the answer must be cheap, well-formed, and leave the
service serving everyone else.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import socket
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import httpx
import pytest
import torch

from gradfence.serve.app import LOOPBACK_HOSTS, METHODS, RefusalPause
from gradfence.serve.server import MAX_PIPELINED

from .conftest import ServerFactory, StubClassifier, ThreadedServer, read_all

JSON = {"content-type": "application/json"}
T = TypeVar("T")


def raw_request(server: ThreadedServer, data: bytes, timeout: float = 10) -> bytes:
    """Send ``data`` on a fresh connection; everything the server answers before closing."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=timeout) as sock:
        sock.sendall(data)
        return read_all(sock)


PREDICT_HEAD = b"POST /v1/predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"


def raw_predict(texts: list[str], headers: bytes = b"") -> bytes:
    """A whole ``POST /v1/predict`` of ``texts`` with its Content-Length, ``headers`` added."""
    body = json.dumps({"texts": texts}).encode()
    return PREDICT_HEAD + headers + b"Content-Length: %d\r\n\r\n%s" % (len(body), body)


def metrics(server: ThreadedServer) -> str:
    return httpx.get(f"{server.url}/metrics", timeout=10).text


def good_request_ok(server: ThreadedServer) -> bool:
    response = httpx.post(f"{server.url}/v1/predict", json={"texts": ["bbb"]}, timeout=10)
    return response.status_code == 200 and response.json()["predictions"][0]["label"] == (
        "negative"
    )


# --- the request head ---------------------------------------------------------------


def send_endless(server: ThreadedServer, start: bytes) -> tuple[bytes, int]:
    """Send ``start``, then ``a`` bytes without end (up to 64 MiB, 10 s) until the server
    answers or closes; checks a good client is served meanwhile. Returns everything the
    server answered and the bytes sent after ``start``."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sent = 0
        answer = b""
        sock.setblocking(False)
        deadline = time.monotonic() + 10
        sock.sendall(start)
        while sent < 64 << 20 and time.monotonic() < deadline:
            try:
                sent += sock.send(b"a" * 65536)
            except BlockingIOError:
                time.sleep(0.001)
            except (BrokenPipeError, ConnectionResetError):
                break
            try:
                answer += sock.recv(65536)
            except BlockingIOError:
                continue
            except ConnectionResetError:
                break
            if answer:
                assert good_request_ok(server)  # others are served meanwhile
                break
        sock.setblocking(True)
        sock.settimeout(5)
        answer += read_all(sock)
    return answer, sent


@pytest.mark.parametrize("where", ["header", "url"])
def test_endless_head_is_431_at_once_and_stalls_nobody(
    serve_model: ServerFactory, where: str
) -> None:
    server = serve_model(StubClassifier(), refusal_pause_s=0)  # (the pause: further down)
    start = b"GET /health/live HTTP/1.1\r\nHost: t\r\nX-Endless: "
    if where == "url":
        start = b"GET /health/live?" + b"a" * 10
    answer, sent = send_endless(server, start)
    assert answer.startswith(b"HTTP/1.1 431 "), answer[:200]
    assert b"request head over 16384 bytes" in answer
    assert b"x-content-type-options: nosniff" in answer
    assert sent < 4 << 20, f"the server read {sent} bytes of one head"
    assert good_request_ok(server)


def test_endless_chunked_trailer_is_cut_off(serve_model: ServerFactory) -> None:
    """Trailers of a chunked body are header fields too, and bounded the same way; the
    rest of a body the app answered without reading must come within the head time."""
    server = serve_model(StubClassifier(), refusal_pause_s=0, head_timeout_s=1)
    body = b'{"texts": ["b"]}'
    head = (
        b"POST %s HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n%x\r\n%s\r\n"
    )
    answer, sent = send_endless(server, head % (b"/v1/predict", len(body), body) + b"0\r\nX: ")
    assert answer.startswith(b"HTTP/1.1 400 "), answer[:200]
    assert b"chunked framing" in answer
    assert sent < 4 << 20, f"the server read {sent} bytes of trailers"
    # a probe answers without reading the body: the connection is closed at the head time
    unfinished = head % (b"/health/live", len(body), body)
    answer, waited = answered_after(raw_request, server, unfinished)
    assert answer.startswith(b"HTTP/1.1 405 ") and waited < 3, (answer[:100], waited)
    assert good_request_ok(server)


def test_the_head_limit_counts_one_head_not_what_follows_it(
    serve_model: ServerFactory,
) -> None:
    """A write longer than the head limit is fine when each head in it fits: pipelined
    requests, or a small head followed by its body."""
    server = serve_model(StubClassifier(), max_head_bytes=1024, head_timeout_s=1)
    head = b"GET /health/live HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
    last = b"GET /health/live HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    padded = head[:-2] + b"X-Padding: " + b"p" * 80 + b"\r\n\r\n"
    answer = raw_request(server, padded * 11 + last)  # about 1.6 kB in one write
    assert answer.count(b"HTTP/1.1 200 ") == 12, answer[:300]
    answer = raw_request(server, raw_predict(["b" * 3000, "g" * 3000], b"Connection: close\r\n"))
    assert answer.startswith(b"HTTP/1.1 200 "), answer[:300]
    # a head pipelined after a request, in the same write, is held to the limit and to
    # the head time as well
    endless = b"GET /health/live HTTP/1.1\r\nHost: 127.0.0.1\r\nX: " + b"a" * 900
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(head + endless)
        time.sleep(0.2)
        sock.sendall(b"a" * 2000)
        answer = read_all(sock)
    assert answer.count(b"HTTP/1.1 200 ") == 1 and b"HTTP/1.1 431 " in answer, answer[-300:]
    started = time.monotonic()
    answer = raw_request(server, head + b"GET /health/live HTTP/1.1\r\nHost: 1")
    assert answer.count(b"HTTP/1.1 200 ") == 1 and b"HTTP/1.1 408 " in answer, answer[-300:]
    assert time.monotonic() - started < 4  # the head time (1 s), not the idle time


def test_a_bad_head_pipelined_behind_a_request_waits_for_its_answer(
    serve_model: ServerFactory,
) -> None:
    good = b"GET /health/live HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
    too_long = b"GET /health/live HTTP/1.1\r\nHost: 127.0.0.1\r\nX: " + b"a" * 3000
    for pause in (PAUSE_S, 0):
        server = serve_model(StubClassifier(), refusal_pause_s=pause, max_head_bytes=1024)
        for bad, status in [(b"GARBAGE\r\n\r\n", b"400"), (too_long, b"431")]:
            answer, waited = answered_after(raw_request, server, good + bad)
            assert answer.startswith(b"HTTP/1.1 200 "), answer[:200]
            assert answer.count(b"HTTP/1.1 " + status + b" ") == 1, answer[-300:]
            assert waited >= pause * 0.9  # the bad head's refusal pause still holds


def test_a_late_head_pipelined_behind_a_slow_request_waits_for_its_answer(
    serve_model: ServerFactory,
) -> None:
    model = StubClassifier()
    server = serve_model(model, head_timeout_s=0.5)
    predict = raw_predict(["bbb"])
    model.gate.clear()  # the model holds the request past the head time
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(predict + b"GET /health/live HTTP/1.1\r\nHost: 1")
        time.sleep(1.5)
        model.gate.set()
        answer = read_all(sock)
    assert answer.startswith(b"HTTP/1.1 200 "), answer[:200]
    assert answer.count(b"HTTP/1.1 408 ") == 1, answer[-300:]


def test_pipelined_and_chunked_bodies(serve_model: ServerFactory) -> None:
    """A request with a body pipelined behind another is answered even when its body
    arrives later; a body in 1-byte chunks is fine; a broken body behind a request in
    progress is refused after that request's answer."""
    server = serve_model(StubClassifier())
    good = b"GET /health/live HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
    body = json.dumps({"texts": ["bbb " * 1500]}).encode()
    post = PREDICT_HEAD + b"Connection: close\r\n"
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(good + post + b"Content-Length: %d\r\n\r\n" % len(body) + body[:100])
        time.sleep(0.3)
        sock.sendall(body[100:])
        answer = read_all(sock)
    assert answer.count(b"HTTP/1.1 200 ") == 2, answer[-300:]
    chunks = b"".join(b"1\r\n%s\r\n" % body[i : i + 1] for i in range(len(body)))
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(post + b"Transfer-Encoding: chunked\r\n\r\n")
        time.sleep(0.2)
        sock.sendall(chunks)  # 30 kB of framing around 6 kB of body
        time.sleep(0.2)
        sock.sendall(b"0\r\n\r\n")
        answer = read_all(sock)
    assert answer.startswith(b"HTTP/1.1 200 "), answer[:300]
    broken = post + b"Transfer-Encoding: chunked\r\n\r\nzz\r\n"
    answer = raw_request(server, good + broken)
    assert answer.startswith(b"HTTP/1.1 200 "), answer[:300]
    assert answer.count(b"HTTP/1.1 400 ") == 1, answer[-300:]


def test_a_body_sent_after_its_answer_keeps_the_connection(serve_model: ServerFactory) -> None:
    """A client writes a head and its body apart; an answer that did not need the body
    (a 404) may come in between: the body is then read and the connection kept."""
    server = serve_model(StubClassifier())
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(
            b"POST /v1/nothing HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            b"Content-Type: application/json\r\nContent-Length: 2\r\n\r\n"
        )
        assert sock.recv(65536).startswith(b"HTTP/1.1 404 ")
        time.sleep(0.2)
        sock.sendall(b"{}")
        sock.sendall(b"GET /health/live HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        answer = read_all(sock)
    assert answer.startswith(b"HTTP/1.1 200 "), answer[:200]
    # and the connection is idle from then on: closed at the idle time
    server = serve_model(StubClassifier(), idle_timeout_s=1)
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(
            b"POST /v1/nothing HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            b"Content-Type: application/json\r\nContent-Length: 2\r\n\r\n"
        )
        assert sock.recv(65536).startswith(b"HTTP/1.1 404 ")
        sock.sendall(b"{}")
        closed, waited = answered_after(read_all, sock)
    assert closed == b"" and waited < 4, (closed, waited)


def test_a_pipelined_head_waiting_for_its_turn_is_not_late(serve_model: ServerFactory) -> None:
    """A head not read on because the requests before it are in progress is not held to
    the head time meanwhile."""
    model = StubClassifier()
    server = serve_model(model, head_timeout_s=0.5)
    predict = raw_predict(["bbb"])
    good = b"GET /health/live HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
    model.gate.clear()  # the first request takes longer than the head time
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(predict + good + b"GET /health/live HTTP/1.1\r\nHost: 1")
        time.sleep(1.5)
        model.gate.set()
        sock.sendall(b"27.0.0.1\r\nConnection: close\r\n\r\n")
        answer = read_all(sock)
    assert answer.count(b"HTTP/1.1 200 ") == 3, answer[-300:]


def test_pipelined_requests_past_the_limit_are_refused_after_the_others(
    serve_model: ServerFactory,
) -> None:
    """llhttp parses every head of a read at once: a client pipelining thousands of
    requests in one write must not queue them all (each holds a scope and a cycle)."""
    server = serve_model(StubClassifier())
    head = b"GET /v1/model HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
    # 215 kB in one write; what the client reads may be cut short: the server closes with
    # the rest of the write unread, and the client's kernel then resets the connection
    raw_request(server, head * 5000)
    served = re.search(r'route="/v1/model",status="200"} ([0-9.]+)', metrics(server))
    assert served is not None
    # (answered between two reads of the write, a few more may be served)
    assert 1 + MAX_PIPELINED <= float(served.group(1)) < 1000, served.group(0)
    assert good_request_ok(server)


def test_a_request_asking_to_upgrade_with_a_body_is_refused(serve_model: ServerFactory) -> None:
    """The parser reads nothing after a head asking to upgrade, so its body would reach
    the app empty: refused instead."""
    server = serve_model(StubClassifier())
    request = raw_predict(["bbb"], b"Connection: Upgrade\r\nUpgrade: h2c\r\n")
    answer = raw_request(server, request)
    assert answer.startswith(b"HTTP/1.1 400 ") and b"asking to upgrade has a body" in answer


def test_a_request_asking_to_upgrade_is_answered_and_its_connection_closed(
    serve_model: ServerFactory,
) -> None:
    """Nothing is upgraded: the request is answered as HTTP/1.1, and the bytes after its
    head are not read as requests (the parser stops at such a head)."""
    server = serve_model(StubClassifier())
    upgrade = (
        b"GET /health/live HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: Upgrade\r\n"
        b"Upgrade: h2c\r\n\r\n"
    )
    smuggled = b"GET /v1/nothing HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n" * 400  # past 16 KiB
    answer, waited = answered_after(raw_request, server, upgrade + smuggled)
    assert answer.startswith(b"HTTP/1.1 200 ") and answer.count(b"HTTP/1.1 ") == 1, answer[-300:]
    assert waited < 3  # closed after the answer, not at the idle timeout (5 s)


def test_a_flood_of_bad_heads_logs_one_line(
    serve_model: ServerFactory, caplog: pytest.LogCaptureFixture
) -> None:
    server = serve_model(StubClassifier(), refusal_pause_s=0)
    uvicorn_log = logging.getLogger("uvicorn")  # does not propagate to caplog's root handler
    uvicorn_log.addHandler(caplog.handler)
    try:
        with caplog.at_level(logging.WARNING):
            for _ in range(50):
                head = b"GET /health/live HTTP/1.1\r\n" + b"X: y\r\n" * 3000
                assert raw_request(server, head).startswith(b"HTTP/1.1 431 ")
                nonsense = b"\x00\x01 nonsense\r\n\r\n"
                assert raw_request(server, nonsense).startswith(b"HTTP/1.1 400 ")
    finally:
        uvicorn_log.removeHandler(caplog.handler)
    lines = [r for r in caplog.records if "Invalid HTTP request" in r.getMessage()]
    assert len(lines) <= 1, [r.getMessage() for r in lines]  # throttled: one per 10 s
    assert good_request_ok(server)


def test_slow_head_is_408_and_a_silent_connection_is_closed(
    serve_model: ServerFactory,
) -> None:
    server = serve_model(StubClassifier(), head_timeout_s=0.5)
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as slow:
        slow.sendall(b"GET /health/live HTTP/1.1\r\nHost: t\r\n")  # never finishes
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as silent:
            assert good_request_ok(server)
            assert read_all(silent) == b""  # closed without a word
        answer = read_all(slow)
    assert answer.startswith(b"HTTP/1.1 408 "), answer
    assert b"the request head did not arrive within 0.5 s" in answer
    assert time.monotonic() - started < 5


def test_slowloris_after_keep_alive_request_times_out(serve_model: ServerFactory) -> None:
    server = serve_model(StubClassifier(), head_timeout_s=0.5, idle_timeout_s=30)
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(b"GET /health/live HTTP/1.1\r\nHost: t\r\n\r\n")
        assert sock.recv(65536).startswith(b"HTTP/1.1 200 ")
        started = time.monotonic()
        for byte in b"GET /health/live HT":  # one byte every 0.1 s: never a whole head
            try:
                sock.sendall(bytes([byte]))
            except (BrokenPipeError, ConnectionResetError):
                break
            time.sleep(0.1)
        answer = read_all(sock)
    assert answer.startswith(b"HTTP/1.1 408 "), answer
    assert time.monotonic() - started < 5


def test_idle_connections_cannot_lock_clients_out(serve_model: ServerFactory) -> None:
    server = serve_model(StubClassifier(), max_connections=20, head_timeout_s=60)
    idle = [socket.create_connection(("127.0.0.1", server.port), timeout=10) for _ in range(40)]
    try:
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as half:
            half.sendall(b"GET /health/live HTTP/1.1\r\n")  # a slowloris among them
            for _ in range(5):
                assert good_request_ok(server)
    finally:
        for sock in idle:
            sock.close()


# --- refusals only a retry can answer come after a pause -----------------------------

PAUSE_S = 0.8


def answered_after(send: Callable[..., T], *args: Any, **kwargs: Any) -> tuple[T, float]:
    """``send(*args, **kwargs)`` and the seconds it took."""
    started = time.monotonic()
    answer = send(*args, **kwargs)
    return answer, time.monotonic() - started


def test_a_refused_head_waits_unread_and_others_are_served_meanwhile(
    serve_model: ServerFactory,
) -> None:
    server = serve_model(StubClassifier(), refusal_pause_s=PAUSE_S)
    head = b"GET /health/live HTTP/1.1\r\n" + b"X: y\r\n" * 3000  # over 16 KiB
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(head)
        sock.setblocking(False)
        started = time.monotonic()
        assert good_request_ok(server)  # the pause holds no one else up
        sent = 0
        while time.monotonic() - started < PAUSE_S / 2:  # meanwhile, nothing is read
            try:
                sent += sock.send(b"a" * 65536)
            except BlockingIOError:
                time.sleep(0.01)
        sock.setblocking(True)
        sock.settimeout(10)
        answer = read_all(sock)
        waited = time.monotonic() - started
    assert answer.startswith(b"HTTP/1.1 431 "), answer[:100]
    assert waited >= PAUSE_S * 0.9
    assert sent < 16 << 20, f"{sent} bytes were taken during the pause"
    nonsense, waited = answered_after(raw_request, server, b"\x00 nonsense\r\n\r\n")
    assert nonsense.startswith(b"HTTP/1.1 400 ")
    assert waited >= PAUSE_S * 0.9


def test_made_up_methods_wait_and_mistakes_do_not(serve_model: ServerFactory) -> None:
    server = serve_model(StubClassifier(), refusal_pause_s=PAUSE_S)
    with httpx.Client(base_url=server.url, timeout=10) as client:
        # a method HTTP does not know is refused by the parser; one it knows, but the
        # app does not serve, by the app: both after the pause
        made_up, waited = answered_after(client.request, "BREW", "/v1/predict")
        assert (made_up.status_code, made_up.json()) == (400, {"detail": "invalid HTTP request"})
        assert waited >= PAUSE_S * 0.9, waited
        unserved, waited = answered_after(client.request, "PROPFIND", "/v1/predict")
        assert unserved.status_code == 405, unserved.text
        assert waited >= PAUSE_S * 0.9, waited
        for method, path, status in [
            ("GET", "/v1/predict", 405),  # a known method on the wrong route
            ("POST", "/v1/nothing", 404),
        ]:
            mistake, waited = answered_after(client.request, method, path, json={})
            assert mistake.status_code == status, (method, path, mistake.text)
            assert waited < PAUSE_S * 0.9, (method, path, waited)
        invalid, waited = answered_after(client.post, "/v1/predict", json={"texts": 3})
        assert invalid.status_code == 422, invalid.text
        assert waited < PAUSE_S * 0.9, waited


def test_a_pausing_refusal_gives_its_connection_up_at_the_cap(
    serve_model: ServerFactory,
) -> None:
    server = serve_model(StubClassifier(), refusal_pause_s=30, max_connections=4)

    async def scenario() -> None:
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:
            paused = [asyncio.create_task(client.request("BREW", "/v1/predict")) for _ in range(4)]
            await asyncio.sleep(0.5)
            started = time.monotonic()
            assert await asyncio.to_thread(good_request_ok, server)
            assert time.monotonic() - started < 10  # not the 30 s pause
            for task in paused:
                task.cancel()
            await asyncio.gather(*paused, return_exceptions=True)

    asyncio.run(scenario())


def test_refusal_pause_holds_at_most_its_limit_and_spaces_answers_out() -> None:
    pause = RefusalPause(1.0, limit=3, per_second=10)
    first, second, third = pause.take(), pause.take(), pause.take()
    assert first is not None and second is not None and third is not None
    assert 0.95 <= first <= 1.0
    # at most 10 answers a second: each waits 0.1 s more than the one before
    assert second - first == pytest.approx(0.1, abs=0.02)
    assert third - second == pytest.approx(0.1, abs=0.02)
    assert pause.take() is None  # a fourth is answered at once
    pause.release()
    assert pause.take() is not None
    assert RefusalPause(0, limit=10).take() is None  # 0 s: off
    # clients that leave at once do not push the schedule out for those that come later
    churn = RefusalPause(1.0, limit=5, per_second=10)
    for _ in range(100):
        delay = churn.take()
        assert delay is not None and delay <= 1.0 + 2 / 10
        churn.release()


# --- what the app lets through ------------------------------------------------------


# methods the HTTP parser knows and the app does not serve
UNSERVED_METHODS = ("PROPFIND", "MKCOL", "COPY", "MOVE", "LOCK", "UNLOCK", "SEARCH", "PURGE")


def test_made_up_methods_do_not_grow_metrics(serve_model: ServerFactory) -> None:
    server = serve_model(StubClassifier(), refusal_pause_s=0)
    with httpx.Client(base_url=server.url, timeout=10) as client:
        for i in range(200):
            assert client.request(f"M{i:04d}X", "/v1/predict").status_code == 400
            method = UNSERVED_METHODS[i % len(UNSERVED_METHODS)]
            assert client.request(method, "/v1/predict").status_code == 405
        text = client.get("/metrics").text
    methods = {
        line.split('method="')[1].split('"')[0]
        for line in text.splitlines()
        if line.startswith("gradfence_http_requests_total{")
    }
    assert methods <= METHODS | {"other"}
    assert (
        'gradfence_http_requests_total{method="other",route="/v1/predict",status="405"} 200.0'
        in (text)
    )
    assert len(text) < 20_000


@pytest.mark.parametrize(
    "content_type", [None, "text/plain", "application/x-www-form-urlencoded", "multipart/form-data"]
)
def test_a_body_not_declared_json_is_415(
    serve_model: ServerFactory, content_type: str | None
) -> None:
    server = serve_model(StubClassifier())
    headers = {"content-type": content_type} if content_type else {}
    response = httpx.post(
        f"{server.url}/v1/predict", content=b'{"texts": ["b"]}', headers=headers, timeout=10
    )
    assert response.status_code == 415
    assert response.json()["field"] == "content-type"
    ok = httpx.post(
        f"{server.url}/v1/predict",
        content=b'{"texts": ["b"]}',
        headers={"content-type": "application/json; charset=utf-8"},
        timeout=10,
    )
    assert ok.status_code == 200


def test_host_header_checked_on_loopback_binds(serve_model: ServerFactory) -> None:
    """DNS rebinding: a page on evil.example resolving to 127.0.0.1 sends its own Host."""
    server = serve_model(StubClassifier(), allowed_hosts=LOOPBACK_HOSTS)
    port = server.port
    for host in ("evil.example", f"evil.example:{port}", "127.0.0.1.evil.example", ""):
        answer = raw_request(
            server,
            b"POST /v1/predict HTTP/1.1\r\nHost: %s\r\nContent-Type: application/json\r\n"
            b'Content-Length: 15\r\nConnection: close\r\n\r\n{"texts":["b"]}' % host.encode(),
        )
        assert answer.startswith(b"HTTP/1.1 400 "), (host, answer)
        assert b'"field":"host"' in answer
    for host in (f"127.0.0.1:{port}", f"localhost:{port}", "localhost", f"[::1]:{port}"):
        response = httpx.post(
            f"{server.url}/v1/predict", json={"texts": ["b"]}, headers={"host": host}
        )
        assert response.status_code == 200, host


def test_every_answer_says_nosniff_and_no_store(serve_model: ServerFactory) -> None:
    server = serve_model(StubClassifier(), api_key="k")
    key = {"authorization": "Bearer k"}
    with httpx.Client(base_url=server.url, timeout=10) as client:
        answers = [
            client.post("/v1/predict", json={"texts": ["b"]}, headers=key),
            client.post("/v1/predict", json={"texts": []}, headers=key),
            client.post("/v1/predict", json={"texts": ["b"]}),
            client.get("/nope", headers=key),
            client.get("/metrics", headers=key),
            client.get("/health/ready"),
        ]
    assert [a.status_code for a in answers] == [200, 422, 401, 404, 200, 200]
    for answer in answers:
        assert answer.headers["x-content-type-options"] == "nosniff"
        assert answer.headers["cache-control"] == "no-store"


def test_the_key_protects_every_route_but_the_health_probes(serve_model: ServerFactory) -> None:
    server = serve_model(StubClassifier(), api_key="k", openapi=True)
    key = {"authorization": "Bearer k"}
    with httpx.Client(base_url=server.url, timeout=10) as client:
        for path in ("/v1/model", "/metrics", "/openapi.json", "/docs", "/redoc", "/nope"):
            assert client.get(path).status_code == 401, path
        assert client.get("/health/live").status_code == 200
        assert client.get("/health/ready").status_code == 200
        assert client.get("/metrics", headers=key).status_code == 200
        assert client.get("/openapi.json", headers=key).status_code == 200
    public = serve_model(StubClassifier(), api_key="k", metrics_public=True)
    assert httpx.get(f"{public.url}/metrics").status_code == 200
    assert httpx.get(f"{public.url}/v1/model").status_code == 401


def test_docs_routes_are_off_by_default_and_never_load_a_cdn(serve_model: ServerFactory) -> None:
    server = serve_model(StubClassifier())
    for path in ("/docs", "/redoc", "/openapi.json", "/docs/oauth2-redirect"):
        assert httpx.get(f"{server.url}{path}").status_code == 404, path
    with_schema = serve_model(StubClassifier(), openapi=True)
    assert httpx.get(f"{with_schema.url}/openapi.json").status_code == 200
    assert httpx.get(f"{with_schema.url}/docs").status_code == 404


def test_openapi_documents_bodies_errors_and_bearer_auth(serve_model: ServerFactory) -> None:
    server = serve_model(StubClassifier(), api_key="k", openapi=True)
    schema = httpx.get(f"{server.url}/openapi.json", headers={"authorization": "Bearer k"}).json()
    predict = schema["paths"]["/v1/predict"]["post"]
    body = predict["requestBody"]["content"]["application/json"]["schema"]
    assert body == {"$ref": "#/components/schemas/PredictRequest"}
    request = schema["components"]["schemas"]["PredictRequest"]
    texts = request["properties"]["texts"]
    assert (texts["minItems"], texts["maxItems"], texts["items"]["maxLength"]) == (1, 64, 10_000)
    assert request["additionalProperties"] is False
    ok = predict["responses"]["200"]["content"]["application/json"]["schema"]
    assert ok == {"$ref": "#/components/schemas/PredictResponse"}
    for status in ("400", "401", "408", "413", "415", "422", "500", "503", "504"):
        error = predict["responses"][status]["content"]["application/json"]["schema"]
        assert error == {"$ref": "#/components/schemas/ErrorBody"}, status
    assert schema["components"]["securitySchemes"]["HTTPBearer"]["scheme"] == "bearer"
    assert predict["security"] == [{"HTTPBearer": []}]
    assert "security" not in schema["paths"]["/health/ready"]["get"]


# --- overload: refusals must be cheap ---------------------------------------------


def test_full_queue_refuses_before_the_body_and_logs_little(
    serve_model: ServerFactory, caplog: pytest.LogCaptureFixture
) -> None:
    model = EnteredStub()
    server = serve_model(
        model, max_batch_size=1, max_queue=2, max_wait_ms=0, refusal_pause_s=PAUSE_S
    )
    model.gate.clear()
    model.entered.clear()

    async def fill() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
            post = client.post
            held = [asyncio.create_task(post("/v1/predict", json={"texts": ["b"]}))]
            assert await asyncio.to_thread(model.entered.wait, 10)  # stalled in the model
            held += [
                asyncio.create_task(post("/v1/predict", json={"texts": [t]})) for t in ("g", "bb")
            ]
            deadline = time.monotonic() + 10
            while "gradfence_queue_depth 2.0" not in (await client.get("/metrics")).text:
                assert time.monotonic() < deadline
                await asyncio.sleep(0.01)
            # the head of a big request, whose body never comes: refused unread, after
            # the refusal pause
            started = time.monotonic()
            head = (
                b"POST /v1/predict HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
                b"Content-Length: 500000\r\n\r\n"
            )
            answer = await asyncio.to_thread(raw_request, server, head, 5)
            assert answer.startswith(b"HTTP/1.1 503 "), answer
            assert b"retry-after: 1" in answer.lower() and b"connection: close" in answer
            assert PAUSE_S * 0.9 <= time.monotonic() - started < PAUSE_S + 2
            with caplog.at_level(logging.WARNING, logger="gradfence.serve"):
                storm = await asyncio.gather(
                    *(client.post("/v1/predict", json={"texts": ["b"] * 64}) for _ in range(100))
                )
            assert {r.status_code for r in storm} == {503}
            model.gate.set()
            return await asyncio.gather(*held)

    assert [r.status_code for r in asyncio.run(fill())] == [200, 200, 200]
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) <= 2, [r.getMessage() for r in warnings]


class EnteredStub(StubClassifier):
    """Sets ``entered`` when a batch reaches the model."""

    def __init__(self) -> None:
        super().__init__()
        self.entered = threading.Event()

    def forward(self, texts: Sequence[str]) -> torch.Tensor:
        self.entered.set()
        return super().forward(texts)


class TokenTimedStub(StubClassifier):
    """Model time proportional to the characters of the batch (like tokens on a CPU)."""

    seconds_per_char = 0.0004

    def forward(self, texts: Sequence[str]) -> torch.Tensor:
        time.sleep(self.seconds_per_char * sum(len(t) for t in texts))
        return super().forward(texts)


def test_admission_counts_work_not_texts(serve_model: ServerFactory) -> None:
    """Long texts: the queue has room for all of them, the timeout does not."""
    model = TokenTimedStub()
    server = serve_model(model, request_timeout_s=3.0, max_wait_ms=20, max_batch_size=64)
    for _ in range(4):  # the service learns what a token costs
        assert (
            httpx.post(
                f"{server.url}/v1/predict", json={"texts": ["b" * 400] * 4}, timeout=10
            ).status_code
            == 200
        )
    long_text = "bg " * 333  # ~1,000 characters: 0.4 s of model time each

    async def burst() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
            return await asyncio.gather(
                *(client.post("/v1/predict", json={"texts": [long_text]}) for _ in range(24))
            )

    codes = [r.status_code for r in asyncio.run(burst())]
    assert 504 not in codes, codes  # 24 x 0.4 s = 9.6 s against a 3 s timeout
    assert codes.count(200) >= 3 and codes.count(503) >= 8, codes
    assert good_request_ok(server)


def test_connections_keep_working_from_other_threads(serve_model: ServerFactory) -> None:
    """The edge state is per connection: concurrent keep-alive clients do not mix."""
    server = serve_model(StubClassifier())
    errors: list[BaseException] = []

    def client() -> None:
        try:
            with httpx.Client(base_url=server.url, timeout=10) as c:
                for _ in range(20):
                    assert c.post("/v1/predict", json={"texts": ["ggg"]}).status_code == 200
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=client) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors
