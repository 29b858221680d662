"""How fast is ``gradfence lint`` compared with a bare ``ast.parse`` of the same files?

Lints a large tree — by default the installed torch package's own ``.py`` files plus
generated training scripts — and prints files/s, lines/s, and the lint time relative to a
single-process bare parse (read + ``ast.parse``) of the same files, for ``--jobs 1`` and
``--jobs 2``; then the same tree linted as a project (cross-file summaries, the torch
package's own modules resolved from its source) with a cold cache. Target: ratio <= 1.5.

Then a generated project of ``--project-files`` files (default 1,000) whose modules import
helpers from each other: a cold-cache lint, then a re-lint after changing one file with the
cache warm (a fresh ``Project``, as a new ``gradfence lint`` run has). Target: <= 0.3 s.

    python benchmarks/lint_speed.py                 # torch tree + 300 generated files
    python benchmarks/lint_speed.py --limit 800     # a subset of the torch tree
    python benchmarks/lint_speed.py PATH...         # your own tree
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import gc
import os
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

from gradfence.lint import Settings, lint_paths
from gradfence.lint.analysis import project as projects
from gradfence.lint.analysis.project import ProjectConfig
from gradfence.lint.engine import read_source
from gradfence.lint.files import discover

TRAINING_SCRIPT = """\
import torch
import torch.nn as nn
import torch.nn.functional as F


class Net{i}(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([nn.Linear(32, 32) for _ in range({depth})])
        self.head = nn.Linear(32, 10)

    def forward(self, x):
        for layer in self.layers:
            x = F.dropout(F.relu(layer(x)), 0.1, training=self.training)
        return self.head(x)


@torch.no_grad()
def evaluate(model, loader):
    model.eval()
    correct = 0
    for x, y in loader:
        correct += (model(x).argmax(-1) == y).sum().item()
    model.train()
    return correct / len(loader)


def fit(model, optimizer, train_loader, val_loader, epochs={depth}):
    history = []
    for epoch in range(epochs):
        model.train()
        total = 0.0
        for step, (x, y) in enumerate(train_loader):
            optimizer.zero_grad()
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            optimizer.step()
            total += loss.item()
        history.append((total, evaluate(model, val_loader)))
    return history
"""


def torch_tree() -> Path | None:
    """The installed torch package directory, found without importing torch."""
    for entry in sys.path:
        candidate = Path(entry) / "torch"
        if (candidate / "__init__.py").is_file():
            return candidate
    return None


def generated_tree(directory: Path, count: int) -> list[str]:
    paths = []
    for i in range(count):
        path = directory / f"train_{i:04d}.py"
        path.write_text(TRAINING_SCRIPT.format(i=i, depth=2 + i % 7))
        paths.append(str(path))
    return paths


class Timing:
    """Wall-clock seconds and CPU seconds (this process + worker processes) of one run."""

    def __init__(self, wall: float, cpu: float, findings: int = 0) -> None:
        self.wall, self.cpu, self.findings = wall, cpu, findings


def _cpu() -> float:
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def timed(fn: Callable[[], int]) -> Timing:
    gc.collect()
    wall, cpu = time.perf_counter(), _cpu()
    findings = fn()
    return Timing(time.perf_counter() - wall, _cpu() - cpu, findings)


def bare_parse(paths: list[str]) -> int:
    """Read + ``ast.parse`` every file, one process (the baseline)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for path in paths:
            with contextlib.suppress(SyntaxError, ValueError, RecursionError):
                ast.parse(read_source(path), filename=path)
    return 0


def lint(paths: list[str], jobs: int, project: ProjectConfig | None = None) -> int:
    projects._PROJECTS.clear()  # a fresh run: nothing remembered in this process
    results = lint_paths(paths, Settings(project=project), jobs=jobs)
    return sum(len(r.diagnostics) for r in results)


HELPER = """\
import torch


def validate_{i}(model, loader):
    model.eval()
    with torch.no_grad():
        return [model(x) for x in loader]


def step_{i}(model, optimizer, x):
    model.train()
    model(x).sum().backward()
    optimizer.step()
"""
TRAINER = """\
import torch

from .helpers_{j} import step_{j}, validate_{j}


def fit_{i}(model, optimizer, loader, val_loader):
    for x in loader:
        step_{j}(model, optimizer, x)
        validate_{j}(model, val_loader)
"""


def generated_project(directory: Path, count: int) -> list[str]:
    """A package of ``count`` modules: half helpers, half trainers importing a helper."""
    (directory / "pyproject.toml").write_text("[project]\nname = 'generated'\n")
    package = directory / "pkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    paths = []
    for i in range(count // 2):
        helper = package / f"helpers_{i}.py"
        helper.write_text(HELPER.format(i=i))
        trainer = package / f"trainer_{i}.py"
        trainer.write_text(TRAINER.format(i=i, j=(i * 7) % (count // 2)))
        paths += [str(helper), str(trainer)]
    return paths


def project_run(count: int, repeat: int) -> None:
    """Cold-cache project lint and warm re-lint after one change, on a generated project."""
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        files = generated_project(root, count)
        base = best_of(repeat, lambda: bare_parse(files))
        colds = []
        for attempt in range(repeat):
            config = ProjectConfig(str(root), str(root / f".cache{attempt}"))
            colds.append(timed(lambda config=config: lint(files, 1, config)))
        cold = Timing(min(t.wall for t in colds), min(t.cpu for t in colds), colds[0].findings)
        config = ProjectConfig(str(root), str(root / ".cache0"))
        warm_runs = []
        for attempt in range(repeat):
            changed = root / "pkg" / "helpers_0.py"
            changed.write_text(HELPER.format(i=0) + f"\n# change {attempt}\n")
            warm_runs.append(timed(lambda: lint(files, 1, config)))
        warm = min(t.wall for t in warm_runs)
        print(f"generated project: {len(files)} files, each trainer imports a helper module")
        print(f"  bare ast.parse, 1 process     {base.cpu:7.2f} s CPU   ratio 1.00")
        print(
            f"  lint, project, cold cache     {cold.cpu:7.2f} s CPU   ratio "
            f"{cold.cpu / base.cpu:.2f}  ({cold.findings} findings)"
        )
        print(
            f"  re-lint after 1 change, warm  {warm:7.3f} s wall  "
            f"({warm_runs[0].findings} findings; target <= 0.3 s)"
        )


def best_of(repeat: int, fn: Callable[[], int]) -> Timing:
    runs = [timed(fn) for _ in range(repeat)]
    return Timing(min(r.wall for r in runs), min(r.cpu for r in runs), runs[0].findings)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("paths", nargs="*", help="trees to lint (default: the torch package)")
    parser.add_argument("--limit", type=int, default=0, help="use only the first N files")
    parser.add_argument("--generated", type=int, default=300, help="generated training scripts")
    parser.add_argument("--repeat", type=int, default=3, help="best of N runs for each timing")
    parser.add_argument(
        "--project-files", type=int, default=1000, help="files of the generated project"
    )
    args = parser.parse_args()

    roots = args.paths or [str(p) for p in [torch_tree()] if p is not None]
    files: list[str] = []
    for root in roots:
        # the torch package lives in site-packages, which directory walks skip by default
        files.extend(sorted(discover([root], base=root)) if os.path.isdir(root) else [root])
    if args.limit:
        files = files[: args.limit]
    with tempfile.TemporaryDirectory() as tmp:
        files += generated_tree(Path(tmp), args.generated)
        lines = sum(read_source(p).count("\n") for p in files)
        with_torch = sum("torch" in read_source(p) for p in files)
        print(f"corpus: {len(files)} files ({with_torch} mention torch), {lines:,} lines")
        print(f"roots: {', '.join(roots) or '-'} + {args.generated} generated training scripts")
        print(f"machine: {os.cpu_count()} CPUs, Python {sys.version.split()[0]}")
        base = best_of(args.repeat, lambda: bare_parse(files))
        runs = {jobs: best_of(args.repeat, lambda jobs=jobs: lint(files, jobs)) for jobs in (1, 2)}
        # the same files as one project: cross-file summaries read from source, cold cache
        root = str(Path(roots[0]).parent) if roots else tmp
        project = best_of(args.repeat, lambda: lint(files, 1, ProjectConfig(root, None)))

    def row(label: str, t: Timing, cpu: bool) -> str:
        seconds = t.cpu if cpu else t.wall
        ratio = seconds / (base.cpu if cpu else base.wall)
        return (
            f"{label:<28} {seconds:7.2f} s  {len(files) / seconds:7.0f} files/s"
            f"  {lines / seconds:9.0f} lines/s  ratio {ratio:.2f}"
        )

    print("CPU seconds, all processes (robust to other load on the machine):")
    print(row("  bare ast.parse, 1 process", base, cpu=True))
    for jobs, timing in runs.items():
        print(
            row(f"  gradfence lint --jobs {jobs}", timing, cpu=True)
            + f"  ({timing.findings} findings)"
        )
    print(
        row("  lint --jobs 1, as a project", project, cpu=True)
        + f"  ({project.findings} findings; cross-file summaries, no cache)"
    )
    print("wall clock:")
    print(row("  bare ast.parse, 1 process", base, cpu=False))
    for jobs, timing in runs.items():
        speedup = timing.cpu / timing.wall
        print(
            row(f"  gradfence lint --jobs {jobs}", timing, cpu=False)
            + f"  ({speedup:.2f} cores busy)"
        )
    project_run(args.project_files, args.repeat)
    print(f"load average during the run: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
