"""The result of an audit: :class:`AuditReport` (its findings, ``ok``, ``raise_if_findings``)."""

from __future__ import annotations

from gradfence.auditing.findings import Finding
from gradfence.errors import AuditError


class AuditReport:
    """What an audit found; ``with gf.audit(model) as report:`` yields one.

    The findings are filled in when the ``with`` block exits (runtime findings from
    hooks are collected while it runs and merged then), so read them after the block.
    ``blind`` maps the code of each check that could not see part of the block (code
    compiled by ``torch.compile``, TorchScript) to where and why; those parts can hide
    findings of that code, so ``ok`` says nothing about them.

    >>> from gradfence.auditing.findings import Finding
    >>> report = AuditReport([Finding("GFR001", "grad mode leaked ...")])
    >>> report.ok
    False
    """

    __slots__ = ("blind", "findings")

    def __init__(
        self, findings: list[Finding] | None = None, blind: dict[str, str] | None = None
    ) -> None:
        self.findings: list[Finding] = list(findings or [])
        self.blind: dict[str, str] = dict(blind or {})

    @property
    def ok(self) -> bool:
        """True when the audit found nothing."""
        return not self.findings

    def codes(self) -> list[str]:
        """The code of every finding, in order (handy in assertions)."""
        return [finding.code for finding in self.findings]

    def format(self) -> str:
        """Every finding on its own line (or a line saying there were none), then the blind checks.

        >>> print(AuditReport(blind={"GFR005": "inside X", "GFR006": "inside X"}).format())
        gradfence audit: no findings
          not checked: GFR005, GFR006 inside X
        """
        if not self.findings:
            lines = ["gradfence audit: no findings"]
        else:
            lines = [f"gradfence audit: {len(self.findings)} finding(s)"]
            lines.extend(f"  {finding}" for finding in self.findings)
        by_reason: dict[str, list[str]] = {}
        for code, reason in sorted(self.blind.items()):
            by_reason.setdefault(reason, []).append(code)
        lines.extend(
            f"  not checked: {', '.join(codes)} {reason}" for reason, codes in by_reason.items()
        )
        return "\n".join(lines)

    def raise_if_findings(self) -> None:
        """Raise :class:`~gradfence.AuditError` listing every finding, if there is any."""
        if self.findings:
            raise AuditError(self.format())

    def __repr__(self) -> str:
        blind = f", blind={self.blind!r}" if self.blind else ""
        return f"AuditReport(findings={self.findings!r}{blind})"

    def __str__(self) -> str:
        return self.format()
