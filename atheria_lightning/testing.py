"""Test support shared by the tests and the benchmarks: a fake session clock that moves on with each episode."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from typing_extensions import override

__all__ = ["EpisodeClock"]


class EpisodeClock(Callback):
    """A fake clock that advances ``seconds_per_episode`` at the start of each episode.

    Given as the ``clock`` of a time-dependent callback and as a callback of the same trainer, it makes a run of a
    few real seconds look as long as a session: a :class:`~atheria_lightning.callbacks.TimeLimitGuard` then stops
    where it would after hours, and nothing sleeps. Set :attr:`now` to start a new session.

    Args:
        seconds_per_episode: How far the clock moves at each episode's start.

    Example::

        clock = EpisodeClock(seconds_per_episode=60.0)
        Trainer(callbacks=[clock, TimeLimitGuard(max_hours=1.0).use_clock(clock)])
    """

    def __init__(self, seconds_per_episode: float) -> None:
        self.now = 0.0
        self.seconds_per_episode = seconds_per_episode

    def __call__(self) -> float:
        return self.now

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self.now += self.seconds_per_episode
