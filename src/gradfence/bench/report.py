"""Render a :class:`~gradfence.bench.runner.BenchRun`: terminal table, JSON, Markdown, PNG.

The terminal and Markdown tables are built from the same rows (:func:`table`); the
JSON document (:func:`to_json`, schema in ``docs/bench.md``) carries every measured
number with its unit in its key, plus a ``units`` map naming each unit.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from gradfence.bench.runner import BenchRun, ConfigResult
from gradfence.tables import aligned

SCHEMA = "gradfence.bench/1"

# unit of every number in the JSON document, by key (also the key suffixes)
UNITS: dict[str, str] = {
    "batch_size": "samples",
    "batch_sizes": "samples",
    "repeats": "calls",
    "warmup": "calls",
    "latency_median_ms": "milliseconds",
    "latency_p95_ms": "milliseconds",
    "latency_samples_ms": "milliseconds",
    "throughput_samples_per_s": "samples per second",
    "saved_for_backward_bytes": "bytes",
    "saved_for_backward_storages": "storages (count)",
    "peak_memory_baseline_bytes": "bytes",
    "peak_memory_peak_bytes": "bytes",
    "peak_memory_delta_bytes": "bytes",
    "speedup_vs_grad": "ratio (grad median latency / this median latency)",
    "max_abs_diff": "output units (absolute difference)",
    "mode_dependent_modules": "modules (count per class name)",
    "cpu_count": "logical CPUs",
    "torch_threads": "threads",
}

HEADERS = (
    "mode",
    "batch",
    "median ms",
    "p95 ms",
    "samples/s",
    "vs grad",
    "saved for backward",
    "peak mem +",
)


def human_bytes(count: int) -> str:
    """``1536`` -> ``'1.5 KiB'`` (binary units; plain bytes below 1 KiB)."""
    size = float(count)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(size) < 1024 or unit == "GiB":
            return f"{count} B" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


def speedup_vs_grad(run: BenchRun, item: ConfigResult) -> float | None:
    """grad's median latency / this configuration's, at the same batch size (None without grad)."""
    grad = run.result("grad", item.batch_size)
    if grad is None:
        return None
    return grad.latency.median_s / item.latency.median_s


def table(run: BenchRun) -> list[tuple[str, ...]]:
    """One row of display strings per configuration, in :data:`HEADERS` order."""
    rows: list[tuple[str, ...]] = []
    for item in sorted(run.results, key=lambda r: (r.batch_size, run.settings.modes.index(r.mode))):
        speedup = speedup_vs_grad(run, item)
        rows.append(
            (
                item.mode,
                str(item.batch_size),
                f"{item.latency.median_s * 1e3:.3f}",
                f"{item.latency.p95_s * 1e3:.3f}",
                f"{item.throughput_per_s:,.0f}",
                "-" if speedup is None else f"{speedup:.2f}x",
                human_bytes(item.saved.bytes),
                "-" if item.peak is None else human_bytes(item.peak.delta_bytes),
            )
        )
    return rows


def threads(env: dict[str, Any]) -> str:
    """``'2 threads'`` / ``'1 thread'``: torch's intra-op thread count of the run."""
    count = env["torch_threads"]
    return f"{count} thread{'' if count == 1 else 's'}"


def headline(run: BenchRun) -> str:
    """Model, module mode, device, machine, versions and threads in one line."""
    env = run.environment
    return (
        f"model {run.settings.workload.label} ({run.settings.module_mode} mode) on "
        f"{env['device']} ({env['device_name']}), {env['cpu_count']} CPUs, "
        f"torch {env['torch']}, {threads(env)}, python {env['python']}, "
        f"{env['platform']}"
    )


def render_terminal(run: BenchRun) -> str:
    """The aligned text table with the headline above and the notes below."""
    lines = [f"gradfence bench: {headline(run)}", ""]
    numbers = range(1, len(HEADERS))  # every column but the mode is right-aligned
    lines.extend(aligned([HEADERS, *table(run)], right=numbers, header=True))
    lines.append("")
    lines.extend(f"note: {note}" for note in run.notes)
    return "\n".join(lines) + "\n"


def render_markdown(run: BenchRun) -> str:
    """A Markdown table with the command, the headline and the notes."""
    lines = [
        f"`{run.command}`",
        "",
        f"{headline(run)}; {run.created_utc}",
        "",
        "| " + " | ".join(HEADERS) + " |",
        "|" + "|".join(":---" if i == 0 else "---:" for i in range(len(HEADERS))) + "|",
    ]
    lines.extend("| " + " | ".join(row) + " |" for row in table(run))
    lines.append("")
    lines.extend(f"- {note}" for note in run.notes)
    return "\n".join(lines) + "\n"


def to_json(run: BenchRun) -> dict[str, Any]:
    """The JSON document of a run (schema ``gradfence.bench/1``, see ``docs/bench.md``)."""
    from gradfence.bench.measure import WARMUP

    settings = run.settings
    comparison = run.train_eval
    return {
        "schema": SCHEMA,
        "created_utc": run.created_utc,
        "command": run.command,
        "units": UNITS,
        "environment": dict(run.environment),
        "settings": {
            "model": settings.workload.label,
            "model_factory": settings.workload.model_spec,
            "input_factory": settings.workload.input_spec,
            "batch_sizes": list(settings.batch_sizes),
            "modes": list(settings.modes),
            "module_mode": settings.module_mode,
            "device": settings.device,
            "repeats": settings.repeats,
            "warmup": WARMUP,
        },
        "train_vs_eval": None
        if comparison is None
        else {
            "outputs_differ": comparison.outputs_differ,
            "max_abs_diff": comparison.max_abs_diff,
            "mode_dependent_modules": dict(comparison.mode_dependent_modules),
            "error": comparison.error,
            "note": comparison.note(),
        },
        "notes": list(run.notes),
        "results": [_result_json(run, item) for item in run.results],
    }


def _result_json(run: BenchRun, item: ConfigResult) -> dict[str, Any]:
    peak = item.peak
    return {
        "mode": item.mode,
        "batch_size": item.batch_size,
        "module_mode": run.settings.module_mode,
        "latency_median_ms": item.latency.median_s * 1e3,
        "latency_p95_ms": item.latency.p95_s * 1e3,
        "latency_samples_ms": [sample * 1e3 for sample in item.latency.samples_s],
        "throughput_samples_per_s": item.throughput_per_s,
        "speedup_vs_grad": speedup_vs_grad(run, item),
        "saved_for_backward_bytes": item.saved.bytes,
        "saved_for_backward_storages": item.saved.storages,
        "peak_memory_method": None if peak is None else peak.method,
        "peak_memory_baseline_bytes": None if peak is None else peak.baseline_bytes,
        "peak_memory_peak_bytes": None if peak is None else peak.peak_bytes,
        "peak_memory_delta_bytes": None if peak is None else peak.delta_bytes,
    }


def plot(run: BenchRun, path: Path) -> None:
    """Write a PNG: median latency (p95 whiskers), saved-for-backward and peak-memory increase,
    per mode against batch size. Needs matplotlib (``pip install 'gradfence[bench]'``)."""
    from matplotlib.figure import Figure

    settings = run.settings
    figure = Figure(figsize=(13, 4.2), layout="constrained")
    latency_ax, saved_ax, peak_ax = figure.subplots(1, 3)
    mib = 1024 * 1024
    styles = {"grad": ("-", "o"), "no_grad": ("--", "s"), "inference_mode": (":", "^")}
    for mode in settings.modes:
        line, marker = styles.get(mode, ("-", "o"))
        items = [run.result(mode, size) for size in settings.batch_sizes]
        present = [item for item in items if item is not None]
        sizes = [item.batch_size for item in present]
        medians = [item.latency.median_s * 1e3 for item in present]
        above = [item.latency.p95_s * 1e3 - m for item, m in zip(present, medians, strict=True)]
        latency_ax.errorbar(
            sizes,
            medians,
            yerr=[[0] * len(sizes), above],
            linestyle=line,
            marker=marker,
            capsize=3,
            label=mode,
        )
        saved = [item.saved.bytes / mib for item in present]
        saved_ax.plot(sizes, saved, linestyle=line, marker=marker, label=mode)
        peaks = [(item.batch_size, item.peak.delta_bytes / mib) for item in present if item.peak]
        if peaks:
            peak_ax.plot(*zip(*peaks, strict=True), linestyle=line, marker=marker, label=mode)
    peak_label = "CUDA max allocated" if settings.device == "cuda" else "peak RSS"
    for ax, title, ylabel in (
        (latency_ax, "latency per call (median, whisker p95)", "ms"),
        (saved_ax, "saved for backward", "MiB"),
        (peak_ax, f"{peak_label} increase during one call", "MiB"),
    ):
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("batch size")
        ax.set_ylabel(ylabel)
        ax.set_xscale("log", base=2)
        ax.set_xticks(list(settings.batch_sizes), [str(s) for s in settings.batch_sizes])
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    latency_ax.set_yscale("log")
    for ax in (saved_ax, peak_ax):
        ax.set_ylim(bottom=0)
    env = run.environment
    figure.suptitle(
        f"gradfence bench: {settings.workload.label} ({settings.module_mode} mode), "
        f"{env['device']} ({env['device_name']}), torch {env['torch']}, "
        f"{threads(env)}",
        fontsize=10,
    )
    figure.savefig(path, dpi=110)
