"""The stop signals (SIGTERM, SIGINT) handled by one function for the length of a block.

Light on purpose: the command line uses it before torch or the server are imported.
"""

from __future__ import annotations

import signal
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import FrameType

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)

Handler = Callable[[int, FrameType | None], object]


@contextmanager
def stop_signals_to(handler: Handler) -> Iterator[None]:
    """Within the block SIGTERM and SIGINT call ``handler``; the previous handlers come
    back after (main thread only, as ``signal.signal`` requires)."""
    previous = {sig: signal.signal(sig, handler) for sig in STOP_SIGNALS}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
