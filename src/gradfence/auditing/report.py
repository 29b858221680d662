"""The result of an audit: :class:`AuditReport` (its findings, ``ok``, ``raise_if_findings``)."""

from __future__ import annotations

from gradfence.auditing.findings import Finding
from gradfence.errors import AuditError


class AuditReport:
    """What an audit found; ``with gf.audit(model) as report:`` yields one.

    The findings are filled in when the ``with`` block exits (runtime findings from
    hooks are collected while it runs and merged then), so read them after the block.

    >>> from gradfence.auditing.findings import Finding
    >>> report = AuditReport([Finding("GFR001", "grad mode leaked ...")])
    >>> report.ok
    False
    """

    __slots__ = ("findings",)

    def __init__(self, findings: list[Finding] | None = None) -> None:
        self.findings: list[Finding] = list(findings or [])

    @property
    def ok(self) -> bool:
        """True when the audit found nothing."""
        return not self.findings

    def codes(self) -> list[str]:
        """The code of every finding, in order (handy in assertions)."""
        return [finding.code for finding in self.findings]

    def format(self) -> str:
        """Every finding on its own line, or a line saying there were none."""
        if not self.findings:
            return "gradfence audit: no findings"
        lines = [f"gradfence audit: {len(self.findings)} finding(s)"]
        lines.extend(f"  {finding}" for finding in self.findings)
        return "\n".join(lines)

    def raise_if_findings(self) -> None:
        """Raise :class:`~gradfence.AuditError` listing every finding, if there is any."""
        if self.findings:
            raise AuditError(self.format())

    def __repr__(self) -> str:
        return f"AuditReport(findings={self.findings!r})"

    def __str__(self) -> str:
        return self.format()
