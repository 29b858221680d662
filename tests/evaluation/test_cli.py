"""``gradfence eval``: factories by built-in name, module or file; table, JSON, errors."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from torchmetrics.classification import MulticlassAccuracy

import gradfence as gf
from gradfence.cli import main
from gradfence.evaluation import registry, toy


def toy_reference() -> dict[str, float]:
    model, dataset = toy.toy_model(), toy.toy_dataset()
    loader = DataLoader(dataset, batch_size=64)
    results = gf.evaluate(
        model,
        loader,
        {"acc": MulticlassAccuracy(num_classes=3, average="micro")},
        loss=F.cross_entropy,
        progress=False,
    )
    return {name: float(value) for name, value in results.items()}  # type: ignore[arg-type]


def table_rows(out: str) -> dict[str, str]:
    lines = out.strip().splitlines()
    assert lines[1].split() == ["metric", "value"]
    return dict(line.split(maxsplit=1) for line in lines[3:])  # type: ignore[misc]


def test_builtin_toy_prints_the_evaluate_results(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["eval", "--model", "toy", "--data", "toy"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0] == "model toy, data toy (500 samples, batch size 64)"
    rows = table_rows(out)
    expected = toy_reference()
    assert list(rows) == ["acc", "loss"]  # the default metrics
    assert float(rows["acc"]) == pytest.approx(expected["acc"], rel=1e-5)
    assert float(rows["loss"]) == pytest.approx(expected["loss"], rel=1e-5)
    assert expected["acc"] > 0.9  # evaluated in eval mode: dropout (p=0.5) would spoil it


def test_json_output(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out_file = tmp_path / "results.json"
    argv = ["eval", "--model", "toy", "--data", "toy", "--metric", "acc", "--metric", "f1,loss"]
    assert main([*argv, "--batch-size", "7", "--json", str(out_file)]) == 0
    record = json.loads(out_file.read_text())
    assert record["model"] == "toy" and record["samples"] == 500 and record["batch_size"] == 7
    assert list(record["results"]) == ["acc", "f1", "loss"]
    rows = table_rows(capsys.readouterr().out)
    for name, value in record["results"].items():
        assert float(rows[name]) == pytest.approx(value, rel=1e-5)
    # Batch size changes nothing but float rounding.
    assert record["results"]["acc"] == pytest.approx(toy_reference()["acc"], abs=1e-7)


FACTORIES = textwrap.dedent(
    """
    import torch
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset

    def model():
        return nn.Identity()

    def data():
        logits = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 1.0]])
        return TensorDataset(logits, torch.tensor([0, 1, 1, 1]))

    def loader():
        return DataLoader(data(), batch_size=3)

    def not_a_model():
        return 42

    class ByLength(nn.Module):
        # a 'text model': class 1 when the text has more than 3 characters

        def forward(self, texts):
            long = torch.tensor([float(len(t) > 3) for t in texts])
            return torch.stack([1 - long, long], dim=1)

    def text_model():
        return ByLength()

    def texts():
        return [("good", 1), ("bad", 0), ("fine", 0), ("awesome", 1), ("meh", 0)]

    def broken():
        raise RuntimeError("weights not found\\nsecond line")

    def empty():
        return []

    def five_features():
        return TensorDataset(torch.ones(4, 5), torch.zeros(4, dtype=torch.long))
    """
)


@pytest.fixture
def factories(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "my_factories.py"
    path.write_text(FACTORIES)
    monkeypatch.syspath_prepend(str(tmp_path))
    return path


@pytest.mark.parametrize("form", ["module", "file"])
def test_user_factories(factories: Path, form: str, capsys: pytest.CaptureFixture[str]) -> None:
    prefix = "my_factories" if form == "module" else str(factories)
    argv = ["eval", "--model", f"{prefix}:model", "--data", f"{prefix}:data"]
    assert main([*argv, "--metric", "acc"]) == 0
    assert table_rows(capsys.readouterr().out) == {"acc": "0.75"}  # 3 of 4 right


def test_a_dataloader_factory_and_given_num_classes(
    factories: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["eval", "--model", "my_factories:model", "--data", "my_factories:loader"]
    assert main([*argv, "--metric", "macro-acc", "--num-classes", "2"]) == 0
    out = capsys.readouterr().out
    assert "(4 samples, batch size 3)" in out  # the loader's own batch size
    assert table_rows(out) == {"macro-acc": "0.833333"}  # (1 + 2/3) / 2


def test_text_batches(factories: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # a list of (text, label) is a Dataset to DataLoader: batches of (list[str], tensor)
    argv = ["eval", "--model", "my_factories:text_model", "--data", "my_factories:texts"]
    assert main([*argv, "--metric", "acc", "--batch-size", "2"]) == 0
    assert table_rows(capsys.readouterr().out) == {"acc": "0.8"}  # "fine" is wrong


def test_registry_names_resolve(
    factories: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(registry.MODELS, "tiny", "my_factories:model")
    monkeypatch.setitem(registry.DATASETS, "tiny-heldout", "my_factories:data")
    assert main(["eval", "--model", "tiny", "--data", "tiny-heldout", "--metric", "acc"]) == 0
    assert table_rows(capsys.readouterr().out) == {"acc": "0.75"}


def test_builtin_sentiment_target(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # gradfence serve's default model on (the first 24 of) its held-out tweets
    pytest.importorskip("transformers")
    serve_model = pytest.importorskip("gradfence.serve.model")
    first = serve_model.TweetDataset(serve_model.heldout_dataset().items[:24])
    monkeypatch.setattr(serve_model, "heldout_dataset", lambda: first)
    argv = ["eval", "--model", "sentiment", "--data", "sentiment-heldout", "--batch-size", "8"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "(24 samples, batch size 8)" in out
    rows = table_rows(out)
    assert list(rows) == ["acc", "loss"]
    # the same texts through the model by hand, in eval mode and without grad
    model = serve_model.load_default()
    texts = [text for text, _ in first.items]
    labels = torch.tensor([label for _, label in first.items])
    with torch.no_grad():
        logits = model(texts)
    accuracy = float((logits.argmax(1) == labels).float().mean())
    assert float(rows["acc"]) == pytest.approx(accuracy, abs=1e-6)
    assert float(rows["loss"]) == pytest.approx(float(F.cross_entropy(logits, labels)), rel=1e-4)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--model", "toy", "--data", "toy", "--metric", "top5"],
         "argument --metric: unknown metric 'top5' (known: acc, f1, loss, macro-acc, mse)"),
        (["--model", "no-colon", "--data", "toy"], "expected MODULE:FACTORY"),
        (["--model", "toy", "--data", ":data"], "expected MODULE:FACTORY"),
        (["--model", "no_such_module_x:f", "--data", "toy"], "cannot import no_such_module_x"),
        (["--model", "my_factories:missing", "--data", "toy"], "has no attribute 'missing'"),
        (["--model", "missing_file.py:f", "--data", "toy"], "no such file"),
        (["--model", "my_factories:not_a_model", "--data", "toy"], "not an nn.Module"),
        (["--model", "toy", "--data", "my_factories:model"], "return a torch.utils.data.Dataset"),
        (["--model", "toy", "--data", "toy", "--batch-size", "0"],
         "argument --batch-size: '0' is not an integer >= 1"),
        (["--model", "toy", "--data", "toy", "--device", "gpu0"], "argument --device: 'gpu0': "),
        (["--model", "toy", "--data", "toy", "--batch-size", "a,b"],
         "argument --batch-size: 'a,b' is not an integer >= 1"),
        (["--model", "toy", "--data", "toy", "--num-classes", "1"],
         "argument --num-classes: '1' is not an integer >= 2"),
        (["--model", "toy", "--data", "toy", "--num-classes", "x"],
         "argument --num-classes: 'x' is not an integer >= 2"),
        (["--model", "toy", "--data", "toy", "--mode", "eval"],
         "argument --mode: invalid choice: 'eval' (choose from "),  # quotes vary by Python
        (["--model", "toy", "--data", "toy", "--metric", ","],
         "argument --metric: ',' names no metric"),
        (["--model", "my_factories:broken", "--data", "toy"],
         "--model 'my_factories:broken' raised RuntimeError: weights not found"),
        (["--model", "toy", "--data", "my_factories:broken"],
         "--data 'my_factories:broken' raised RuntimeError: weights not found"),
        # the model does not fit the data: while reading the number of classes ...
        (["--model", "toy", "--data", "my_factories:five_features"],
         "failed: RuntimeError: mat1 and mat2 shapes cannot be multiplied"),
        # ... or inside gf.evaluate (a target of class 2 with --num-classes 2)
        (["--model", "toy", "--data", "toy", "--num-classes", "2"],
         "evaluating --model 'toy' on --data 'toy' failed: ValueError: "),
        (["--model", "toy", "--data", "my_factories:empty", "--num-classes", "3"],
         "--data 'my_factories:empty' returned an empty dataset"),
        (["--model", "toy", "--data", "toy", "--json", "no/such/dir/r.json"],
         "--json 'no/such/dir/r.json': no such directory no/such/dir"),
    ],
)  # fmt: skip
def test_bad_input_is_one_line_and_exit_2(
    factories: Path, argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    try:
        status = main(["eval", *argv])
    except SystemExit as exited:  # argparse's type= and choices=, through _Parser.error
        status = exited.code  # type: ignore[assignment]
        prefix = "gradfence eval: error: "
    else:
        prefix = "gradfence: error: "
    assert status == 2
    err = capsys.readouterr().err
    assert err.startswith(prefix) and message in err
    assert err.count("\n") == 1


def test_json_that_cannot_be_written_is_one_line_and_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # a directory in place of the file: only found out when writing, after the table
    assert main(["eval", "--model", "toy", "--data", "toy", "--json", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"gradfence: error: --json '{tmp_path}': cannot write: ")
    assert err.count("\n") == 1


@pytest.mark.parametrize("no_progress", [False, True])
def test_progress_bar_only_on_a_terminal_unless_turned_off(
    no_progress: bool, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["eval", "--model", "toy", "--data", "toy", *(["--no-progress"] * no_progress)]
    assert main(argv) == 0
    assert capsys.readouterr().err == ""  # stderr is not a terminal: never a bar
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert ("evaluate" in err and "/8" in err) is not no_progress  # 8 batches of 64


def test_device_option_moves_the_model(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["eval", "--model", "toy", "--data", "toy", "--device", "cpu"]) == 0
    rows = table_rows(capsys.readouterr().out)
    assert float(rows["acc"]) == pytest.approx(toy_reference()["acc"], rel=1e-5)


def test_the_cli_module_imports_without_torch() -> None:
    code = (
        "import sys, gradfence.cli as c; c.build_parser; import gradfence.evaluation.cli; "
        "print('torch' in sys.modules)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert out.strip() == "False"
