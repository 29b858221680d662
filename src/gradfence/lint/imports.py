"""Import-alias resolution: which qualified name a local expression refers to.

``import torch as T``, ``from torch import no_grad``, ``from torch.nn import functional as F``
and friends are recorded as local-name -> qualified-name bindings; :meth:`ImportMap.resolve`
then turns ``T.no_grad`` or ``F.dropout`` into a canonical dotted name such as
``torch.no_grad`` or ``torch.nn.functional.dropout``. Names that are not bound by an
import resolve to ``None``: rules stay silent on what they cannot resolve.
"""

from __future__ import annotations

import ast

# The grad-mode objects are re-exported under several paths; rules see one spelling.
GRAD_MODE_NAMES = frozenset({"no_grad", "enable_grad", "set_grad_enabled", "inference_mode"})
_GRAD_MODE_PREFIXES = ("torch.autograd.grad_mode.", "torch.autograd.")


def canonical(qualname: str) -> str:
    """Map re-export paths onto one spelling: ``torch.autograd.no_grad`` -> ``torch.no_grad``."""
    for prefix in _GRAD_MODE_PREFIXES:
        if qualname.startswith(prefix):
            rest = qualname[len(prefix) :]
            if rest in GRAD_MODE_NAMES:
                return "torch." + rest
    if qualname.startswith("torch.nn.modules."):
        return "torch.nn." + qualname.rsplit(".", 1)[1]
    return qualname


def dotted(node: ast.expr) -> str | None:
    """``a.b.c`` for a chain of attribute accesses on a name, else ``None``."""
    parts: list[str] = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        parts.append(node.id)
        return ".".join(reversed(parts))
    return None


class ImportMap:
    """Local names bound by imports, resolved to canonical qualified names."""

    __slots__ = ("aliases",)

    def __init__(self) -> None:
        self.aliases: dict[str, str] = {}

    def add(self, node: ast.Import | ast.ImportFrom) -> None:
        """Record the bindings an import statement makes."""
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.asname is not None:
                    self.aliases[alias.asname] = alias.name
                else:
                    top = alias.name.split(".", 1)[0]
                    self.aliases[top] = top
            return
        if node.level or node.module is None:
            return
        for alias in node.names:
            if alias.name != "*":
                self.aliases[alias.asname or alias.name] = f"{node.module}.{alias.name}"

    def resolve(self, node: ast.expr) -> str | None:
        """Canonical qualified name of a name/attribute chain bound by an import."""
        parts: list[str] = []
        while isinstance(node, ast.Attribute):
            parts.append(node.attr)
            node = node.value
        if not isinstance(node, ast.Name):
            return None
        base = self.aliases.get(node.id)
        if base is None:
            return None
        if parts:
            base = base + "." + ".".join(reversed(parts))
        return canonical(base)

    def local_name(self, qualname: str) -> str | None:
        """A local spelling of ``qualname`` usable in a fix (``nn.ModuleList``), if one exists."""
        best: str | None = None
        for local, target in self.aliases.items():
            if qualname == target:
                return local
            if qualname.startswith(target + "."):
                candidate = local + qualname[len(target) :]
                if best is None or len(candidate) < len(best):
                    best = candidate
        return best
