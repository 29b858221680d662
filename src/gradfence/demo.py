"""``gradfence demo``: what ``gf.inference`` restores that hand-written code does not."""

from __future__ import annotations

import argparse
from typing import Any


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "demo",
        help="show gf.inference restoring a frozen BatchNorm that model.train() would clobber",
        description=(
            "Builds a small model with a frozen (eval) BatchNorm, evaluates it once the "
            "hand-written way and once with gf.inference, and prints each submodule's mode after."
        ),
    )
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    import torch
    from torch import nn

    import gradfence as gf

    def build() -> nn.Module:
        torch.manual_seed(0)
        model = nn.Sequential(
            nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Dropout(0.5), nn.Linear(16, 2)
        )
        model[1].eval()  # frozen BatchNorm: its running statistics must not move
        return model

    def modes(model: nn.Module) -> str:
        return " ".join(
            f"{name}={'train' if m.training else 'eval'}"
            for name, m in model.named_children()
            if isinstance(m, nn.BatchNorm1d | nn.Dropout)
        )

    x = torch.randn(4, 8)
    hand = build()
    print(f"before:                          {modes(hand)}")
    hand.eval()
    with torch.no_grad():
        hand(x)
    hand.train()
    print(f"after eval(); no_grad; train():  {modes(hand)}   <- frozen BN is training again")

    scoped = build()
    with gf.inference(scoped):
        out = scoped(x)
    print(f"after gf.inference(model):       {modes(scoped)}   <- exactly as before")
    print(f"output requires_grad inside the scope: {out.requires_grad}")
    return 0
