"""What a callback that stopped a run early does once training has ended: flush the mirror, say how to continue."""

from __future__ import annotations

import sys
import time
from typing import Protocol

import lightning.pytorch as pl
from tqdm import tqdm

from atheria_lightning.data import episodes_done, total_episodes
from atheria_lightning.store import RunStore

__all__ = ["StopsEarly", "announce_stop", "say"]


class StopsEarly(Protocol):
    """A callback that may end training before the run's last episode (the time guard, a signal)."""

    @property
    def stopped_because(self) -> str | None:
        """Why it stopped this session's training, once it has (``time limit: …``); None while it has not."""


def announce_stop(
    trainer: pl.Trainer, store: RunStore | None, reason: str, since: float, flush_timeout_s: float
) -> float:
    """Wait for the checkpoint, flush the mirror within ``flush_timeout_s``, print where the run stopped.

    Call it from ``on_train_end`` on every rank, after setting ``trainer.should_stop`` at an episode's end (which
    makes :class:`~atheria_lightning.callbacks.SmartCheckpoint` save that episode). ``since`` is the
    ``time.monotonic()`` of the stop decision; returns the seconds from it to the flushed mirror.
    """
    if store is not None and trainer.is_global_zero:
        store.flush(flush_timeout_s)
    seconds = time.monotonic() - since
    if trainer.is_global_zero:
        done, total = episodes_done(trainer), total_episodes(trainer)
        # A module without Atheria's episodes counts steps.
        where = f"step {done}" if total is None else f"episode {done} of {total} ({100.0 * done / max(total, 1):.0f}%)"
        say(f"stopped at {where}, run the same command again to continue "
            f"({reason}; checkpoint and mirror flush took {seconds:.1f} s)")  # fmt: skip
    return seconds


def say(line: str) -> None:
    """One line on stdout, on its own line even while a progress bar is drawn (tqdm clears it, then redraws it)."""
    tqdm.write(line, file=sys.stdout)
    sys.stdout.flush()
