"""SmartCheckpoint: when to keep ``last.ckpt`` and the top-k best checkpoints; the run store does the writing."""

from __future__ import annotations

import logging
import math
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Checkpoint
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import CombinedLoader
from typing_extensions import Self, override

from atheria_lightning.data import EpisodeDataModule, episodes_done
from atheria_lightning.errors import require
from atheria_lightning.rng import restore_rng_states, rng_states
from atheria_lightning.store import RunStore, StoreCheckpointIO, UsesRunStore
from atheria_lightning.store.manifest import SETTINGS_KEY

log = logging.getLogger(__name__)

__all__ = ["SmartCheckpoint"]

#: The training loss, and the count of skipped non-finite episodes, that QCAModule leaves in callback_metrics.
TRAIN_LOSS = "train/loss"
SKIPPED = "train/nonfinite_skipped"


class SmartCheckpoint(UsesRunStore, Checkpoint):
    """Decides when the run keeps ``last.ckpt`` and its ``top_k`` best checkpoints; its :class:`RunStore` writes them.

    - ``last.ckpt`` every ``every_n_episodes`` episodes, when the run stops (time guard, signal, last episode) and at
      the end of training. When a validation follows the episode, the save waits for it, so the file carries the
      new metric and a non-finite state is never kept: a state is saved only once a finite number proves it sound
      (its validation metric, else the next episode's training loss; the serialized state waits in memory for that
      one episode). A state that led to a non-finite loss is dropped, and ``last.ckpt`` keeps the last sound one.
    - ``best-eNNNNNN.ckpt`` (episode number) when a validation's finite ``monitor`` value enters the ``top_k``
      lowest; the store keeps exactly those, from its manifest, across kills, resumes and moved folders.
    - On an out-of-memory error the last finished episode is saved; on other errors nothing half-done is.
    - Every checkpoint carries the random-number states (torch CPU and CUDA, numpy, Python) of the moment of the
      save, restored on resume: a module whose dropout or DataLoader shuffle draws from them replays exactly from a
      checkpoint taken at an epoch boundary. A resume in the middle of an epoch also needs a train dataloader that
      saves its position (torchdata's ``StatefulDataLoader``, or one with ``replays_mid_epoch = True`` like
      Atheria's episode stream): without one, a warning says so.

    Lightning runs checkpoint callbacks after all others, so a save at an episode's end includes what every other
    callback recorded for that episode.

    Args:
        top_k: How many best checkpoints to keep (at least 1).
        every_n_episodes: Save ``last.ckpt`` every this many episodes.
        monitor: The validation metric ranking checkpoints; lower is better. ``val/loss`` is ``QCAModule``'s
            training objective on the fixed validation universes. Fixed for a run: its best files are ranked by it.
        async_write: Write files in a background thread, for a store this callback makes itself (plain
            ``Trainer`` without :meth:`use_store`); ``AtheriaCLI`` hands it the run's store.

    Raises:
        ConfigError: ``top_k < 1``, ``every_n_episodes < 1`` or an empty ``monitor``.

    Example::

        store = RunStore("runs/demo")
        Trainer(plugins=[store.checkpoint_io], callbacks=[SmartCheckpoint(top_k=5).use_store(store)])
    """

    def __init__(
        self, top_k: int = 5, every_n_episodes: int = 10, monitor: str = "val/loss", async_write: bool = True
    ) -> None:
        require(isinstance(top_k, int) and top_k >= 1, f"SmartCheckpoint.top_k={top_k!r} must be an integer >= 1")
        require(
            isinstance(every_n_episodes, int) and every_n_episodes >= 1,
            f"SmartCheckpoint.every_n_episodes={every_n_episodes!r} must be a positive integer",
        )
        require(isinstance(monitor, str) and bool(monitor), f"SmartCheckpoint.monitor={monitor!r} must name a logged "
                "metric, e.g. val/loss")  # fmt: skip
        self.top_k = top_k
        self.every_n_episodes = every_n_episodes
        self.monitor = monitor
        self.async_write = async_write
        self._after_validation: int | None = None  # a due last.ckpt waiting for the validation of this episode
        self._saved_episode = -1  # the newest last.ckpt asked for
        self._saved_after_validation = -1  # ... when it was asked for after that episode's validation
        self._sound = True  # the newest episode's training loss was finite
        self._processes = 1  # the trainer's world size: random-number states are restored in one process only
        self._restored_rng: dict[str, Any] | None = None  # restored at load, until the resumed run's first batch

    @override
    def use_store(self, store: RunStore) -> Self:
        store.keep_best(self.top_k, self.monitor)
        return super().use_store(store)

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self.store is None:  # a plain Trainer: the default root dir is the run folder
            self.use_store(RunStore(trainer.default_root_dir, async_write=self.async_write))
        assert self.store is not None
        if not isinstance(trainer.strategy.checkpoint_io, StoreCheckpointIO):
            trainer.strategy.checkpoint_io = self.store.checkpoint_io
        if trainer.is_global_zero and stage == "fit":
            self.store.open()
        self._after_validation, self._saved_episode, self._sound = None, -1, True
        self._processes, self._restored_rng = trainer.world_size, None

    def resume_settings(self) -> dict[str, Any]:
        """This session's settings a resume reports when they differ from the checkpoint's, keyed as the CLI
        names them."""
        return {"SmartCheckpoint.top_k": self.top_k, "SmartCheckpoint.every_n_episodes": self.every_n_episodes}

    @override
    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        checkpoint.setdefault(SETTINGS_KEY, {}).update(
            self.resume_settings(), **{"trainer.precision": str(trainer.precision)}
        )

    @override
    def state_dict(self) -> dict[str, Any]:
        # Lightning gathers callback states as it builds each checkpoint: these are the states at the save.
        return {"rng": rng_states()}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the random-number states saved with the checkpoint (a checkpoint of an earlier version, without
        them, resumes as it always did).

        Lightning loads callback states before its fit loop creates the first train DataLoader iterator, which
        draws the shuffle's seed from torch's generator, so the resumed epoch draws what the uninterrupted one did
        (:meth:`on_train_epoch_start` handles the iterator Lightning creates and discards at an epoch's end).
        Under DDP only rank 0 writes the file, so it holds rank 0's states: they are not restored, since rank 0's
        stream on every rank would make ranks seeded apart draw the same numbers (each rank keeps the seeding of
        the new session: the resume is sound, not exact).
        """
        states = state_dict.get("rng")
        if states is None or self._processes > 1:
            return
        try:
            restore_rng_states(states)
            self._restored_rng = states
        except ValueError as err:
            log.warning("the checkpoint's random-number states are not restored (%s): the run resumes, but does "
                        "not replay the uninterrupted run exactly", err)  # fmt: skip

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._saved_episode = episodes_done(trainer)  # the state resumed from is on disk already
        if trainer.ckpt_path is not None and trainer.is_global_zero:
            _warn_if_inexact_mid_epoch(trainer)

    @override
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Resumed at an epoch's end, Lightning creates a train DataLoader iterator at the start of fit, finishes the
        # saved epoch without a batch, and creates the next epoch's iterator after this hook: the first one drew
        # from the restored generators, so they are restored again for the one whose batches the run gets.
        if self._restored_rng is not None:
            restore_rng_states(self._restored_rng)
            self._restored_rng = None

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._restored_rng = None  # a batch came from the iterator created after the restore: nothing to redo

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self._skip(trainer):
            return
        assert self.store is not None
        # This episode ran on the state of the previous one: its loss proves (or disproves) a held save.
        self._sound = self._episode_was_sound(trainer)
        self.store.confirm(self._sound)
        if not self._sound:
            return  # the weights are those that just gave a non-finite loss: nothing of them is kept
        episode = episodes_done(trainer)
        waited = self._after_validation is not None  # that validation did not come: save this newer state now
        due = episode % self.every_n_episodes == 0 or trainer.should_stop or waited
        if not due or episode == self._saved_episode:
            return
        self._after_validation = None
        if _validation_follows(trainer, episode):
            self._after_validation = episode
        else:
            self._save_last(trainer, episode, metric=None, hold=not trainer.should_stop)

    @override
    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._skip(trainer):
            return
        assert self.store is not None
        episode = episodes_done(trainer)
        value = trainer.callback_metrics.get(self.monitor)
        metric = None if value is None else float(value)
        if metric is not None and not math.isfinite(metric):
            log.warning("%s is %s at episode %d: the state is not kept (not last.ckpt, not a best checkpoint)",
                        self.monitor, metric, episode)  # fmt: skip
            self._after_validation = None
            return
        if self._after_validation == episode:
            self._after_validation = None
            self._save_last(trainer, episode, metric, hold=metric is None)
            self._saved_after_validation = episode if metric is not None else -1
        if metric is None:
            return
        keep = self.store.enters_top_k(metric) if trainer.is_global_zero else False
        if not trainer.strategy.broadcast(keep, src=0):
            return
        if self._saved_after_validation == episode:
            self.store.copy_last_to_best(trainer, episode, metric)  # the same state, copied by the writer thread
        else:
            self.store.save(trainer, "best", episode, metric)

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.store is None:
            return
        if not self._skip(trainer):
            self.store.confirm(self._sound)  # no next episode will prove it: kept unless the last loss was bad
            episode = episodes_done(trainer)
            if self._sound and episode != self._saved_episode:
                self._save_last(trainer, episode, metric=None, hold=False)
        if trainer.is_global_zero:
            self.store.wait()

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        if self.store is None:
            return
        self.store.confirm(self._sound)
        # Out of memory strikes in the forward or backward pass, before the optimizer step: the weights are those of
        # the last finished episode, worth keeping. After other errors the state may be half-updated: only the
        # writes already queued finish.
        if isinstance(exception, torch.cuda.OutOfMemoryError) and not self._skip(trainer) and self._sound:
            if isinstance(trainer.datamodule, EpisodeDataModule):
                trainer.datamodule.abandon_running_episode()
            episode = episodes_done(trainer)
            if episode != self._saved_episode:
                self._save_last(trainer, episode, metric=None, hold=False)
        if trainer.is_global_zero:
            self.store.wait(timeout=60.0)

    def _episode_was_sound(self, trainer: pl.Trainer) -> bool:
        """Whether the episode that just ended had a finite loss, read without waiting for the device.

        QCAModule logs ``train/nonfinite_skipped`` every episode and removes ``train/loss`` for a skipped one, so
        the keys alone tell; another module's loss is read only when it lives on the CPU (a GPU loss would cost a
        device sync each episode), else the episode counts as sound and the validation metric is the proof.
        """
        if SKIPPED in trainer.callback_metrics:  # QCAModule: it removes train/loss when it skips an episode
            return TRAIN_LOSS in trainer.callback_metrics
        loss = trainer.callback_metrics.get(TRAIN_LOSS)
        if isinstance(loss, torch.Tensor) and loss.device.type == "cpu":
            return bool(torch.isfinite(loss).all())
        return True

    def _save_last(self, trainer: pl.Trainer, episode: int, metric: float | None, hold: bool) -> None:
        assert self.store is not None
        self.store.save(trainer, "last", episode, metric, hold=hold)
        self._saved_episode = episode

    def _skip(self, trainer: pl.Trainer) -> bool:
        return (
            self.store is None
            or bool(trainer.fast_dev_run)
            or trainer.state.fn != TrainerFn.FITTING
            or trainer.sanity_checking
        )


def _warn_if_inexact_mid_epoch(trainer: pl.Trainer) -> None:
    """Warn when the run resumed in the middle of an epoch of a train dataloader that does not save its position:
    the rest of that epoch is not the uninterrupted run's (restored random-number states do not bring it back)."""
    if trainer.global_step == 0:
        return
    batches, hint = trainer.num_training_batches, ""
    if math.isfinite(batches):
        steps_per_epoch = math.ceil(batches / trainer.accumulate_grad_batches)
        if trainer.global_step % steps_per_epoch == 0:
            return  # an epoch boundary: the next epoch starts afresh, from the restored states
        hint = f" (SmartCheckpoint.every_n_episodes a multiple of the {steps_per_epoch} steps per epoch)"
    loaders = CombinedLoader(trainer.train_dataloader).flattened
    inexact = [type(loader).__name__ for loader in loaders if not _replays_mid_epoch(loader)]
    if inexact:
        log.warning("resumed at step %d, in the middle of an epoch: the train dataloader (%s) does not save its "
                    "position, so the rest of this epoch does not replay the uninterrupted run. For an exact resume, "
                    "use torchdata's StatefulDataLoader, or checkpoints taken at epoch boundaries%s",
                    trainer.global_step, ", ".join(inexact), hint)  # fmt: skip


def _replays_mid_epoch(loader: object) -> bool:
    """Whether a resume in the middle of ``loader``'s epoch goes on with the batches an uninterrupted run would get:
    Lightning saves and restores a loader with ``state_dict``/``load_state_dict`` (torchdata's
    ``StatefulDataLoader``); a loader whose position lives in other saved state says so with
    ``replays_mid_epoch = True`` (:class:`~atheria_lightning.data.EpisodeStream`)."""
    stateful = callable(getattr(loader, "state_dict", None)) and callable(getattr(loader, "load_state_dict", None))
    return stateful or getattr(loader, "replays_mid_epoch", False) is True


def _validation_follows(trainer: pl.Trainer, episode: int) -> bool:
    """Whether Lightning validates right after this episode, from its public settings.

    A wrong answer costs nothing: a save waiting for a validation that does not come is made at the next episode's
    end, or at the end of training.
    """
    if not trainer.enable_validation:
        return False
    if trainer.should_stop:
        return True  # Lightning validates once more when a run stops early
    every = trainer.val_check_batch
    return isinstance(every, int) and every > 0 and episode % every == 0
