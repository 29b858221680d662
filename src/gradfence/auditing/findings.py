"""What an audit can find: the :class:`Finding` record and the finding codes (a contract)."""

from __future__ import annotations

from dataclasses import dataclass, field

# Codes never change meaning once published; each maps to a one-line title.
CODES: dict[str, str] = {
    "GFR001": "grad mode or inference mode on exit differs from on entry",
    "GFR002": "a module's training flag on exit differs from on entry",
    "GFR003": "an audited module's forward built an autograd graph during evaluation",
    "GFR004": "a parameter or buffer was mutated during the audit",
    "GFR005": "dropout was active during the audit",
    "GFR006": "a BatchNorm-family module ran in training mode during the audit",
    "GFR007": "model state is an inference tensor at exit",
}


@dataclass(frozen=True)
class Finding:
    """One broken promise of an audited block.

    ``code`` is one of :data:`CODES` (``"GFR001"`` ... ``"GFR007"``); ``message`` says
    what happened, where and the fix in one line; ``module`` is the dotted name of the
    module concerned (``""`` for the audited module itself or for findings about the
    block as a whole); ``detail`` holds the same facts as data (thread names, counts,
    tensor names, call sites) for programs that consume findings.

    >>> f = Finding("GFR002", "encoder.bn1: eval -> train ...", "encoder.bn1")
    >>> f.code, f.module
    ('GFR002', 'encoder.bn1')
    """

    code: str
    message: str
    module: str = ""
    detail: dict[str, object] = field(default_factory=dict, hash=False)

    def __str__(self) -> str:
        return f"{self.code} {self.message}"


def check_codes(codes: object) -> frozenset[str]:
    """The codes in ``codes`` (one string or an iterable), or ``ValueError`` naming a bad one."""
    if isinstance(codes, str):
        codes = (codes,)
    try:
        chosen = frozenset(str(code).upper() for code in codes)  # type: ignore[attr-defined]
    except TypeError:
        raise ValueError(
            f"ignore= takes finding codes such as ['GFR005'], got {type(codes).__name__}"
        ) from None
    unknown = sorted(chosen - CODES.keys())
    if unknown:
        raise ValueError(
            f"unknown finding code(s) {', '.join(unknown)} in ignore=: the codes are "
            f"{', '.join(CODES)}"
        )
    return chosen
