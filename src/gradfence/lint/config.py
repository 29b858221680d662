"""``[tool.gradfence]`` in pyproject.toml: select, ignore, per-file-ignores, target-torch, exclude.

```toml
[tool.gradfence]
select = ["GF"]                 # codes or prefixes
ignore = ["GF305"]
target-torch = "2.0"            # enables GF106
exclude = ["legacy/", "*_pb2.py"]   # .gitignore-like, on top of .venv, build, ...
[tool.gradfence.per-file-ignores]
"tests/*" = ["GF304", "GF305"]
```
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gradfence.errors import GradfenceError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib


class ConfigError(GradfenceError, ValueError):
    """A ``[tool.gradfence]`` value or a command-line option is malformed."""


@dataclass(frozen=True)
class LintConfig:
    """The linter's configuration, as read from pyproject.toml (all optional)."""

    select: tuple[str, ...] | None = None
    ignore: tuple[str, ...] = ()
    per_file_ignores: tuple[tuple[str, tuple[str, ...]], ...] = ()
    target_torch: tuple[int, int] | None = None
    exclude: tuple[str, ...] = ()
    root: Path | None = field(default=None, compare=False)


_VERSION = re.compile(r"^(\d+)\.(\d+)(?:\.\d+)?$")


def parse_torch_version(text: str) -> tuple[int, int]:
    """``"2.0"`` -> ``(2, 0)``; anything else is a :class:`ConfigError`."""
    match = _VERSION.match(text.strip())
    if match is None:
        raise ConfigError(f"target-torch must look like X.Y (e.g. 2.0), got {text!r}")
    return int(match.group(1)), int(match.group(2))


def find_pyproject(start: Path) -> Path | None:
    """The nearest pyproject.toml in ``start`` or a parent directory."""
    start = start.resolve()
    if start.is_file():
        start = start.parent
    for directory in (start, *start.parents):
        candidate = directory / "pyproject.toml"
        if candidate.is_file():
            return candidate
    return None


def _codes(value: Any, key: str) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ConfigError(f"[tool.gradfence] {key} must be a list of rule codes")
    return tuple(v.strip().upper() for v in value)


def load_config(pyproject: Path | None) -> LintConfig:
    """Read ``[tool.gradfence]`` from ``pyproject`` (an empty config if absent)."""
    if pyproject is None:
        return LintConfig()
    try:
        with open(pyproject, "rb") as handle:
            data = tomllib.load(handle)
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"cannot read {pyproject}: {exc}") from None
    section = data.get("tool", {}).get("gradfence", {})
    if not isinstance(section, dict):
        raise ConfigError(f"{pyproject}: [tool.gradfence] must be a table")
    known = {"select", "ignore", "per-file-ignores", "target-torch", "exclude"}
    unknown = sorted(set(section) - known)
    if unknown:
        raise ConfigError(f"{pyproject}: unknown [tool.gradfence] key {unknown[0]!r}")
    per_file = section.get("per-file-ignores", {})
    if not isinstance(per_file, dict):
        raise ConfigError("[tool.gradfence] per-file-ignores must be a table of pattern = [codes]")
    target = section.get("target-torch")
    if target is not None and not isinstance(target, str):
        raise ConfigError('[tool.gradfence] target-torch must be a string such as "2.0"')
    exclude = section.get("exclude", [])
    if not isinstance(exclude, list) or not all(isinstance(e, str) for e in exclude):
        raise ConfigError("[tool.gradfence] exclude must be a list of patterns")
    return LintConfig(
        select=_codes(section["select"], "select") if "select" in section else None,
        ignore=_codes(section.get("ignore", []), "ignore"),
        per_file_ignores=tuple(
            (pattern, _codes(codes, f"per-file-ignores {pattern!r}"))
            for pattern, codes in per_file.items()
        ),
        target_torch=parse_torch_version(target) if target is not None else None,
        exclude=tuple(exclude),
        root=pyproject.parent,
    )


# ``torch>=1.8``, ``torch == 1.7.1``, ``"torch>=1.9,<2.0"``, ``torch<2.1``: a requirement on
# the ``torch`` distribution itself (not ``torchvision``), with its version clauses
_TORCH_REQUIREMENT = re.compile(
    r"""(?:^|["'\s,\[])torch\s*(?:\[[^\]]*\])?\s*((?:[<>=!~]=?\s*[\d.*]+\s*,?\s*)+)""",
    re.MULTILINE,
)
_CLAUSE = re.compile(r"([<>=!~]=?)\s*(\d+)\.(\d+)")
_REQUIREMENT_FILES = ("pyproject.toml", "setup.py", "setup.cfg")


def declared_torch(root: Path | None) -> tuple[int, int] | None:
    """The oldest torch the project declares it supports, from its requirements
    (pyproject.toml, setup.py, setup.cfg, requirements*.txt): the lower bound of the torch
    requirement (``torch>=1.8`` -> (1, 8), ``torch==1.7.1`` -> (1, 7)); with only an upper
    bound below 2.1 (``torch<2.0``), (1, 0). None when no file pins torch at all."""
    if root is None:
        return None
    files = [root / name for name in _REQUIREMENT_FILES]
    files += sorted(root.glob("requirements*.txt")) + sorted(root.glob("requirements/*.txt"))
    lowest: tuple[int, int] | None = None
    for path in files:
        try:
            text = path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            continue
        for match in _TORCH_REQUIREMENT.finditer(text):
            bound = _lower_bound(match.group(1))
            if bound is not None and (lowest is None or bound < lowest):
                lowest = bound
    return lowest


def _lower_bound(clauses: str) -> tuple[int, int] | None:
    lower: tuple[int, int] | None = None
    upper_only: tuple[int, int] | None = None
    for operator, major, minor in _CLAUSE.findall(clauses):
        version = (int(major), int(minor))
        if operator in {">=", "==", "~=", ">", "==="}:
            lower = version if lower is None else min(lower, version)
        elif operator in {"<", "<="}:
            upper_only = version
    if lower is not None:
        return lower
    if upper_only is not None and upper_only <= (2, 1):
        return (1, 0)
    return None
