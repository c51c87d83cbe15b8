"""Keeps the first and last training loss of this session and prints a short summary when fit ends."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_only
from typing_extensions import Self, override

from atheria_lightning.data import episodes_done, total_episodes


class RunSummary(Callback):
    """Prints, on rank 0 at the end of fit: episodes run this session, first and last loss, seconds per episode,
    where the checkpoints are, and a line per logger given by :meth:`show_loggers` (``AtheriaCLI`` gives
    TensorBoard's command and the W&B run's URL or ``wandb sync`` command, whichever loggers the run has).

    Args:
        run_dir: The run folder, shown in the summary.

    Example::

        trainer = Trainer(callbacks=[RunSummary("runs/demo")])
    """

    def __init__(self, run_dir: str) -> None:
        self.run_dir = run_dir
        self._logger_lines: Callable[[], list[str]] = list
        self.first_loss: float | None = None
        self.last_loss: float | None = None
        self.episodes = 0
        self._started = 0.0

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._started = time.monotonic()

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self.episodes += 1
        if not outputs:  # a skipped non-finite episode returns no loss
            return
        # The module already synchronised on this loss to test it for NaN, so reading it costs no extra wait.
        loss = float(outputs["loss"])
        if self.first_loss is None:
            self.first_loss = loss
        self.last_loss = loss

    def show_loggers(self, lines: Callable[[], list[str]]) -> Self:
        """Where to see the logs: ``lines()`` is asked at the end of fit (a W&B run's URL exists only by then)."""
        self._logger_lines = lines
        return self

    def lines(self, trainer: pl.Trainer) -> list[str]:
        elapsed = time.monotonic() - self._started if self._started else 0.0
        done = episodes_done(trainer)
        total = total_episodes(trainer) or done
        speed = f"{elapsed / self.episodes:.2f} s/episode" if self.episodes else "no episode run"
        first = "n/a" if self.first_loss is None else f"{self.first_loss:.4f}"
        last = "n/a" if self.last_loss is None or math.isnan(self.last_loss) else f"{self.last_loss:.4f}"
        return [
            f"episodes: {self.episodes} this session, {done} of {total} in the run ({speed})",
            f"loss: first {first}, last {last}",
            f"checkpoints: {self.run_dir}/checkpoints",
            *self._logger_lines(),
        ]

    @override
    @rank_zero_only
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        print("\n".join(["", "=== atheria run summary ===", *self.lines(trainer)]), flush=True)
