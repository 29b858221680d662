"""Fixtures for the service tests: a tiny random BERT checkpoint, stub models, a server."""

from __future__ import annotations

import os
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
import uvicorn
from torch import Tensor, nn

from gradfence.serve.app import ServeSettings, create_app
from gradfence.serve.batcher import Batcher
from gradfence.serve.model import TextClassifier
from gradfence.serve.server import uvicorn_config

LABELS = ("negative", "neutral", "positive")
WORDS = ["good", "bad", "great", "awful", "day", "the", "movie", "was", "not", "very"]


@pytest.fixture(scope="session", autouse=True)
def export_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """ONNX exports (``--runtime auto``, the default, makes them) go to a temporary
    directory, for the servers the tests start as subprocesses too: never the user's."""
    directory = tmp_path_factory.mktemp("gradfence-cache")
    previous = os.environ.get("GRADFENCE_CACHE_DIR")
    os.environ["GRADFENCE_CACHE_DIR"] = str(directory)
    yield directory
    if previous is None:
        del os.environ["GRADFENCE_CACHE_DIR"]
    else:
        os.environ["GRADFENCE_CACHE_DIR"] = previous


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A randomly initialised 1-layer BERT classifier + tokenizer, saved as safetensors."""
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast

    directory = tmp_path_factory.mktemp("tiny-bert")
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    vocab = specials + letters + [f"##{c}" for c in letters] + WORDS
    (directory / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tokenizer = BertTokenizerFast(vocab_file=str(directory / "vocab.txt"))
    config = BertConfig(
        vocab_size=len(vocab),
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=64,
        num_labels=3,
        id2label=dict(enumerate(LABELS)),
        label2id={label: i for i, label in enumerate(LABELS)},
    )
    torch.manual_seed(0)
    model = BertForSequenceClassification(config)  # from config: in train mode
    assert model.training
    model.save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)
    return directory


class StubClassifier(TextClassifier):
    """Deterministic scores from character counts; records what its forward saw.

    ``gate``: forward waits for it (to hold batches back); ``rows_delta``: return that
    many rows more or fewer than texts (a broken model).
    """

    def __init__(self, rows_delta: int = 0) -> None:
        super().__init__()
        self.linear = nn.Linear(3, 3)
        self.dropout = nn.Dropout(0.5)
        with torch.no_grad():
            self.linear.weight.copy_(torch.eye(3))
            self.linear.bias.zero_()
        self.labels = LABELS
        self.model_id = "stub"
        self.rows_delta = rows_delta
        self.gate = threading.Event()
        self.gate.set()
        self.batches: list[list[str]] = []
        self.seen: list[dict[str, Any]] = []
        self.train()  # as a freshly built module would be

    def forward(self, texts: Sequence[str]) -> Tensor:
        self.gate.wait(30)
        self.batches.append(list(texts))
        self.seen.append(
            {
                "grad": torch.is_grad_enabled(),
                "training": self.training,
                "thread": threading.current_thread().name,
            }
        )
        features = torch.tensor([stub_features(t) for t in texts], dtype=torch.float32)
        out: Tensor = self.linear(self.dropout(features))
        n = len(texts) + self.rows_delta
        return out[:n] if self.rows_delta <= 0 else torch.cat([out, out[: self.rows_delta]])


def stub_features(text: str) -> list[float]:
    return [float(text.count("b")), float(text.count(" ")), float(text.count("g"))]


def stub_label(text: str) -> str:
    features = stub_features(text)
    return LABELS[max(range(3), key=features.__getitem__)]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class ThreadedServer:
    """The app on uvicorn in a background thread, bound to 127.0.0.1 on a free port."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        # the service's own HTTP edge (h11, head limits, connection cap)
        settings = app.state.service.settings
        config = uvicorn_config(
            app, settings, host="127.0.0.1", port=self.port, log_level="warning"
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> ThreadedServer:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("test server did not start")
            time.sleep(0.01)
        return self

    def wait_ready(self, timeout_s: float = 60) -> None:
        deadline = time.monotonic() + timeout_s
        while httpx.get(f"{self.url}/health/ready").status_code != 200:
            if time.monotonic() > deadline:
                raise RuntimeError("model did not get ready")
            time.sleep(0.02)

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(30)
        assert not self.thread.is_alive()


def wait_process_ready(url: str, process: subprocess.Popen[bytes], timeout_s: float = 180) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert process.poll() is None, f"server exited with {process.returncode}"
        try:
            if httpx.get(f"{url}/health/ready", timeout=5).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise AssertionError("server did not get ready")


ServerFactory = Callable[..., ThreadedServer]


def started(model: StubClassifier, **options: Any) -> Batcher:
    """A batcher of ``model`` with its workers running (no warm-up batch)."""
    batcher = Batcher(model, **options)
    batcher.start(warmup=[])
    return batcher


@pytest.fixture
def serve_model() -> Iterator[ServerFactory]:
    """``serve_model(model_or_loader, **settings)`` -> a started, ready ThreadedServer.

    One model worker unless a test asks for more (``workers=2``): tests that stall the
    model hold its only worker, whatever the cores of the machine running them.
    """
    servers: list[ThreadedServer] = []

    def start(
        model: TextClassifier | Callable[[], TextClassifier], **settings: Any
    ) -> ThreadedServer:
        load = model if not isinstance(model, nn.Module) else (lambda: model)
        settings.setdefault("workers", 1)
        server = ThreadedServer(create_app(load, ServeSettings(**settings)))
        servers.append(server.__enter__())
        server.wait_ready(180)  # worker processes import torch first: slow on a busy machine
        return server

    yield start
    for server in servers:
        server.__exit__()


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Run the Ray test (slow start on 2 cores) after every other test."""
    items.sort(key=lambda item: item.path.name == "test_ray.py")


def read_all(sock: socket.socket) -> bytes:
    """Everything the server sends on ``sock`` until it closes the connection (or resets it,
    or the socket times out): an answer may arrive in several packets."""
    chunks = []
    try:
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    except (ConnectionResetError, TimeoutError):
        pass
    return b"".join(chunks)
