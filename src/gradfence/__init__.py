"""gradfence: PyTorch's grad-mode and train/eval contract, explicit, enforced and measured.

The public API is what this module exports. Names are loaded on first use so that
``gradfence lint`` and the flake8 plugin start without importing torch, and work where
torch is not installed at all (``pip install gradfence`` installs no torch; the runtime
parts need ``pip install 'gradfence[torch]'``, and say so in one line when it is missing).

>>> import gradfence as gf
>>> import torch
>>> model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Dropout(0.5))
>>> with gf.inference(model):
...     out = model(torch.ones(1, 2))
>>> model.training, out.requires_grad
(True, False)
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from gradfence.errors import (
    AuditError,
    DuplicateSamplesWarning,
    EvaluationError,
    GradfenceError,
    GradfenceWarning,
    MissingDependencyError,
    ScopeError,
    ScopeOverlapWarning,
)

if TYPE_CHECKING:
    from gradfence.auditing.auditor import audit
    from gradfence.auditing.findings import Finding
    from gradfence.auditing.report import AuditReport
    from gradfence.evaluation.loop import evaluate
    from gradfence.evaluation.sampler import ShardedSampler
    from gradfence.scope import Scope, inference, training

__version__ = "0.1.0"  # the one source of the version: pyproject.toml reads it from here

# public name -> module that defines it (imported lazily, see module docstring)
_LAZY: dict[str, str] = {
    "audit": "gradfence.auditing.auditor",
    "Finding": "gradfence.auditing.findings",
    "AuditReport": "gradfence.auditing.report",
    "inference": "gradfence.scope",
    "training": "gradfence.scope",
    "Scope": "gradfence.scope",
    "evaluate": "gradfence.evaluation.loop",
    "ShardedSampler": "gradfence.evaluation.sampler",
}

__all__ = [
    "AuditError",
    "AuditReport",
    "DuplicateSamplesWarning",
    "EvaluationError",
    "Finding",
    "GradfenceError",
    "GradfenceWarning",
    "MissingDependencyError",
    "Scope",
    "ScopeError",
    "ScopeOverlapWarning",
    "ShardedSampler",
    "__version__",
    "audit",
    "evaluate",
    "inference",
    "training",
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'gradfence' has no attribute {name!r}")
    try:
        value = getattr(importlib.import_module(module), name)
    except ModuleNotFoundError as exc:
        missing = MissingDependencyError.of(exc, f"gf.{name}")
        if missing is None:
            raise
        raise missing from None
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
