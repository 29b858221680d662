"""The light install: ``pip install gradfence`` lints without torch; the rest says what to add.

One fresh virtual environment per module (7 s measured at low load, 20-60 s at load
average 14): the checkout's files copied to a temporary folder and installed with no
extras, plus flake8 and pytest for the plugins. Nothing there can import torch, so every
check below runs where torch is absent.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import venv
from pathlib import Path

import pytest

from gradfence.errors import MissingDependencyError, UsageError

ROOT = Path(__file__).resolve().parent.parent
BAD = "import torch\n\n\ndef f(model):\n    with torch.no_grad:\n        return model(1)\n"


def _bin(environment: Path, name: str) -> Path:
    return environment / ("Scripts" if os.name == "nt" else "bin") / name


@pytest.fixture(scope="module")
def light(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh venv holding ``pip install <checkout> flake8 pytest``: no extras, no torch."""
    base = tmp_path_factory.mktemp("light")
    checkout = base / "checkout"
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info", "*.pyc")
    shutil.copytree(ROOT / "src", checkout / "src", ignore=ignore)
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy2(ROOT / name, checkout / name)
    environment = base / "venv"
    venv.create(environment, with_pip=True)
    done = subprocess.run(
        [
            _bin(environment, "python"),
            "-m",
            "pip",
            "install",
            "--quiet",
            str(checkout),
            "flake8",
            "pytest",
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return environment


def _run(
    environment: Path, *argv: str | Path, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    return subprocess.run(
        [str(arg) for arg in argv],
        capture_output=True,
        text=True,
        check=False,
        cwd=cwd,
        env=env,
    )


def test_the_light_install_has_no_torch(light: Path) -> None:
    python = _bin(light, "python")
    script = (
        "import importlib.util as u; "
        "print([m for m in ('torch', 'torchmetrics', 'tqdm') if u.find_spec(m)])"
    )
    done = _run(light, python, "-c", script)
    assert done.stdout.strip() == "[]", done.stderr


def test_gradfence_lint_and_flake8_run_without_torch(light: Path, tmp_path: Path) -> None:
    (tmp_path / "bad.py").write_text(BAD)
    linted = _run(light, _bin(light, "gradfence"), "lint", "bad.py", cwd=tmp_path)
    assert linted.returncode == 1, linted.stderr
    assert linted.stdout.splitlines()[0].startswith("bad.py:5:10: GF101 [*] ")
    flaked = _run(light, _bin(light, "flake8"), "--select", "GF", "bad.py", cwd=tmp_path)
    assert flaked.returncode == 1, flaked.stderr
    assert flaked.stdout.splitlines() == [
        "bad.py:5:10: GF101 `torch.no_grad` is a class: call it (`with torch.no_grad():`)"
    ]


def test_torch_parts_raise_one_line_import_error(light: Path) -> None:
    script = (
        "import gradfence as gf\n"
        "for name in ('inference', 'training', 'audit', 'evaluate', 'ShardedSampler'):\n"
        "    try:\n"
        "        getattr(gf, name)\n"
        "    except ImportError as exc:\n"
        "        print(type(exc).__name__, exc)\n"
    )
    done = _run(light, _bin(light, "python"), "-c", script)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [
        f"MissingDependencyError gf.{name} needs torch, which is not installed: "
        "pip install 'gradfence[torch]'"
        for name in ("inference", "training", "audit", "evaluate", "ShardedSampler")
    ]


def test_the_pytest_plugin_loads_without_torch(light: Path, tmp_path: Path) -> None:
    (tmp_path / "test_plain.py").write_text("def test_plain():\n    assert True\n")
    done = _run(
        light, _bin(light, "python"), "-m", "pytest", "-p", "no:cacheprovider", cwd=tmp_path
    )
    assert done.returncode == 0, done.stdout[-2000:]
    assert "gradfence-" in done.stdout  # listed among the plugins: loaded, not skipped


def test_the_leak_check_without_torch_says_what_to_install(light: Path, tmp_path: Path) -> None:
    (tmp_path / "test_plain.py").write_text("def test_plain():\n    assert True\n")
    argv = ("-m", "pytest", "-p", "no:cacheprovider", "--gradfence-leaks")
    done = _run(light, _bin(light, "python"), *argv, cwd=tmp_path)
    assert done.returncode == 4  # pytest's usage error
    assert "--gradfence-leaks needs torch: pip install 'gradfence[torch]'" in done.stderr
    assert "Traceback" not in done.stdout + done.stderr


@pytest.mark.parametrize(
    ("argv", "extra"),
    [
        (("bench", "--repeats", "1"), "torch"),
        (("eval", "--model", "toy", "--data", "toy"), "torch"),
        (("demo",), "torch"),
        (("serve",), "serve"),
    ],
)
def test_commands_needing_torch_say_what_to_install(
    light: Path, argv: tuple[str, ...], extra: str
) -> None:
    done = _run(light, _bin(light, "gradfence"), *argv)
    assert done.returncode == 2
    assert done.stdout == ""
    assert done.stderr.endswith(f"pip install 'gradfence[{extra}]'\n")
    assert done.stderr.count("\n") == 1, done.stderr


def test_missing_dependency_error_only_for_optional_packages() -> None:
    torch_missing = ModuleNotFoundError("No module named 'torch._C'", name="torch._C")
    error = MissingDependencyError.of(torch_missing, "gf.audit")
    assert isinstance(error, ImportError)
    assert str(error) == (
        "gf.audit needs torch, which is not installed: pip install 'gradfence[torch]'"
    )
    user_module = ModuleNotFoundError("No module named 'my_model'", name="my_model")
    assert MissingDependencyError.of(user_module, "gf.audit") is None


def test_usage_error_has_one_home() -> None:
    import gradfence.cli

    assert gradfence.cli.UsageError is UsageError
    assert UsageError.__module__ == "gradfence.errors"


def test_version_has_one_source() -> None:
    from importlib.metadata import version

    import gradfence

    assert version("gradfence") == gradfence.__version__
