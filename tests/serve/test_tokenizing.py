"""Tokenizing on the server's event loop: the tokenizer's Rust backend called directly,
only where it gives the ids the ``transformers`` wrapper gives."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from gradfence.serve.data import load_tweets
from gradfence.serve.model import (
    TokenizedClassifier,
    direct_tokenizer,
    load_default,
    load_model_dir,
)

ODD_TEXTS = [
    "",
    "   ",
    "UPPER lower MiXeD",
    "e\u0301 (a combining accent) and \ufb01 ligatures, \uff26\uff35\uff2c\uff2c width",
    "tabs\tand\nnew lines\r\n",
    "😀😀😀 🇫🇷 ñandú 東京タワー",
    "x" * 3000,
    "many words " * 400,
]


def wrapper_ids(model: TokenizedClassifier, texts: list[str]) -> list[list[int]]:
    encoded = model.tokenizer(texts, truncation=True, max_length=model.max_tokens)
    return [list(ids) for ids in encoded["input_ids"]]


def test_default_model_tokenizes_as_its_wrapper_does() -> None:
    model = load_default()
    texts = [tweet.text for tweet in load_tweets()[:3000]] + ODD_TEXTS
    assert model._direct_tokenizer() is not None  # the backend is called directly
    encoded = model.encode(texts)
    assert [item.ids for item in encoded] == wrapper_ids(model, texts)
    assert [item.tokens for item in encoded] == [len(ids) for ids in wrapper_ids(model, texts)]
    assert max(item.tokens for item in encoded) == model.max_tokens  # truncated there


def test_checkpoint_tokenizer_direct_and_truncated_at_its_positions(
    tiny_model_dir: Path,
) -> None:
    model = load_model_dir(tiny_model_dir)  # 64 positions: truncates at 64, not 256
    assert model.max_tokens == 64
    assert model._direct_tokenizer() is not None
    texts = ["good bad good", "bad " * 100, *ODD_TEXTS]
    encoded = model.encode(texts)
    assert [item.ids for item in encoded] == wrapper_ids(model, texts)
    assert encoded[1].tokens == 64


class _Shifted:
    """A tokenizer whose wrapper adds a step its backend does not know about."""

    def __init__(self, tokenizer: Any) -> None:
        self.inner = tokenizer
        self.backend_tokenizer = tokenizer.backend_tokenizer
        self.truncation_side = "right"
        self.pad_token_id = tokenizer.pad_token_id

    def __call__(self, texts: list[str], **options: Any) -> dict[str, Any]:
        encoded = self.inner(texts, **options)
        return {"input_ids": [[i + 1 for i in ids] for ids in encoded["input_ids"]]}


def test_wrapper_that_differs_from_its_backend_is_called_instead(tiny_model_dir: Path) -> None:
    model = load_model_dir(tiny_model_dir)
    shifted = _Shifted(model.tokenizer)
    assert direct_tokenizer(shifted, model.max_tokens) is None
    model.tokenizer = shifted  # a new tokenizer: the direct copy is checked again
    ids = model.encode(["good bad"])[0].ids
    assert ids is not None
    assert list(ids) == wrapper_ids(model, ["good bad"])[0]  # the wrapper's, shifted
    assert list(ids) != shifted.inner(["good bad"])["input_ids"][0]
    assert model._direct_tokenizer() is None


def test_slow_tokenizer_without_backend_is_called_as_it_is() -> None:
    class Slow:
        def __call__(self, texts: list[str], **options: Any) -> dict[str, Any]:
            return {"input_ids": [[1, len(text), 2] for text in texts]}

    assert direct_tokenizer(Slow(), 16) is None


def test_direct_tokenizer_is_safe_from_many_threads() -> None:
    model = load_default()
    texts = [tweet.text for tweet in load_tweets()[:400]]
    expected = [item.ids for item in model.encode(texts)]
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda i: [e.ids for e in model.encode(texts[i::8])], range(8)))
    for i, result in enumerate(results):
        assert result == expected[i::8]


def test_special_tokens_in_user_text_are_split_as_the_wrapper_splits_them(
    tiny_model_dir: Path,
) -> None:
    """``split_special_tokens`` is set on the backend by the wrapper at each call, not
    saved with it: a copy without it would turn a user's "[SEP]" into a real separator."""
    texts = ["good [SEP] bad [CLS] good", "[PAD][MASK] bad", "good"]
    for split in (False, True):
        model = load_model_dir(tiny_model_dir)
        model.tokenizer.split_special_tokens = split
        encoded = [item.ids for item in model.encode(texts)]
        assert model._direct_tokenizer() is not None
        assert encoded == wrapper_ids(model, texts)
        separators = encoded[0].count(model.tokenizer.sep_token_id)  # type: ignore[union-attr]
        assert separators == (1 if split else 2)  # the closing one, and the user's unless split
        model.tokenizer.split_special_tokens = not split  # changed: checked again
        assert [item.ids for item in model.encode(texts)] == wrapper_ids(model, texts)
