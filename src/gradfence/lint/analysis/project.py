"""The project a file belongs to: its root, its modules' names and their cached summaries.

The root is the nearest directory above a file holding ``pyproject.toml``, ``setup.py``,
``setup.cfg`` or ``.git``. A module name (``pkg.trainer``) maps to ``ROOT/pkg/trainer.py``,
``ROOT/pkg/trainer/__init__.py`` or the same under ``ROOT/src/``; its summary is computed
from its source the first time it is asked for, whether or not the file is being linted,
and kept in the cache directory by content hash (``.gradfence_cache/`` by default, as
ruff keeps ``.ruff_cache/``), so that re-linting after a change re-reads little.
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

from gradfence.lint.analysis.summary import ModuleSummary, summarise, summarise_lazily

# bump when summaries change shape or meaning: old cache entries are then ignored
ANALYSIS_VERSION = "14"
CACHE_DIR_NAME = ".gradfence_cache"
ROOT_MARKERS = ("pyproject.toml", "setup.py", "setup.cfg", ".git")
# a file bigger than this is not summarised for other files' sake (generated code)
MAX_SUMMARY_BYTES = 2_000_000


@dataclass(frozen=True)
class ProjectConfig:
    """Where the project is and where its summaries are cached (picklable, for workers)."""

    root: str
    cache_dir: str | None  # None: no cache (``--no-cache``)


def find_root(start: str | Path) -> Path | None:
    """The nearest directory at or above ``start`` with a project marker."""
    path = Path(start).resolve()
    if not path.is_dir():
        path = path.parent
    for directory in (path, *path.parents):
        if any((directory / marker).exists() for marker in ROOT_MARKERS):
            return directory
    return None


def module_name(path: str | Path, root: str | Path) -> str | None:
    """``pkg.trainer`` for ``ROOT/pkg/trainer.py`` (or ``ROOT/src/pkg/...``); None outside."""
    try:
        relative = Path(path).resolve().relative_to(Path(root).resolve())
    except ValueError:
        return None
    parts = list(relative.with_suffix("").parts)
    if parts and parts[0] == "src" and len(parts) > 1:
        parts = parts[1:]
    if parts and parts[-1] == "__init__":
        parts = parts[:-1]
    if not parts or not all(p.isidentifier() for p in parts):
        return None
    return ".".join(parts)


def package_of(path: str | Path, root: str | Path | None) -> str | None:
    """The package relative imports of ``path`` are resolved against."""
    if root is None:
        return None
    name = module_name(path, root)
    if name is None:
        return None
    if Path(path).name == "__init__.py":
        return name
    return name.rpartition(".")[0]


class SummaryCache:
    """Summaries on disk, one JSON file per content hash."""

    def __init__(self, directory: str | None) -> None:
        self.directory = Path(directory) if directory else None
        self._ready = False

    @staticmethod
    def key(source: str, package: str | None) -> str:
        digest = hashlib.sha256()
        digest.update(f"{ANALYSIS_VERSION}\0{package}\0".encode())
        digest.update(source.encode("utf-8", "surrogatepass"))
        return digest.hexdigest()

    def _path(self, key: str) -> Path | None:
        if self.directory is None:
            return None
        return self.directory / "summaries" / key[:2] / f"{key}.json"

    def get(self, key: str) -> ModuleSummary | None:
        path = self._path(key)
        if path is None:
            return None
        try:
            with open(path, encoding="utf-8") as handle:
                return ModuleSummary.from_data(json.load(handle))
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def put(self, key: str, summary: ModuleSummary) -> None:
        path = self._path(key)
        if path is None:
            return
        try:
            if not self._ready and self.directory is not None:
                self.directory.mkdir(parents=True, exist_ok=True)
                gitignore = self.directory / ".gitignore"
                if not gitignore.exists():
                    gitignore.write_text("# created by gradfence lint\n*\n", encoding="utf-8")
                self._ready = True
            path.parent.mkdir(parents=True, exist_ok=True)
            temporary = path.with_suffix(f".{os.getpid()}.tmp")
            with open(temporary, "w", encoding="utf-8") as handle:
                json.dump(summary.as_data(), handle, separators=(",", ":"))
            os.replace(temporary, path)
        except OSError:
            pass  # a read-only tree: lint without a cache


class Project:
    """Module summaries of one project, loaded on demand (one instance per process)."""

    def __init__(self, config: ProjectConfig | None) -> None:
        self.root = Path(config.root) if config is not None else None
        self.cache = SummaryCache(config.cache_dir if config is not None else None)
        self._modules: dict[str, ModuleSummary | None] = {}
        self._keys: dict[str, str | None] = {}
        self._located: dict[str, Path | None] = {}
        # project modules read for the file being linted (its findings depend on them)
        self.touched: dict[str, str | None] = {}

    def summary_for(self, source: str, tree: ast.Module, path: str) -> ModuleSummary:
        """The summary of a file being linted (from the cache when its text is unchanged)."""
        package = package_of(path, self.root) if self.root is not None else None
        key = SummaryCache.key(source, package)
        name = module_name(path, self.root) if self.root is not None else None
        known = self._modules.get(name) if name is not None else None
        if known is not None and name is not None and self._keys.get(name) == key:
            return known  # summarised already, for a file importing it
        found = self.cache.get(key)
        if found is None and name is not None:
            # a module of the project: summarised in full once, for itself and its importers
            # (files are linted imports first), so that no file is parsed twice
            found = summarise(tree, package)
            self.cache.put(key, found)
            self._modules[name] = found
            self._keys[name] = key
        elif found is None:
            # outside a project: only what the rules ask about
            found = summarise_lazily(tree, source, package)
        elif name is not None:
            self._modules.setdefault(name, found)  # complete: importers may use it as is
            self._keys.setdefault(name, key)
        return found

    def module_key(self, name: str) -> str | None:
        """The content hash of project module ``name`` (None when it has no file), read
        once per process."""
        if name not in self._keys:
            path = self.locate(name)
            key = None
            if path is not None:
                try:
                    source = path.read_bytes().decode("utf-8", errors="replace")
                except OSError:
                    source = None
                if source is not None:
                    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
                    key = SummaryCache.key(source, package)
            self._keys[name] = key
        return self._keys[name]

    def module(self, name: str) -> ModuleSummary | None:
        """The summary of project module ``name``; None if it is not part of the project."""
        self.touched.setdefault(name, None)
        if name in self._modules:
            return self._modules[name]
        self._modules[name] = None  # also guards against import cycles
        path = self.locate(name)
        if path is None:
            return None
        try:
            raw = path.read_bytes()
        except OSError:
            return None
        if len(raw) > MAX_SUMMARY_BYTES:
            return None
        source = raw.decode("utf-8", errors="replace")
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        key = SummaryCache.key(source, package)
        self._keys[name] = key
        found = self.cache.get(key)
        if found is None:
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    tree = ast.parse(source)
            except (SyntaxError, ValueError, RecursionError, MemoryError):
                return None
            try:
                found = summarise(tree, package)
            except RecursionError:
                return None
            self.cache.put(key, found)
        self._modules[name] = found
        return found

    def locate(self, name: str) -> Path | None:
        """The file of project module ``name``, if it has one (memoised)."""
        if name not in self._located:
            self._located[name] = self._locate(name)
        return self._located[name]

    def _locate(self, name: str) -> Path | None:
        if self.root is None or not all(p.isidentifier() for p in name.split(".")):
            return None
        relative = Path(*name.split("."))
        for base in (self.root, self.root / "src"):
            for candidate in (base / relative.with_suffix(".py"), base / relative / "__init__.py"):
                if candidate.is_file():
                    return candidate
        return None

    def resolve(self, qualname: str) -> tuple[str, ModuleSummary, str] | None:
        """``pkg.utils.validate`` -> (``pkg.utils``, its summary, ``validate``): the longest
        prefix that is a project module, and the function's name inside it."""
        parts = qualname.split(".")
        for cut in range(len(parts) - 1, 0, -1):
            name = ".".join(parts[:cut])
            summary = self.module(name)
            if summary is not None:
                return name, summary, ".".join(parts[cut:])
        return None


_PROJECTS: dict[ProjectConfig | None, Project] = {}


def project_for(config: ProjectConfig | None) -> Project:
    """The process-wide :class:`Project` of ``config`` (summaries are shared between files)."""
    project = _PROJECTS.get(config)
    if project is None:
        if len(_PROJECTS) > 8:
            _PROJECTS.clear()
        project = _PROJECTS[config] = Project(config)
    return project
