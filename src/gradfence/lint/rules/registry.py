"""The rule registry: code, name, summary, fixability and documentation of every rule.

A rule is a function ``check(model) -> Iterator[Hit]`` registered with :func:`rule`; its
docstring is the rule's documentation page (What it does / Why is this a problem? /
Example / Use instead / References), shown by ``gradfence rules CODE`` and rendered into
``docs/rules/CODE.md``.
"""

from __future__ import annotations

import ast
import inspect
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from gradfence.lint.diagnostics import Fix
from gradfence.lint.model import FileModel

# (node, message, fix) is a high-confidence finding; a fourth item gives the confidence
# (:data:`gradfence.lint.diagnostics.LOW` for findings shown only with ``--preview``).
Hit = tuple[ast.AST, str, Fix | None] | tuple[ast.AST, str, Fix | None, str]
Check = Callable[[FileModel], Iterator[Hit]]


@dataclass(frozen=True)
class Rule:
    """A registered rule."""

    code: str
    name: str
    summary: str
    fixable: bool
    check: Check

    @property
    def doc(self) -> str:
        """The rule's documentation page (Markdown), from the check's docstring."""
        return inspect.cleandoc(self.check.__doc__ or "")


RULES: dict[str, Rule] = {}


def rule(code: str, name: str, summary: str, *, fixable: bool = False) -> Callable[[Check], Check]:
    """Register ``check`` as rule ``code``."""

    def register(check: Check) -> Check:
        if code in RULES:
            raise ValueError(f"rule {code} registered twice")
        RULES[code] = Rule(code, name, summary, fixable, check)
        return check

    return register
