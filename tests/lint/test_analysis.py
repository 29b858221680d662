"""The analysis core: summaries across files, the cache, confidence, safe/unsafe fixes."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

from gradfence.lint import Selection, Settings, check_source
from gradfence.lint.analysis.project import ProjectConfig, find_root, module_name
from gradfence.lint.engine import lint_file

UTILS = """
import torch


def validate(model, loader):
    model.eval()
    with torch.no_grad():
        return [model(x) for x in loader]
"""
TRAIN = """
import torch
from .utils import validate


def fit(model, optimizer, loader, val_loader):
    for x in loader:
        model(x).sum().backward()
        optimizer.step()
        validate(model, val_loader)
"""


def _project(tmp_path: Path, cache: bool = True) -> Settings:
    (tmp_path / "pyproject.toml").write_text("[project]\nname = 'p'\n", encoding="utf-8")
    package = tmp_path / "pkg"
    package.mkdir()
    (package / "__init__.py").write_text("", encoding="utf-8")
    (package / "utils.py").write_text(UTILS, encoding="utf-8")
    (package / "train.py").write_text(TRAIN, encoding="utf-8")
    config = ProjectConfig(str(tmp_path), str(tmp_path / ".gradfence_cache") if cache else None)
    return Settings(Selection(select=("GF302",)), project=config)


def test_root_and_module_names(tmp_path: Path) -> None:
    _project(tmp_path)
    assert find_root(tmp_path / "pkg" / "train.py") == tmp_path.resolve()
    assert module_name(tmp_path / "pkg" / "train.py", tmp_path) == "pkg.train"
    assert module_name(tmp_path / "pkg" / "__init__.py", tmp_path) == "pkg"


def test_effects_of_a_helper_in_another_file(tmp_path: Path) -> None:
    settings = _project(tmp_path)
    result = lint_file(str(tmp_path / "pkg" / "train.py"), settings)
    assert [(d.code, d.line) for d in result.diagnostics] == [("GF302", 10)]
    # without the project, `validate` cannot be seen into: silent
    alone = check_source(TRAIN, "train.py", Settings(Selection(select=("GF302",))))
    assert alone == []


def test_import_of_the_module_resolves_too(tmp_path: Path) -> None:
    settings = _project(tmp_path)
    source = TRAIN.replace("from .utils import validate", "import pkg.utils").replace(
        "        validate(", "        pkg.utils.validate("
    )
    (tmp_path / "pkg" / "train.py").write_text(source, encoding="utf-8")
    result = lint_file(str(tmp_path / "pkg" / "train.py"), settings)
    assert [d.code for d in result.diagnostics] == ["GF302"]


def test_cache_holds_summaries_by_content(tmp_path: Path) -> None:
    settings = _project(tmp_path)
    lint_file(str(tmp_path / "pkg" / "train.py"), settings)
    cached = list((tmp_path / ".gradfence_cache" / "summaries").rglob("*.json"))
    assert len(cached) == 2  # train.py and the utils.py it imports
    assert all(json.loads(p.read_text())["functions"] for p in cached)
    # a helper that restores train mode: the changed file is re-summarised
    (tmp_path / "pkg" / "utils.py").write_text(
        UTILS.replace("return [model(x) for x in loader]", "out = [model(x) for x in loader]")
        + "    model.train()\n    return out\n",
        encoding="utf-8",
    )
    fresh = subprocess.run(
        [sys.executable, "-m", "gradfence", "lint", "--select", "GF302", "pkg/train.py"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert fresh.returncode == 0, fresh.stdout + fresh.stderr
    assert len(list((tmp_path / ".gradfence_cache" / "summaries").rglob("*.json"))) == 3


def test_no_cache_writes_nothing(tmp_path: Path) -> None:
    _project(tmp_path)
    done = subprocess.run(
        [sys.executable, "-m", "gradfence", "lint", "--no-cache", "pkg"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 1 and "GF302" in done.stdout
    assert not (tmp_path / ".gradfence_cache").exists()


SAMPLER = textwrap.dedent(
    """
    import torch.nn as nn
    import torch.nn.functional as F


    class Sampler(nn.Module):
        def sample(self, x, rate):
            return F.dropout(x, rate)
    """
)


def test_low_confidence_only_with_preview() -> None:
    select = Selection(select=("GF306",))
    assert check_source(SAMPLER, "s.py", Settings(select)) == []
    [found] = check_source(SAMPLER, "s.py", Settings(select, preview=True))
    assert found.confidence == "low"
    assert found.fix is not None and not found.fix.safe


def test_fix_applies_unsafe_fixes_only_on_request(tmp_path: Path) -> None:
    path = tmp_path / "s.py"
    path.write_text(SAMPLER, encoding="utf-8")
    base = [sys.executable, "-m", "gradfence", "lint", "--no-cache", "--preview", "--fix"]
    subprocess.run([*base, str(path)], capture_output=True, text=True, cwd=tmp_path)
    assert path.read_text(encoding="utf-8") == SAMPLER
    subprocess.run([*base, "--unsafe-fixes", str(path)], capture_output=True, cwd=tmp_path)
    assert "training=self.training" in path.read_text(encoding="utf-8")


def test_json_reports_confidence_and_applicability(tmp_path: Path) -> None:
    path = tmp_path / "s.py"
    path.write_text(SAMPLER, encoding="utf-8")
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "gradfence",
            "lint",
            "--no-cache",
            "--preview",
            "--format",
            "json",
            str(path),
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    [item] = json.loads(done.stdout)
    assert item["confidence"] == "low"
    assert item["fix"]["applicability"] == "unsafe"


def _gf304(source: str, path: str = "decode.py") -> list[int]:
    found = check_source(textwrap.dedent(source), path, Settings(Selection(select=("GF304",))))
    return [d.line for d in found]


def test_inference_script_that_never_differentiates() -> None:
    source = """
    import torch
    from models import Generator


    def main(config, loader, device):
        model = Generator(**config)
        model.load_state_dict(torch.load(config["checkpoint"]))
        model = model.to(device)  # the same module
        with torch.no_grad():
            for batch in loader:
                model(batch)


    if __name__ == "__main__":
        main(CONFIG, LOADER, "cpu")
    """
    assert _gf304(source) == [12]
    library = source.split("\n\n\n    if __name__")[0] + "\n"  # a library: defines main()
    assert _gf304(library) == []
    # the file calls .eval() on it: fine
    evaluated = source.replace("model = model.to(device)", "model = model.to(device).eval()")
    assert _gf304(evaluated) == []
    fixed = source.replace("        model = model.to(device)", "        model.eval()")
    assert _gf304(fixed) == []


def test_unpickled_module_in_an_inference_script() -> None:
    source = """
    import torch

    with open("model.pt", "rb") as f:
        model = torch.load(f)
    with torch.no_grad():
        for i in range(10):
            word = model(torch.tensor([[i]]))
    """
    assert _gf304(source, "generate.py") == [8]
    training = source + "\nmodel.train()\n"  # the file sets modes: the pickled mode is unknown
    assert _gf304(training, "generate.py") == []


def test_evaluation_helper_with_a_metric_in_a_file_without_backward() -> None:
    source = """
    import torch


    def eval_net(net, dataset):
        total = 0
        for image, mask in dataset:
            prediction = net(image)
            total += dice_coefficient(prediction, mask)
        return total / len(dataset)
    """
    assert _gf304(source, "eval.py") == [8]
    # a function that only runs the network in a file without backward: thin evidence
    plain = source.replace("eval_net", "run_net").replace("dice_coefficient", "compare")
    assert _gf304(plain, "eval.py") == []


def test_declared_torch_requirement(tmp_path: Path) -> None:
    from gradfence.lint.config import declared_torch

    assert declared_torch(tmp_path) is None
    (tmp_path / "requirements.txt").write_text("numpy\ntorchvision>=0.2\ntorch>=1.8.1\n")
    assert declared_torch(tmp_path) == (1, 8)
    (tmp_path / "setup.py").write_text('setup(install_requires=["torch==1.7.0", "tqdm"])\n')
    assert declared_torch(tmp_path) == (1, 7)
    (tmp_path / "requirements.txt").unlink()
    (tmp_path / "setup.py").write_text('setup(install_requires=["torch<2.0"])\n')
    assert declared_torch(tmp_path) == (1, 0)
    (tmp_path / "setup.py").write_text('setup(install_requires=["torch>=2.2"])\n')
    assert declared_torch(tmp_path) == (2, 2)


def test_gf106_reads_the_declared_requirement(tmp_path: Path) -> None:
    (tmp_path / "requirements.txt").write_text("torch>=1.9\n", encoding="utf-8")
    (tmp_path / ".git").mkdir()
    (tmp_path / "asr.py").write_text(
        "import torch\n\n\n@torch.no_grad\ndef transcribe(model, x):\n    return model(x)\n",
        encoding="utf-8",
    )
    command = [sys.executable, "-m", "gradfence", "lint", "--no-cache", "asr.py"]
    done = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True)
    assert "GF106" in done.stdout, done.stdout + done.stderr
    (tmp_path / "requirements.txt").write_text("torch>=2.1\n", encoding="utf-8")
    done = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True)
    assert "GF106" not in done.stdout


def test_results_are_reused_until_a_dependency_changes(tmp_path: Path) -> None:
    settings = _project(tmp_path)
    train = str(tmp_path / "pkg" / "train.py")
    first = lint_file(train, settings)
    assert [d.code for d in first.diagnostics] == ["GF302"]
    results = list((tmp_path / ".gradfence_cache" / "results").rglob("*.json"))
    assert len(results) == 1
    entry = json.loads(results[0].read_text())
    assert "pkg.utils" in entry["deps"]
    # an unchanged file is answered from the cache, without being read
    entry["diagnostics"][0][2] = "from the cache"
    results[0].write_text(json.dumps(entry))
    assert [d.message for d in lint_file(train, settings).diagnostics] == ["from the cache"]
    # the helper now restores train mode: train.py's cached result must not be used
    fixed = UTILS.replace("return [model(x) for x in loader]", "out = [model(x) for x in loader]")
    (tmp_path / "pkg" / "utils.py").write_text(
        fixed + "    model.train()\n    return out\n", encoding="utf-8"
    )
    command = [sys.executable, "-m", "gradfence", "lint", "--select", "GF302", "pkg/train.py"]
    done = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def test_project_files_are_linted_imports_first(tmp_path: Path) -> None:
    from gradfence.lint.engine import _imports_first

    _project(tmp_path)
    train, utils = str(tmp_path / "pkg" / "train.py"), str(tmp_path / "pkg" / "utils.py")
    assert _imports_first([train, utils]) == [utils, train]
    assert sorted(_imports_first([utils, train])) == sorted([utils, train])


def test_results_keep_the_order_given(tmp_path: Path) -> None:
    from gradfence.lint.engine import lint_paths

    settings = _project(tmp_path, cache=False)
    paths = [str(tmp_path / "pkg" / "train.py"), str(tmp_path / "pkg" / "utils.py")]
    assert [r.path for r in lint_paths(paths, settings, jobs=1)] == paths


METERS = """
class AverageMeter:
    def __init__(self, names=()):
        self.totals = [0.0 for _ in names] or [0.0]
        self.last = list(self.totals)

    def update(self, observed):
        if not isinstance(observed, list):
            observed = [observed]
        for position, value in enumerate(observed):
            self.last[position] = value
            self.totals[position] += value


class ItemMeter:
    def __init__(self):
        self.sum = 0.0

    def update(self, value):
        self.sum += float(value)
"""
RUNNER = """
import torch
from pkg.misc import AverageMeter, ItemMeter
from tracking import ExternalMeter


class Runner:
    def __init__(self, model, optimizer):
        self.model, self.optimizer = model, optimizer
        self.losses = AverageMeter(["coarse", "refine"])
        self.items = ItemMeter()
        self.external = ExternalMeter()

    def train_step(self, data):
        _loss, _, refine_loss, coarse_loss = self.model(data)
        self.model.zero_grad()
        _loss.backward()
        self.optimizer.step()
        self.losses.update([coarse_loss * 1000, refine_loss * 1000])
        self.items.update(_loss)
        self.external.update(_loss)
"""


def test_loss_kept_by_a_meter_defined_in_another_file(tmp_path: Path) -> None:
    """The meter's summary (another module) says ``update`` keeps its argument: the loss
    handed to it every step keeps its graph (microsoft/SpareNet's runner); a project meter
    that turns it into a number and a meter from another package are silent."""
    settings = _project(tmp_path)
    (tmp_path / "pkg" / "misc.py").write_text(METERS, encoding="utf-8")
    (tmp_path / "pkg" / "runner.py").write_text(RUNNER, encoding="utf-8")
    settings = Settings(Selection(select=("GF401",)), project=settings.project)
    result = lint_file(str(tmp_path / "pkg" / "runner.py"), settings)
    assert [(d.code, d.line) for d in result.diagnostics] == [("GF401", 19)]
    assert "AverageMeter.update" in result.diagnostics[0].message
    # without the project, the meter cannot be seen into: silent
    alone = check_source(RUNNER, "runner.py", Settings(Selection(select=("GF401",))))
    assert alone == []


STEP = """
def train_batch(model, batch, optimizer):
    loss = model(batch).mean()
    loss.backward()
    optimizer.step()
    return loss
"""
FIT = """
import torch
from pkg.step import train_batch


def fit(model, loader, optimizer):
    total = 0
    for batch in loader:
        loss = train_batch(model, batch, optimizer)
        total += loss
    return total
"""


def test_loss_returned_by_a_helper_in_another_file_that_differentiates_it(
    tmp_path: Path,
) -> None:
    settings = _project(tmp_path)
    (tmp_path / "pkg" / "step.py").write_text(STEP, encoding="utf-8")
    (tmp_path / "pkg" / "fit.py").write_text(FIT, encoding="utf-8")
    settings = Settings(Selection(select=("GF401",)), project=settings.project)
    result = lint_file(str(tmp_path / "pkg" / "fit.py"), settings)
    assert [(d.code, d.line) for d in result.diagnostics] == [("GF401", 10)]
    alone = check_source(FIT, "fit.py", Settings(Selection(select=("GF401",))))
    assert alone == []


PREPARE = """
import torch


@torch.inference_mode()
def add_tokens(model, tokenizer):
    model.resize_token_embeddings(len(tokenizer))


class Base(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(4, 4)
"""
FINETUNE = """
import torch
from pkg.prepare import Base, add_tokens


class Net(Base):
    @torch.inference_mode()
    def warmup(self, x):
        self.cache = self.proj(x)


def finetune(model, tokenizer, loader):
    add_tokens(model, tokenizer)
    optimizer = torch.optim.AdamW(model.parameters())
    for x in loader:
        model(x).loss.backward()
        optimizer.step()


def export(model, tokenizer):
    add_tokens(model, tokenizer)
    return model
"""


def test_inference_tensors_given_to_a_module_in_another_file(tmp_path: Path) -> None:
    """A helper of another module resizes the embeddings under inference_mode and the
    caller trains the model; a class whose nn.Module base is in another module caches an
    inference tensor on itself. Exporting without training is silent."""
    settings = _project(tmp_path)
    (tmp_path / "pkg" / "prepare.py").write_text(PREPARE, encoding="utf-8")
    (tmp_path / "pkg" / "finetune.py").write_text(FINETUNE, encoding="utf-8")
    settings = Settings(Selection(select=("GF402",)), project=settings.project)
    result = lint_file(str(tmp_path / "pkg" / "finetune.py"), settings)
    assert [(d.code, d.line) for d in result.diagnostics] == [("GF402", 9), ("GF402", 13)]
    alone = check_source(FINETUNE, "finetune.py", Settings(Selection(select=("GF402",))))
    assert alone == []


NET = """
class NeuralNet:
    def train_step(self, xi, yi, optimizer):
        optimizer.zero_grad()
        loss = self.get_loss(self.module_(xi), yi)
        loss.backward()
        optimizer.step()
        return loss

    def fit_loop(self, X, y):
        for xi, yi in self.get_iterator(X, y):
            self.train_step(xi, yi, self.optimizer_)


class Plain:
    def train_step(self, xi, yi, optimizer):
        self.get_loss(self.module_(xi), yi).backward()
"""
OVERRIDE = """
import torch
import pkg


class Trainer(pkg.NeuralNet):
    def train_step(self, X, y, _):
        loss = self.get_loss(self.module_(X), y)
        loss.backward()
        for p in self.module_.parameters():
            p.data.add_(-self.lr, p.grad.data)
        return loss


class Other(pkg.Plain):
    def train_step(self, X, y, optimizer):
        self.get_loss(self.module_(X), y).backward()
        optimizer.step()
"""


def test_override_drops_the_clear_of_the_method_it_replaces(tmp_path: Path) -> None:
    """skorch's example (7d36887^): ``train_step`` overrides a project base class method
    (re-exported by the package's ``__init__``) that cleared the gradients; the override
    differentiates and updates without clearing. Overriding a method that never cleared
    them is silent."""
    settings = _project(tmp_path)
    (tmp_path / "pkg" / "__init__.py").write_text("from .net import NeuralNet, Plain\n")
    (tmp_path / "pkg" / "net.py").write_text(NET, encoding="utf-8")
    (tmp_path / "pkg" / "trainer.py").write_text(OVERRIDE, encoding="utf-8")
    settings = Settings(Selection(select=("GF206",)), project=settings.project)
    result = lint_file(str(tmp_path / "pkg" / "trainer.py"), settings)
    assert [(d.code, d.line) for d in result.diagnostics] == [("GF206", 11)]
    assert "`NeuralNet.train_step` it overrides" in result.diagnostics[0].message
