"""``gradfence lint``: a fast static checker for PyTorch grad-mode and train/eval pitfalls.

Stdlib :mod:`ast` only, and no torch import: the checker runs in CI without PyTorch.

>>> from gradfence.lint import check_source
>>> [d.code for d in check_source("import torch\\nmodel.eval\\n")]
['GF301']
"""

from __future__ import annotations

from gradfence.lint.diagnostics import Diagnostic, Edit, Fix
from gradfence.lint.engine import FileResult, Settings, check_source, lint_file, lint_paths
from gradfence.lint.selection import Selection

__all__ = [
    "Diagnostic",
    "Edit",
    "FileResult",
    "Fix",
    "Selection",
    "Settings",
    "check_source",
    "lint_file",
    "lint_paths",
]
