"""The measurements of ``gradfence bench``, one function per measured quantity.

Definitions (also in ``docs/bench.md``):

* **mode**: ``grad`` (autograd records the graph), ``no_grad`` or ``inference_mode``.
  The module is in eval mode for all three, or in train mode for all three with
  ``--train-mode``. Scopes come from :mod:`gradfence.scope` (see :func:`scope`).
* **latency**: wall time of one forward call (``time.perf_counter``; on CUDA with a
  ``torch.cuda.synchronize()`` before and after), after ``WARMUP`` untimed calls per
  mode. Repeats are interleaved across modes, in an order rotated every round, so
  a slow phase of a shared machine hits every mode alike. Median and 95th percentile
  (``statistics.quantiles``, inclusive method) over the repeats; throughput is
  batch size / median.
* **saved for backward**: bytes of the storages autograd keeps alive for backward
  during one forward call, seen by ``torch.autograd.graph.saved_tensors_hooks``. Each
  storage counts once, with its full size (a saved view keeps its whole base alive;
  a tensor saved by two nodes is one storage). Storages of the model's parameters and
  buffers, of the input tensors and of the output tensors are left out: the caller
  holds those whatever the grad mode, so what remains is the memory that disabling
  the graph avoids.
* **peak memory**: on CUDA ``torch.cuda.max_memory_allocated`` around one forward
  call (after ``reset_peak_memory_stats``), against ``memory_allocated`` before it. On
  CPU, a fresh child process per configuration (:mod:`gradfence.bench._probe`) builds
  the model and the input, then measures one forward call holding its output: its
  RSS just before the call (baseline) and its peak RSS after it (peak).
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import statistics
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, cast

from gradfence.batches import tensors_in
from gradfence.errors import GradfenceError, one_line
from gradfence.modes import BENCH_MODES, GradMode

if TYPE_CHECKING:
    import torch
    from torch import nn

    from gradfence.bench.workload import Workload

WARMUP = 5


class MeasurementError(GradfenceError):
    """The model could not be measured (its forward or the peak-memory probe failed)."""


# --- model inputs and outputs ------------------------------------------------------


def call(model: nn.Module, model_input: Any) -> Any:
    """Run the model: a tuple is positional arguments, a mapping keyword arguments."""
    if isinstance(model_input, tuple):
        return model(*model_input)
    if isinstance(model_input, Mapping):
        return model(**model_input)
    return model(model_input)


def scope(model: nn.Module, mode: str, training: bool) -> contextlib.ExitStack:
    """The module mode and grad mode of one configuration, both restored on exit.

    Eval: ``gf.inference(model, mode=mode)`` for no_grad / inference_mode, and
    ``gf.inference(model)`` with ``torch.enable_grad()`` inside it for ``grad``.
    Train (``--train-mode``): ``gf.training(model)``, with ``gf.inference(mode=mode)``
    (grad mode only, no modules) inside it for no_grad / inference_mode.
    """
    import torch

    import gradfence as gf

    if mode not in BENCH_MODES:
        raise ValueError(f"unknown mode {mode!r}: use one of {', '.join(BENCH_MODES)}")
    stack = contextlib.ExitStack()
    if training:
        stack.enter_context(gf.training(model))
        if mode != "grad":
            stack.enter_context(gf.inference(mode=cast(GradMode, mode)))
    elif mode == "grad":
        stack.enter_context(gf.inference(model))
        stack.enter_context(torch.enable_grad())
    else:
        stack.enter_context(gf.inference(model, mode=cast(GradMode, mode)))
    return stack


def _forward(model: nn.Module, model_input: Any, what: str) -> Any:
    try:
        return call(model, model_input)
    except Exception as exc:
        raise MeasurementError(f"the model's forward failed {what}: {one_line(exc)}") from None


# --- latency -----------------------------------------------------------------------


@dataclass(frozen=True)
class Latency:
    """Timed forward calls of one configuration, in seconds."""

    samples_s: tuple[float, ...]

    @property
    def median_s(self) -> float:
        return statistics.median(self.samples_s)

    @property
    def p95_s(self) -> float:
        if len(self.samples_s) == 1:
            return self.samples_s[0]
        return statistics.quantiles(self.samples_s, n=100, method="inclusive")[94]


def time_modes(
    model: nn.Module,
    model_input: Any,
    modes: Sequence[str],
    *,
    training: bool,
    repeats: int,
    device: str,
    advance: Callable[[int], None] = lambda n: None,
) -> dict[str, Latency]:
    """Time ``repeats`` forward calls per mode, interleaved, after :data:`WARMUP` calls each.

    ``advance(len(modes))`` is called after every round (for a progress bar).
    """
    import torch

    sync: Callable[[], None] = torch.cuda.synchronize if device == "cuda" else _no_sync
    for mode in modes:
        with scope(model, mode, training):
            for _ in range(WARMUP):
                _forward(model, model_input, f"in mode {mode}")
    samples: dict[str, list[float]] = {mode: [] for mode in modes}
    for round_index in range(repeats):
        shift = round_index % len(modes)
        for mode in (*modes[shift:], *modes[:shift]):
            with scope(model, mode, training):
                sync()
                start = time.perf_counter()
                out = call(model, model_input)
                sync()
                samples[mode].append(time.perf_counter() - start)
                del out
        advance(len(modes))
    return {mode: Latency(tuple(values)) for mode, values in samples.items()}


def _no_sync() -> None:
    pass


# --- bytes saved for backward ------------------------------------------------------


@dataclass(frozen=True)
class SavedForBackward:
    """What autograd saved during one forward call (see the module docstring)."""

    bytes: int
    storages: int


def _storage_key(tensor: torch.Tensor) -> tuple[str, int] | None:
    try:
        storage = tensor.untyped_storage()
    except (RuntimeError, NotImplementedError):  # sparse or storage-less: not counted
        return None
    if storage.nbytes() == 0:
        return None
    return (str(tensor.device), storage.data_ptr())


def saved_for_backward(
    model: nn.Module, model_input: Any, mode: str, *, training: bool
) -> SavedForBackward:
    """Count the storages saved for backward in one forward call of this configuration.

    >>> import torch
    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    >>> saved_for_backward(model, torch.ones(5, 4), "grad", training=False)
    SavedForBackward(bytes=160, storages=1)
    >>> saved_for_backward(model, torch.ones(5, 4), "no_grad", training=False)
    SavedForBackward(bytes=0, storages=0)
    """
    import torch

    # strong references: nothing saved is freed (and its address reused) while counting
    saved: dict[tuple[str, int], torch.Tensor] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        key = _storage_key(tensor)
        if key is not None:
            saved.setdefault(key, tensor)
        return tensor

    hooks = torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor)
    with hooks, scope(model, mode, training):
        output = _forward(model, model_input, f"in mode {mode}")
    held = [*model.parameters(), *model.buffers(), *tensors_in(model_input), *tensors_in(output)]
    for tensor in held:
        key = _storage_key(tensor)
        if key is not None:
            saved.pop(key, None)
    total = sum(tensor.untyped_storage().nbytes() for tensor in saved.values())
    return SavedForBackward(bytes=total, storages=len(saved))


# --- peak memory -------------------------------------------------------------------


@dataclass(frozen=True)
class PeakMemory:
    """Memory before one forward call (baseline) and at its peak, in bytes."""

    method: str
    baseline_bytes: int
    peak_bytes: int

    @property
    def delta_bytes(self) -> int:
        return self.peak_bytes - self.baseline_bytes


def peak_cuda(model: nn.Module, model_input: Any, mode: str, *, training: bool) -> PeakMemory:
    """``torch.cuda.max_memory_allocated`` during one forward call, output held."""
    import torch

    gc.collect()
    with scope(model, mode, training):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        baseline = torch.cuda.memory_allocated()
        output = _forward(model, model_input, f"in mode {mode}")
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
        del output
    return PeakMemory("cuda_max_memory_allocated", baseline, peak)


# how far VmHWM may exceed VmRSS right after a reset (pages touched in between)
_PAGE_SLACK = 1024 * 1024


def _proc_status(field_name: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field_name + ":"):
                return int(line.split()[1]) * 1024  # the kernel reports kB
    raise OSError(f"/proc/self/status has no {field_name}")


def peak_rss(run: Callable[[], Any]) -> PeakMemory:
    """Peak resident set size of this process while ``run()`` executes (its result held).

    On Linux the kernel's high-water mark is reset first (``/proc/self/clear_refs``), so
    baseline is the RSS right before ``run`` and peak is ``VmHWM`` right after. Elsewhere,
    or where the reset did not take, ``getrusage`` gives the peak so far before and after,
    which is only a lower bound on the increase when an earlier phase peaked higher.
    """
    gc.collect()
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
        baseline = _proc_status("VmRSS")
        reset = _proc_status("VmHWM") <= baseline + _PAGE_SLACK
    except OSError:
        reset = False
    if not reset:
        return _peak_rusage(run)
    result = run()
    peak = _proc_status("VmHWM")
    del result
    return PeakMemory("cpu_rss_child_vmhwm", baseline, peak)


def _peak_rusage(run: Callable[[], Any]) -> PeakMemory:
    import resource

    scale = 1 if sys.platform == "darwin" else 1024  # bytes on macOS, KiB elsewhere
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale
    result = run()
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale
    del result
    return PeakMemory("cpu_rss_child_ru_maxrss", before, after)


def peak_cpu_in_child(
    workload: Workload, batch_size: int, mode: str, *, training: bool, threads: int
) -> PeakMemory:
    """Run :mod:`gradfence.bench._probe` for one configuration in a fresh process."""
    command = [
        sys.executable,
        "-m",
        "gradfence.bench._probe",
        "--model",
        workload.model_spec,
        "--input",
        workload.input_spec,
        "--batch-size",
        str(batch_size),
        "--mode",
        mode,
        "--threads",
        str(threads),
    ]
    if training:
        command.append("--train-mode")
    env = dict(os.environ)
    # the child imports what this process can (user modules found via sys.path included)
    env["PYTHONPATH"] = os.pathsep.join(entry for entry in sys.path if entry)
    done = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    if done.returncode != 0:
        lines = done.stderr.strip().splitlines() or [f"exit status {done.returncode}"]
        raise MeasurementError(
            f"peak-memory probe for mode {mode}, batch size {batch_size} failed: {lines[-1]}"
        )
    data = json.loads(done.stdout.strip().splitlines()[-1])
    return PeakMemory(str(data["method"]), int(data["baseline_bytes"]), int(data["peak_bytes"]))


# --- eval versus train -------------------------------------------------------------

_MODE_DEPENDENT = ("Dropout", "BatchNorm", "InstanceNorm", "SyncBatchNorm")


@dataclass(frozen=True)
class TrainEvalComparison:
    """Outputs of one forward call in train mode and in eval mode (grad off), compared."""

    outputs_differ: bool | None
    max_abs_diff: float | None
    mode_dependent_modules: dict[str, int] = field(default_factory=dict)
    error: str | None = None

    def note(self) -> str:
        """One sentence for the report."""
        layers = ", ".join(
            f"{name} x{count}" for name, count in self.mode_dependent_modules.items()
        )
        having = f" (mode-dependent layers: {layers})" if layers else ""
        if self.outputs_differ is None:
            return f"train-mode forward failed, outputs not compared: {self.error}{having}"
        if self.outputs_differ:
            return (
                f"outputs differ between train and eval mode, max |diff| = "
                f"{self.max_abs_diff:.3g}{having}: eval() is about correctness, not speed"
            )
        return f"outputs are identical in train and eval mode{having}"


def compare_train_eval(model: nn.Module, model_input: Any, device: str) -> TrainEvalComparison:
    """Run the model once in train and once in eval mode (no_grad) and compare outputs.

    Buffers (BatchNorm running statistics) and the RNG state are restored afterwards,
    and module flags by the scopes, so the model is left exactly as it was.
    """
    import torch

    import gradfence as gf

    counts = Counter(
        type(module).__name__
        for module in model.modules()
        if any(part in type(module).__name__ for part in _MODE_DEPENDENT)
    )
    kept = [(buffer, buffer.detach().clone()) for buffer in model.buffers()]
    devices = [torch.cuda.current_device()] if device == "cuda" else []
    try:
        with torch.random.fork_rng(devices=devices), gf.training(model), torch.no_grad():
            train_out = tensors_in(call(model, model_input))
    except Exception as exc:
        first = str(exc).strip().splitlines()
        return TrainEvalComparison(None, None, dict(counts), first[0] if first else repr(exc))
    finally:
        with torch.no_grad():
            for buffer, value in kept:
                buffer.copy_(value)
    with gf.inference(model):
        eval_out = tensors_in(call(model, model_input))
    if len(train_out) != len(eval_out) or any(
        a.shape != b.shape for a, b in zip(train_out, eval_out, strict=True)
    ):
        return TrainEvalComparison(True, None, dict(counts))
    differ = not all(torch.equal(a, b) for a, b in zip(train_out, eval_out, strict=True))
    diffs = [
        float((a.double() - b.double()).abs().max())
        for a, b in zip(train_out, eval_out, strict=True)
        if a.is_floating_point() and a.numel()
    ]
    return TrainEvalComparison(differ, max(diffs, default=0.0), dict(counts))
