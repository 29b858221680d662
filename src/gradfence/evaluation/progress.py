"""The progress bar of ``gf.evaluate``: tqdm on a terminal, nothing otherwise."""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from typing import NoReturn

from tqdm import tqdm

from gradfence.evaluation.metrics import MetricSlot

# Running values cost a metric compute (and a host sync): refresh them at most this often.
POSTFIX_INTERVAL_S = 0.5
# How often tqdm redraws the bar.
REDRAW_INTERVAL_S = 0.1


class Progress:
    """Batches per second and the running (local) value of each scalar metric."""

    def __init__(
        self, progress: bool | None, rank: int, total: int | None, slots: Sequence[MetricSlot]
    ) -> None:
        """``progress`` forces the bar on or off; ``None``: only on a terminal, on rank 0."""
        self._slots = slots
        self._bar: tqdm[NoReturn] | None = None  # a bar without an iterable
        self._next_postfix = 0.0
        if progress is False or (progress is None and rank != 0):
            return
        try:
            bar = tqdm(
                total=total,
                desc="evaluate",
                unit="batch",
                file=sys.stderr,
                dynamic_ncols=True,
                leave=False,
                mininterval=REDRAW_INTERVAL_S,
                disable=None if progress is None else False,  # None: tqdm checks isatty
            )
        except (OSError, ValueError):  # isatty on a closed or detached stream
            return
        if not bar.disable:
            self._bar = bar

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
