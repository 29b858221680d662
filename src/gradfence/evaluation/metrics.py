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
import math
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
from torch import Tensor
from torchmetrics import Metric

from gradfence.errors import EvaluationError

ResultValue = float | Tensor
Results = dict[str, ResultValue]
MetricFn = Callable[[Any, Any], Any]


def distributed_world_size() -> int:
    """World size of the default process group; 1 when torch.distributed is not initialised."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


@contextlib.contextmanager
def outside_inference_mode() -> Iterator[None]:
    """No grad, and *not* inference mode, even when the caller is inside ``inference_mode``.

    Leaving inference mode with ``inference_mode(False)`` turns grad on, hence the
    ``no_grad`` inside it: results are computed without graphs either way.
    """
    with contextlib.ExitStack() as stack:
        if torch.is_inference_mode_enabled():
            stack.enter_context(torch.inference_mode(False))
        stack.enter_context(torch.no_grad())
        yield


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
        self.metric.update(_detached(preds), _detached(target))

    def running(self) -> float | None:
        metric = self.metric
        # compute() would sync across ranks at a moment the other ranks do not share
        # (and inside inference_mode): switch the sync off for this local peek, and drop
        # the cached value so the final compute() syncs for real.
        if not hasattr(metric, "_to_sync"):  # a torchmetrics without that switch: no peek
            return None
        to_sync = metric._to_sync
        metric._to_sync = False
        try:
            value = metric.compute()
        except Exception:  # a display aid: a metric that cannot compute yet shows nothing
            return None
        finally:
            metric._to_sync = to_sync
            metric._computed = None
        if isinstance(value, Tensor) and value.numel() == 1:
            return float(value.item())
        return None

    def result(self, into: Results) -> None:
        metric = self.metric
        _normalise_inference_states(metric)
        local = _state_references(metric)
        try:
            value = metric.compute()
        except BaseException:
            # torchmetrics' sync_context has no try/finally (torchmetrics#3486): a compute()
            # that raises after the sync leaves the states global and the metric marked as
            # synced, so the next update() raises. Put this rank's own states back.
            _restore_states(metric, local)
            raise
        flatten_result(self.name, value, into)


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


def _restore_states(metric: Metric, states: dict[str, Any]) -> None:
    for attr, value in states.items():
        setattr(metric, attr, value)
    metric._is_synced = False
    metric._cache = None
    metric._computed = None


class MeanSlot(MetricSlot):
    """A callable ``fn(preds, target)`` averaged over samples, e.g. a loss function.

    A scalar result is taken as the batch's mean and weighted by the batch size; a
    1-D result with one value per sample is summed. The running sums are detached
    tensors on the evaluation device (float64, so large datasets keep their digits),
    read back once at the end: no per-batch host synchronisation.
    """

    def __init__(self, name: str, fn: MetricFn, device: torch.device) -> None:
        super().__init__(name)
        self.fn = fn
        self.device = device
        self.dtype = torch.float32 if device.type == "mps" else torch.float64
        self.total = torch.zeros((), dtype=self.dtype, device=device)
        self.count = 0

    def reset(self) -> None:
        self.total = torch.zeros((), dtype=self.dtype, device=self.device)
        self.count = 0

    def update(self, preds: Any, target: Any, batch_size: int) -> None:
        value = self.fn(_detached(preds), _detached(target))
        if not isinstance(value, Tensor):
            value = torch.as_tensor(value)
        value = value.detach()
        if value.device != self.total.device:
            value = value.to(self.total.device)
        # add_ promotes into the float64 total; alpha weights the batch mean in the same op
        if value.dim() == 0:
            self.total.add_(value, alpha=batch_size)
            self.count += batch_size
        elif value.dim() == 1 and value.numel() == batch_size:
            self.total.add_(value.sum(dtype=self.dtype))
            self.count += batch_size
        else:
            raise EvaluationError(
                f"metric {self.name!r} returned shape {tuple(value.shape)} for a batch of "
                f"{batch_size}: return a scalar (the batch mean) or one value per sample"
            )

    def running(self) -> float | None:
        return float(self.total.item()) / self.count if self.count else None

    def result(self, into: Results) -> None:
        total, count = self.total.clone(), float(self.count)
        if distributed_world_size() > 1:
            import torch.distributed as dist

            sums = torch.stack([total, torch.tensor(count, dtype=self.dtype, device=total.device)])
            dist.all_reduce(sums)
            total, count = sums[0], float(sums[1].item())
        into[self.name] = float(total.item()) / count if count else math.nan
