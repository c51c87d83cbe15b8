"""A progress bar counted in episodes of the whole run (``episode k/N``), with an ETA that survives resumes."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import TQDMProgressBar
from lightning.pytorch.callbacks.progress.tqdm_progress import Tqdm, convert_inf
from typing_extensions import override


class EpisodeProgressBar(TQDMProgressBar):
    """Lightning's tqdm bar showing ``episode k/N`` over the run, not batches of an epoch.

    On resume the bar starts at the restored episode and its rate (hence ETA) counts only this session's episodes.

    Example::

        trainer = Trainer(callbacks=[EpisodeProgressBar()])
    """

    @property
    @override
    def total_train_batches(self) -> int | float:
        datamodule = getattr(self.trainer, "datamodule", None)
        return getattr(datamodule, "total_episodes", super().total_train_batches)

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
        super().on_train_epoch_start(trainer, *args)
        self._count_episodes(trainer)

    def _count_episodes(self, trainer: pl.Trainer) -> None:
        bar = self.train_progress_bar
        start = getattr(trainer.datamodule, "next_episode", 0) if trainer.datamodule is not None else 0
        bar.reset(total=convert_inf(self.total_train_batches))
        bar.initial = start
        bar.n = start
        bar.set_description("episode")

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        # batch_idx restarts when a finished run is continued in a new epoch; the episode number does not.
        n = batch["episode"] + 1 if isinstance(batch, dict) and "episode" in batch else batch_idx + 1
        bar = self.train_progress_bar
        if bar is not None and self._should_update(n, bar.total):
            bar.n = n
            bar.set_postfix(self.get_metrics(trainer, pl_module), refresh=False)
            bar.refresh()  # once per update: a notebook's bar is a widget message each time
