"""The HTTP API: endpoints, limits and status codes, on a real uvicorn server (127.0.0.1)."""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import httpx
import pytest
import torch

import gradfence as gf
from gradfence.serve.app import MAX_TEXT_CHARS, MAX_TEXTS, ServeSettings, create_app
from gradfence.serve.model import load_model_dir

from .conftest import ServerFactory, StubClassifier, ThreadedServer, stub_label


def predict(server: ThreadedServer, body: object, **kwargs: object) -> httpx.Response:
    kwargs.setdefault("timeout", 30)
    return httpx.post(f"{server.url}/v1/predict", json=body, **kwargs)  # type: ignore[arg-type]


def test_predict_one_answer_per_text_in_order(serve_model: ServerFactory) -> None:
    server = serve_model(StubClassifier())
    texts = ["bbb", "a  b c", "ggg g", "bg"]
    response = predict(server, {"texts": texts})
    assert response.status_code == 200
    body = response.json()
    assert body["model"] == "stub"
    assert [p["label"] for p in body["predictions"]] == [stub_label(t) for t in texts]
    for p in body["predictions"]:
        assert set(p["scores"]) == {"negative", "neutral", "positive"}
        assert p["score"] == max(p["scores"].values())
        assert sum(p["scores"].values()) == pytest.approx(1.0)


def test_tiny_bert_batched_answers_equal_single_runs(
    serve_model: ServerFactory, tiny_model_dir: Path
) -> None:
    """Concurrent requests merged into batches get the scores of their own texts."""
    model = load_model_dir(tiny_model_dir)
    texts = [f"the movie was {'very ' * i}good" if i % 2 else f"awful day {i}" for i in range(24)]
    with gf.inference(model):
        expected = [model([t]).softmax(-1)[0].tolist() for t in texts]
    server = serve_model(model, max_batch_size=8, max_wait_ms=20)

    async def send_all() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
            return await asyncio.gather(
                *(client.post("/v1/predict", json={"texts": [t]}) for t in texts)
            )

    responses = asyncio.run(send_all())
    for response, want in zip(responses, expected, strict=True):
        assert response.status_code == 200
        scores = response.json()["predictions"][0]["scores"]
        assert [scores[label] for label in model.labels] == pytest.approx(want, abs=1e-5)
    batch_counts = httpx.get(f"{server.url}/metrics").text
    assert "gradfence_batch_size_count" in batch_counts


def test_model_info_seen_from_inference_thread(serve_model: ServerFactory) -> None:
    """The model was built in train mode and the main thread has grad on: the
    inference thread still runs it in eval mode with grad off."""
    model = StubClassifier()
    assert model.training and torch.is_grad_enabled()
    server = serve_model(model)
    info = httpx.get(f"{server.url}/v1/model").json()
    state = info["inference_thread"]
    assert state["eval_mode"] is True and state["modules_in_train_mode"] == []
    assert state["grad_enabled"] is False and state["inference_mode"] is True
    assert state["thread"] == "gradfence-inference"
    assert info["labels"] == ["negative", "neutral", "positive"]
    assert info["runtime"] == "torch"
    assert info["limits"]["max_texts"] == MAX_TEXTS
    assert predict(server, {"texts": ["bb"]}).status_code == 200
    assert all(
        s == {"grad": False, "training": False, "thread": "gradfence-inference"} for s in model.seen
    )


def test_health_ready_waits_for_load_and_warmup() -> None:
    release = threading.Event()
    model = StubClassifier()

    def slow_load() -> StubClassifier:
        release.wait(30)
        return model

    with ThreadedServer(create_app(slow_load, ServeSettings())) as server:
        assert httpx.get(f"{server.url}/health/live").status_code == 200
        not_ready = httpx.get(f"{server.url}/health/ready")
        assert not_ready.status_code == 503 and not_ready.json() == {"status": "loading"}
        early = predict(server, {"texts": ["x"]})
        assert early.status_code == 503 and early.headers["retry-after"] == "1"
        release.set()
        server.wait_ready()
        assert model.batches[0] == ["gradfence warm-up batch"]  # warm-up ran first
        assert predict(server, {"texts": ["x"]}).status_code == 200


def test_failed_load_reports_not_ready() -> None:
    def broken() -> StubClassifier:
        raise FileNotFoundError("no weights here")

    failures: list[BaseException] = []
    with ThreadedServer(create_app(broken, on_fatal=failures.append)) as server:
        for _ in range(500):
            if failures:
                break
            threading.Event().wait(0.01)
        ready = httpx.get(f"{server.url}/health/ready")
        assert ready.status_code == 503
        assert ready.json() == {"status": "failed", "detail": "FileNotFoundError: no weights here"}
    assert isinstance(failures[0], FileNotFoundError)


MALFORMED: list[tuple[object, str]] = [
    ({"texts": []}, "texts"),
    ({"texts": ["ok", 3]}, "texts[1]"),
    ({"texts": [None]}, "texts[0]"),
    ({"texts": ["x"] * (MAX_TEXTS + 1)}, "texts"),
    ({"texts": ["ok", "y" * (MAX_TEXT_CHARS + 1)]}, "texts[1]"),
    ({"texts": "not a list"}, "texts"),
    ({}, "texts"),
    ({"texts": ["x"], "extra": 1}, "extra"),
    (["x"], "body"),
]


@pytest.mark.parametrize(("body", "field"), MALFORMED)
def test_422_names_the_field(serve_model: ServerFactory, body: object, field: str) -> None:
    server = serve_model(StubClassifier())
    response = predict(server, body)
    assert response.status_code == 422
    assert response.json()["field"] == field
    assert field.split("[")[0] in response.json()["detail"] or field == "body"


def test_limits_at_the_edge_are_accepted(serve_model: ServerFactory) -> None:
    server = serve_model(StubClassifier(), max_batch_size=16)
    texts = ["g" * MAX_TEXT_CHARS] + ["b"] * (MAX_TEXTS - 1)
    response = predict(server, {"texts": texts})
    assert response.status_code == 200
    labels = [p["label"] for p in response.json()["predictions"]]
    assert labels == ["positive"] + ["negative"] * (MAX_TEXTS - 1)


def test_invalid_json_and_oversized_bodies(serve_model: ServerFactory) -> None:
    server = serve_model(StubClassifier())
    url = f"{server.url}/v1/predict"
    bad = httpx.post(url, content=b"{not json", headers={"content-type": "application/json"})
    assert bad.status_code == 422 and bad.json()["field"] == "body"
    json_type = {"content-type": "application/json"}
    surrogate = httpx.post(url, content=b'{"texts": ["ok", "a\\ud800b"]}', headers=json_type)
    assert surrogate.status_code == 422 and surrogate.json()["field"] == "texts[1]"
    # RecursionError inside json.loads
    deep = httpx.post(url, content=b"[" * 200_000, headers=json_type)
    assert deep.status_code == 422 and deep.json()["field"] == "body"
    big = json.dumps({"texts": ["x" * 9000] * 120}).encode()  # > 1 MiB
    assert len(big) > 1 << 20
    assert httpx.post(url, content=big, headers=json_type).status_code == 413

    def chunks() -> object:  # no Content-Length: counted while streaming
        for _ in range(20):
            yield b"x" * 65536

    streamed = httpx.post(url, content=chunks(), headers=json_type)  # type: ignore[arg-type]
    assert streamed.status_code == 413
    assert predict(server, {"texts": ["b"]}).status_code == 200


def test_api_key(serve_model: ServerFactory) -> None:
    server = serve_model(StubClassifier(), api_key="s3cret")
    assert predict(server, {"texts": ["b"]}).status_code == 401
    wrong = predict(server, {"texts": ["b"]}, headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 401 and wrong.headers["www-authenticate"] == "Bearer"
    assert httpx.get(f"{server.url}/v1/model").status_code == 401
    ok = predict(server, {"texts": ["b"]}, headers={"Authorization": "Bearer s3cret"})
    assert ok.status_code == 200
    assert httpx.get(f"{server.url}/health/ready").status_code == 200


def test_api_key_beyond_ascii(serve_model: ServerFactory) -> None:
    server = serve_model(StubClassifier(), api_key="clé-secrète")
    ok = predict(server, {"texts": ["b"]}, headers={"Authorization": "Bearer clé-secrète".encode()})
    assert ok.status_code == 200
    wrong = predict(server, {"texts": ["b"]}, headers={"Authorization": "Bearer clé".encode()})
    assert wrong.status_code == 401


def test_thousand_malformed_requests_leave_server_healthy(serve_model: ServerFactory) -> None:
    server = serve_model(StubClassifier())
    statuses: dict[int, int] = {}
    with httpx.Client(base_url=server.url, timeout=30) as client:
        for i in range(1000):
            kind = i % 4
            if kind == 0:
                response = client.post(
                    "/v1/predict",
                    content=b"\xff\xfe{[",
                    headers={"content-type": "application/json"},
                )
            elif kind == 1:
                body, _ = MALFORMED[i % len(MALFORMED)]
                response = client.post("/v1/predict", json=body)
            elif kind == 2:
                response = client.post("/v1/predict", json={"texts": [i]})
            else:
                response = client.get("/v1/predict")  # wrong method
            statuses[response.status_code] = statuses.get(response.status_code, 0) + 1
        assert statuses == {422: 750, 405: 250}
        assert client.get("/health/ready").status_code == 200
        good = client.post("/v1/predict", json={"texts": ["bbb", "ggg"]})
        assert [p["label"] for p in good.json()["predictions"]] == ["negative", "positive"]
        metrics = client.get("/metrics").text
    assert (
        'gradfence_http_requests_total{method="POST",route="/v1/predict",status="422"} 750.0'
        in (metrics)
    )


def test_queue_full_burst_every_accepted_request_answered(serve_model: ServerFactory) -> None:
    model = StubClassifier()
    server = serve_model(model, max_batch_size=4, max_queue=8, max_wait_ms=1)
    model.gate.clear()  # the inference thread stalls on its next batch
    texts = [f"{'b' * (i % 3)}{'g' * (i % 2)} {i}" for i in range(60)]

    async def burst() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:
            tasks = [
                asyncio.create_task(client.post("/v1/predict", json={"texts": [t]})) for t in texts
            ]
            done, _ = await asyncio.wait(tasks, timeout=3)
            # the rejected ones come back while the model is stalled
            assert done and all(t.result().status_code == 503 for t in done)
            model.gate.set()
            return await asyncio.gather(*tasks)

    responses = asyncio.run(burst())
    codes = [r.status_code for r in responses]
    assert set(codes) == {200, 503}
    assert codes.count(200) >= 8  # the queue's worth, plus the stalled batch
    for text, response in zip(texts, responses, strict=True):
        if response.status_code == 503:
            assert response.headers["retry-after"] == "1"
            assert "busy" in response.json()["detail"]
        else:
            assert response.json()["predictions"][0]["label"] == stub_label(text)
    assert httpx.get(f"{server.url}/health/ready").status_code == 200


def test_request_timeout_is_504_and_server_recovers(serve_model: ServerFactory) -> None:
    model = StubClassifier()
    server = serve_model(model, request_timeout_s=0.3, workers=1)  # one worker to stall
    model.gate.clear()
    response = predict(server, {"texts": ["bbb"]})
    assert response.status_code == 504
    assert "0.3 s" in response.json()["detail"]
    assert httpx.get(f"{server.url}/v1/model").status_code == 504  # thread busy
    model.gate.set()
    again = predict(server, {"texts": ["ggg"]})
    assert again.status_code == 200
    assert again.json()["predictions"][0]["label"] == "positive"


def test_broken_model_gives_500_not_a_hang(serve_model: ServerFactory) -> None:
    def load() -> StubClassifier:
        model = StubClassifier(rows_delta=0)
        return model

    model = load()
    server = serve_model(model)
    model.rows_delta = -1  # from now on one row short
    response = predict(server, {"texts": ["a", "b", "c"]})
    assert response.status_code == 500
    assert response.json()["detail"] == "inference failed: BatchMismatchError"
    model.rows_delta = 0
    assert predict(server, {"texts": ["b"]}).status_code == 200


class _MiscountingStub(StubClassifier):
    """A model whose token count has a bug: the predict path fails outside the model."""

    def estimate_tokens(self, texts: Sequence[str]) -> int:
        raise RuntimeError("a bug in estimate_tokens")


def test_a_bug_in_the_predict_path_is_a_json_500_with_the_edge_headers(
    serve_model: ServerFactory, caplog: pytest.LogCaptureFixture
) -> None:
    server = serve_model(_MiscountingStub())
    with caplog.at_level(logging.ERROR, logger="gradfence.serve"):
        response = predict(server, {"texts": ["b"]})
    assert response.status_code == 500
    assert response.json() == {"detail": "internal error"}
    assert response.headers["x-content-type-options"] == "nosniff"
    assert response.headers["cache-control"] == "no-store"
    assert 'route="/v1/predict",status="500"} 1.0' in metrics_text(server)
    assert [r.getMessage() for r in caplog.records] == ["POST /v1/predict failed"]
    assert httpx.get(f"{server.url}/health/ready").status_code == 200


def test_metrics_exposes_the_documented_series(serve_model: ServerFactory) -> None:
    server = serve_model(StubClassifier())
    predict(server, {"texts": ["b", "g"]})
    text = httpx.get(f"{server.url}/metrics").text
    for name in (
        "gradfence_http_requests_total",
        "gradfence_http_request_duration_seconds_bucket",
        "gradfence_queue_depth",
        "gradfence_batch_size_bucket",
        "gradfence_texts_total",
    ):
        assert name in text
    # values, not only names: one request of two texts, run as one batch of two
    for line in (
        'gradfence_http_requests_total{method="POST",route="/v1/predict",status="200"} 1.0',
        'gradfence_http_request_duration_seconds_count{method="POST",route="/v1/predict",'
        'status="200"} 1.0',
        'gradfence_batch_size_bucket{le="1.0"} 0.0',
        'gradfence_batch_size_bucket{le="2.0"} 1.0',
        "gradfence_batch_size_count 1.0",
        "gradfence_texts_total 2.0",
        "gradfence_queue_depth 0.0",
    ):
        assert line in text.splitlines(), line
    # a counter, not a precomputed rate: Prometheus' rate() computes texts/s from it
    assert "gradfence_texts_per_second" not in text
    assert "# TYPE gradfence_texts_total counter" in text
    assert httpx.get(f"{server.url}/nope").status_code == 404
    assert 'route="other"' in httpx.get(f"{server.url}/metrics").text


def test_one_debug_log_line_per_request(
    serve_model: ServerFactory, caplog: pytest.LogCaptureFixture
) -> None:
    server = serve_model(StubClassifier())
    with caplog.at_level(logging.DEBUG, logger="gradfence.serve"):
        predict(server, {"texts": ["b"]})
        predict(server, {"texts": []})
    lines = [r.getMessage() for r in caplog.records if r.name == "gradfence.serve"]
    assert [line.rsplit(" ", 1)[0] for line in lines] == [
        "POST /v1/predict 200",
        "POST /v1/predict 422",
    ]


def test_body_that_never_arrives_is_408_and_an_abandoned_one_not_a_500(
    serve_model: ServerFactory,
) -> None:
    """A client sending less than its Content-Length cannot hold a request (nor a
    graceful shutdown) forever; one closing the connection mid-body is no server error."""
    server = serve_model(StubClassifier(), request_timeout_s=1.0)
    head = (
        b"POST /v1/predict HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
        b"Content-Length: 1000\r\n\r\n"
    )
    partial = head + b'{"texts": ["b"'
    with socket.create_connection(("127.0.0.1", server.port), timeout=20) as sock:
        sock.sendall(partial)
        answer = sock.recv(4096)
    assert answer.startswith(b"HTTP/1.1 408 ")
    assert b"the body did not arrive within 1 s" in answer
    with socket.create_connection(("127.0.0.1", server.port), timeout=20) as sock:
        sock.sendall(partial)  # and goes away
    deadline = time.monotonic() + 20
    while 'route="/v1/predict",status="499"' not in (text := metrics_text(server)):
        assert time.monotonic() < deadline, text
        time.sleep(0.02)
    assert 'status="500"' not in text
    assert predict(server, {"texts": ["g"]}).json()["predictions"][0]["label"] == "positive"


def metrics_text(server: ThreadedServer) -> str:
    return httpx.get(f"{server.url}/metrics", timeout=10).text


def test_request_larger_than_the_whole_queue_is_422_not_a_503_to_retry(
    serve_model: ServerFactory,
) -> None:
    server = serve_model(StubClassifier(), max_queue=2)
    response = predict(server, {"texts": ["b", "g", "b"]})
    assert response.status_code == 422 and "retry-after" not in response.headers
    assert response.json()["field"] == "texts"
    assert "queues at most 2 texts" in response.json()["detail"]
    assert [p["label"] for p in predict(server, {"texts": ["b", "g"]}).json()["predictions"]] == [
        "negative",
        "positive",
    ]


def test_nan_scores_are_an_error_for_that_request_only(serve_model: ServerFactory) -> None:
    class NanForSome(StubClassifier):
        def forward(self, texts: Sequence[str]) -> torch.Tensor:
            out = super().forward(texts)
            return torch.where(
                torch.tensor([t == "nan" for t in texts]).unsqueeze(1), torch.nan, out
            )

    model = NanForSome()
    server = serve_model(model, max_wait_ms=200)  # both requests share a batch

    async def both() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
            return await asyncio.gather(
                client.post("/v1/predict", json={"texts": ["g", "nan"]}),
                client.post("/v1/predict", json={"texts": ["bb"]}),
            )

    bad, good = asyncio.run(both())
    assert bad.status_code == 500
    assert bad.json() == {"detail": "inference failed: NonFiniteScoresError"}
    assert good.json()["predictions"][0]["label"] == "negative"


def test_client_leaving_while_queued_takes_its_texts_out(serve_model: ServerFactory) -> None:
    model = StubClassifier()
    server = serve_model(model, max_wait_ms=0, workers=1)  # one worker to stall
    model.gate.clear()  # the next batch stalls in the model
    with pytest.raises(httpx.TimeoutException):
        predict(server, {"texts": ["held"]}, timeout=0.3)  # its batch runs: stays
    with pytest.raises(httpx.TimeoutException):
        predict(server, {"texts": ["abandoned", "too"]}, timeout=0.3)  # queued: leaves
    deadline = time.monotonic() + 20
    while metrics_text(server).count('route="/v1/predict",status="499"') == 0 or (
        "gradfence_queue_depth 0.0" not in metrics_text(server)
    ):
        assert time.monotonic() < deadline, metrics_text(server)
        time.sleep(0.02)
    model.gate.set()
    assert predict(server, {"texts": ["g"]}).json()["predictions"][0]["label"] == "positive"
    assert ["abandoned", "too"] not in model.batches and ["held"] in model.batches
    text = metrics_text(server)
    assert 'route="/v1/predict",status="499"} 2.0' in text and 'status="500"' not in text
