"""What does ``gf.evaluate`` cost, next to the hand-written evaluation loop it replaces?

Both run the same model on the same pre-built batches with the same work per batch
(forward, a torchmetrics accuracy update, a detached sample-weighted cross-entropy
sum) and the same work at the end (compute the accuracy, read the loss):

* hand-written: ``model.eval(); with torch.no_grad(): for x, y in batches: ...``,
  then ``model.train()`` (which, unlike gf.evaluate, clobbers the frozen BatchNorm);
* ``gf.evaluate(model, batches, {"acc": acc}, loss=F.cross_entropy, progress=False)``.

Batches are a Python list (no DataLoader) so that nothing but the two loops differs
and any per-batch overhead of gf.evaluate shows in full. The two are interleaved,
alternating which goes first, and the ratio is taken per pair; the median is printed,
for wall time and for the process's CPU time (with one torch thread, CPU time is the
steadier measure on a machine shared with other jobs).

Run: ``.venv/bin/python benchmarks/evaluate_overhead.py`` (``--quick`` for a smoke run).
Target: median ratio <= 1.03.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics.classification import MulticlassAccuracy

import gradfence as gf

Batches = list[tuple[torch.Tensor, torch.Tensor]]


def build(features: int, classes: int) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(features, 512),
        nn.BatchNorm1d(512),
        nn.ReLU(),
        nn.Dropout(0.2),
        nn.Linear(512, 512),
        nn.ReLU(),
        nn.Dropout(0.2),
        nn.Linear(512, classes),
    )
    model[1].eval()  # a frozen BatchNorm, as in fine-tuning
    return model


def hand_written(
    model: nn.Module, batches: Batches, acc: MulticlassAccuracy
) -> tuple[float, float]:
    model.eval()
    acc.reset()
    total = torch.zeros((), dtype=torch.float64)
    count = 0
    with torch.no_grad():
        for x, y in batches:
            out = model(x)
            acc.update(out, y)
            total += F.cross_entropy(out, y).double() * len(y)
            count += len(y)
    model.train()
    return float(acc.compute()), float(total) / count


def with_gradfence(
    model: nn.Module, batches: Batches, acc: MulticlassAccuracy
) -> tuple[float, float]:
    results = gf.evaluate(model, batches, {"acc": acc}, loss=F.cross_entropy, progress=False)
    return results["acc"], results["loss"]  # type: ignore[return-value]


def timed(fn: Callable[[], object]) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process) for one call."""
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=21, help="interleaved pairs (default 21)")
    parser.add_argument("--batches", type=int, default=40, help="batches per evaluation")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--features", type=int, default=256)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--quick", action="store_true", help="3 pairs of 5 batches")
    args = parser.parse_args()
    if args.quick:
        args.repeats, args.batches = 3, 5
    torch.set_num_threads(args.threads)

    classes = 10
    generator = torch.Generator().manual_seed(0)
    batches = [
        (
            torch.randn(args.batch_size, args.features, generator=generator),
            torch.randint(0, classes, (args.batch_size,), generator=generator),
        )
        for _ in range(args.batches)
    ]
    model = build(args.features, classes)
    acc = MulticlassAccuracy(num_classes=classes, average="micro")

    # Same numbers from both (the hand-written loop then leaves the BatchNorm training).
    reference = hand_written(build(args.features, classes), batches, acc)
    got = with_gradfence(model, batches, acc)
    assert abs(reference[0] - got[0]) < 1e-6 and abs(reference[1] - got[1]) < 1e-6, (
        reference,
        got,
    )

    def hand() -> object:
        result = hand_written(model, batches, acc)
        model[1].eval()  # put the frozen BN back, so both loops see the same model
        return result

    def scoped() -> object:
        return with_gradfence(model, batches, acc)

    for fn in (hand, scoped):  # warm-up
        fn()
    hand_times: list[tuple[float, float]] = []
    gf_times: list[tuple[float, float]] = []
    for i in range(args.repeats):
        if i % 2:
            t_gf, t_hand = timed(scoped), timed(hand)
        else:
            t_hand, t_gf = timed(hand), timed(scoped)
        hand_times.append(t_hand)
        gf_times.append(t_gf)

    print(
        f"torch {torch.__version__}, {platform.machine()}, {torch.get_num_threads()} thread(s); "
        f"{args.batches} batches of {args.batch_size}x{args.features}, {args.repeats} pairs"
    )
    for clock, k in (("wall", 0), ("cpu", 1)):
        hand_ms = statistics.median(t[k] for t in hand_times) * 1e3 / args.batches
        gf_ms = statistics.median(t[k] for t in gf_times) * 1e3 / args.batches
        ratio = statistics.median(g[k] / h[k] for g, h in zip(gf_times, hand_times, strict=True))
        print(
            f"{clock:>4} time per batch (median): hand-written {hand_ms:.3f} ms, "
            f"gf.evaluate {gf_ms:.3f} ms; median ratio {ratio:.3f} (target <= 1.03)"
        )


if __name__ == "__main__":
    main()
