"""A progress bar counted in episodes of the whole run (``episode k/N``), with an ETA that survives resumes."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import TQDMProgressBar
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
    def on_train_epoch_start(self, trainer: pl.Trainer, *args: Any) -> None:
        super().on_train_epoch_start(trainer, *args)
        start = getattr(trainer.datamodule, "next_episode", 0) if trainer.datamodule is not None else 0
        self.train_progress_bar.initial = start
        self.train_progress_bar.n = start
        self.train_progress_bar.set_description("episode")
