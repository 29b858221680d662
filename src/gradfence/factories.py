"""Callables named on the command line as ``module.path:attr`` or ``path/to/file.py:attr``.

``gradfence eval`` (``--model``, ``--data``) and ``gradfence bench`` (``--model``,
``--input``) both take such names. Every way one can fail (bad format, missing file, a
module that does not import or raises while importing, a missing attribute, something
not callable) is a :class:`FactoryError` whose message is one line naming the option.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import importlib.util
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

from gradfence.errors import UsageError, one_line

__all__ = ["FORMS", "FactoryError", "is_file", "one_line", "resolve", "split"]

FORMS = "MODULE:FACTORY or path/to/file.py:FACTORY"


class FactoryError(UsageError, ValueError):
    """A factory named on the command line cannot be found, imported or called as given."""


def is_file(location: str) -> bool:
    """Whether the part before the colon names a file rather than a module."""
    return location.endswith(".py") or "/" in location or os.sep in location


def split(spec: str, option: str, forms: str = FORMS) -> tuple[str, str]:
    """``(location, attribute)`` of a spec, or a :class:`FactoryError` naming the forms."""
    location, colon, attribute = spec.rpartition(":")
    if not colon or not location or not attribute:
        raise FactoryError(f"{option} {spec!r}: expected {forms}")
    return location, attribute


def resolve(spec: str, option: str, forms: str = FORMS) -> Callable[..., Any]:
    """Import what ``spec`` names and return it; it must be callable.

    A file is imported once per process (under a name derived from its absolute path),
    with its folder on ``sys.path`` while it runs, so that its imports find its
    neighbours as when run as a script. A module name is looked up like ``python -m``
    does, the working directory first. Either way ``sys.path`` is put back afterwards:
    an import that a factory makes only when called must find its module on the
    caller's ``sys.path``.
    """
    location, attribute = split(spec, option, forms)
    module = _import(location, spec, option)
    value: Any = module
    for part in attribute.split("."):
        try:
            value = getattr(value, part)
        except AttributeError:
            raise FactoryError(
                f"{option} {spec!r}: {location} has no attribute {attribute!r}"
            ) from None
    if not callable(value):
        raise FactoryError(
            f"{option} {spec!r}: {attribute} is {type(value).__name__}, not callable"
        )
    factory: Callable[..., Any] = value
    return factory


def _import(location: str, spec: str, option: str) -> ModuleType:
    try:
        if is_file(location):
            return _import_file(Path(location).expanduser().resolve())
        with _on_sys_path("" if "" in sys.path else os.getcwd()):
            return importlib.import_module(location)
    except FileNotFoundError:
        raise FactoryError(f"{option} {spec!r}: no such file {location}") from None
    except Exception as exc:  # the module's own code may raise anything: bad input
        raise FactoryError(
            f"{option} {spec!r}: cannot import {location}: {one_line(exc)}"
        ) from None


def _import_file(path: Path) -> ModuleType:
    if not path.is_file():
        raise FileNotFoundError(path)
    digest = hashlib.sha1(str(path).encode()).hexdigest()[:12]
    name = f"_gradfence_factory_{path.stem}_{digest}"
    cached = sys.modules.get(name)
    if cached is not None:
        return cached
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load {path} as a Python module")
    module = importlib.util.module_from_spec(spec)
    # Registered before it runs (dataclasses and pickling look modules up by name).
    sys.modules[name] = module
    try:
        with _on_sys_path(str(path.parent)):
            spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module


@contextlib.contextmanager
def _on_sys_path(folder: str) -> Iterator[None]:
    """``folder`` first on ``sys.path`` inside the block (unless already there), then
    taken off again."""
    if folder in sys.path:
        yield
        return
    sys.path.insert(0, folder)
    try:
        yield
    finally:
        with contextlib.suppress(ValueError):
            sys.path.remove(folder)
