"""Overhead of ``gf.audit`` on the forward of a small model, measured side by side.

Run: ``.venv/bin/python benchmarks/audit_overhead.py [--rounds 15] [--iters 200]``

Variants, interleaved round by round so that machine noise hits all of them alike:

* ``plain``        forward under ``torch.no_grad()`` in eval mode, no audit;
* ``audit``        the same forward inside an open ``gf.audit(model)`` (hooks + op watch);
* ``audit-strict`` the same inside ``gf.audit(model, strict=True)`` (same hooks: strict
  only adds work at entry and exit);
* ``enter+exit``   one whole ``with gf.audit(model):`` block around a single forward
  (default and strict), i.e. what a per-batch audit costs.

Prints the median time per forward (microseconds) and the ratio to ``plain``.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

import gradfence as gf


def small_model() -> nn.Module:
    return nn.Sequential(
        nn.Linear(64, 128),
        nn.BatchNorm1d(128),
        nn.ReLU(),
        nn.Dropout(0.1),
        nn.Linear(128, 128),
        nn.ReLU(),
        nn.Dropout(0.1),
        nn.Linear(128, 10),
    ).eval()


def time_per_call(fn: Callable[[], object], iters: int) -> float:
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    return (time.perf_counter() - start) / iters * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--iters", type=int, default=200)
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(1)
    model = small_model()
    x = torch.randn(32, 64)

    def forward() -> object:
        return model(x)

    def audited(strict: bool) -> Callable[[], object]:
        def run() -> object:
            with gf.audit(model, strict=strict):
                return model(x)

        return run

    samples: dict[str, list[float]] = {
        name: []
        for name in ("plain", "audit", "audit-strict", "enter+exit", "enter+exit strict")
    }
    with torch.no_grad():
        for _ in range(3):  # warm-up
            forward()
        for _ in range(args.rounds):
            samples["plain"].append(time_per_call(forward, args.iters))
            with gf.audit(model):
                samples["audit"].append(time_per_call(forward, args.iters))
            with gf.audit(model, strict=True):
                samples["audit-strict"].append(time_per_call(forward, args.iters))
            samples["enter+exit"].append(time_per_call(audited(False), args.iters))
            samples["enter+exit strict"].append(time_per_call(audited(True), args.iters))

    base = statistics.median(samples["plain"])
    print(
        f"torch {torch.__version__}, 1 intra-op thread, batch 32, {args.rounds} rounds x "
        f"{args.iters} forwards, {sum(p.numel() for p in model.parameters())} parameters"
    )
    print(f"{'variant':<20}{'median us/forward':>20}{'ratio':>8}")
    for name, values in samples.items():
        median = statistics.median(values)
        print(f"{name:<20}{median:>20.1f}{median / base:>8.2f}")


if __name__ == "__main__":
    main()
