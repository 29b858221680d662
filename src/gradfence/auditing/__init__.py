"""``gf.audit``: check at run time that a block of code honours the evaluation contract.

This package imports nothing heavy on purpose: the pytest plugin
(:mod:`gradfence.auditing.pytest_plugin`) is loaded by every pytest run once gradfence is
installed, so torch is imported only when an audit is actually used. The public names
are ``gf.audit``, ``gf.Finding`` and ``gf.AuditReport`` (see :mod:`gradfence`). The
package is named ``auditing`` so that it never shadows the function ``gf.audit``.
"""
