"""How ``gradfence bench`` reports a run: speedups, the aligned table, JSON and Markdown."""

from __future__ import annotations

from gradfence.bench.measure import Latency, PeakMemory, SavedForBackward
from gradfence.bench.report import render_markdown, render_terminal, speedup_vs_grad, to_json
from gradfence.bench.runner import BenchRun, ConfigResult, Settings
from gradfence.bench.workload import Workload

ENVIRONMENT = {
    "device": "cpu",
    "device_name": "test CPU",
    "cpu_count": 2,
    "torch": "2.13.0",
    "torch_threads": 1,
    "python": "3.11.7",
    "platform": "Linux",
}


def result(mode: str, batch_size: int, median_ms: float) -> ConfigResult:
    latency = Latency((median_ms / 1e3,) * 3)
    peak = PeakMemory("cpu_rss_child_vmhwm", 1000, 1000 + 2048)
    return ConfigResult(mode, batch_size, latency, SavedForBackward(1536, 1), peak)


def a_run() -> BenchRun:
    """grad takes 4 ms, no_grad 2 ms and inference_mode 1 ms: speedups 1x, 2x and 4x."""
    settings = Settings(
        Workload("mlp", "m:f", "m:g"), (8,), ("grad", "no_grad", "inference_mode"), repeats=3
    )
    results = [result("inference_mode", 8, 1.0), result("grad", 8, 4.0), result("no_grad", 8, 2.0)]
    return BenchRun(settings, dict(ENVIRONMENT), results, command="gradfence bench")


def test_speedup_is_grad_latency_over_the_modes_latency() -> None:
    run = a_run()
    speedups = {item.mode: speedup_vs_grad(run, item) for item in run.results}
    assert speedups == {"grad": 1.0, "no_grad": 2.0, "inference_mode": 4.0}
    assert {row["mode"]: row["speedup_vs_grad"] for row in to_json(run)["results"]} == speedups


def test_no_speedup_without_a_grad_row() -> None:
    run = a_run()
    run.results = [item for item in run.results if item.mode != "grad"]
    assert all(speedup_vs_grad(run, item) is None for item in run.results)


def test_terminal_table_is_aligned_with_modes_in_the_settings_order() -> None:
    lines = render_terminal(a_run()).splitlines()
    widths = [len(cell) for cell in lines[3].split("  ")]
    assert widths == [14, 5, 9, 6, 9, 7, 18, 10]  # the rule under the header
    cells = [line.split() for line in lines[2:7]]
    assert cells[2:] == [
        ["grad", "8", "4.000", "4.000", "2,000", "1.00x", "1.5", "KiB", "2.0", "KiB"],
        ["no_grad", "8", "2.000", "2.000", "4,000", "2.00x", "1.5", "KiB", "2.0", "KiB"],
        ["inference_mode", "8", "1.000", "1.000", "8,000", "4.00x", "1.5", "KiB", "2.0", "KiB"],
    ]
    # numbers right-aligned: every row ends at the same column
    assert len({len(line) for line in lines[3:7]}) == 1


def test_markdown_table_has_the_same_rows() -> None:
    lines = render_markdown(a_run()).splitlines()
    assert "| no_grad | 8 | 2.000 | 2.000 | 4,000 | 2.00x | 1.5 KiB | 2.0 KiB |" in lines
