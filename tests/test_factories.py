"""MODULE:FACTORY and path/to/file.py:FACTORY resolution shared by eval and bench."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from gradfence.errors import UsageError
from gradfence.factories import FactoryError, resolve


def test_file_factory_is_imported_once_and_can_import_its_neighbour(tmp_path: Path) -> None:
    (tmp_path / "helper_mod_for_factories.py").write_text("VALUE = 41\n")
    user = tmp_path / "user_factories.py"
    user.write_text(
        "import helper_mod_for_factories\n"
        "LOADS = []\n"
        "LOADS.append(1)\n"
        "def build():\n"
        "    return helper_mod_for_factories.VALUE + len(LOADS)\n"
    )
    path_before = list(sys.path)
    first = resolve(f"{user}:build", "--model")
    second = resolve(f"{user}:build", "--input")
    assert first is second, "the same file must not be executed twice"
    assert first() == 42
    assert sys.path == path_before, "the file's folder is on sys.path only while it runs"


def test_module_factory_leaves_sys_path_as_it_was(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "cwd_factory_mod.py").write_text("def build():\n    return 7\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(
        sys, "path", [entry for entry in sys.path if entry not in ("", str(tmp_path))]
    )
    path_before = list(sys.path)
    assert resolve("cwd_factory_mod:build", "--model")() == 7
    assert sys.path == path_before


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("no-colon", "expected MODULE:FACTORY or path/to/file.py:FACTORY"),
        ("json:nothing", "json has no attribute 'nothing'"),
        ("json:__name__", "__name__ is str, not callable"),
        ("no_such_module_abc:f", "cannot import no_such_module_abc: ModuleNotFoundError"),
        ("missing/file.py:f", "no such file missing/file.py"),
    ],
)
def test_bad_specs_are_one_line_usage_errors(spec: str, message: str) -> None:
    with pytest.raises(FactoryError) as caught:
        resolve(spec, "--model")
    text = str(caught.value)
    assert text.startswith(f"--model {spec!r}: ") and message in text
    assert "\n" not in text
    assert isinstance(caught.value, UsageError)


def test_module_raising_on_import_is_reported_not_raised(tmp_path: Path) -> None:
    broken = tmp_path / "broken_factories.py"
    broken.write_text("raise RuntimeError('needs a GPU\\nsecond line')\n")
    with pytest.raises(FactoryError, match=r"cannot import .*RuntimeError: needs a GPU$"):
        resolve(f"{broken}:build", "--data")
