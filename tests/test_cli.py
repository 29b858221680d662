"""The ``gradfence`` entry point: console script, ``python -m``, exit statuses."""

from __future__ import annotations

import subprocess
import sys

import pytest

from gradfence import __version__
from gradfence.cli import main


def test_python_dash_m_runs_the_cli() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "gradfence", "--version"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0
    assert done.stdout.strip() == f"gradfence {__version__}"


def test_no_command_prints_help_and_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 2
    assert "commands" in capsys.readouterr().out


def test_unknown_command_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["no-such-command"])
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert "invalid choice" in err
    assert err.count("\n") == 1, "a usage error is one line, not usage text"


def test_missing_subcommand_argument_is_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["eval", "--model", "toy"])
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("gradfence eval: error:") and "--data" in err
    assert err.count("\n") == 1


def test_demo_shows_the_frozen_batchnorm_kept(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo"]) == 0
    lines = capsys.readouterr().out.splitlines()
    hand = next(line for line in lines if line.startswith("after eval()"))
    scoped = next(line for line in lines if line.startswith("after gf.inference"))
    assert "1=train" in hand, "the hand-written pattern should clobber the frozen BN"
    assert "1=eval 3=train" in scoped
    assert lines[-1].endswith("False")
