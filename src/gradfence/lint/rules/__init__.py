"""Every lint rule, one module per family; importing this package registers them all.

- :mod:`.syntax`: GF000 (the file does not parse)
- :mod:`.contexts`: GF1xx, grad-mode contexts used wrongly
- :mod:`.autograd`: GF2xx, backward and parameter updates against the grad mode
- :mod:`.modes`: GF3xx, train/eval mode of modules
- :mod:`.tensors`: GF4xx, graphs and inference tensors kept alive or mutated
"""

from __future__ import annotations

from gradfence.lint.rules import autograd, contexts, modes, syntax, tensors
from gradfence.lint.rules.registry import RULES, Hit, Rule, rule

__all__ = ["RULES", "Hit", "Rule", "autograd", "contexts", "modes", "rule", "syntax", "tensors"]
