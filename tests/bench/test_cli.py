"""``gradfence bench`` end to end: built-ins, user factories, JSON schema, outputs, errors.

Runs are kept small (one or two batch sizes, 1-2 repeats); each CPU configuration still
starts one child process for its peak RSS, which is what most of the time goes to.
"""

from __future__ import annotations

import json
import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch

from gradfence.bench.report import SCHEMA, UNITS
from gradfence.cli import main
from gradfence.modes import BENCH_MODES as MODES

F32 = 4

USER_MODELS = textwrap.dedent(
    """
    import torch
    from torch import nn

    WIDTH = 2 * 1024 * 1024


    class Waves(nn.Module):
        # h = x * w (saved by sin), y = sin(h).sum(1): one saved storage, 4 x WIDTH f32
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.full((WIDTH,), 0.5))

        def forward(self, x):
            return torch.sin(x * self.w).sum(dim=1)


    def build():
        return Waves()


    def batch(size):
        return torch.randn(size, WIDTH)


    def stack():
        return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 6), nn.Sigmoid(),
                             nn.Linear(6, 3))


    def pairs(size):
        return {"input": torch.randn(size, 4)}


    def not_a_model():
        return 42


    def no_tensors(size):
        return [size]


    def broken():
        raise RuntimeError("weights not found\\nsecond line")


    class CharCodes(nn.Module):
        # a 'text model': tokenizes inside, one row of 6 character codes per text
        def __init__(self):
            super().__init__()
            self.scale = nn.Parameter(torch.ones(6))

        def forward(self, texts):
            codes = torch.tensor([[float(ord(c)) for c in t[:6].ljust(6)] for t in texts])
            return torch.tanh(codes * self.scale).sum(dim=1)


    def text_model():
        return CharCodes()


    def texts(size):
        return ["gradfence"] * size
    """
)


@pytest.fixture
def user_file(tmp_path: Path) -> Path:
    path = tmp_path / "user_models.py"
    path.write_text(USER_MODELS)
    return path


def bench(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    status = main(["bench", *args])
    out, err = capsys.readouterr()
    return status, out, err


def unitless_numbers(node: Any, key: str, units: dict[str, str]) -> list[str]:
    """Keys of numbers (or lists / maps of numbers) below ``node`` that have no unit."""
    if key in units:
        return []
    if isinstance(node, dict):
        return [bad for sub, value in node.items() for bad in unitless_numbers(value, sub, units)]
    if isinstance(node, list):
        return [bad for value in node for bad in unitless_numbers(value, key, units)]
    if isinstance(node, int | float) and not isinstance(node, bool):
        return [key]
    return []


def check_schema(doc: dict[str, Any], modes: list[str], batch_sizes: list[int]) -> None:
    """Keys, types and units of a ``gradfence.bench/1`` document."""
    assert doc["schema"] == SCHEMA
    assert doc["units"] == UNITS
    body = {key: value for key, value in doc.items() if key != "units"}
    assert unitless_numbers(body, "", UNITS) == []
    assert set(doc) == {
        "schema", "created_utc", "command", "units", "environment", "settings",
        "train_vs_eval", "notes", "results",
    }  # fmt: skip
    assert isinstance(doc["created_utc"], str) and doc["created_utc"].endswith("+00:00")
    assert doc["command"].startswith("gradfence bench --model ")
    env = doc["environment"]
    assert {"machine", "cpu", "cpu_count", "platform", "python", "torch", "gradfence",
            "torch_threads", "device", "device_name"} <= set(env)  # fmt: skip
    assert env["torch"] == torch.__version__
    assert env["torch_threads"] == torch.get_num_threads()
    assert isinstance(env["cpu_count"], int)
    settings = doc["settings"]
    assert settings["modes"] == modes and settings["batch_sizes"] == batch_sizes
    assert settings["module_mode"] in {"eval", "train"}
    assert isinstance(settings["repeats"], int) and isinstance(settings["warmup"], int)
    comparison = doc["train_vs_eval"]
    assert set(comparison) == {
        "outputs_differ", "max_abs_diff", "mode_dependent_modules", "error", "note",
    }  # fmt: skip
    assert all(isinstance(note, str) for note in doc["notes"])
    types = {
        "mode": str,
        "batch_size": int,
        "module_mode": str,
        "latency_median_ms": float,
        "latency_p95_ms": float,
        "latency_samples_ms": list,
        "throughput_samples_per_s": float,
        "speedup_vs_grad": (float, type(None)),
        "saved_for_backward_bytes": int,
        "saved_for_backward_storages": int,
        "peak_memory_method": str,
        "peak_memory_baseline_bytes": int,
        "peak_memory_peak_bytes": int,
        "peak_memory_delta_bytes": int,
    }
    assert [(r["mode"], r["batch_size"]) for r in doc["results"]] == [
        (mode, size) for size in batch_sizes for mode in modes
    ]
    for row in doc["results"]:
        assert set(row) == set(types)
        for key, kind in types.items():
            assert isinstance(row[key], kind), key
        # measured quantities carry their unit in the key too
        suffixes = {"_ms": "milliseconds", "_bytes": "bytes", "_per_s": "samples per second"}
        for key in row:
            for suffix, unit in suffixes.items():
                if key.endswith(suffix):
                    assert UNITS[key] == unit, key
        assert len(row["latency_samples_ms"]) == settings["repeats"]
        assert row["latency_median_ms"] <= max(row["latency_samples_ms"])
        assert row["latency_p95_ms"] >= row["latency_median_ms"]
        assert row["throughput_samples_per_s"] == pytest.approx(
            row["batch_size"] / (row["latency_median_ms"] / 1e3)
        )
        assert row["peak_memory_delta_bytes"] == (
            row["peak_memory_peak_bytes"] - row["peak_memory_baseline_bytes"]
        )
        assert row["peak_memory_baseline_bytes"] > 0


def test_builtin_mlp_all_outputs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    files = {"--json": "r.json", "--markdown": "r.md", "--plot": "r.png"}
    args = [arg for option, name in files.items() for arg in (option, str(tmp_path / name))]
    status, out, err = bench(["--batch-sizes", "2", "--repeats", "2", *args], capsys)
    assert status == 0
    assert err == ""  # stderr is not a terminal: no progress bar
    doc = json.loads((tmp_path / "r.json").read_text())
    check_schema(doc, list(MODES), [2])
    saved = {row["mode"]: row["saved_for_backward_bytes"] for row in doc["results"]}
    # eval: the two ReLU results of batch x 1024 float32 (Dropout is the identity)
    assert saved == {"grad": 2 * 2 * 1024 * F32, "no_grad": 0, "inference_mode": 0}
    assert doc["settings"]["module_mode"] == "eval"
    assert doc["environment"]["device"] == "cpu"
    assert all(row["peak_memory_method"].startswith("cpu_rss_child") for row in doc["results"])
    grad = doc["results"][0]
    assert grad["speedup_vs_grad"] == 1.0
    comparison = doc["train_vs_eval"]
    assert comparison["outputs_differ"] is True
    assert comparison["mode_dependent_modules"] == {"Dropout": 2}
    # the terminal table and the Markdown carry the same rows
    markdown = (tmp_path / "r.md").read_text()
    for row in doc["results"]:
        median = f"{row['latency_median_ms']:.3f}"
        assert f"| {row['mode']} | 2 | {median} |" in markdown
        assert any(line.startswith(row["mode"]) and median in line for line in out.splitlines())
    assert "16.0 KiB" in out and "16.0 KiB" in markdown
    count = torch.get_num_threads()
    assert f"torch {torch.__version__}, {count} thread{'s' if count > 1 else ''}, " in out
    assert "note: outputs differ between train and eval mode" in out
    assert (tmp_path / "r.png").read_bytes().startswith(b"\x89PNG\r\n\x1a\n")


def test_builtin_cnn_saved_bytes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "cnn.json"
    status, out, _ = bench(
        ["--model", "cnn", "--batch-sizes", "2", "--modes", "grad",
         "--repeats", "1", "--json", str(path)],
        capsys,
    )  # fmt: skip
    assert status == 0
    doc = json.loads(path.read_text())
    check_schema(doc, ["grad"], [2])
    # hand count in test_saved.py::test_cnn_builtin_by_hand
    assert doc["results"][0]["saved_for_backward_bytes"] == 1_081_344
    assert doc["train_vs_eval"]["mode_dependent_modules"] == {"BatchNorm2d": 2, "Dropout": 1}
    assert "gradfence bench: model cnn (eval mode) on cpu" in out


def test_train_mode(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "train.json"
    status, out, _ = bench(
        ["--train-mode", "--modes", "grad", "--batch-sizes", "2", "--repeats", "1",
         "--json", str(path)],
        capsys,
    )  # fmt: skip
    assert status == 0
    doc = json.loads(path.read_text())
    check_schema(doc, ["grad"], [2])
    assert doc["settings"]["module_mode"] == "train"
    assert doc["results"][0]["module_mode"] == "train"
    # train: each Dropout adds its noise and its output (see test_saved.py)
    assert doc["results"][0]["saved_for_backward_bytes"] == 6 * 2 * 1024 * F32
    assert "(train mode)" in out


def test_factory_from_a_user_file(
    user_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "user.json"
    status, out, _ = bench(
        ["--model", f"{user_file}:build", "--input", f"{user_file}:batch",
         "--batch-sizes", "4", "--modes", "grad,no_grad", "--repeats", "1", "--json", str(path)],
        capsys,
    )  # fmt: skip
    assert status == 0, out
    doc = json.loads(path.read_text())
    check_schema(doc, ["grad", "no_grad"], [4])
    grad, no_grad = doc["results"]
    saved = 4 * 2 * 1024 * 1024 * F32  # x * w, saved by sin: 32 MiB
    assert (grad["saved_for_backward_bytes"], grad["saved_for_backward_storages"]) == (saved, 1)
    assert no_grad["saved_for_backward_bytes"] == 0
    # the child process held the graph (and so x * w) when it read its peak RSS
    assert grad["peak_memory_delta_bytes"] >= saved
    assert doc["train_vs_eval"]["outputs_differ"] is False
    assert doc["settings"]["model"] == f"{user_file}:build"


def test_factory_from_an_importable_module(
    user_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    monkeypatch.syspath_prepend(str(user_file.parent))
    path = tmp_path / "module.json"
    status, out, _ = bench(
        ["--model", "user_models:stack", "--input", "user_models:pairs", "--batch-sizes", "5",
         "--modes", "grad", "--repeats", "2", "--json", str(path)],
        capsys,
    )  # fmt: skip
    assert status == 0, out
    doc = json.loads(path.read_text())
    # a mapping input is passed as keyword arguments (nn.Sequential's ``input``)
    assert doc["results"][0]["saved_for_backward_bytes"] == 5 * 8 * F32 + 5 * 6 * F32
    assert doc["results"][0]["peak_memory_baseline_bytes"] > 0


def test_a_text_model_takes_a_list_of_texts(
    user_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "text.json"
    status, _, err = bench(
        ["--model", f"{user_file}:text_model", "--input", f"{user_file}:texts",
         "--batch-sizes", "3", "--modes", "grad,inference_mode", "--repeats", "1",
         "--json", str(path)],
        capsys,
    )  # fmt: skip
    assert status == 0, err
    grad, inference = json.loads(path.read_text())["results"]
    # made inside forward: codes (saved by mul, next to the parameter) and tanh's result
    assert grad["saved_for_backward_bytes"] == 2 * 3 * 6 * F32
    assert inference["saved_for_backward_bytes"] == 0


def test_builtin_sentiment_resolves_to_the_serve_model() -> None:
    pytest.importorskip("transformers")
    from gradfence.bench.builtins import sentiment_input
    from gradfence.bench.workload import workload
    from gradfence.builtin_models import BUILTIN_MODELS
    from gradfence.factories import resolve
    from gradfence.serve.model import heldout_dataset, load_default

    chosen = workload("sentiment", None)
    assert resolve(chosen.model_spec, "--model") is load_default
    heldout = [text for text, _ in heldout_dataset().items]
    assert resolve(chosen.input_spec, "--input") is sentiment_input
    assert sentiment_input(3) == heldout[:3]
    assert chosen.make_input(2) == heldout[:2]  # a list of texts is a valid model input
    assert "needs gradfence[serve]" in BUILTIN_MODELS["sentiment"].description


def test_bench_and_eval_share_one_registry_of_builtin_models() -> None:
    from gradfence.builtin_models import BUILTIN_MODELS
    from gradfence.evaluation.registry import MODELS

    assert {"mlp", "cnn", "toy", "sentiment"} <= set(BUILTIN_MODELS)
    assert {name: entry.model for name, entry in BUILTIN_MODELS.items()} == MODELS


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "cuda.json"
    status, _, _ = bench(
        ["--device", "cuda", "--batch-sizes", "2", "--repeats", "2", "--json", str(path)], capsys
    )
    assert status == 0
    doc = json.loads(path.read_text())
    check_schema(doc, list(MODES), [2])
    assert doc["environment"]["device"] == "cuda"
    grad = doc["results"][0]
    assert grad["peak_memory_method"] == "cuda_max_memory_allocated"
    assert grad["saved_for_backward_bytes"] == 2 * 2 * 1024 * F32
    assert grad["peak_memory_delta_bytes"] >= grad["saved_for_backward_bytes"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--model", "resnet"],
         "unknown model 'resnet': use a built-in (cnn, mlp, sentiment, toy)"),
        (["--model", "pkg:build"], "--model pkg:build needs --input MODULE:FACTORY"),
        (["--plot", "chart.jpg"], "--plot 'chart.jpg': the file name must end in .png"),
        (["--json", "/no/such/dir/r.json"], "no such directory /no/such/dir"),
        (["--model", "no/such/file.py:build", "--input", "x:y"], "no such file no/such/file.py"),
        (["--model", "mlp", "--input", "json:nothing"], "json has no attribute 'nothing'"),
        (["--model", "no_such_module_xyz:f", "--input", "json:loads"], "cannot import"),
        (["--model", "USER:not_a_model", "--input", "USER:batch"], "returned int, not a torch"),
        (["--model", "USER:broken", "--input", "USER:batch"],
         "raised RuntimeError: weights not found"),
        (["--model", "USER:WIDTH", "--input", "USER:batch"], "WIDTH is int, not callable"),
        (["--model", "mlp", "--input", "USER:no_tensors"], "returned list holding no tensor"),
    ],
)  # fmt: skip
def test_bad_input_is_one_line_and_exit_2(
    args: list[str], message: str, user_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = [arg.replace("USER", str(user_file)) for arg in args]
    status, out, err = bench(args, capsys)
    assert status == 2
    assert out == ""
    assert err.count("\n") == 1 and err.startswith("gradfence: error: ")
    assert message in err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--batch-sizes", "1,0"], "argument --batch-sizes: '0' is not a positive integer"),
        (["--batch-sizes", "8,x"], "argument --batch-sizes: 'x' is not a positive integer"),
        (["--batch-sizes", "8,8"], "argument --batch-sizes: '8,8' repeats a value"),
        (["--batch-sizes", ","], "argument --batch-sizes: empty: give positive integers"),
        (["--modes", "grad,eval"],
         "argument --modes: unknown value 'eval', use some of grad,no_grad,inference_mode"),
        (["--repeats", "0"], "argument --repeats: '0' is not a positive integer"),
        (["--repeats", "2,3"], "argument --repeats: '2,3' is not a positive integer"),
        (["--device", "tpu"], "argument --device: invalid choice: 'tpu'"),
    ],
)  # fmt: skip
def test_bad_numbers_and_choices_are_argparse_errors_in_one_line(
    args: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["bench", *args])
    out, err = capsys.readouterr()
    assert (exited.value.code, out) == (2, "")
    assert err.startswith(f"gradfence bench: error: {message}")
    assert err.endswith("(see 'gradfence bench --help')\n") and err.count("\n") == 1


def test_an_output_path_that_is_a_directory_is_refused_before_measuring(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "r.json").mkdir()
    status, out, err = bench(["--json", str(tmp_path / "r.json")], capsys)
    assert (status, out) == (2, "")
    assert err == f"gradfence: error: --json '{tmp_path / 'r.json'}': is a directory\n"


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux /proc")
def test_an_output_that_cannot_be_written_is_one_line_and_exit_2(
    capsys: pytest.CaptureFixture[str],
) -> None:
    # /proc exists but takes no new files: found out only when writing, after the run
    path = "/proc/gradfence-bench.json"
    args = ["--modes", "no_grad", "--batch-sizes", "1", "--repeats", "1", "--json", path]
    status, out, err = bench(args, capsys)
    assert status == 2
    assert "no_grad" in out  # the table was printed before the write failed
    assert err.startswith(f"gradfence: error: --json '{path}': cannot write: ")
    assert err.count("\n") == 1


@pytest.mark.parametrize(
    ("source", "message"),
    [
        ("raise RuntimeError('no GPU here\\nsecond line')\n", "RuntimeError: no GPU here"),
        ("def f(:\n", "SyntaxError: "),
    ],
)
def test_a_module_failing_to_import_is_one_line_and_exit_2(
    source: str,
    message: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    (tmp_path / "fails_on_import.py").write_text(source)
    monkeypatch.syspath_prepend(str(tmp_path))
    args = ["--model", "fails_on_import:build", "--input", "fails_on_import:batch"]
    status, out, err = bench(args, capsys)
    assert (status, out) == (2, "")
    assert err.startswith(
        "gradfence: error: --model 'fails_on_import:build': cannot import fails_on_import: "
    )
    assert message in err and err.count("\n") == 1


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present")
def test_cuda_without_a_device_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    status, _, err = bench(["--device", "cuda"], capsys)
    assert status == 2
    assert "--device cuda: no CUDA device available" in err


def test_progress_bar_on_a_terminal(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import sys

    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    status, out, err = bench(["--modes", "no_grad", "--batch-sizes", "1", "--repeats", "3"], capsys)
    assert status == 0
    # repeats + saved-bytes pass + peak memory: 5 steps, the last one labelled
    assert "5/5" in err and "peak memory" in err
    assert "5/5" not in out


def test_the_cli_module_imports_without_torch() -> None:
    import subprocess
    import sys

    code = (
        "import sys, gradfence.cli as c; c.build_parser(); import gradfence.bench.cli; "
        "print('torch' in sys.modules)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert out.strip() == "False"  # `gradfence --help` and `bench --help` start fast
