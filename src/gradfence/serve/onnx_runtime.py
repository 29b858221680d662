"""``--runtime onnx``: the same weights run by ONNX Runtime (fp32), checked against torch.

The export is built from the loaded torch model on first use (token ids -> logits,
pooling and head included) and cached in the user's cache directory under the hash of
the weights, so a changed checkpoint never picks up a stale export. At start-up the
ONNX scores of a fixed set of texts are compared with torch's: more than
:data:`TOLERANCE` apart and loading fails, naming the file. Each worker thread gets its
own ONNX Runtime session with as many threads as torch gives that worker.

>>> from gradfence.serve.model import load_default
>>> model = load_onnx(load_default())  # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

import gradfence as gf
from gradfence.serve.model import TokenizedClassifier, pad_ids

log = logging.getLogger("gradfence.serve")

TOLERANCE = 1e-5  # largest difference of any probability between torch and ONNX Runtime
OPSET = 17
CACHE_ENV = "GRADFENCE_CACHE_DIR"
# texts of 3 to 77 MiniLM tokens, run as one padded batch: the check covers padding too
CHECK_TEXTS = (
    "ok",
    "The meeting is at 3pm.",
    "I love this phone, the battery lasts for days!",
    "Worst customer service ever. Two hours on hold and then they hung up on me.",
    "@airline thanks for nothing, my bag is in another country again #fail",
    "Not bad at all, though the screen could be brighter and the price is a bit high for "
    "what you get. Would I buy it again? Probably, if it were on sale, but I would look "
    "at the alternatives first. The camera is great in daylight and poor at night; the "
    "speaker is fine; the software updates have been regular so far, which I appreciate.",
)


class RuntimeMismatchError(RuntimeError):
    """ONNX Runtime's scores differ from torch's by more than :data:`TOLERANCE`."""


def cache_dir() -> Path:
    """Where exports are cached: ``$GRADFENCE_CACHE_DIR``, else the user cache directory."""
    explicit = os.environ.get(CACHE_ENV)
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "gradfence"


def weights_hash(module: nn.Module) -> str:
    """Hex SHA-256 of a module's parameters and buffers (names, dtypes, shapes, bytes)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        data = tensor.detach().cpu().contiguous()
        digest.update(f"{name}\0{data.dtype}\0{tuple(data.shape)}\0".encode())
        digest.update(data.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def export_path(model: TokenizedClassifier) -> Path:
    """The cache file of ``model``'s export: keyed by its weights, class and exporter."""
    key = hashlib.sha256(
        f"{weights_hash(model)}\0{type(model).__qualname__}\0{torch.__version__}\0{OPSET}".encode()
    ).hexdigest()
    return cache_dir() / "onnx" / f"{key[:32]}.onnx"


class _IdsToLogits(nn.Module):
    """What is exported: padded token ids and mask -> logits."""

    def __init__(self, model: TokenizedClassifier) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        return self.model.logits(input_ids, attention_mask)


def export_onnx(model: TokenizedClassifier, path: Path) -> None:
    """Export ``model`` (in eval mode, grad off) to ``path``, written atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    encoded = model.encode(["an example to trace", "two"])
    input_ids, attention_mask = pad_ids([item.ids or () for item in encoded], 0)
    partial = path.with_suffix(f".{os.getpid()}.{threading.get_ident()}.partial")
    axes = {0: "batch", 1: "tokens"}
    with gf.inference(model, mode="no_grad"), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tracer's notes on Python branches in the model
        torch.onnx.export(
            _IdsToLogits(model),
            (input_ids, attention_mask),
            str(partial),
            input_names=["input_ids", "attention_mask"],
            output_names=["logits"],
            dynamic_axes={"input_ids": axes, "attention_mask": axes, "logits": {0: "batch"}},
            opset_version=OPSET,
            dynamo=False,
        )
    partial.replace(path)


class OnnxClassifier(TokenizedClassifier):
    """A :class:`TokenizedClassifier` whose logits come from ONNX Runtime (fp32, CPU).

    It has no parameters; ``gf.inference`` around it still holds (nothing to switch).
    """

    runtime = "onnx"

    def __init__(self, source: TokenizedClassifier, path: Path) -> None:
        super().__init__()
        self.tokenizer = source.tokenizer
        self.labels = source.labels
        self.model_id = source.model_id
        self.max_tokens = source.max_tokens
        self.path = path
        self._sessions = threading.local()

    def _device(self) -> torch.device:
        return torch.device("cpu")

    def _session(self) -> Any:
        session = getattr(self._sessions, "session", None)
        if session is None:
            import onnxruntime  # type: ignore[import-untyped]

            options = onnxruntime.SessionOptions()
            options.intra_op_num_threads = torch.get_num_threads()  # the worker's share
            options.inter_op_num_threads = 1
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
            session = onnxruntime.InferenceSession(
                str(self.path), options, providers=["CPUExecutionProvider"]
            )
            self._sessions.session = session
        return session

    def logits(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """ONNX Runtime's logits for padded token ids, one row per text."""
        feed = {"input_ids": input_ids.numpy(), "attention_mask": attention_mask.numpy()}
        (out,) = self._session().run(["logits"], feed)
        return torch.from_numpy(out)


def max_difference(
    reference: TokenizedClassifier, candidate: TokenizedClassifier, texts: Sequence[str]
) -> float:
    """Largest difference of any probability between two models on ``texts``."""
    with gf.inference(reference), gf.inference(candidate):
        expected = reference(texts).float().softmax(-1)
        actual = candidate(texts).float().softmax(-1)
    return float((expected - actual).abs().max())


def load_onnx(model: TokenizedClassifier) -> OnnxClassifier:
    """``model`` run by ONNX Runtime: exported once per weights, checked against torch.

    Raises :class:`RuntimeMismatchError` when the scores differ by more than
    :data:`TOLERANCE` on :data:`CHECK_TEXTS`.
    """
    try:
        import onnxruntime  # noqa: F401
    except ImportError as exc:
        raise ImportError(
            "--runtime onnx needs onnxruntime: pip install 'gradfence[onnx]'", name=exc.name
        ) from exc
    path = export_path(model)
    if path.is_file():
        log.info("ONNX export of %s: %s (cached)", model.model_id, path)
    else:
        log.info("exporting %s to ONNX: %s", model.model_id, path)
        export_onnx(model, path)
    candidate = OnnxClassifier(model, path)
    difference = max_difference(model, candidate, CHECK_TEXTS)
    if not difference <= TOLERANCE:
        raise RuntimeMismatchError(
            f"--runtime onnx: scores differ from torch by {difference:.2g} (more than "
            f"{TOLERANCE:g}) with {path}; delete that file to export again, "
            "or use --runtime torch"
        )
    log.info("ONNX Runtime scores within %.1g of torch's", difference)
    return candidate
