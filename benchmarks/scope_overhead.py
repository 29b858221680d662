"""What does ``gf.inference(model)`` cost, next to the hand-written pattern it replaces?

Measured side by side in one run (interleaved samples, medians), on
(a) a 3-layer MLP and (b) a ~180-module tree of 36 Conv-BN-ReLU-Dropout blocks:

* scope alone:    ``with gf.inference(model): pass``
  vs hand-written ``model.eval(); with torch.no_grad(): pass; model.train()``
* with a forward: the same around a batch-1 forward pass.

Run: ``.venv/bin/python benchmarks/scope_overhead.py`` (``--quick`` for a smoke run).
Targets for (b): scope alone <= 0.3x the hand-written flip; with the forward <= 1.02x.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

import gradfence as gf


def mlp() -> tuple[nn.Module, torch.Tensor]:
    model = nn.Sequential(
        nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 10)
    )
    return model, torch.randn(1, 64)


def conv_tree() -> tuple[nn.Module, torch.Tensor]:
    blocks = [
        nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Dropout(0.1))
        for _ in range(36)
    ]
    return nn.Sequential(*blocks), torch.randn(1, 8, 16, 16)


def per_call_us(fn: Callable[[], None], inner: int) -> float:
    start = time.perf_counter_ns()
    for _ in range(inner):
        fn()
    return (time.perf_counter_ns() - start) / inner / 1e3


def compare(
    label: str, hand: Callable[[], None], scoped: Callable[[], None], samples: int, inner: int
) -> float:
    for _ in range(max(inner // 4, 1)):  # warm-up
        hand()
        scoped()
    hand_us: list[float] = []
    scoped_us: list[float] = []
    for _ in range(samples):  # interleaved, so drift on a shared machine hits both alike
        hand_us.append(per_call_us(hand, inner))
        scoped_us.append(per_call_us(scoped, inner))
    h, s = statistics.median(hand_us), statistics.median(scoped_us)
    ratio = s / h
    print(f"  {label:<22} hand-written {h:9.1f} us   gf.inference {s:9.1f} us   ratio {ratio:.3f}")
    return ratio


def run(name: str, build: Callable[[], tuple[nn.Module, torch.Tensor]], quick: bool) -> None:
    model, x = build()
    model.train()
    count = sum(1 for _ in model.modules())
    print(f"{name} ({count} modules)")
    samples, inner = (5, 20) if quick else (25, 200)

    def hand_flip() -> None:
        model.eval()
        with torch.no_grad():
            pass
        model.train()

    def scoped_flip() -> None:
        with gf.inference(model):
            pass

    def hand_forward() -> None:
        model.eval()
        with torch.no_grad():
            model(x)
        model.train()

    def scoped_forward() -> None:
        with gf.inference(model):
            model(x)

    compare("scope alone", hand_flip, scoped_flip, samples, inner)
    compare("around batch-1 forward", hand_forward, scoped_forward, samples, max(inner // 5, 4))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="few samples: a smoke run")
    args = parser.parse_args()
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"{platform.processor() or platform.machine()}, Python {platform.python_version()}"
    )
    run("(a) 3-layer MLP", mlp, args.quick)
    run("(b) 36 Conv-BN-ReLU-Dropout blocks", conv_tree, args.quick)


if __name__ == "__main__":
    main()
