"""The ``gradfence`` command: one entry point, one subcommand per capability.

Each capability's CLI glue lives in its own module and exposes
``register(subparsers)``, which adds its subparser(s) and sets ``handler`` on them:
a callable taking the parsed namespace and returning the exit status. Those modules
import torch and other heavy dependencies inside their handlers, not at import time,
so ``gradfence --help`` and ``gradfence lint`` start fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

from gradfence import __version__
from gradfence.errors import GradfenceError, MissingDependencyError, UsageError

# Modules providing ``register(subparsers)``, in the order shown by --help.
COMMAND_MODULES: tuple[str, ...] = (
    "gradfence.demo",
    "gradfence.lint.cli",
    "gradfence.serve.cli",
    "gradfence.bench.cli",
    "gradfence.evaluation.cli",
)

EXIT_USAGE = 2


__all__ = ["EXIT_USAGE", "UsageError", "build_parser", "main", "one_of", "positive_int"]


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (what is wrong, where to look), exit 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


# --- argument types: argparse reports their errors as "argument --OPTION: <message>" ---


def positive_int(text: str) -> int:
    """``type=`` of an option taking one integer >= 1."""
    if not text.strip().isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive integer")
    return int(text)


def positive_ints(text: str) -> tuple[int, ...]:
    """``type=`` of an option taking comma-separated integers >= 1, none repeated."""
    return _distinct(text, [positive_int(part) for part in _parts(text, "positive integers")])


def one_of(choices: Sequence[str]) -> Callable[[str], tuple[str, ...]]:
    """``type=`` of an option taking comma-separated names out of ``choices``, none repeated."""
    allowed = ",".join(choices)

    def names(text: str) -> tuple[str, ...]:
        parts = _parts(text, f"some of {allowed}")
        for part in parts:
            if part not in choices:
                raise argparse.ArgumentTypeError(f"unknown value {part!r}, use some of {allowed}")
        return _distinct(text, parts)

    names.__name__ = "one_of"
    return names


def _parts(text: str, expected: str) -> list[str]:
    parts = [part.strip() for part in text.split(",") if part.strip()]
    if not parts:
        raise argparse.ArgumentTypeError(f"empty: give {expected}, comma-separated")
    return parts


def _distinct(text: str, values: Sequence[Any]) -> tuple[Any, ...]:
    if len(set(values)) != len(values):
        raise argparse.ArgumentTypeError(f"{text!r} repeats a value")
    return tuple(values)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="gradfence",
        description=(
            "Make PyTorch's grad-mode and train/eval contract explicit, enforced and measured."
        ),
    )
    parser.add_argument("--version", action="version", version=f"gradfence {__version__}")
    subparsers = parser.add_subparsers(title="commands", metavar="COMMAND", dest="command")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; return the process exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    handler = getattr(args, "handler", None)
    if handler is None:
        parser.print_help()
        return EXIT_USAGE
    try:
        status: int = handler(args)
    except ModuleNotFoundError as exc:  # an optional dependency missing: one line
        missing = MissingDependencyError.of(exc, f"gradfence {args.command}")
        if missing is None:
            raise
        print(f"gradfence: error: {missing}", file=sys.stderr)
        return EXIT_USAGE
    except GradfenceError as exc:  # misuse: one line, no traceback
        print(f"gradfence: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("gradfence: interrupted", file=sys.stderr)
        return 130
    return status
