"""``gf.evaluate``: the evaluation loop, with modes restored and metrics exact across ranks."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import Tensor, nn
from torchmetrics import Metric

from gradfence.errors import DuplicateSamplesWarning, EvaluationError
from gradfence.evaluation.metrics import (
    MeanSlot,
    MetricFn,
    MetricSlot,
    Results,
    TorchmetricSlot,
    distributed_world_size,
    outside_inference_mode,
)
from gradfence.evaluation.progress import Progress, wants_progress
from gradfence.scope import GradMode, inference

Step = Callable[[nn.Module, Any], tuple[Any, Any]]


def evaluate(
    model: nn.Module,
    loader: Iterable[Any],
    metrics: Mapping[str, Metric | MetricFn] | None = None,
    device: torch.device | str | None = None,
    mode: GradMode = "no_grad",
    step: Step | None = None,
    loss: MetricFn | None = None,
    progress: bool | None = None,
) -> Results:
    """Evaluate ``model`` on every batch of ``loader``; return each metric's value.

    The loop runs inside :func:`gf.inference(model, mode=mode) <gradfence.inference>`,
    so on return *and* on exception every submodule's train/eval flag and the grad
    mode are exactly what they were (a frozen BatchNorm inside a training model stays
    frozen, the model stays in train mode for the next step).

    Args:
        model: the module to evaluate.
        loader: any iterable of batches, typically a ``DataLoader``.
        metrics: name -> torchmetrics ``Metric`` (reset before use, left computed), or
            name -> callable ``(preds, target) -> tensor`` averaged over samples (a scalar
            is a batch mean, weighted by the batch size; a 1-D tensor is one value per
            sample).
        device: where batches and metrics go; default: the device of the model's first
            parameter (CPU for a model without parameters). Batches (tensors in nested
            tuples, lists and dicts) are moved there before ``step`` sees them.
        mode: ``"no_grad"`` or ``"inference_mode"`` (see ``gf.inference``).
        step: ``step(model, batch) -> (preds, target)``; the default takes
            ``batch = (x, y)`` and returns ``(model(x), y)``.
        loss: ``loss(preds, target)``; its sample-weighted mean is ``results["loss"]``.
        progress: ``None``: a tqdm bar (batches/s, running metrics) only when stderr is
            a terminal, on rank 0; ``True``/``False`` to force it on or off.

    Returns:
        ``{name: value}``: Python floats for scalar metrics, detached CPU tensors
        otherwise; ``"loss"`` when ``loss`` is given. Loss and every accumulation are
        detached: no graph is kept.

    When ``torch.distributed`` is initialised, metric states are synchronised across
    ranks (and the loss reduced as a sample-weighted mean), so every rank returns the
    global result; with :class:`gf.ShardedSampler <gradfence.ShardedSampler>` in the
    loader that equals the single-process result. Collectives run after the grad scope
    is left, never inside ``inference_mode``; a failing metric is put back to its local,
    unsynchronised state. A loader whose ``DistributedSampler`` pads (or drops) samples
    gets one :class:`~gradfence.DuplicateSamplesWarning`, from rank 0.

    >>> import torch, torchmetrics, gradfence as gf
    >>> model = torch.nn.Linear(4, 3)
    >>> data = [(torch.randn(8, 4), torch.randint(0, 3, (8,))) for _ in range(4)]
    >>> acc = torchmetrics.classification.MulticlassAccuracy(num_classes=3)
    >>> results = gf.evaluate(model, data, {"acc": acc}, loss=torch.nn.functional.cross_entropy)
    >>> sorted(results), model.training
    (['acc', 'loss'], True)
    """
    scope = inference(model, mode=mode)  # validates model and mode before anything runs
    target_device = resolve_device(model, device)
    slots = _build_slots(metrics, loss, target_device)
    run_step = _default_step if step is None else step
    rank = _rank()
    if rank == 0:  # once for the whole job, not once per rank
        _warn_if_padded(loader)

    for slot in slots:
        slot.reset()
    bar = Progress(wants_progress(progress, rank), _length(loader), slots)
    try:
        with scope:
            for batch in loader:
                preds, target = run_step(model, to_device(batch, target_device))
                size = _batch_size(target, preds)
                for slot in slots:
                    slot.update(preds, target, size)
                bar.advance()
    finally:
        bar.close()

    # The scope is closed: collectives (metric sync, loss reduction) run here, in no_grad.
    results: Results = {}
    with outside_inference_mode():
        for slot in slots:
            slot.result(results)
    return results


def resolve_device(model: nn.Module, device: torch.device | str | None) -> torch.device:
    if device is not None:
        return torch.device(device)
    for parameter in model.parameters():
        return parameter.device
    return torch.device("cpu")


def _build_slots(
    metrics: Mapping[str, Metric | MetricFn] | None,
    loss: MetricFn | None,
    device: torch.device,
) -> list[MetricSlot]:
    from torchmetrics import MetricCollection

    slots: list[MetricSlot] = []
    seen: dict[int, str] = {}
    for name, metric in (metrics or {}).items():
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
            slots.append(MeanSlot(name, metric, device))
        else:
            raise EvaluationError(
                f"metric {name!r} is a {type(metric).__name__}: pass a torchmetrics Metric "
                "or a callable (preds, target) -> tensor"
            )
    if loss is not None:
        if metrics is not None and "loss" in metrics:
            raise EvaluationError(
                "a metric is named 'loss' and loss= is given too: rename the metric"
            )
        slots.append(MeanSlot("loss", loss, device))
    return slots


def _rank() -> int:
    if distributed_world_size() == 1:
        return 0
    import torch.distributed as dist

    return dist.get_rank()


def _length(loader: Iterable[Any]) -> int | None:
    try:
        return len(loader)  # type: ignore[arg-type]
    except TypeError:
        return None


def _warn_if_padded(loader: Iterable[Any]) -> None:
    """Warn when the loader's sampler is a DistributedSampler that pads or drops samples."""
    from torch.utils.data import DistributedSampler

    candidates = (
        getattr(loader, "sampler", None),
        getattr(getattr(loader, "batch_sampler", None), "sampler", None),
    )
    for sampler in candidates:
        if not isinstance(sampler, DistributedSampler):
            continue
        size = len(sampler.dataset)  # type: ignore[arg-type]
        if sampler.total_size > size:
            what = (
                f"pads its {sampler.num_replicas} shards to {sampler.total_size} samples for a "
                f"dataset of {size}: the result counts {sampler.total_size - size} duplicate(s)"
            )
        elif sampler.total_size < size:
            what = (
                f"drops {size - sampler.total_size} of {size} samples (drop_last=True): "
                "the result misses them"
            )
        else:
            return
        warnings.warn(
            f"gf.evaluate: the loader's DistributedSampler {what}. Use "
            "gf.ShardedSampler(dataset) for evaluation: it shards without padding, so the "
            "result is exact.",
            DuplicateSamplesWarning,
            stacklevel=3,
        )
        return


def _default_step(model: nn.Module, batch: Any) -> tuple[Any, Any]:
    if not isinstance(batch, tuple | list) or len(batch) != 2:
        shape = f"a {type(batch).__name__}" + (
            f" of {len(batch)}" if isinstance(batch, tuple | list) else ""
        )
        raise EvaluationError(
            f"gf.evaluate's default step expects batches of (inputs, target), got {shape}: "
            "pass step=lambda model, batch: (preds, target)"
        )
    inputs, target = batch
    return model(inputs), target


def to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, Tensor):
        if batch.device == device:  # the common case, checked first: it runs per batch
            return batch
        # non_blocking only towards an accelerator: a non-blocking copy *to* the CPU may
        # be read before it has landed.
        return batch.to(device, non_blocking=device.type != "cpu")
    if type(batch) is tuple:
        return tuple([to_device(item, device) for item in batch])
    if isinstance(batch, tuple):
        items = [to_device(item, device) for item in batch]
        return type(batch)(*items) if hasattr(batch, "_fields") else tuple(items)
    if isinstance(batch, list):
        return [to_device(item, device) for item in batch]
    if isinstance(batch, dict):
        return {key: to_device(value, device) for key, value in batch.items()}
    return batch


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
