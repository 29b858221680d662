"""``gradfence eval``: evaluate a model factory on a dataset factory, print a table (and JSON)."""

from __future__ import annotations

import argparse
import contextlib
import json
import math
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from gradfence.errors import GradfenceError
from gradfence.evaluation.registry import DATASETS, DEFAULT_METRICS, METRICS, MODELS
from gradfence.factories import one_line
from gradfence.modes import GRAD_MODES
from gradfence.tables import aligned


def register(subparsers: Any) -> None:
    metric_help = "; ".join(f"{name}: {metric.help}" for name, metric in METRICS.items())
    parser = subparsers.add_parser(
        "eval",
        help="evaluate a model on a dataset with gf.evaluate and print the metrics",
        description=(
            "Build a model and a dataset from factories (callables taking no argument), "
            "evaluate the model with gf.evaluate (eval mode and no_grad, both restored) "
            "and print one row per metric. FACTORY is a built-in name, module.path:callable "
            "or path/to/file.py:callable."
        ),
    )
    builtin_models = ", ".join(sorted(MODELS)) or "none"
    builtin_data = ", ".join(sorted(DATASETS)) or "none"
    parser.add_argument(
        "--model",
        required=True,
        metavar="FACTORY",
        help=f"returns an nn.Module (built-in: {builtin_models})",
    )
    parser.add_argument(
        "--data",
        required=True,
        metavar="FACTORY",
        help=f"returns a Dataset, list or DataLoader of (x, target) (built-in: {builtin_data})",
    )
    parser.add_argument(
        "--metric",
        action="extend",
        type=_metric_names,
        metavar="NAME",
        help=(
            "repeat or comma-separate for several "
            f"(default: {' '.join(DEFAULT_METRICS)}). {metric_help}. "
            "Classification metrics take the model output as logits of shape (N, classes)."
        ),
    )
    parser.add_argument(
        "--batch-size", type=_integer_at_least(1), default=64, metavar="N", help="default: 64"
    )
    parser.add_argument(
        "--num-classes",
        type=_integer_at_least(2),
        metavar="K",
        help="for classification metrics; default: the width of the model's output on batch 1",
    )
    parser.add_argument(
        "--mode",
        default="no_grad",
        choices=GRAD_MODES,
        help="grad mode of the evaluation (default: no_grad)",
    )
    parser.add_argument(
        "--device",
        type=_device,
        help="move the model there and evaluate there (default: where the factory put it)",
    )
    parser.add_argument("--json", type=Path, metavar="FILE", help="also write the results here")
    parser.add_argument(
        "--no-progress", action="store_true", help="no progress bar, even on a terminal"
    )
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from gradfence.errors import UsageError

    names: list[str] = args.metric or list(DEFAULT_METRICS)
    batch_size: int = args.batch_size
    num_classes: int | None = args.num_classes
    device = args.device
    json_path = _json_path(args.json)

    model, loader, samples = _build_targets(args, batch_size)
    if device is not None:
        model.to(device)

    import gradfence as gf

    if num_classes is None and any(METRICS[name].needs_classes for name in names):
        with _failures_as_usage_errors(args):
            num_classes = _output_width(model, loader, device)
    metrics: dict[str, Any] = {}
    loss = None
    for name in dict.fromkeys(names):  # in order, once each
        built = METRICS[name].build(num_classes)
        if METRICS[name].is_loss:
            loss = built
        else:
            metrics[name] = built

    with _failures_as_usage_errors(args):
        results = gf.evaluate(
            model,
            loader,
            metrics,
            device=device,
            mode=args.mode,
            loss=loss,
            progress=False if args.no_progress else None,
        )
    plain = {name: _plain(value) for name, value in results.items()}
    size = f"{samples} samples, " if samples is not None else ""
    batch_size = getattr(loader, "batch_size", None) or batch_size
    print(f"model {args.model}, data {args.data} ({size}batch size {batch_size})")
    print(_table(plain))
    if json_path is not None:
        record = {
            "model": args.model,
            "data": args.data,
            "samples": samples,
            "batch_size": batch_size,
            "mode": args.mode,
            "results": plain,
        }
        try:
            json_path.write_text(json.dumps(record, indent=2) + "\n")
        except OSError as exc:
            raise UsageError(f"--json '{json_path}': cannot write: {one_line(exc)}") from None
    return 0


def _integer_at_least(minimum: int) -> Callable[[str], int]:
    """An argparse ``type=``: an integer >= ``minimum``, or a one-line usage error."""

    def parse(text: str) -> int:
        if not text.strip().isdigit() or int(text) < minimum:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer >= {minimum}")
        return int(text)

    return parse


def _metric_names(text: str) -> list[str]:
    """An argparse ``type=`` for ``--metric``: comma-separated built-in metric names."""
    names = [name.strip() for name in text.split(",") if name.strip()]
    known = ", ".join(sorted(METRICS))
    if not names:
        raise argparse.ArgumentTypeError(f"{text!r} names no metric (known: {known})")
    for name in names:
        if name not in METRICS:
            raise argparse.ArgumentTypeError(f"unknown metric {name!r} (known: {known})")
    return names


def _json_path(path: Path | None) -> Path | None:
    """``--json``, checked before anything is evaluated: its folder must exist."""
    from gradfence.errors import UsageError

    if path is not None and not path.parent.is_dir():
        raise UsageError(f"--json '{path}': no such directory {path.parent}")
    return path


@contextlib.contextmanager
def _failures_as_usage_errors(args: argparse.Namespace) -> Iterator[None]:
    """The model, data and metrics not fitting together is bad input: one line, exit 2."""
    from gradfence.errors import UsageError

    try:
        yield
    except GradfenceError:
        raise
    except Exception as exc:
        raise UsageError(
            f"evaluating --model {args.model!r} on --data {args.data!r} failed: {one_line(exc)}"
        ) from None


def _device(name: str) -> Any:
    """An argparse ``type=`` for ``--device``: a torch.device that exists here."""
    import torch

    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise argparse.ArgumentTypeError(f"{name!r}: {str(exc).splitlines()[0]}") from None
    backend = getattr(torch, device.type, None)
    is_available = getattr(backend, "is_available", None)
    if device.type != "cpu" and callable(is_available) and not is_available():
        raise argparse.ArgumentTypeError(f"{name!r}: no {device.type} device is available here")
    return device


def _build_targets(args: argparse.Namespace, batch_size: int) -> tuple[Any, Any, int | None]:
    """Call the model and data factories; wrap a dataset in a DataLoader."""
    from torch import nn
    from torch.utils.data import DataLoader, Dataset, IterableDataset

    from gradfence.errors import UsageError
    from gradfence.evaluation.registry import load_factory

    model_factory = load_factory(args.model, MODELS, "--model")
    data_factory = load_factory(args.data, DATASETS, "--data")
    model = _call(model_factory, "--model", args.model)
    if not isinstance(model, nn.Module):
        raise UsageError(
            f"--model {args.model!r} returned a {type(model).__name__}, not an nn.Module"
        )
    data = _call(data_factory, "--data", args.data)
    dataset: Any
    if isinstance(data, DataLoader):
        loader = data
        dataset = data.dataset
    elif isinstance(data, Dataset | list | tuple):  # a list of pairs is a dataset too
        loader = DataLoader(data, batch_size=batch_size)  # type: ignore[arg-type]
        dataset = data
    else:
        raise UsageError(
            f"--data {args.data!r} returned a {type(data).__name__}: return a "
            "torch.utils.data.Dataset (or DataLoader, or list) of (inputs, target) pairs"
        )
    samples = None if isinstance(dataset, IterableDataset) else _length(dataset)
    if samples == 0:  # every metric would be undefined: 0 or NaN, and a warning
        raise UsageError(f"--data {args.data!r} returned an empty dataset")
    return model, loader, samples


def _call(factory: Callable[[], Any], option: str, spec: str) -> Any:
    """Call a factory; an exception it raises is reported as one line, exit status 2."""
    from gradfence.errors import UsageError

    try:
        return factory()
    except GradfenceError:
        raise
    except Exception as exc:
        raise UsageError(f"{option} {spec!r} raised {one_line(exc)}") from None


def _length(dataset: Any) -> int | None:
    try:
        return len(dataset)
    except TypeError:
        return None


def _output_width(model: Any, loader: Any, device: Any) -> int:
    """The number of classes, read off the model's output on the first batch."""
    import gradfence as gf
    from gradfence.batches import to_device
    from gradfence.errors import UsageError
    from gradfence.evaluation.loop import resolve_device

    batch = next(iter(loader), None)
    if not isinstance(batch, tuple | list) or len(batch) != 2:
        raise UsageError(
            "cannot infer the number of classes: the data must give (inputs, target) "
            "batches; or pass --num-classes"
        )
    with gf.inference(model):
        output = model(to_device(batch[0], resolve_device(model, device)))
    if getattr(output, "ndim", 0) != 2 or output.shape[1] < 2:
        shape = tuple(getattr(output, "shape", ()))
        raise UsageError(
            f"classification metrics need logits of shape (N, classes >= 2); the model "
            f"returned shape {shape}: pass --num-classes or pick --metric mse"
        )
    return int(output.shape[1])


def _plain(value: Any) -> Any:
    """A result value as JSON: floats stay floats (NaN -> null), tensors become lists."""
    if isinstance(value, float):
        return None if math.isnan(value) else value
    return value.tolist()


def _table(results: dict[str, Any]) -> str:
    rows = [("metric", "value")]
    for name, value in results.items():
        shown = f"{value:.6g}" if isinstance(value, float) else json.dumps(value)
        rows.append((name, shown))
    return "\n".join(aligned(rows, header=True))
