"""Helpers with one home each: grad-mode names, batch walking, aligned tables, world size."""

from __future__ import annotations

import collections
import subprocess
import sys
from typing import Any

import torch

from gradfence.batches import map_tensors, tensors_in, to_device
from gradfence.distributed import World, world
from gradfence.modes import BENCH_MODES, GRAD_MODES
from gradfence.tables import aligned


def test_mode_names() -> None:
    assert GRAD_MODES == ("no_grad", "inference_mode")
    assert ("grad", *GRAD_MODES) == BENCH_MODES


def test_mode_names_and_registries_import_without_torch() -> None:
    code = (
        "import sys, gradfence.modes, gradfence.builtin_models, gradfence.batches, "
        "gradfence.tables, gradfence.distributed, gradfence.cli\n"
        "print('torch' in sys.modules)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.stdout.strip() == "False", done.stderr


def test_batches_are_walked_in_order_and_rebuilt_with_their_types() -> None:
    pair = collections.namedtuple("pair", "a b")
    one, two, three = torch.ones(1), torch.zeros(2), torch.full((1,), 3.0)
    batch: Any = {"x": pair(one, [two, "text"]), "y": (three, 7)}
    assert tensors_in(batch) == [one, two, three]
    doubled = map_tensors(batch, lambda tensor: tensor * 2)
    assert type(doubled["x"]) is pair and doubled["x"].b[1] == "text" and doubled["y"][1] == 7
    assert [t.tolist() for t in tensors_in(doubled)] == [[2.0], [0.0, 0.0], [6.0]]
    moved = to_device(batch, "cpu")
    assert moved["x"].a is one  # already there: .to() returns the tensor itself


def test_aligned_table() -> None:
    rows = [("name", "n"), ("a", "10"), ("long name", "2")]
    assert aligned(rows, right={1}, header=True) == [
        "name        n",
        "---------  --",
        "a          10",
        "long name   2",
    ]
    assert aligned([]) == []


def test_world_outside_a_process_group() -> None:
    assert world() == World(size=1, rank=0)
