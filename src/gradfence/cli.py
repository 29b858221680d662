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
from collections.abc import Sequence
from typing import NoReturn

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


__all__ = ["EXIT_USAGE", "UsageError", "build_parser", "main"]


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (what is wrong, where to look), exit 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


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
