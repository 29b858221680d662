"""``gf.audit``: check at run time that a block of code honours the evaluation contract.

This package imports nothing heavy on purpose: the pytest plugin
(:mod:`gradfence.audit.pytest_plugin`) is loaded by every pytest run once gradfence is
installed, so torch is imported only when an audit is actually used. The public names
are ``gf.audit``, ``gf.Finding`` and ``gf.AuditReport`` (see :mod:`gradfence`).

The package shares its name with the function ``gf.audit``. Python binds a package to
its parent's attribute when it is first imported (here, by the pytest plugin, before
``gf.audit`` is ever looked up), which would shadow the lazily exported function; so
the package itself is callable and forwards the call to
:func:`gradfence.audit.auditor.audit`. ``gf.audit(model)`` thus works whichever import
came first.
"""

from __future__ import annotations

import sys
import types
from typing import Any


class _AuditPackage(types.ModuleType):
    def __call__(self, *modules: Any, **options: Any) -> Any:
        from gradfence.audit.auditor import audit

        return audit(*modules, **options)


sys.modules[__name__].__class__ = _AuditPackage
