"""One benchmark run: every (mode, batch size) configuration measured, plus its context.

:func:`run_bench` is the whole of ``gradfence bench`` minus argument parsing and
rendering; :class:`BenchRun` is what the reports render.
"""

from __future__ import annotations

import datetime
import os
import platform
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from typing import Any

from gradfence.batches import to_device
from gradfence.bench import measure
from gradfence.bench.workload import Workload

# peak-RSS child processes run at once on CPU (each measures only itself)
CHILDREN_AT_ONCE = max(1, min(2, os.cpu_count() or 1))


@dataclass(frozen=True)
class Settings:
    """What to measure (the command line, checked)."""

    workload: Workload
    batch_sizes: tuple[int, ...]
    modes: tuple[str, ...]
    training: bool = False
    device: str = "cpu"
    repeats: int = 30

    @property
    def module_mode(self) -> str:
        return "train" if self.training else "eval"


@dataclass(frozen=True)
class ConfigResult:
    """The measurements of one (mode, batch size)."""

    mode: str
    batch_size: int
    latency: measure.Latency
    saved: measure.SavedForBackward
    peak: measure.PeakMemory | None

    @property
    def throughput_per_s(self) -> float:
        return self.batch_size / self.latency.median_s


@dataclass
class BenchRun:
    """A finished run: settings, machine, per-configuration results and notes."""

    settings: Settings
    environment: dict[str, Any]
    results: list[ConfigResult] = field(default_factory=list)
    train_eval: measure.TrainEvalComparison | None = None
    created_utc: str = ""
    command: str = "gradfence bench"
    notes: list[str] = field(default_factory=list)

    def result(self, mode: str, batch_size: int) -> ConfigResult | None:
        for item in self.results:
            if item.mode == mode and item.batch_size == batch_size:
                return item
        return None


def environment(device: str) -> dict[str, Any]:
    """The machine, software versions, thread count and device of this run."""
    import torch

    from gradfence import __version__

    env: dict[str, Any] = {
        "machine": platform.machine(),
        "cpu": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "gradfence": __version__,
        "torch_threads": torch.get_num_threads(),
        "device": device,
        "device_name": _cpu_name(),
    }
    if device == "cuda":
        env["device_name"] = torch.cuda.get_device_name()
        env["cuda"] = torch.version.cuda
    return env


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def steps(settings: Settings) -> int:
    """How many progress steps :func:`run_bench` reports in all."""
    configs = len(settings.batch_sizes) * len(settings.modes)
    # timed calls, one saved-bytes pass and one peak-memory measurement per configuration
    return configs * (settings.repeats + 2)


def run_bench(
    settings: Settings,
    *,
    command: str = "gradfence bench",
    advance: Callable[[int, str], None] = lambda n, what: None,
) -> BenchRun:
    """Measure every configuration of ``settings``; ``advance(n, what)`` reports progress."""
    import torch

    run = BenchRun(
        settings,
        environment(settings.device),
        created_utc=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        command=command,
    )
    model = settings.workload.build_model().to(settings.device)
    threads = torch.get_num_threads()
    largest_input: Any = None
    for batch_size in settings.batch_sizes:
        model_input = to_device(settings.workload.make_input(batch_size), settings.device)
        if batch_size == max(settings.batch_sizes):
            largest_input = model_input  # train vs eval is compared on the largest batch
        label = f"batch {batch_size}"
        latencies = measure.time_modes(
            model,
            model_input,
            settings.modes,
            training=settings.training,
            repeats=settings.repeats,
            device=settings.device,
            advance=_labelled(advance, f"{label}: timing"),
        )
        for mode in settings.modes:
            saved = measure.saved_for_backward(model, model_input, mode, training=settings.training)
            advance(1, f"{label}: saved for backward")
            run.results.append(ConfigResult(mode, batch_size, latencies[mode], saved, None))
        del model_input
    run.train_eval = measure.compare_train_eval(model, largest_input, settings.device)
    del largest_input
    _measure_peaks(run, model, threads, advance)
    run.notes.extend(_notes(run))
    return run


def _labelled(advance: Callable[[int, str], None], what: str) -> Callable[[int], None]:
    def advance_with_label(count: int) -> None:
        advance(count, what)

    return advance_with_label


def _measure_peaks(
    run: BenchRun, model: Any, threads: int, advance: Callable[[int, str], None]
) -> None:
    settings = run.settings
    peaks: dict[int, measure.PeakMemory] = {}
    if settings.device == "cuda":
        for index, item in enumerate(run.results):
            model_input = to_device(settings.workload.make_input(item.batch_size), settings.device)
            peaks[index] = measure.peak_cuda(
                model, model_input, item.mode, training=settings.training
            )
            del model_input
            advance(1, f"batch {item.batch_size}: peak memory")
    else:
        # Each child's peak RSS is its own, so children may overlap in time: that costs
        # them speed, which is not measured here, and saves most of the wall time.
        with ThreadPoolExecutor(max_workers=CHILDREN_AT_ONCE) as pool:
            futures = {
                pool.submit(
                    measure.peak_cpu_in_child,
                    settings.workload,
                    item.batch_size,
                    item.mode,
                    training=settings.training,
                    threads=threads,
                ): index
                for index, item in enumerate(run.results)
            }
            for future in as_completed(futures):
                index = futures[future]
                peaks[index] = future.result()
                advance(1, f"batch {run.results[index].batch_size}: peak memory")
    for index, peak in peaks.items():
        item = run.results[index]
        run.results[index] = ConfigResult(
            item.mode, item.batch_size, item.latency, item.saved, peak
        )


def _notes(run: BenchRun) -> list[str]:
    notes = []
    if run.train_eval is not None:
        notes.append(run.train_eval.note())
    settings = run.settings
    notes.append(
        f"latency: median and p95 of {settings.repeats} calls per configuration after "
        f"{measure.WARMUP} warm-up calls, modes interleaved; module in {settings.module_mode} mode"
    )
    if settings.device == "cpu":
        notes.append(
            "peak memory: RSS of a fresh child process per configuration, one forward call "
            "with its output held, versus its RSS just before the call"
        )
    else:
        notes.append(
            "peak memory: torch.cuda.max_memory_allocated during one forward call with its "
            "output held, versus memory_allocated just before the call"
        )
    return notes
