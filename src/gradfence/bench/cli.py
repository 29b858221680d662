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

from gradfence.builtin_models import BUILTIN_MODELS
from gradfence.cli import one_of, positive_int, positive_ints
from gradfence.errors import UsageError, one_line
from gradfence.modes import BENCH_MODES

DEFAULT_BATCH_SIZES = "1,8,32"
DEFAULT_REPEATS = 30
DEVICES = ("cpu", "cuda")


def register(subparsers: Any) -> None:
    """Add the ``bench`` subcommand."""
    builtins = "; ".join(f"{name}: {entry.description}" for name, entry in BUILTIN_MODELS.items())
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
        type=positive_ints,
        default=DEFAULT_BATCH_SIZES,
        metavar="1,8,32",
        help=f"comma-separated batch sizes (default: {DEFAULT_BATCH_SIZES})",
    )
    parser.add_argument(
        "--modes",
        type=one_of(BENCH_MODES),
        default=",".join(BENCH_MODES),
        metavar=",".join(BENCH_MODES),
        help="comma-separated grad modes to measure (default: all three)",
    )
    parser.add_argument(
        "--train-mode",
        action="store_true",
        help="measure with the model in train mode (default: eval mode for every grad mode)",
    )
    parser.add_argument(
        "--device", default="cpu", choices=DEVICES, metavar="cpu|cuda", help="default: cpu"
    )
    parser.add_argument(
        "--repeats",
        type=positive_int,
        default=DEFAULT_REPEATS,
        metavar="N",
        help=f"timed calls per configuration, after 5 warm-up calls (default: {DEFAULT_REPEATS})",
    )
    parser.add_argument("--json", metavar="FILE", help="write the results as JSON")
    parser.add_argument("--plot", metavar="FILE.png", help="write a PNG chart (needs matplotlib)")
    parser.add_argument("--markdown", metavar="FILE.md", help="write a Markdown table")
    parser.set_defaults(handler=run)


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
        raise UsageError(f"{option} '{path}': cannot write: {one_line(exc)}") from None


def run(args: argparse.Namespace) -> int:
    """Check the arguments, run the benchmark, print the table and write the files."""
    from gradfence.bench.workload import workload

    batch_sizes: tuple[int, ...] = args.batch_sizes
    modes: tuple[str, ...] = args.modes
    repeats: int = args.repeats
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
    settings = Settings(chosen, batch_sizes, modes, args.train_mode, args.device, repeats)
    command = " ".join(
        [
            "gradfence bench",
            f"--model {args.model}",
            *([f"--input {args.input}"] if args.input else []),
            f"--batch-sizes {','.join(map(str, batch_sizes))}",
            f"--modes {','.join(modes)}",
            *(["--train-mode"] if args.train_mode else []),
            f"--device {args.device}",
            f"--repeats {repeats}",
        ]
    )
    from tqdm import tqdm

    # disable=None: a bar on a terminal only (tqdm's own check of its output stream)
    with tqdm(total=steps(settings), disable=None, leave=False, unit="step") as bar:

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
