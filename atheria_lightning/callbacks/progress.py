"""A progress bar counted in episodes of the whole run (``episode k/N``), with an ETA that survives resumes."""

from __future__ import annotations

import time
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import TQDMProgressBar
from lightning.pytorch.callbacks.progress.tqdm_progress import Tqdm, convert_inf
from typing_extensions import override

from atheria_lightning.data import episodes_done, total_episodes
from atheria_lightning.errors import require


class EpisodeProgressBar(TQDMProgressBar):
    """Lightning's tqdm bar showing ``episode k/N`` over the run, not batches of an epoch.

    On resume the bar starts at the restored episode and its rate (hence ETA) counts only this session's episodes.
    It redraws at most every ``min_interval_s`` seconds, and at the last episode, whatever the episode length: a
    notebook's bar is a message to the browser per redraw, and Lightning's count-based ``refresh_rate`` (20 on
    Colab) would leave a bar of 1-s episodes 20 s behind. ``refresh_rate=0`` still turns it off.

    Args:
        refresh_rate: Lightning's argument; only 0 (no bar) matters here.
        process_position: Lightning's argument.
        leave: Lightning's argument.
        min_interval_s: Least time between two redraws.

    Raises:
        ConfigError: ``min_interval_s < 0``.

    Example::

        trainer = Trainer(callbacks=[EpisodeProgressBar()])
    """

    def __init__(
        self, refresh_rate: int = 1, process_position: int = 0, leave: bool = False, min_interval_s: float = 0.5
    ) -> None:
        require(min_interval_s >= 0, f"EpisodeProgressBar.min_interval_s={min_interval_s!r} must be >= 0 seconds")
        super().__init__(refresh_rate, process_position, leave)
        self.min_interval_s = min_interval_s
        self._drawn_at: float | None = None

    @property
    @override
    def total_train_batches(self) -> int | float:
        return total_episodes(self.trainer) or super().total_train_batches

    @override
    def get_metrics(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, int | str | float | dict]:
        # QCAModule sends train/loss to callback_metrics directly (not through self.log with prog_bar=True).
        metrics = super().get_metrics(trainer, pl_module)
        loss = trainer.callback_metrics.get("train/loss")
        if loss is not None:
            metrics["train/loss"] = float(loss)
        return metrics

    @property
    @override
    def train_description(self) -> str:
        return "episode"  # one label from the first draw on: never "Training", nor "Epoch 0"

    @override
    def init_validation_tqdm(self) -> Any:
        # Validation takes a moment every few episodes; its own bar would bury the episode bar in a notebook.
        return Tqdm(disable=True)

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        # Lightning skips on_train_epoch_start when it resumes inside an epoch, which is where a run that stopped
        # (time guard, end of its episodes, a kill) resumes: without this the bar would count "Training: k/?".
        self._count_episodes(trainer)

    @override
    def on_train_epoch_start(self, trainer: pl.Trainer, *args: Any) -> None:
        # Not Lightning's: it would reset the bar to this epoch's batches and relabel it "Epoch N" for one redraw.
        self._count_episodes(trainer)

    def _count_episodes(self, trainer: pl.Trainer) -> None:
        bar = self.train_progress_bar
        start = episodes_done(trainer)
        bar.set_description(self.train_description, refresh=False)
        bar.initial = 0  # reset() draws at 0: with the resumed count as initial, the rate would be negative
        bar.reset(total=convert_inf(self.total_train_batches))
        bar.initial = start
        bar.n = start

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        # batch_idx restarts when a finished run is continued in a new epoch; the episode number does not.
        n = batch["episode"] + 1 if isinstance(batch, dict) and "episode" in batch else batch_idx + 1
        bar = self.train_progress_bar
        if bar is None or not self.is_enabled:
            return
        bar.n = n  # shown at the next redraw, and by close() when the run stops
        bar.initial = min(bar.initial, n - 1)  # a rate over this session's episodes, never a negative one
        now = time.monotonic()
        last = bar.total is not None and n >= bar.total
        if last or self._drawn_at is None or now - self._drawn_at >= self.min_interval_s:
            self._drawn_at = now
            bar.set_postfix(self.get_metrics(trainer, pl_module), refresh=False)
            bar.refresh()  # once per redraw: a notebook's bar is a widget message each time
