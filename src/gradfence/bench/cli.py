"""``gradfence bench``: the command line of the benchmark (parsing, checks, outputs)."""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from gradfence.bench.builtins import BUILTINS
from gradfence.errors import UsageError

DEFAULT_BATCH_SIZES = "1,8,32"
DEFAULT_REPEATS = 30
DEVICES = ("cpu", "cuda")


def register(subparsers: Any) -> None:
    """Add the ``bench`` subcommand."""
    builtins = "; ".join(f"{name}: {entry.description}" for name, entry in BUILTINS.items())
    parser = subparsers.add_parser(
        "bench",
        help="measure what no_grad, inference_mode and eval buy on your model",
        description=(
            "For every (mode, batch size): median and p95 latency, throughput, bytes saved "
            "for backward, and peak memory; plus whether eval and train outputs differ."
        ),
        epilog=f"built-in models: {builtins}",
    )
    parser.add_argument(
        "--model",
        default="mlp",
        metavar="NAME|MODULE:FACTORY",
        help="a built-in model, or a factory returning an nn.Module: module:callable or "
        "path/to/file.py:callable (default: mlp)",
    )
    parser.add_argument(
        "--input",
        metavar="MODULE:FACTORY",
        help="a factory batch_size -> model input (a tensor, a list of texts, a tuple of "
        "positional arguments or a dict of keyword arguments); built-ins provide their own",
    )
    parser.add_argument(
        "--batch-sizes",
        default=DEFAULT_BATCH_SIZES,
        metavar="1,8,32",
        help=f"comma-separated batch sizes (default: {DEFAULT_BATCH_SIZES})",
    )
    parser.add_argument(
        "--modes",
        default="grad,no_grad,inference_mode",
        metavar="grad,no_grad,inference_mode",
        help="comma-separated grad modes to measure (default: all three)",
    )
    parser.add_argument(
        "--train-mode",
        action="store_true",
        help="measure with the model in train mode (default: eval mode for every grad mode)",
    )
    parser.add_argument("--device", default="cpu", metavar="cpu|cuda", help="default: cpu")
    parser.add_argument(
        "--repeats",
        default=str(DEFAULT_REPEATS),
        metavar="N",
        help=f"timed calls per configuration, after 5 warm-up calls (default: {DEFAULT_REPEATS})",
    )
    parser.add_argument("--json", metavar="FILE", help="write the results as JSON")
    parser.add_argument("--plot", metavar="FILE.png", help="write a PNG chart (needs matplotlib)")
    parser.add_argument("--markdown", metavar="FILE.md", help="write a Markdown table")
    parser.set_defaults(handler=run)


def _positive_ints(option: str, text: str) -> tuple[int, ...]:
    parts = [part.strip() for part in text.split(",") if part.strip()]
    if not parts:
        raise UsageError(f"{option} is empty: give comma-separated positive integers, e.g. 1,8,32")
    values = []
    for part in parts:
        if not part.isdigit() or int(part) < 1:
            raise UsageError(f"{option}: {part!r} is not a positive integer")
        values.append(int(part))
    if len(set(values)) != len(values):
        raise UsageError(f"{option} {text!r} repeats a value")
    return tuple(values)


def _modes(text: str) -> tuple[str, ...]:
    from gradfence.bench.measure import MODES

    modes = tuple(part.strip() for part in text.split(",") if part.strip())
    if not modes:
        raise UsageError(f"--modes is empty: use some of {','.join(MODES)}")
    for mode in modes:
        if mode not in MODES:
            raise UsageError(f"--modes: unknown mode {mode!r}, use some of {','.join(MODES)}")
    if len(set(modes)) != len(modes):
        raise UsageError(f"--modes {text!r} repeats a mode")
    return modes


def _output(option: str, value: str | None, suffix: str) -> Path | None:
    if value is None:
        return None
    path = Path(value)
    if path.suffix.lower() != suffix:
        raise UsageError(f"{option} {value!r}: the file name must end in {suffix}")
    if not path.parent.is_dir():
        raise UsageError(f"{option} {value!r}: no such directory {path.parent}")
    if path.is_dir():
        raise UsageError(f"{option} {value!r}: is a directory")
    return path


def _write(option: str, path: Path, write: Callable[[Path], object]) -> None:
    """Write one output file; failing to is one line and exit status 2, not a traceback."""
    try:
        write(path)
    except OSError as exc:
        text = str(exc).strip().splitlines()
        detail = f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__
        raise UsageError(f"{option} '{path}': cannot write: {detail}") from None


def run(args: argparse.Namespace) -> int:
    """Check the arguments, run the benchmark, print the table and write the files."""
    from gradfence.bench.factories import workload

    batch_sizes = _positive_ints("--batch-sizes", args.batch_sizes)
    modes = _modes(args.modes)
    repeats = _positive_ints("--repeats", args.repeats)
    if len(repeats) != 1:
        raise UsageError(f"--repeats {args.repeats!r}: give one positive integer")
    if args.device not in DEVICES:
        raise UsageError(f"--device {args.device!r}: use cpu or cuda")
    json_path = _output("--json", args.json, ".json")
    markdown_path = _output("--markdown", args.markdown, ".md")
    plot_path = _output("--plot", args.plot, ".png")
    if plot_path is not None and importlib.util.find_spec("matplotlib") is None:
        raise UsageError("--plot needs matplotlib: pip install 'gradfence[bench]'")
    chosen = workload(args.model, args.input)

    import torch

    from gradfence.bench import report
    from gradfence.bench.runner import Settings, run_bench, steps

    if args.device == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device cuda: no CUDA device available to torch {torch.__version__}")
    settings = Settings(chosen, batch_sizes, modes, args.train_mode, args.device, repeats[0])
    command = " ".join(
        [
            "gradfence bench",
            f"--model {args.model}",
            *([f"--input {args.input}"] if args.input else []),
            f"--batch-sizes {','.join(map(str, batch_sizes))}",
            f"--modes {','.join(modes)}",
            *(["--train-mode"] if args.train_mode else []),
            f"--device {args.device}",
            f"--repeats {repeats[0]}",
        ]
    )
    # imported by name: tqdm ships no type hints, and the bar is only used as Any
    tqdm: Any = importlib.import_module("tqdm").tqdm
    with tqdm(
        total=steps(settings), disable=not sys.stderr.isatty(), leave=False, unit="step"
    ) as bar:

        def advance(count: int, what: str) -> None:
            bar.set_description_str(what, refresh=False)
            bar.update(count)

        result = run_bench(settings, command=command, advance=advance)
    sys.stdout.write(report.render_terminal(result))
    if json_path is not None:
        document = json.dumps(report.to_json(result), indent=2) + "\n"
        _write("--json", json_path, lambda path: path.write_text(document))
    if markdown_path is not None:
        markdown = report.render_markdown(result)
        _write("--markdown", markdown_path, lambda path: path.write_text(markdown))
    if plot_path is not None:
        _write("--plot", plot_path, lambda path: report.plot(result, path))
    return 0
