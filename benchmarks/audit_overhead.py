"""Overhead of ``gf.audit`` on the forward of small models, measured side by side.

Run: ``.venv/bin/python benchmarks/audit_overhead.py [--rounds 41] [--iters 40]``

For each model, these variants are timed in turn within every round, in an order that
rotates from round to round (so that machine noise hits all of them alike), and the
median over rounds is reported:

* ``plain``              forward in eval mode under ``torch.no_grad()``, no audit;
* ``audit``              the same forward inside an open ``gf.audit(model)``;
* ``audit strict``       inside ``gf.audit(model, strict=True)`` (same hooks: strict
                         only adds work at entry and exit);
* ``audit no GFR005``    inside ``gf.audit(model, ignore=["GFR005"])`` (no op watch);
* ``enter+exit``         a whole ``with gf.audit(model):`` around one forward, i.e. what
                         auditing every batch separately costs (default, then strict).

Models (batch sizes in brackets):

* ``mlp-sequential`` [32]  ``nn.Sequential`` of Linear/BatchNorm/ReLU/Dropout (26k
  parameters): torch's own modules only, so the op watch never switches on;
* ``mlp-custom`` [32]      the same layers in a user-defined module whose ``forward``
  calls them: the op watch is on for the whole forward (the worst case: tiny ops);
* ``cnn-custom`` [16]      a small user-defined CNN on 3x32x32 images (conv, BatchNorm,
  dropout; 61k parameters), timed with a tenth of the iterations;
* ``bert-tiny`` [4x16]     a 2-layer Hugging Face ``BertModel`` (hidden size 32, SDPA
  attention, built from a config: no download) on 4 sequences of 16 token ids,
  timed with a quarter of the iterations. Skipped when transformers is not installed.

Prints, per model, the median microseconds of CPU time per forward (the process's CPU
time, one intra-op thread) and the ratio to ``plain``, and whether the audited forward
gives bit-identical outputs.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

import gradfence as gf


def mlp_layers() -> list[nn.Module]:
    return [
        nn.Linear(64, 128),
        nn.BatchNorm1d(128),
        nn.ReLU(),
        nn.Dropout(0.1),
        nn.Linear(128, 128),
        nn.ReLU(),
        nn.Dropout(0.1),
        nn.Linear(128, 10),
    ]


class CustomMLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.bn, _, self.drop1, self.fc2, _, self.drop2, self.fc3 = mlp_layers()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.drop1(F.relu(self.bn(self.fc1(x))))
        return self.fc3(self.drop2(F.relu(self.fc2(x))))


class SmallCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 32, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(32)
        self.conv2 = nn.Conv2d(32, 64, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(64)
        self.drop = nn.Dropout(0.2)
        self.head = nn.Linear(64 * 8 * 8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.bn1(self.conv1(x))), 2)
        x = F.max_pool2d(F.relu(self.bn2(self.conv2(x))), 2)
        return self.head(self.drop(x.flatten(1)))


def tiny_bert() -> nn.Module:
    from transformers import BertConfig, BertModel

    config = BertConfig(
        vocab_size=1000,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
        attn_implementation="sdpa",
    )
    return BertModel(config)


def random_input(shape: tuple[int, ...]) -> torch.Tensor:
    return torch.randn(*shape)


def token_ids(shape: tuple[int, ...]) -> torch.Tensor:
    return torch.randint(0, 1000, shape)


# name -> (builder, input maker, input shape, fraction of --iters)
MODELS: dict[
    str,
    tuple[
        Callable[[], nn.Module], Callable[[tuple[int, ...]], torch.Tensor], tuple[int, ...], float
    ],
] = {
    "mlp-sequential": (lambda: nn.Sequential(*mlp_layers()), random_input, (32, 64), 1.0),
    "mlp-custom": (CustomMLP, random_input, (32, 64), 1.0),
    "cnn-custom": (SmallCNN, random_input, (16, 3, 32, 32), 0.1),
    "bert-tiny": (tiny_bert, token_ids, (4, 16), 0.25),
}


def first_tensor(output: object) -> torch.Tensor:
    """The model's output tensor (``last_hidden_state`` of a Hugging Face output)."""
    if isinstance(output, torch.Tensor):
        return output
    return output[0]  # type: ignore[index,no-any-return]


def time_per_call(fn: Callable[[], object], iters: int) -> float:
    # CPU time of this process, not wall time: on a shared machine, time spent
    # descheduled would otherwise land on whichever variant happened to be running.
    start = time.process_time()
    for _ in range(iters):
        fn()
    return (time.process_time() - start) / iters * 1e6


def measure(model: nn.Module, x: torch.Tensor, rounds: int, iters: int) -> dict[str, float]:
    def forward() -> object:
        return model(x)

    def inside(**options: object) -> Callable[[], float]:
        def run() -> float:
            with gf.audit(model, **options):  # type: ignore[arg-type]
                return time_per_call(forward, iters)

        return run

    def per_batch(strict: bool) -> Callable[[], float]:
        def one() -> object:
            with gf.audit(model, strict=strict):
                return model(x)

        return lambda: time_per_call(one, iters)

    variants: dict[str, Callable[[], float]] = {
        "plain": lambda: time_per_call(forward, iters),
        "audit": inside(),
        "audit strict": inside(strict=True),
        "audit no GFR005": inside(ignore=["GFR005"]),
        "enter+exit": per_batch(False),
        "enter+exit strict": per_batch(True),
    }
    samples: dict[str, list[float]] = {name: [] for name in variants}
    order = list(variants)
    with torch.no_grad():
        for _ in range(5):  # warm-up
            forward()
        for round_ in range(rounds):
            # rotate the order so that no variant always runs right after another
            shift = round_ % len(order)
            for name in order[shift:] + order[:shift]:
                samples[name].append(variants[name]())
    return {name: statistics.median(values) for name, values in samples.items()}


def identical_outputs(model: nn.Module, x: torch.Tensor) -> bool:
    """Does the audited forward give bit-identical results (eval, and train with a seed)?"""
    same = True
    for train in (False, True):
        model.train(train)
        torch.manual_seed(1)
        plain = model(x)
        torch.manual_seed(1)
        with gf.audit(model):
            audited = model(x)
        same = same and torch.equal(first_tensor(plain), first_tensor(audited))
    model.eval()
    return same


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--rounds", type=int, default=41)
    parser.add_argument("--iters", type=int, default=40)
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(
        f"torch {torch.__version__}, 1 intra-op thread, "
        f"{args.rounds} rounds x {args.iters} forwards, median CPU time per forward"
    )
    for label, (build, make_input, shape, share) in MODELS.items():
        torch.manual_seed(0)
        try:
            model = build().eval()
        except ImportError as error:
            print(f"\n{label}: skipped ({error})")
            continue
        x = make_input(shape)
        medians = measure(model, x, args.rounds, max(4, int(args.iters * share)))
        params = sum(p.numel() for p in model.parameters())
        same = "yes" if identical_outputs(model, x) else "NO"
        print(f"\n{label}: {params} parameters, input {tuple(shape)}, identical outputs: {same}")
        print(f"  {'variant':<20}{'us/forward':>12}{'ratio':>8}")
        for name, median in medians.items():
            print(f"  {name:<20}{median:>12.1f}{median / medians['plain']:>8.2f}")


if __name__ == "__main__":
    main()
