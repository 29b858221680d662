"""``gf.evaluate``: the evaluation loop, with modes restored and metrics exact across ranks."""

from __future__ import annotations

import contextlib
import itertools
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, TypeAlias

import torch
from torch import Tensor, nn
from torchmetrics import Metric, MetricCollection

from gradfence.batches import to_device
from gradfence.distributed import world
from gradfence.errors import DuplicateSamplesWarning, EvaluationError
from gradfence.evaluation.distributed import gather_tensors, outside_inference_mode
from gradfence.evaluation.metrics import (
    FunctionSlot,
    MeanSlot,
    MetricFn,
    MetricSlot,
    TorchmetricSlot,
)
from gradfence.evaluation.progress import Progress
from gradfence.modes import GradMode
from gradfence.scope import inference

Step = Callable[[nn.Module, Any], tuple[Any, ...]]
Callback = Callable[[int, Any, Any, Any], None]
Metrics: TypeAlias = (
    Mapping[str, Metric | MetricFn] | Metric | Sequence[Metric] | MetricCollection | None
)
AUTOCAST_DTYPES = (torch.bfloat16, torch.float16)


class EvaluationResults(dict[str, float | Tensor]):
    """``{name: value}`` of one evaluation, plus ``predictions`` when they were asked for.

    A plain ``dict`` otherwise: compare it, print it, ``json.dumps`` its floats.
    """

    predictions: Tensor | None = None


def evaluate(
    model: nn.Module,
    loader: Iterable[Any],
    metrics: Metrics = None,
    device: torch.device | str | None = None,
    mode: GradMode = "no_grad",
    step: Step | None = None,
    loss: MetricFn | None = None,
    progress: bool | None = None,
    *,
    limit_batches: int | float | None = None,
    return_predictions: bool = False,
    autocast: torch.dtype | None = None,
    callback: Callback | None = None,
) -> EvaluationResults:
    """Evaluate ``model`` on every batch of ``loader``; return each metric's value.

    The loop runs inside :func:`gf.inference(model, mode=mode) <gradfence.inference>`,
    so on return *and* on exception every submodule's train/eval flag and the grad
    mode are exactly what they were (a frozen BatchNorm inside a training model stays
    frozen, the model stays in train mode for the next step).

    Args:
        model: the ``nn.Module`` to evaluate.
        loader: any iterable of batches, typically a ``DataLoader``.
        metrics: name -> torchmetrics ``Metric`` (reset before use, left computed), or
            name -> callable ``(preds, target) -> tensor`` averaged over samples (a scalar
            is a batch mean, weighted by the batch size; a 1-D tensor is one value per
            sample). Also one ``Metric``, a list of ``Metric``s or a ``MetricCollection``,
            named from their class as torchmetrics names them.
        device: where batches and metrics go; default: the device of the model's first
            parameter (CPU for a model without parameters). Tensors in nested tuples,
            lists, dicts and any ``Mapping``, namedtuples, dataclasses, and objects with a
            ``.to()`` (Hugging Face ``BatchEncoding``) are moved there before ``step``.
        mode: ``"no_grad"`` or ``"inference_mode"`` (see ``gf.inference``).
        step: ``step(model, batch) -> (preds, target)`` or ``(preds, target, loss)``
            with the batch's mean loss. The default takes ``batch = (x, y)`` and calls
            ``model(x)``, or a ``Mapping`` with a ``"labels"`` key (Hugging Face) and calls
            ``model(**batch)``; an output with ``.logits`` gives the preds, and its
            ``.loss`` the loss.
        loss: ``loss(preds, target)``; its sample-weighted mean is ``results["loss"]``.
            Without it, a loss the step returns is reported there.
        progress: ``None``: a tqdm bar (batches/s, running metrics) only when stderr is
            a terminal, on rank 0; ``True``/``False`` to force it on or off.
        limit_batches: evaluate only the first N batches (an int), or that fraction of
            ``len(loader)`` (a float in (0, 1], at least one batch), on each rank.
        return_predictions: also return every prediction as ``results.predictions``,
            one tensor on the CPU in dataset order (gathered from every rank, without the
            duplicates a ``DistributedSampler`` pads with).
        autocast: run ``step`` under ``torch.autocast`` with this dtype
            (``torch.bfloat16`` or ``torch.float16``); predictions reach the metrics as
            float32.
        callback: ``callback(batch_index, batch, preds, target)`` after each batch's
            metrics were updated, inside the evaluation modes.

    Returns:
        ``{name: value}`` (an :class:`EvaluationResults`, a ``dict``): Python floats for
        scalar metrics, detached CPU tensors otherwise; ``"loss"`` when a loss is
        given or the step returns one. Loss and every accumulation are detached: no
        graph is kept.

    Raises:
        EvaluationError: a ``model``, ``loader``, ``metrics`` or option of the wrong kind,
            a batch or model output the default step cannot handle, or a loader that
            gives no batch at all (on every rank).

    When ``torch.distributed`` is initialised, metric states are synchronised across
    ranks (and the loss reduced as a sample-weighted mean), so every rank returns the
    global result; with :class:`gf.ShardedSampler <gradfence.ShardedSampler>` in the
    loader that equals the single-process result, for any dataset size and world size
    (a rank whose shard is empty takes part in the sync). Collectives run after the grad
    scope is left, never inside ``inference_mode``; a failing metric is put back to its
    local, unsynchronised state. A loader whose ``DistributedSampler`` pads (or drops)
    samples, or a ``DataLoader(drop_last=True)`` that leaves samples out, gets one
    :class:`~gradfence.DuplicateSamplesWarning`, from rank 0.

    >>> import torch, torchmetrics, gradfence as gf
    >>> model = torch.nn.Linear(4, 3)
    >>> data = [(torch.randn(8, 4), torch.randint(0, 3, (8,))) for _ in range(4)]
    >>> acc = torchmetrics.classification.MulticlassAccuracy(num_classes=3)
    >>> results = gf.evaluate(model, data, {"acc": acc}, loss=torch.nn.functional.cross_entropy)
    >>> sorted(results), model.training
    (['acc', 'loss'], True)
    """
    _check_model_and_loader(model, loader)
    scope = inference(model, mode=mode)  # validates mode before anything runs
    target_device = resolve_device(model, device)
    named = _named_metrics(metrics)
    slots = _build_slots(named, loss, target_device)
    # a loss the step returns is reported unless loss= or a metric named "loss" is given
    wants_step_loss = loss is None and all(name != "loss" for name, _ in named)
    step_loss: MeanSlot | None = None  # made on the first such loss (a MeanMetric is not free)
    run_step = _default_step if step is None else step
    limit = _batch_limit(limit_batches, loader)
    autocast_context = _autocast(autocast, target_device)
    world_size, rank = world()
    order = _sample_order(loader, world_size) if return_predictions else None
    if rank == 0:  # once for the whole job, not once per rank
        _warn_if_samples_left_out(loader)

    for slot in slots:
        slot.reset()
    predictions: list[Tensor] = []
    batches = 0
    total = _length(loader)
    if limit is not None:
        total = limit if total is None else min(limit, total)
    bar = Progress(progress, rank, total, slots)
    try:
        with scope:
            for index, batch in enumerate(itertools.islice(loader, limit)):
                batch = to_device(batch, target_device)
                with autocast_context:
                    preds, target, batch_loss = _unpack(run_step(model, batch))
                if autocast is not None:
                    preds = _full_precision(preds)
                size = _batch_size(target, preds)
                for slot in slots:
                    slot.update(preds, target, size)
                if wants_step_loss and batch_loss is not None:
                    if step_loss is None:
                        step_loss = _new_slot(MeanSlot("loss", target_device), slots)
                    step_loss.add(batch_loss, size)
                if return_predictions:
                    predictions.append(_prediction(preds))
                if callback is not None:
                    callback(index, batch, preds, target)
                batches += 1
                bar.advance()
    finally:
        bar.close()

    # The scope is closed: collectives (metric sync, gathers) run here, in no_grad.
    with outside_inference_mode():
        batches, had_step_loss = _global_counts(batches, step_loss is not None, target_device)
        if batches == 0:
            raise EvaluationError(
                "the loader gave no batch: there is nothing to evaluate (an empty dataset?)"
            )
        if had_step_loss and step_loss is None:  # other ranks have one: sync an empty one
            _new_slot(MeanSlot("loss", target_device), slots)
        results = EvaluationResults()
        for slot in slots:
            slot.result(results)
        if return_predictions:
            results.predictions = _gather_predictions(predictions, order, target_device)
    return results


def _new_slot(slot: MeanSlot, slots: list[MetricSlot]) -> MeanSlot:
    slot.reset()
    slots.append(slot)  # the progress bar holds this list: it shows the new slot too
    return slot


def resolve_device(model: nn.Module, device: torch.device | str | None) -> torch.device:
    if device is not None:
        return torch.device(device)
    for parameter in model.parameters():
        return parameter.device
    return torch.device("cpu")


def _check_model_and_loader(model: Any, loader: Any) -> None:
    if not isinstance(model, nn.Module):
        if isinstance(loader, nn.Module):
            raise EvaluationError(
                f"model= is a {type(model).__name__} and loader= an nn.Module: the order is "
                "gf.evaluate(model, loader, metrics)"
            )
        what = "a function" if callable(model) else f"a {type(model).__name__}"
        raise EvaluationError(
            f"model= is {what}, not a torch.nn.Module: pass the module to evaluate (a plain "
            "callable can be wrapped in an nn.Module whose forward calls it)"
        )
    if isinstance(loader, nn.Module) or not isinstance(loader, Iterable):
        raise EvaluationError(
            f"loader= is a {type(loader).__name__}: pass an iterable of batches, such as a "
            "torch.utils.data.DataLoader"
        )


def _named_metrics(metrics: Metrics) -> list[tuple[str, Any]]:
    """``metrics=`` in any accepted form as (name, metric) pairs, in order."""
    if metrics is None:
        return []
    if isinstance(metrics, MetricCollection):
        return list(metrics.items())
    if isinstance(metrics, Metric):
        return [(type(metrics).__name__, metrics)]
    if isinstance(metrics, Mapping):
        return list(metrics.items())
    if isinstance(metrics, list | tuple):
        named: dict[str, Metric] = {}
        for index, metric in enumerate(metrics):
            if not isinstance(metric, Metric):
                raise EvaluationError(
                    f"metrics[{index}] is a {type(metric).__name__}: a list holds torchmetrics "
                    "Metrics (named from their class); name anything else in a dict, "
                    "metrics={'name': fn}"
                )
            name = type(metric).__name__
            if name in named:
                raise EvaluationError(
                    f"metrics= has two {name}s: pass a dict to name them, "
                    "metrics={'name': metric, ...}"
                )
            named[name] = metric
        return list(named.items())
    what = "a function" if callable(metrics) else f"a {type(metrics).__name__}"
    raise EvaluationError(
        f"metrics= is {what}: pass a dict of names to torchmetrics Metrics or callables "
        "(preds, target) -> tensor, e.g. metrics={'acc': fn}, a Metric, a list of Metrics "
        "or a MetricCollection (a loss function goes in loss=)"
    )


def _build_slots(
    named: list[tuple[str, Any]], loss: MetricFn | None, device: torch.device
) -> list[MetricSlot]:
    slots: list[MetricSlot] = []
    seen: dict[int, str] = {}
    for name, metric in named:
        if isinstance(metric, Metric):
            if id(metric) in seen:  # it would be reset once and updated twice per batch
                raise EvaluationError(
                    f"metrics {seen[id(metric)]!r} and {name!r} are the same Metric object: "
                    "give each name its own instance"
                )
            seen[id(metric)] = name
            slots.append(TorchmetricSlot(name, metric, device))
        elif isinstance(metric, MetricCollection):
            raise EvaluationError(
                f"metric {name!r} is a MetricCollection: pass its metrics as separate "
                "entries, metrics=dict(collection.items()), or the collection itself as "
                "metrics="
            )
        elif callable(metric):
            slots.append(FunctionSlot(name, metric, device))
        else:
            raise EvaluationError(
                f"metric {name!r} is a {type(metric).__name__}: pass a torchmetrics Metric "
                "or a callable (preds, target) -> tensor"
            )
    if loss is not None:
        if any(name == "loss" for name, _ in named):
            raise EvaluationError(
                "a metric is named 'loss' and loss= is given too: rename the metric"
            )
        slots.append(FunctionSlot("loss", loss, device))
    return slots


def _batch_limit(limit: int | float | None, loader: Iterable[Any]) -> int | None:
    if limit is None:
        return None
    if isinstance(limit, int) and not isinstance(limit, bool) and limit >= 1:
        return limit
    if isinstance(limit, float) and 0.0 < limit <= 1.0:
        length = _length(loader)
        if length is None:
            raise EvaluationError(
                f"limit_batches={limit} is a fraction of len(loader), but the loader has no "
                "len(): pass a number of batches (an int)"
            )
        return max(1, int(length * limit))
    raise EvaluationError(
        f"limit_batches={limit!r}: pass a number of batches (an int >= 1) or a fraction of "
        "the loader (a float in (0, 1])"
    )


def _autocast(
    dtype: torch.dtype | None, device: torch.device
) -> contextlib.AbstractContextManager[Any]:
    if dtype is None:
        return contextlib.nullcontext()
    if dtype not in AUTOCAST_DTYPES:
        raise EvaluationError(
            f"autocast={dtype!r}: pass torch.bfloat16 or torch.float16 (or None for no autocast)"
        )
    return torch.autocast(device_type=device.type, dtype=dtype)


def _full_precision(preds: Any) -> Any:
    if isinstance(preds, Tensor) and preds.dtype in AUTOCAST_DTYPES:
        return preds.float()
    return preds


def _length(loader: Iterable[Any]) -> int | None:
    try:
        return len(loader)  # type: ignore[arg-type]
    except TypeError:
        return None


def _samplers(loader: Iterable[Any]) -> list[Any]:
    return [
        getattr(loader, "sampler", None),
        getattr(getattr(loader, "batch_sampler", None), "sampler", None),
    ]


def _warn_if_samples_left_out(loader: Iterable[Any]) -> None:
    """Warn when the loader's sampler pads or drops samples, or its last batch is dropped."""
    from torch.utils.data import DataLoader, DistributedSampler

    what = None
    fix = (
        "Use gf.ShardedSampler(dataset) for evaluation: it shards without padding, so the "
        "result is exact."
    )
    for sampler in _samplers(loader):
        if not isinstance(sampler, DistributedSampler):
            continue
        size = len(sampler.dataset)  # type: ignore[arg-type]
        if sampler.total_size > size:
            what = (
                f"DistributedSampler pads its {sampler.num_replicas} shards to "
                f"{sampler.total_size} samples for a dataset of {size}: the result counts "
                f"{sampler.total_size - size} duplicate(s)"
            )
        elif sampler.total_size < size:
            what = (
                f"DistributedSampler drops {size - sampler.total_size} of {size} samples "
                "(drop_last=True): the result misses them"
            )
        break
    if what is None and isinstance(loader, DataLoader) and loader.drop_last:
        samples = _length(loader.sampler)
        batch_size = loader.batch_size
        if samples is not None and batch_size is not None and samples % batch_size:
            what = (
                f"DataLoader(drop_last=True) leaves out its last {samples % batch_size} of "
                f"{samples} samples (an incomplete batch of {batch_size}): the result misses them"
            )
            fix = "Use drop_last=False for evaluation: every sample counts once."
    if what is None:
        return
    warnings.warn(f"gf.evaluate: the loader's {what}. {fix}", DuplicateSamplesWarning, stacklevel=3)


def _sample_order(loader: Iterable[Any], world_size: int) -> list[int] | None:
    """The dataset index of each sample this rank's loader gives, in loader order.

    Replayed from a DataLoader's sampler, which must then be deterministic: a
    SequentialSampler, a gf.ShardedSampler or a DistributedSampler (seeded). ``None``
    on one process for a loader that is not such a DataLoader (a list of batches, an
    IterableDataset): predictions are kept in the order the loader gave them.
    """
    from torch.utils.data import (
        DataLoader,
        DistributedSampler,
        IterableDataset,
        SequentialSampler,
    )

    from gradfence.evaluation.sampler import ShardedSampler

    replayable = (SequentialSampler, ShardedSampler, DistributedSampler)
    sampler = None
    if isinstance(loader, DataLoader):
        sampler = getattr(loader.batch_sampler, "sampler", None) or loader.sampler
        if isinstance(sampler, replayable):
            return list(sampler)
        if not isinstance(loader.dataset, IterableDataset):
            raise EvaluationError(
                "return_predictions=True puts predictions in dataset order by replaying the "
                f"loader's sampler, and a {type(sampler).__name__} cannot be replayed: use "
                "shuffle=False, or gf.ShardedSampler(dataset, shuffle=True, seed=...)"
            )
    if world_size == 1:
        return None
    raise EvaluationError(
        "return_predictions=True on several ranks needs a DataLoader whose sampler is "
        f"gf.ShardedSampler (or DistributedSampler), not a {type(loader).__name__}: "
        "predictions are put back in dataset order by their indices"
    )


def _prediction(preds: Any) -> Tensor:
    if not isinstance(preds, Tensor) or preds.dim() == 0:
        raise EvaluationError(
            f"return_predictions=True needs preds as a tensor with one row per sample, got "
            f"{_shape_of(preds)}: return such a tensor from step="
        )
    return preds.detach().cpu()


def _shape_of(value: Any) -> str:
    if isinstance(value, Tensor):
        return f"a tensor of shape {tuple(value.shape)}"
    return f"a {type(value).__name__}"


def _gather_predictions(
    predictions: list[Tensor], order: list[int] | None, device: torch.device
) -> Tensor:
    try:
        local = torch.cat(predictions) if predictions else torch.empty(0)
    except RuntimeError:
        shapes = sorted({tuple(p.shape[1:]) for p in predictions})
        raise EvaluationError(
            f"return_predictions=True: batches gave predictions of shapes (N, *{shapes[0]}) "
            f"and (N, *{shapes[1]}), which cannot be concatenated: pad them to one shape "
            "in step="
        ) from None
    if order is None:
        return local
    indices = torch.tensor(order[: len(local)], dtype=torch.int64)
    if world()[0] > 1:
        local = torch.cat([p.to(device) for p in gather_tensors(local.to(device))]).cpu()
        indices = torch.cat([i.to(device) for i in gather_tensors(indices.to(device))]).cpu()
    sorted_indices, by_index = torch.sort(indices, stable=True)
    first = torch.ones_like(sorted_indices, dtype=torch.bool)
    first[1:] = sorted_indices[1:] != sorted_indices[:-1]  # a padded duplicate comes later
    return local[by_index[first]]


def _global_counts(batches: int, had_step_loss: bool, device: torch.device) -> tuple[int, bool]:
    """This rank's batch count and step-loss flag, summed over every rank."""
    if world()[0] == 1:
        return batches, had_step_loss
    import torch.distributed as dist

    counts = torch.tensor([batches, int(had_step_loss)], dtype=torch.int64, device=device)
    dist.all_reduce(counts)
    return int(counts[0]), bool(counts[1])


def _unpack(output: Any) -> tuple[Any, Any, Any]:
    if isinstance(output, tuple | list):
        if len(output) == 2:
            return output[0], output[1], None
        if len(output) == 3:
            return output[0], output[1], output[2]
    raise EvaluationError(
        f"step= returned a {type(output).__name__}"
        + (f" of {len(output)}" if isinstance(output, tuple | list) else "")
        + ": return (preds, target) or (preds, target, loss)"
    )


_STEP_FIX = "pass step=lambda model, batch: (preds, target)"


def _default_step(model: nn.Module, batch: Any) -> tuple[Any, ...]:
    if isinstance(batch, Mapping):  # Hugging Face style: keywords, with the target in "labels"
        if "labels" not in batch:
            keys = ", ".join(repr(key) for key in list(batch)[:6])
            raise EvaluationError(
                f"gf.evaluate's default step passes a {type(batch).__name__} batch to the "
                f"model as keywords and takes its 'labels' as the target, but it has no "
                f"'labels' (keys: {keys}): {_STEP_FIX}"
            )
        output = model(**batch)
        target = batch["labels"]
    elif isinstance(batch, tuple | list) and len(batch) == 2:
        inputs, target = batch
        output = model(inputs)
    else:
        shape = f"a {type(batch).__name__}" + (
            f" of {len(batch)}" if isinstance(batch, tuple | list) else ""
        )
        raise EvaluationError(
            f"gf.evaluate's default step expects batches of (inputs, target) or a mapping "
            f"with 'labels', got {shape}: {_STEP_FIX}"
        )
    preds = output if isinstance(output, Tensor) else getattr(output, "logits", None)
    if not isinstance(preds, Tensor):
        raise EvaluationError(
            f"gf.evaluate's default step got a {type(output).__name__} from the model, "
            f"neither a tensor nor an output with .logits: {_STEP_FIX}"
        )
    batch_loss = getattr(output, "loss", None)
    if isinstance(batch_loss, Tensor):
        return preds, target, batch_loss
    return preds, target


def _batch_size(target: Any, preds: Any) -> int:
    for value in (target, preds):
        if isinstance(value, Tensor):
            return int(value.shape[0]) if value.dim() > 0 else 1
        if isinstance(value, list | tuple):
            return len(value)
    raise EvaluationError(
        f"cannot tell the batch size from a target of type {type(target).__name__}: "
        "make step return tensors or lists as (preds, target)"
    )
