"""The engine's parts: import aliases, the grad-scope model, selection, noqa, robustness."""

from __future__ import annotations

import ast
import gc
import subprocess
import sys
import textwrap
import threading
from pathlib import Path
from typing import Any

import pytest

from gradfence.lint import Selection, Settings, check_source, lint_file, lint_paths
from gradfence.lint.imports import ImportMap
from gradfence.lint.model import build_model
from gradfence.lint.rules import RULES
from gradfence.lint.rules.registry import Rule
from gradfence.lint.scopes import GradState


def _imports(source: str) -> ImportMap:
    imports = ImportMap()
    for node in ast.parse(source).body:
        assert isinstance(node, ast.Import | ast.ImportFrom)
        imports.add(node)
    return imports


def _resolve(imports: ImportMap, expr: str) -> str | None:
    node = ast.parse(expr, mode="eval").body
    return imports.resolve(node)


@pytest.mark.parametrize(
    ("source", "expr", "expected"),
    [
        ("import torch as T", "T.no_grad", "torch.no_grad"),
        ("from torch import no_grad", "no_grad", "torch.no_grad"),
        ("import torch", "torch.autograd.no_grad", "torch.no_grad"),
        ("import torch", "torch.autograd.grad_mode.inference_mode", "torch.inference_mode"),
        (
            "from torch.autograd import grad_mode as gm",
            "gm.set_grad_enabled",
            "torch.set_grad_enabled",
        ),
        ("from torch.nn import functional as F", "F.dropout", "torch.nn.functional.dropout"),
        ("import torch.nn.functional as F", "F.dropout", "torch.nn.functional.dropout"),
        ("import torch.nn", "torch.nn.Linear", "torch.nn.Linear"),
        ("from torch import nn", "nn.modules.linear.Linear", "torch.nn.Linear"),
        ("from torch.autograd import grad", "grad", "torch.autograd.grad"),
        ("import torch", "no_grad", None),
        ("from . import torch", "torch.no_grad", None),
        ("import numpy as np", "np.mean", "numpy.mean"),
    ],
)
def test_import_alias_resolution(source: str, expr: str, expected: str | None) -> None:
    assert _resolve(_imports(source), expr) == expected


def test_local_name_for_fixes() -> None:
    assert _imports("import torch.nn as nn").local_name("torch.nn.ModuleList") == "nn.ModuleList"
    assert _imports("import torch as T").local_name("torch.nn.ModuleList") == "T.nn.ModuleList"
    assert _imports("import numpy").local_name("torch.nn.ModuleList") is None


SCOPES = """
import torch
from torch import no_grad, enable_grad, inference_mode, set_grad_enabled

def f(flag):
    grad_probe_default()
    with no_grad():
        grad_probe_disabled()
        with enable_grad():
            grad_probe_enabled()
        grad_probe_disabled()
    with inference_mode():
        grad_probe_inference()
        with enable_grad():
            grad_probe_inference()
    with set_grad_enabled(False):
        grad_probe_disabled()
    with set_grad_enabled(flag):
        grad_probe_unknown()
    with inference_mode(False):
        grad_probe_enabled()
    with torch.inference_mode(mode=flag):
        grad_probe_unknown()
    set_grad_enabled(False)
    grad_probe_disabled()
    if flag:
        torch.set_grad_enabled(True)
    grad_probe_unknown()

@torch.no_grad()
def g():
    grad_probe_disabled()
    def inner():
        grad_probe_default()
    return inner

@torch.inference_mode
def h():
    grad_probe_inference()

class C:
    @no_grad()
    def m(self):
        grad_probe_disabled()
"""


def test_grad_scope_model() -> None:
    model = build_model("s.py", SCOPES, ast.parse(SCOPES))
    seen = 0
    for function in model.functions:
        for call in function.calls:
            name = getattr(call.node.func, "id", "")
            if name.startswith("grad_probe_"):
                seen += 1
                assert call.mode is GradState(name[len("grad_probe_") :]), ast.unparse(call.node)
    assert seen == 16


def _codes(source: str, **kwargs: object) -> list[str]:
    return [d.code for d in check_source(textwrap.dedent(source), "t.py", Settings(**kwargs))]  # type: ignore[arg-type]


def test_noqa_bare_and_with_codes() -> None:
    source = """
    import torch
    model.eval  # noqa
    model.eval  # noqa: GF301
    model.eval  # noqa:GF101,GF301
    model.eval  # noqa: GF101
    model.eval  # NOQA
    """
    found = check_source(textwrap.dedent(source), "t.py")
    assert [(d.code, d.line) for d in found] == [("GF301", 6)]


def test_select_and_ignore_prefixes() -> None:
    source = "import torch\nmodel.eval\ntorch.no_grad()\n"
    assert _codes(source) == ["GF301", "GF102"]
    assert _codes(source, selection=Selection(select=("GF3",))) == ["GF301"]
    assert _codes(source, selection=Selection(ignore=("GF30",))) == ["GF102"]
    # the more specific prefix wins
    assert _codes(source, selection=Selection(select=("GF301",), ignore=("GF3",))) == ["GF301"]


def test_per_file_ignores() -> None:
    selection = Selection(per_file_ignores=(("tests/*", ("GF301",)), ("conf*.py", ("GF1",))))
    assert not selection.enabled("GF301", "tests/test_a.py")
    assert selection.enabled("GF301", "src/a.py")
    assert not selection.enabled("GF102", "pkg/conftest.py")


def test_realistic_correct_training_script_is_clean() -> None:
    source = """
    import torch
    import torch.nn as nn
    import torch.nn.functional as F
    import gradfence as gf

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = nn.ModuleList([nn.Linear(8, 8), nn.Linear(8, 2)])
            self.drop = nn.Dropout(0.1)

        def forward(self, x):
            for layer in self.layers:
                x = self.drop(F.relu(layer(x)))
            return F.dropout(x, 0.1, training=self.training)

    @torch.no_grad()
    def evaluate(model, loader):
        model.eval()
        total = 0.0
        for x, y in loader:
            total += F.cross_entropy(model(x), y).item()
        model.train()
        return total / len(loader)

    def fit(model, optimizer, train_loader, val_loader, epochs):
        history = []
        for epoch in range(epochs):
            model.train()
            running = 0.0
            for x, y in train_loader:
                optimizer.zero_grad()
                loss = F.cross_entropy(model(x), y)
                loss.backward()
                optimizer.step()
                running += loss.item()
                history.append(loss.detach())
            with gf.inference(model):
                val = [model(x) for x, _ in val_loader]
            history.append(evaluate(model, val_loader))
        return history
    """
    assert _codes(source) == []


def test_lint_package_does_not_import_torch(tmp_path: Path) -> None:
    script = (
        "import sys\n"
        "from gradfence.cli import main\n"
        "from gradfence.lint.flake8_plugin import Flake8Plugin\n"
        f"status = main(['lint', {str(tmp_path)!r}])\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
        "sys.exit(status)\n"
    )
    (tmp_path / "a.py").write_text("import torch\nmodel.eval\n")
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 1, result.stderr
    assert "GF301" in result.stdout


def test_internal_error_is_reported_not_raised(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def explode(model: object) -> object:
        raise ValueError("boom")

    original = RULES["GF301"]
    monkeypatch.setitem(
        RULES, "GF301", Rule(original.code, original.name, original.summary, False, explode)
    )  # type: ignore[arg-type]
    path = tmp_path / "a.py"
    path.write_text("import torch\n")
    result = lint_file(str(path), Settings())
    assert result.diagnostics == []
    assert result.error is not None and "boom" in result.error and "\n" not in result.error


def test_deeply_nested_source_does_not_crash(tmp_path: Path) -> None:
    path = tmp_path / "deep.py"
    path.write_text("import torch\nx = " + "(" * 300 + "1" + ")" * 300 + "\n")
    result = lint_file(str(path), Settings())
    assert result.error is None
    assert [d.code for d in result.diagnostics] == ["GF000"]


def test_parallel_and_sequential_agree(tmp_path: Path) -> None:
    fixtures = Path(__file__).parent / "fixtures" / "rules"
    paths = sorted(str(p) for p in fixtures.glob("GF*.py"))
    sequential = lint_paths(paths, Settings(), jobs=1)
    parallel = lint_paths(paths, Settings(), jobs=2)
    assert [r.path for r in parallel] == paths
    assert [r.diagnostics for r in parallel] == [r.diagnostics for r in sequential]
    assert sum(len(r.diagnostics) for r in sequential) > 50


QUICKSTART = """
import torch
from torch import nn

device = "cpu"
model = nn.Sequential(nn.Flatten(), nn.Linear(784, 512), nn.ReLU(), nn.Linear(512, 10))
loss_fn = nn.CrossEntropyLoss()
optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)


def train(dataloader, model, loss_fn, optimizer):
    size = len(dataloader.dataset)
    model.train()
    for batch, (X, y) in enumerate(dataloader):
        X, y = X.to(device), y.to(device)
        pred = model(X)
        loss = loss_fn(pred, y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if batch % 100 == 0:
            loss, current = loss.item(), (batch + 1) * len(X)
            print(f"loss: {loss:>7f}  [{current:>5d}/{size:>5d}]")


def test(dataloader, model, loss_fn):
    size = len(dataloader.dataset)
    num_batches = len(dataloader)
    model.eval()
    test_loss, correct = 0, 0
    with torch.no_grad():
        for X, y in dataloader:
            X, y = X.to(device), y.to(device)
            pred = model(X)
            test_loss += loss_fn(pred, y).item()
            correct += (pred.argmax(1) == y).type(torch.float).sum().item()
    test_loss /= num_batches
    correct /= size


for t in range(5):
    train(train_dataloader, model, loss_fn, optimizer)
    test(test_dataloader, model, loss_fn)
"""

MANUAL_UPDATES = """
import math
import torch

x = torch.linspace(-math.pi, math.pi, 2000)
y = torch.sin(x)
a, b = (torch.randn((), requires_grad=True) for _ in range(2))
learning_rate = 1e-6
for t in range(2000):
    y_pred = a + b * x
    loss = (y_pred - y).pow(2).sum()
    if t % 100 == 99:
        print(t, loss.item())
    loss.backward()
    with torch.no_grad():
        a -= learning_rate * a.grad
        b -= learning_rate * b.grad
        a.grad = None
        b.grad = None
"""


@pytest.mark.parametrize("source", [QUICKSTART, MANUAL_UPDATES], ids=["quickstart", "manual"])
def test_tutorial_style_code_is_clean(source: str) -> None:
    assert _codes(source) == []


def test_quickstart_without_train_call_leaks_eval() -> None:
    """The same tutorial with ``model.train()`` removed: validation leaks eval into training."""
    leaky = QUICKSTART.replace("    model.train()\n", "")
    found = check_source(leaky, "t.py")
    call_line = leaky.splitlines().index("    test(test_dataloader, model, loss_fn)") + 1
    assert [(d.code, d.line) for d in found] == [("GF302", call_line)]


def test_very_long_expressions_do_not_exhaust_recursion() -> None:
    source = "import torch\nfor x in l:\n    loss.backward()\n    total += " + "+".join(
        ["loss"] * 2000
    )
    assert [d.code for d in check_source(source + "\n", "long.py")] == ["GF401"]


# the fork this test needs, from a test run's many threads (Python 3.12+ warns)
@pytest.mark.filterwarnings("ignore:This process .* is multi-threaded:DeprecationWarning")
def test_dead_worker_falls_back_to_this_process(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    from gradfence.lint import engine

    parent = os.getpid()
    original = engine.lint_file

    def dies_in_workers(*args: object) -> object:
        if os.getpid() != parent:
            os._exit(3)  # a worker killed mid-run (OOM killer, signal...)
        return original(*args)  # type: ignore[arg-type]

    # workers are forked (as in a one-thread process), so they see the patched function
    monkeypatch.setattr(engine, "_threads", lambda: 1)
    monkeypatch.setattr(engine, "lint_file", dies_in_workers)
    fixtures = Path(__file__).parent / "fixtures" / "rules"
    paths = sorted(str(p) for p in fixtures.glob("GF3*.py"))
    results = lint_paths(paths, Settings(), jobs=2)
    assert [r.path for r in results] == paths
    assert all(r.error is None for r in results) and sum(len(r.diagnostics) for r in results) > 20


def test_collector_runs_rarely_while_linting_and_is_restored(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from gradfence.lint import engine

    seen: list[tuple[int, int, int]] = []
    real = engine.lint_file

    def recording(path: str, settings: engine.Settings, keep_source: bool = False) -> Any:
        seen.append(gc.get_threshold())
        return real(path, settings, keep_source)

    monkeypatch.setattr(engine, "lint_file", recording)
    target = tmp_path / "m.py"
    target.write_text("import torch\nwith torch.no_grad:\n    pass\n")
    before = gc.get_threshold()
    results = engine.lint_paths([str(target)], engine.Settings(), jobs=1)
    assert [d.code for d in results[0].diagnostics] == ["GF101"]
    assert seen and seen[0][0] >= engine.GC_GEN0_THRESHOLD
    assert gc.get_threshold() == before


START_METHOD = """
import sys, threading
from gradfence.lint.engine import _context
if sys.argv[1] == "thread":
    stop = threading.Event()
    threading.Thread(target=stop.wait, daemon=True).start()
print(_context().get_start_method())
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="fork is chosen on Linux only")
def test_workers_are_forked_only_from_a_process_of_one_thread() -> None:
    """A fork copies locks other threads hold, held for ever in the child (Python 3.12+
    warns): with other threads running, the workers start from a fork server."""

    def method(kind: str) -> str:
        command = [sys.executable, "-c", START_METHOD, kind]
        return subprocess.run(command, capture_output=True, text=True, check=True).stdout.strip()

    assert method("alone") == "fork"
    assert method("thread") == "forkserver"


def test_parallel_lint_from_a_fork_server_agrees_with_sequential() -> None:
    """The fork server's workers import the lint afresh (no copy of this process)."""
    fixtures = Path(__file__).parent / "fixtures" / "rules"
    paths = sorted(str(p) for p in fixtures.glob("GF*.py"))
    stop = threading.Event()
    helper = threading.Thread(target=stop.wait, daemon=True)
    helper.start()
    try:
        from gradfence.lint import engine

        assert engine._context().get_start_method() in ("forkserver", "spawn")
        parallel = lint_paths(paths, Settings(), jobs=2)
    finally:
        stop.set()
        helper.join()
    sequential = lint_paths(paths, Settings(), jobs=1)
    assert [r.diagnostics for r in parallel] == [r.diagnostics for r in sequential]
    assert sum(len(r.diagnostics) for r in sequential) > 50
