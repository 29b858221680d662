"""What ``gf.evaluate`` accumulates: torchmetrics ``Metric``s and sample-weighted means.

Every metric of an evaluation is held in a :class:`MetricSlot`: reset before the loop,
updated per batch with detached tensors, and turned into a result once the loop is
over, *outside* the grad scope. In a distributed run that last step is where the
ranks talk to each other, so it must never run inside ``inference_mode`` (gloo's
collectives fail there, pytorch/pytorch#86830) and must leave every metric consistent
when it fails.
"""

from __future__ import annotations

import abc
import contextlib
import warnings
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.aggregation import MeanMetric
from torchmetrics.utilities.exceptions import TorchMetricsUserError

from gradfence.distributed import world
from gradfence.errors import EvaluationError
from gradfence.evaluation.distributed import gather_tensors

ResultValue = float | Tensor
Results = dict[str, ResultValue]
MetricFn = Callable[[Any, Any], Any]


def flatten_result(name: str, value: Any, into: Results) -> None:
    """Store a metric's computed value: scalars as floats, tensors detached on the CPU.

    Dicts and sequences (e.g. a metric returning several values) become ``name/key``
    and ``name/index`` entries.
    """
    if isinstance(value, Mapping):
        for key, item in value.items():
            flatten_result(f"{name}/{key}", item, into)
    elif isinstance(value, tuple | list):
        for index, item in enumerate(value):
            flatten_result(f"{name}/{index}", item, into)
    elif isinstance(value, Tensor):
        value = value.detach()
        into[name] = float(value.item()) if value.numel() == 1 else value.cpu()
    elif isinstance(value, int | float):
        into[name] = float(value)
    else:
        raise EvaluationError(
            f"metric {name!r} computed a {type(value).__name__}: expected a tensor or a number"
        )


def _detached(value: Any) -> Any:
    # A custom step may run under enable_grad (saliency, attacks): never let a graph
    # into an accumulated state.
    if isinstance(value, Tensor) and value.requires_grad:
        return value.detach()
    return value


class MetricSlot(abc.ABC):
    """One named quantity of an evaluation (the interface; see the two kinds below)."""

    def __init__(self, name: str) -> None:
        self.name = name

    @abc.abstractmethod
    def reset(self) -> None:
        """Clear the accumulated state (before the loop)."""

    @abc.abstractmethod
    def update(self, preds: Any, target: Any, batch_size: int) -> None:
        """Accumulate one batch (``batch_size`` samples)."""

    @abc.abstractmethod
    def running(self) -> float | None:
        """This rank's value so far, for a progress bar (no collectives); None if not scalar."""

    @abc.abstractmethod
    def result(self, into: Results) -> None:
        """Store the final (global, when distributed) value in ``into``."""


class TorchmetricSlot(MetricSlot):
    """A torchmetrics ``Metric``: its own states and its own distributed sync, made safe."""

    def __init__(self, name: str, metric: Metric, device: torch.device) -> None:
        super().__init__(name)
        self.metric = metric
        self.device = device

    def reset(self) -> None:
        if self.metric.device != self.device:  # .to() walks every state: skip the no-op
            self.metric.to(self.device)
        self.metric.reset()

    def update(self, preds: Any, target: Any, batch_size: int) -> None:
        try:
            self.metric.update(_detached(preds), _detached(target))
        except (AttributeError, TypeError) as exc:
            if isinstance(preds, Tensor) and isinstance(target, Tensor):
                raise  # the metric's own failure on tensors: not a wrong kind of input
            raise EvaluationError(
                f"metric {self.name!r} ({type(self.metric).__name__}) cannot take preds of "
                f"type {type(preds).__name__} and a target of type {type(target).__name__}: "
                "pass step=lambda model, batch: (preds, target) returning tensors"
            ) from exc

    def running(self) -> float | None:
        metric = self.metric
        # compute() would sync across ranks at a moment the other ranks do not share (and
        # inside inference_mode), and cache its value: for this local peek, switch both
        # off through the metric's public attributes, so the final compute() syncs for real.
        available, with_cache = metric.distributed_available_fn, metric.compute_with_cache
        metric.distributed_available_fn = _not_distributed
        metric.compute_with_cache = False
        try:
            value = metric.compute()
        except Exception:  # a display aid: a metric that cannot compute yet shows nothing
            return None
        finally:
            metric.distributed_available_fn = available
            metric.compute_with_cache = with_cache
        if isinstance(value, Tensor) and value.numel() == 1:
            return float(value.item())
        return None

    def result(self, into: Results) -> None:
        metric = self.metric
        _normalise_inference_states(metric)
        local = _state_references(metric)
        try:
            with _gathering_empty_shards(metric), _quiet_on_an_empty_shard(metric):
                value = metric.compute()
        except BaseException:
            _put_back_local_states(metric, local)
            raise
        flatten_result(self.name, value, into)


def _not_distributed() -> bool:
    return False


@contextlib.contextmanager
def _gathering_empty_shards(metric: Metric) -> Iterator[None]:
    """Sync with :func:`gather_tensors` (empty shards included) unless the metric has its own."""
    if metric.dist_sync_fn is not None or world()[0] == 1:
        yield
        return
    metric.dist_sync_fn = gather_tensors
    try:
        yield
    finally:
        metric.dist_sync_fn = None


@contextlib.contextmanager
def _quiet_on_an_empty_shard(metric: Metric) -> Iterator[None]:
    """A rank that saw no sample still computes the global value: no "before update" warning."""
    if metric.update_called or world()[0] == 1:
        yield
        return
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", message=r"The ``compute`` method of metric", category=UserWarning
        )
        yield


def _normalise_inference_states(metric: Metric) -> None:
    """Replace states created inside inference_mode by normal tensors.

    Inference tensors cannot be updated in place outside inference mode, so the
    caller's next ``update()`` (or a collective writing into them) would fail.
    """
    for attr, value in metric.metric_state.items():
        if isinstance(value, Tensor) and value.is_inference():
            setattr(metric, attr, value.clone())
        elif isinstance(value, list) and any(
            isinstance(item, Tensor) and item.is_inference() for item in value
        ):
            setattr(
                metric,
                attr,
                [
                    item.clone() if isinstance(item, Tensor) and item.is_inference() else item
                    for item in value
                ],
            )


def _state_references(metric: Metric) -> dict[str, Any]:
    # A sync replaces state attributes rather than writing into them, so references
    # (and shallow copies of list states) are enough to undo it.
    return {
        attr: list(value) if isinstance(value, list) else value
        for attr, value in metric.metric_state.items()
    }


def _put_back_local_states(metric: Metric, states: dict[str, Any]) -> None:
    """Undo a sync after ``compute()`` raised: this rank's own states, marked unsynced.

    torchmetrics' ``sync_context`` has no try/finally (torchmetrics#3486): a compute()
    that raises after the sync leaves the states global and the metric marked as
    synced, so the next update() raises. ``unsync()`` undoes a completed sync; a sync
    that failed half-way is not marked, and the states put back here undo it.
    """
    with contextlib.suppress(TorchMetricsUserError):  # "already un-synced": nothing to undo
        metric.unsync()
    for attr, value in states.items():
        setattr(metric, attr, value)


class MeanSlot(TorchmetricSlot):
    """A sample-weighted mean of the values handed to :meth:`add` (a step's own loss).

    A scalar is taken as the batch's mean and weighted by the batch size; a 1-D value
    with one entry per sample is summed. The sums live in a torchmetrics ``MeanMetric``
    (float64, so large datasets keep their digits; NaN kept, not dropped) on the
    evaluation device, read back once at the end, and synchronised across ranks like
    any other metric. Values are handed to it in chunks of :data:`CHUNK` batches: one
    ``MeanMetric.update`` costs some 30 µs, ten times the per-batch work of a loop.
    """

    CHUNK = 64

    def __init__(self, name: str, device: torch.device) -> None:
        mean = MeanMetric(nan_strategy="disable")
        mean.set_dtype(torch.float32 if device.type == "mps" else torch.float64)
        super().__init__(name, mean, device)
        self._pending: list[Tensor] = []

    def reset(self) -> None:
        self._pending.clear()
        super().reset()

    def update(self, preds: Any, target: Any, batch_size: int) -> None:
        """Nothing: the loop hands values in with :meth:`add`."""

    def add(self, value: Any, batch_size: int) -> None:
        if not isinstance(value, Tensor):
            value = torch.as_tensor(value)
        value = value.detach()
        if value.device != self.device:
            value = value.to(self.device)
        if value.dim() == 0:
            # The batch mean, weighted by the batch size: as that many equal values (a
            # view), since MeanMetric(nan_strategy="disable") drops weight= (torchmetrics 1.9).
            self._pending.append(value.expand(batch_size))
        elif value.dim() == 1 and value.numel() == batch_size:
            self._pending.append(value)  # one value per sample
        else:
            raise EvaluationError(
                f"metric {self.name!r} returned shape {tuple(value.shape)} for a batch of "
                f"{batch_size}: return a scalar (the batch mean) or one value per sample"
            )
        if len(self._pending) >= self.CHUNK:
            self._flush()

    def _flush(self) -> None:
        if self._pending:
            self.metric.update(torch.cat(self._pending))
            self._pending.clear()

    def running(self) -> float | None:
        self._flush()
        return super().running() if self.metric.update_called else None

    def result(self, into: Results) -> None:
        _normalise_inference_states(self.metric)  # states reset inside the caller's
        self._flush()  # inference_mode cannot be added to outside it
        super().result(into)


class FunctionSlot(MeanSlot):
    """A callable ``fn(preds, target)`` averaged over samples, e.g. a loss function."""

    def __init__(self, name: str, fn: MetricFn, device: torch.device) -> None:
        super().__init__(name, device)
        self.fn = fn

    def update(self, preds: Any, target: Any, batch_size: int) -> None:
        self.add(self.fn(_detached(preds), _detached(target)), batch_size)
