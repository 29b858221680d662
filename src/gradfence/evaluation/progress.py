"""The progress bar of ``gf.evaluate``: tqdm on a terminal, nothing otherwise."""

from __future__ import annotations

import importlib
import sys
import time
from collections.abc import Sequence
from typing import Any

from gradfence.evaluation.metrics import MetricSlot

# Running values cost a metric compute (and a host sync): refresh them at most this often.
POSTFIX_INTERVAL_S = 0.5
# How often tqdm redraws the bar.
REDRAW_INTERVAL_S = 0.1


def wants_progress(progress: bool | None, rank: int) -> bool:
    """``progress`` if given; otherwise a bar only on a terminal, and only on rank 0."""
    if progress is not None:
        return progress
    if rank != 0:
        return False
    isatty = getattr(sys.stderr, "isatty", None)
    try:
        return bool(isatty()) if isatty is not None else False
    except (OSError, ValueError):  # a closed or detached stream
        return False


class Progress:
    """Batches per second and the running (local) value of each scalar metric."""

    def __init__(self, enabled: bool, total: int | None, slots: Sequence[MetricSlot]) -> None:
        self._slots = slots
        self._bar: Any = None
        self._next_postfix = 0.0
        if enabled:
            # imported by name: tqdm ships no type hints, and the bar is only used as Any
            tqdm = importlib.import_module("tqdm").tqdm
            self._bar = tqdm(
                total=total,
                desc="evaluate",
                unit="batch",
                file=sys.stderr,
                dynamic_ncols=True,
                leave=False,
                mininterval=REDRAW_INTERVAL_S,
            )

    def advance(self) -> None:
        """One batch done."""
        bar = self._bar
        if bar is None:
            return
        bar.update(1)
        now = time.monotonic()
        if now >= self._next_postfix and self._slots:
            self._next_postfix = now + POSTFIX_INTERVAL_S
            values = {slot.name: slot.running() for slot in self._slots}
            bar.set_postfix(
                {name: f"{value:.4g}" for name, value in values.items() if value is not None},
                refresh=False,
            )

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
