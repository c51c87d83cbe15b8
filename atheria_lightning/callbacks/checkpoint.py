"""SmartCheckpoint: top-k by ``val/combined`` plus ``last.ckpt``, atomic background writes and a verified manifest."""

from __future__ import annotations

import logging
import os
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.trainer.states import TrainerFn
from typing_extensions import override

from atheria_lightning.checkpoint_io import META_KEY, AtomicCheckpointIO
from atheria_lightning.errors import require
from atheria_lightning.manifest import remove_stale_tmp

log = logging.getLogger(__name__)

__all__ = ["SmartCheckpoint", "episodes_done"]


def _validation_follows(trainer: pl.Trainer) -> bool:
    """Whether Lightning validates right after this training batch (asked from ``on_train_batch_end``).

    The question Lightning's own loop asks there, through its private API; if that has moved, the answer is
    False, so a checkpoint is never skipped on a wrong guess.
    """
    try:
        epoch_loop = trainer.fit_loop.epoch_loop
        if not trainer.enable_validation or epoch_loop._skip_next_val:
            return False
        return bool(epoch_loop._should_check_val_fx(trainer.fit_loop._data_fetcher))
    except Exception:  # any change of Lightning's internals: save as if no validation followed
        return False


def episodes_done(trainer: pl.Trainer) -> int:
    """Episodes finished over the whole run (all sessions): from the episode datamodule, else the global step."""
    datamodule = getattr(trainer, "datamodule", None)
    if datamodule is not None and hasattr(datamodule, "current_episode"):
        running = getattr(datamodule, "_running_episode", -1)
        return max(running + 1, getattr(datamodule, "next_episode", 0))
    return trainer.global_step


class SmartCheckpoint(ModelCheckpoint):
    """Keeps the ``top_k`` checkpoints with the lowest ``val/combined`` plus ``last.ckpt``, safely.

    Built on Lightning's :class:`~lightning.pytorch.callbacks.ModelCheckpoint` (its top-k bookkeeping and resume
    state) and :class:`~atheria_lightning.checkpoint_io.AtomicCheckpointIO`, which it installs on the strategy:

    - ``last.ckpt`` every ``every_n_episodes`` episodes, after each validation and at the end of training (once
      per episode: a save due when a validation follows is made after it; when that validation keeps a new best
      checkpoint, ``last.ckpt`` is a copy of that file, made by the writer thread);
    - ``best-eNNNNNN.ckpt`` (episode number) when a validation enters the top ``top_k``;
    - every write goes to a temporary file in the same folder, is fsynced and renamed into place (no symlinks,
      no system temp dir), in a background thread; ``MANIFEST.json`` is rewritten after each file is complete;
    - an old checkpoint is removed only after the new one is complete; the checkpoint the run resumed from is
      never removed; temporary files left by a killed process are removed at start.

    Args:
        top_k: How many best checkpoints to keep (at least 1).
        every_n_episodes: Save ``last.ckpt`` every this many episodes.
        monitor: The metric ranking checkpoints; lower is better.
        dirpath: Local checkpoint folder; defaults to ``<default_root_dir>/checkpoints``.
        async_write: Write files in a background thread (the loop waits only for a copy to CPU memory).

    Raises:
        ConfigError: ``top_k < 1`` or ``every_n_episodes < 1``.

    Example::

        Trainer(callbacks=[SmartCheckpoint(top_k=5, every_n_episodes=10)])
    """

    def __init__(
        self,
        top_k: int = 5,
        every_n_episodes: int = 10,
        monitor: str = "val/combined",
        dirpath: str | None = None,
        async_write: bool = True,
    ) -> None:
        require(top_k >= 1, f"SmartCheckpoint.top_k={top_k} must be at least 1")
        require(
            every_n_episodes >= 1, f"SmartCheckpoint.every_n_episodes={every_n_episodes} must be a positive integer"
        )
        super().__init__(
            dirpath=dirpath,
            filename="best-e{episode:06d}",
            monitor=monitor,
            mode="min",
            save_top_k=top_k,
            save_last=True,
            auto_insert_metric_name=False,
            every_n_epochs=1,  # top-k is decided at each validation end
            enable_version_counter=False,
        )
        self.top_k = top_k
        self.every_n_episodes = every_n_episodes
        self.async_write = async_write
        self.io: AtomicCheckpointIO | None = None
        self._last_saved_episode = -1

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self.dirpath is None:
            self.dirpath = os.path.join(trainer.default_root_dir, "checkpoints")
        super().setup(trainer, pl_module, stage)
        io = trainer.strategy.checkpoint_io
        if not isinstance(io, AtomicCheckpointIO):
            io = AtomicCheckpointIO(async_write=self.async_write)
            trainer.strategy.checkpoint_io = io
        self.io = io
        if trainer.is_global_zero and os.path.isdir(self.dirpath):
            for stale in remove_stale_tmp(self._fs, str(self.dirpath)):
                log.info("removed a partial file left by an interrupted save: %s", stale)

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        episode = episodes_done(trainer)
        due = episode % self.every_n_episodes == 0 and episode != self._last_saved_episode
        if due and not self._skip(trainer) and not _validation_follows(trainer):
            self.save_last_now(trainer)

    @override
    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._skip(trainer):
            return
        candidates = self._monitor_candidates(trainer)
        saved_before = self._last_checkpoint_saved
        self._save_topk_checkpoint(trainer, candidates)
        # last.ckpt must carry the updated top-k list, so it is rewritten when a best file was added: as a copy of
        # that file, which holds this very state (the list included), instead of gathering the state again.
        if self._last_checkpoint_saved != saved_before and self.io is not None:
            self._copy_to_last(trainer, candidates, self._last_checkpoint_saved)
        elif self._last_saved_episode != episodes_done(trainer):
            self.save_last_now(trainer)

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._last_saved_episode != episodes_done(trainer) and not self._skip(trainer):
            self.save_last_now(trainer)
        self.wait()

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        # A crash mid-episode may leave the model half-updated: keep the last good last.ckpt instead of
        # overwriting it (Lightning's default would save here). Only finish the writes already queued.
        # Out of memory is the exception: it strikes in the forward pass or backward, before the optimizer
        # step, so the weights are those of the last finished episode and worth an emergency checkpoint.
        if isinstance(exception, torch.cuda.OutOfMemoryError):
            abandon = getattr(trainer.datamodule, "abandon_running_episode", None)
            if callable(abandon):
                abandon()
            if not self._skip(trainer):
                self.save_last_now(trainer)
        self.wait(timeout=60.0)

    def save_last_now(self, trainer: pl.Trainer) -> None:
        """Queue ``last.ckpt`` for the current state; the write completes in the background."""
        self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
        self._last_saved_episode = episodes_done(trainer)

    def _copy_to_last(self, trainer: pl.Trainer, candidates: dict[str, torch.Tensor], source: str) -> None:
        """``last.ckpt`` as a copy of ``source``, a checkpoint of the current state just queued."""
        self.last_model_path = self.format_checkpoint_name(candidates, self.CHECKPOINT_NAME_LAST)
        if trainer.is_global_zero:
            assert self.io is not None
            self.io.copy_checkpoint(source, self.last_model_path)
        self._last_saved_episode = episodes_done(trainer)

    @property
    def last_saved_episode(self) -> int:
        """The episode count of the newest ``last.ckpt`` queued by this callback (-1 before the first)."""
        return self._last_saved_episode

    def wait(self, timeout: float | None = None) -> bool:
        """Wait for queued writes (bounded by ``timeout``); True when all are on disk and in the manifest."""
        return self.io.wait(timeout) if self.io is not None else True

    @override
    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        metric = trainer.callback_metrics.get(self.monitor) if self.monitor else None
        checkpoint[META_KEY] = {
            "episode": episodes_done(trainer),
            "metric": None if metric is None else float(metric),
        }

    @override
    def _save_topk_checkpoint(self, trainer: pl.Trainer, monitor_candidates: dict[str, torch.Tensor]) -> None:
        current = monitor_candidates.get(self.monitor) if self.monitor else None
        if current is not None and not torch.isfinite(torch.as_tensor(current)):
            # Lightning would rank a NaN as +inf and still keep it while fewer than k exist: never a "best" model.
            log.warning("%s is %s at episode %d: not a top-k candidate", self.monitor, current, episodes_done(trainer))
            return
        super()._save_topk_checkpoint(trainer, monitor_candidates)

    @override
    def _monitor_candidates(self, trainer: pl.Trainer) -> dict[str, torch.Tensor]:
        candidates = super()._monitor_candidates(trainer)
        candidates["episode"] = torch.tensor(episodes_done(trainer))
        return candidates

    def _skip(self, trainer: pl.Trainer) -> bool:
        return bool(trainer.fast_dev_run) or trainer.state.fn != TrainerFn.FITTING or trainer.sanity_checking
