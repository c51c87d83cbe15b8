"""SIGTERM and Ctrl+C outside training end the ``atheria`` command cleanly: an exception, and the line it prints."""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType

__all__ = ["StopRequested", "signals_stop_the_command", "stopped_line"]


class StopRequested(BaseException):
    """SIGTERM or SIGINT while the command is not training (a BaseException, so no ``except Exception`` eats it)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signal_name = signal.Signals(signum).name


def stopped_line(stop: StopRequested) -> str:
    return (f"atheria: stopped by {stop.signal_name} outside training; everything saved is kept: run the same "
            "command again to continue")  # fmt: skip


@contextmanager
def signals_stop_the_command() -> Iterator[None]:
    """SIGTERM and SIGINT raise :class:`StopRequested` (instead of a traceback, or Lightning's exit 1) until
    ``StopOnSignal`` takes over for training; the previous handlers come back afterwards. Main thread only."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum: int, frame: FrameType | None) -> None:
        raise StopRequested(signum)

    previous = {signum: signal.signal(signum, stop) for signum in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
