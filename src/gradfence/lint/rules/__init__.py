"""Every lint rule, one module per family; importing this package registers them all.

- :mod:`.syntax`: GF000 (the file does not parse)
- :mod:`.contexts`: GF1xx, grad-mode contexts used wrongly
- :mod:`.autograd`: GF2xx, backward and parameter updates against the grad mode
- :mod:`.modes`: GF301-GF305, train/eval mode of modules switched, leaked or missing
- :mod:`.layers`: GF306-GF308, how a module is built (dropout gating, registration, freezing)
- :mod:`.tensors`: GF4xx, graphs and inference tensors kept alive or mutated
- :mod:`.recording`: GF108, GF207, graphs recorded (or cut) against the code's intent
- :mod:`.loops`: GF206, GF404, what a training loop carries from one iteration to the next
- :mod:`.pretrained`: GF309, GF310, the mode pretrained or frozen parts are really in

Rules that judge whole statements and loops read the tree through :mod:`.frames`.
"""

from __future__ import annotations

from gradfence.lint.rules import (
    autograd,
    contexts,
    layers,
    loops,
    modes,
    pretrained,
    recording,
    syntax,
    tensors,
)
from gradfence.lint.rules.registry import RULES, Hit, Rule, rule

__all__ = [
    "RULES",
    "Hit",
    "Rule",
    "autograd",
    "contexts",
    "layers",
    "loops",
    "modes",
    "pretrained",
    "recording",
    "rule",
    "syntax",
    "tensors",
]
