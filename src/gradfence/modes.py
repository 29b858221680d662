"""The names of grad modes, in one place and without importing torch.

``gf.inference(mode=...)``, ``gf.evaluate(mode=...)``, ``gradfence eval --mode`` and
``gradfence bench --modes`` all take these names; command lines check them before torch
is imported.

>>> GRAD_MODES
('no_grad', 'inference_mode')
>>> BENCH_MODES
('grad', 'no_grad', 'inference_mode')
"""

from __future__ import annotations

from typing import Literal, get_args

# a grad mode that disables autograd: what gf.inference(mode=...) enters
GradMode = Literal["no_grad", "inference_mode"]
GRAD_MODES: tuple[GradMode, ...] = get_args(GradMode)

# what gradfence bench measures: autograd on ("grad"), then each mode that disables it
BENCH_MODES: tuple[str, ...] = ("grad", *GRAD_MODES)
