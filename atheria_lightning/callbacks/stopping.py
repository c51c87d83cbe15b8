"""The one way a run stops early: write last.ckpt, wait for it, flush the mirror (bounded), say how to continue."""

from __future__ import annotations

import time
from typing import Any

import lightning.pytorch as pl

from atheria_lightning.callbacks.checkpoint import SmartCheckpoint, episodes_done

__all__ = ["emergency_stop", "mirrors", "smart_checkpoint"]


def smart_checkpoint(trainer: pl.Trainer) -> SmartCheckpoint | None:
    return next((cb for cb in trainer.callbacks if isinstance(cb, SmartCheckpoint)), None)


def mirrors(trainer: pl.Trainer) -> list[Any]:
    """Callbacks with a bounded ``flush()``: the mirror (duck-typed, so stopping does not depend on it)."""
    return [cb for cb in trainer.callbacks if callable(getattr(cb, "flush", None))]


def emergency_stop(trainer: pl.Trainer, reason: str, flush_timeout_s: float) -> float:
    """Save ``last.ckpt`` now, wait for the write, flush every mirror within ``flush_timeout_s``, stop the trainer.

    Call it between episodes (``on_train_batch_end``) on every rank: the checkpoint is written by rank 0 only.
    Returns the seconds from the call to the flushed mirror.
    """
    started = time.monotonic()
    checkpoint = smart_checkpoint(trainer)
    if trainer.should_stop and checkpoint is not None and checkpoint.last_saved_episode == episodes_done(trainer):
        return 0.0  # another reason already stopped this episode with its checkpoint
    if checkpoint is not None:
        checkpoint.save_last_now(trainer)
        checkpoint.wait()
    for mirror in mirrors(trainer):
        mirror.flush(timeout_s=flush_timeout_s)
    trainer.should_stop = True
    seconds = time.monotonic() - started
    if trainer.is_global_zero:
        done = episodes_done(trainer)
        datamodule = trainer.datamodule
        total = getattr(datamodule, "total_episodes", done) if datamodule is not None else done
        print(
            f"stopped at episode {done} of {total} ({100.0 * done / max(total, 1):.0f}%), "
            f"run the same command again to continue ({reason}; checkpoint and mirror flush took {seconds:.1f} s)",
            flush=True,
        )
    return seconds
