"""Token-budget batches from a length-sorted window of the queue, texts tokenized once."""

from __future__ import annotations

import itertools
import math
import random
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from gradfence.serve.batcher import Batcher, plan_batch
from gradfence.serve.model import EncodedText, load_model_dir

from .conftest import StubClassifier, stub_label


def test_plan_batch_keeps_the_oldest_and_stays_within_the_budget() -> None:
    rng = random.Random(20261202)
    for _ in range(500):
        tokens = [rng.choice([3, 12, 30, 31, 60, 200, 256]) for _ in range(rng.randint(1, 80))]
        max_texts, max_tokens = rng.randint(1, 32), rng.choice([64, 256, 1024, 2048])
        chosen = plan_batch(tokens, max_texts, max_tokens)
        assert chosen[0] == 0 and chosen == sorted(set(chosen))  # the oldest, queue order
        assert len(chosen) <= max_texts
        padded = len(chosen) * max(tokens[i] for i in chosen)
        assert padded <= max_tokens or len(chosen) == 1


def test_plan_batch_groups_texts_of_similar_length() -> None:
    # oldest 30 tokens; window of short, middle and long tweets
    tokens = [30, 12, 60, 14, 31, 13, 58, 29, 11, 64, 28, 15]
    chosen = plan_batch(tokens, max_texts=4, max_tokens=4096)
    assert chosen == [0, 4, 7, 10]  # the 28-31 token texts, not the first four queued
    assert plan_batch([7] * 40, max_texts=32, max_tokens=4096) == list(range(32))
    assert plan_batch([300, 5, 5], max_texts=32, max_tokens=256) == [0]  # too long: alone


def _cost(runs: Sequence[Sequence[int]], overhead: float) -> float:
    return sum(overhead + len(run) * max(run) for run in runs)


def _least_cost(tokens: list[int], max_texts: int, max_tokens: int, overhead: float) -> float:
    """Every way to cut the sorted token counts into runs, by brute force."""
    ordered = sorted(tokens)
    best = math.inf
    for cuts in itertools.product((False, True), repeat=len(ordered) - 1):
        runs, run = [], [ordered[0]]
        for cut, length in zip(cuts, ordered[1:], strict=True):
            if cut:
                runs.append(run)
                run = []
            run.append(length)
        runs.append(run)
        if all(
            len(r) <= max_texts and (len(r) == 1 or len(r) * max(r) <= max_tokens) for r in runs
        ):
            best = min(best, _cost(runs, overhead))
    return best


def test_plan_batch_cuts_the_queue_into_the_cheapest_batches() -> None:
    rng = random.Random(2)
    for _ in range(300):
        tokens = [rng.choice([3, 9, 12, 30, 31, 60, 120]) for _ in range(rng.randint(1, 8))]
        max_texts, max_tokens = rng.randint(1, 6), rng.choice([64, 256, 2048])
        overhead = rng.choice([0, 8, 32, 500])
        queue, runs = list(tokens), []
        while queue:  # what the workers take, one batch after the other
            chosen = plan_batch(queue, max_texts, max_tokens, overhead)
            runs.append([queue[i] for i in chosen])
            queue = [t for i, t in enumerate(queue) if i not in set(chosen)]
        assert _cost(runs, overhead) == _least_cost(tokens, max_texts, max_tokens, overhead)


def test_a_long_text_does_not_pad_a_batch_of_short_ones() -> None:
    tokens = [12, 14, 11, 13, 160, 12, 15, 13]
    assert plan_batch(tokens, max_texts=32, max_tokens=2048) == [0, 1, 2, 3, 5, 6, 7]
    assert plan_batch(tokens[4:] + tokens[:4], max_texts=32, max_tokens=2048) == [0]
    # where a batch costs much more than its tokens, one batch is cheapest
    assert plan_batch(tokens, 32, 2048, overhead=10_000) == list(range(8))


class TokenCounted(StubClassifier):
    """A stub whose token count is its number of words (+2 for the special tokens)."""

    def __init__(self) -> None:
        super().__init__()
        self.encoded: list[list[str]] = []

    def encode(self, texts: Sequence[str]) -> list[EncodedText]:
        self.encoded.append(list(texts))
        return [EncodedText(t, len(t.split()) + 2) for t in texts]


def test_batches_respect_the_token_budget_and_answers_keep_their_order() -> None:
    model = TokenCounted()
    batcher = Batcher(model, max_batch_size=8, max_batch_tokens=40, max_wait_ms=10_000)
    batcher.start(warmup=[])
    rng = random.Random(7)
    model.gate.clear()
    held = batcher.submit(["b"])  # the worker takes it and waits on the gate
    while batcher.queue_depth:
        time.sleep(0.001)
    requests = [
        [" ".join(rng.choice(["good", "bad", "bb", "gg", "day"]) for _ in range(n)) for n in ns]
        for ns in ([1, 9, 3], [17, 2, 2, 8, 1], [4] * 6, [1, 30, 5])
    ]
    futures = [batcher.submit(texts) for texts in requests]
    assert batcher.queued_tokens == sum(len(t.split()) + 2 for r in requests for t in r)
    model.gate.set()
    for texts, future in zip(requests, futures, strict=True):
        assert [p.label for p in future.result(30)] == [stub_label(t) for t in texts]
    assert held.result(30)[0].label == "negative"
    batcher.stop()
    for batch in model.batches[1:]:
        longest = max(len(t.split()) + 2 for t in batch)
        assert len(batch) <= 8
        assert len(batch) * longest <= 40 or len(batch) == 1
    assert sorted(t for b in model.batches[1:] for t in b) == sorted(t for r in requests for t in r)
    # one tokenizer call per request, in the caller's thread, none by the worker
    assert model.encoded == [["b"], *requests]
    assert batcher.queued_tokens == 0


def test_a_text_of_the_tiny_checkpoint_is_tokenized_once(tiny_model_dir: Path) -> None:
    model = load_model_dir(tiny_model_dir)
    calls: list[list[str]] = []
    tokenizer = model.tokenizer

    class Counting:
        pad_token_id = tokenizer.pad_token_id
        padding_side = tokenizer.padding_side

        def __call__(self, texts: list[str], **kwargs: Any) -> Any:
            calls.append(list(texts))
            return tokenizer(texts, **kwargs)

    model.tokenizer = Counting()
    batcher = Batcher(model, max_batch_size=4, max_wait_ms=1)
    batcher.start(warmup=["warm up"])
    texts = ["good day", "the movie was not very good", "bad", "awful awful day"] * 3
    predictions = batcher.submit(texts).result(30)
    batcher.stop()
    assert calls == [["warm up"], texts]
    import gradfence as gf

    with gf.inference(model):
        direct = model(texts).softmax(-1).tolist()
    for prediction, row in zip(predictions, direct, strict=True):
        assert list(prediction.scores.values()) == pytest.approx(row, abs=1e-6)
