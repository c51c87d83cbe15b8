"""MirrorSync: when the run folder goes to its persistent mirror (Drive, Kaggle output, S3, GCS); the store sends it."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from typing_extensions import Self, override

from atheria_lightning.callbacks.stopping import say
from atheria_lightning.data import episodes_done, total_episodes
from atheria_lightning.errors import ConfigError, require
from atheria_lightning.loggers import BufferedTensorBoardLogger, send_to_loggers
from atheria_lightning.store import RunStore, UsesRunStore, check_mirror_url
from atheria_lightning.store.manifest import SETTINGS_KEY

__all__ = ["MirrorSync", "check_mirror_url"]

#: A slow mirror stretches the interval up to this many times ``every_n_episodes``, so a checkpoint still leaves
#: the machine every few hundred episodes however slow the link is.
MAX_INTERVAL_FACTOR = 16


class MirrorSync(UsesRunStore, Callback):
    """Keeps a persistent copy of the run folder (checkpoints, logs, exports) on a mirror that outlives the session.

    The local run folder is fast but dies with the Colab or Kaggle machine; the mirror is the second level. This
    callback decides *when*: every ``interval`` episodes rank 0 asks the run's :class:`RunStore` for a sync, which
    its background thread carries out, so training never waits on the network. The store knows what to send (each
    checkpoint write and retention removal is queued as it happens), streams each file to a temporary name, moves it
    into place and verifies it by size and sha256, writes the mirror's manifest, and only then deletes what
    retention dropped. ``logs/`` and ``exports/`` are copied file by file when their size or mtime changed. A failed
    sync is retried with exponential backoff and jitter; when retries run out it counts as a failure, is logged once
    and training goes on. At every start the store compares the mirror with the local folder, whatever it held
    (damaged manifest, a stale copy, a new machine), before anything trains.

    One session owns a run's mirror at a time (the store's lease). When another session takes it over
    (``--take_over``, or a heartbeat gone stale), this session is *superseded*: it uploads nothing more, stops after
    the episode where it sees it (under DDP at the next multiple of ``every_n_episodes``) with ``last.ckpt`` kept in the
    local run folder, and the command ends with exit code 5.

    When a sync takes more than ``max_share`` of the wall time between two sync requests, the interval doubles (up to
    16 times ``every_n_episodes``); under a quarter of that share it halves back towards ``every_n_episodes``.

    Args:
        url: The mirror root: a folder (a mounted Google Drive folder, ``/kaggle/working``) or an fsspec URL
            (``s3://bucket/runs`` with s3fs, ``gs://bucket/runs`` with gcsfs). The run goes to
            ``<url>/<experiment_name>``, laid out as the local run folder. ``None`` lets a preset list the callback
            without a URL; the CLI then sets the run's ``mirror_url`` with :meth:`set_url`.
        every_n_episodes: Episodes between sync requests, before any adaptation.
        storage_options: Passed to the fsspec filesystem (credentials, endpoint, ...).
        flush_timeout_s: Longest wait for the mirror at the end of training or at an early stop.
        max_retries: Retries of a failed sync before it counts as a failure.
        backoff_s: First retry delay; it doubles at each retry and is scaled by a random factor in [0.5, 1.5).
        max_share: Share of the wall time a sync may take before the interval doubles, in (0, 1).

    Raises:
        ConfigError: In ``__init__`` for an out-of-range setting, an unknown protocol or a missing optional package
            (s3fs, gcsfs); in ``setup`` without a URL or a store, or when the mirror cannot be written.

    Logged on rank 0 after each sync ends (at the episode where training notices it), straight to the loggers:

    ===================================  ==================================================================
    Key                                  Meaning
    ===================================  ==================================================================
    ``vm/mirror_last_sync_seconds``      Duration of the last completed sync, retries included (once one ran)
    ``vm/mirror_failures``               Syncs that failed after all their retries, since the run started
    ===================================  ==================================================================

    Example::

        store = RunStore("runs/demo")
        mirror = MirrorSync("/content/drive/MyDrive/atheria", every_n_episodes=50).use_store(store)
        trainer = Trainer(default_root_dir="runs/demo", plugins=[store.checkpoint_io], callbacks=[mirror])
    """

    def __init__(
        self,
        url: str | None = None,
        every_n_episodes: int = 50,
        storage_options: dict[str, Any] | None = None,
        flush_timeout_s: float = 120.0,
        max_retries: int = 4,
        backoff_s: float = 1.0,
        max_share: float = 0.1,
    ) -> None:
        _check_settings(every_n_episodes, flush_timeout_s, max_retries, backoff_s, max_share)
        if url is not None:
            check_mirror_url(url)
        self.url = url
        self.every_n_episodes = every_n_episodes
        self.storage_options = dict(storage_options or {})
        self.flush_timeout_s = flush_timeout_s
        self.max_retries = max_retries
        self.backoff_s = backoff_s
        self.max_share = max_share
        self._clock: Callable[[], float] = time.monotonic
        self._sleep: Callable[[float], Any] = time.sleep
        self.interval = every_n_episodes
        self._failures_before = 0  # failures of earlier sessions, from the checkpoint
        self._episodes_since_request = 0
        self._sync_due = False
        self._syncs_seen = 0
        self._last_request_at: float | None = None
        self._last_gap: float | None = None
        self._taken_by: str | None = None  # the session that took the mirror over, once this one has stopped for it

    def use_clock(self, clock: Callable[[], float] | None = None, sleep: Callable[[float], Any] | None = None) -> Self:
        """Tests: a clock for the interval adaptation and a sleep for the retries, so that none waits; before
        :meth:`use_store`. Not a setting: a preset cannot name a function."""
        self._clock = clock or self._clock
        self._sleep = sleep or self._sleep
        return self

    def set_url(self, url: str) -> None:
        """Set the mirror root after construction (the CLI passes ``mirror_url``); checked as in ``__init__``."""
        check_mirror_url(url)
        self.url = url

    @override
    def use_store(self, store: RunStore) -> Self:
        require(self.url is not None, "MirrorSync has no url: set mirror_url, or MirrorSync's url in the config")
        assert self.url is not None
        store.set_mirror(self.url, self.storage_options, self.flush_timeout_s, self.max_retries, self.backoff_s,
                         self._clock, self._sleep)  # fmt: skip
        return super().use_store(store)

    @property
    def failures(self) -> int:
        """Syncs that failed after their retries, over the whole run."""
        return self._failures_before + (self.store.sync_failures if self.store is not None else 0)

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        store = self.store
        require(store is not None, "MirrorSync needs the run's RunStore: AtheriaCLI passes it, or call use_store")
        assert store is not None
        problem = None
        if trainer.is_global_zero:
            try:
                store.start_mirror()
            except ConfigError as err:
                problem = str(err)
        # Decided on rank 0 and shared, so every rank stops together on an unreachable mirror.
        problem = trainer.strategy.broadcast(problem, src=0)
        if problem:
            raise ConfigError(problem)
        self._episodes_since_request, self._last_request_at, self._sync_due = 0, None, False

    @property
    def stopped_because(self) -> str | None:
        """Why this session stopped early, once another session took the mirror over (:class:`StopsEarly`)."""
        return None if self._taken_by is None else f"the mirror was taken over by another session ({self._taken_by})"

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self.store is not None and (trainer.world_size == 1 or episodes_done(trainer) % self.every_n_episodes == 0):
            # Decided on rank 0 and shared at episodes every rank counts alike, so all ranks stop together (under
            # DDP every every_n_episodes episodes, to spare a collective per episode; alone, after each episode).
            taken = trainer.strategy.broadcast(self.store.superseded_by if trainer.is_global_zero else None, src=0)
            if taken is not None and self._taken_by is None:
                self._taken_by = taken
                trainer.should_stop = True
        if not trainer.is_global_zero or self.store is None:
            return
        self._episodes_since_request += 1
        if self._episodes_since_request >= self.interval:
            # Not now: Lightning runs SmartCheckpoint after this callback, so this episode's checkpoint is queued only
            # later. The request goes out at the next episode's start.
            self._episodes_since_request = 0
            self._sync_due = True
        if self.store.syncs_ended != self._syncs_seen:
            self._syncs_seen = self.store.syncs_ended
            self._adapt_interval(self.store.last_sync_seconds, self._last_gap)
            metrics = {"vm/mirror_failures": float(self.failures)}
            if self.store.last_sync_seconds:
                metrics["vm/mirror_last_sync_seconds"] = self.store.last_sync_seconds
            send_to_loggers(trainer, metrics)

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if not (self._sync_due and trainer.is_global_zero and self.store is not None):
            return
        self._sync_due = False
        for logger in trainer.loggers:  # buffered events written out first, so the sync copies them
            if isinstance(logger, BufferedTensorBoardLogger):
                logger.flush()
        now = self._clock()
        self._last_gap = None if self._last_request_at is None else now - self._last_request_at
        self._last_request_at = now
        self.store.request_sync()

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.is_global_zero and self.store is not None:
            self.store.flush(self.flush_timeout_s)
        if trainer.is_global_zero and self._taken_by is not None:
            done, total = episodes_done(trainer), total_episodes(trainer)
            where = f"step {done}" if total is None else f"episode {done} of {total}"
            say(f"stopped at {where}: {self.stopped_because}; this session's checkpoints stay in "
                f"{self.store.run_dir if self.store else 'the run folder'} and are not uploaded")  # fmt: skip

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        # What was saved before the crash goes out (bounded); Lightning calls no teardown hook after an exception.
        if trainer.is_global_zero and self.store is not None:
            self.store.flush(self.flush_timeout_s)

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        # After on_fit_end, where the report wrote exports/: they go too.
        if stage == "fit" and trainer.is_global_zero and self.store is not None:
            self.store.flush(self.flush_timeout_s)

    def resume_settings(self) -> dict[str, Any]:
        """This session's settings a resume reports when they differ from the checkpoint's, keyed as the CLI
        names them."""
        return {"MirrorSync.every_n_episodes": self.every_n_episodes}

    @override
    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        checkpoint.setdefault(SETTINGS_KEY, {}).update(self.resume_settings())

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"interval": self.interval, "failures": self.failures}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # Clamped: every_n_episodes may differ in the resumed session.
        interval = int(state_dict.get("interval", self.every_n_episodes))
        self.interval = min(max(interval, self.every_n_episodes), MAX_INTERVAL_FACTOR * self.every_n_episodes)
        self._failures_before = int(state_dict.get("failures", 0)) - (
            self.store.sync_failures if self.store is not None else 0
        )

    def _adapt_interval(self, duration_s: float, gap_s: float | None) -> None:
        if not gap_s or gap_s <= 0:
            return
        if duration_s > self.max_share * gap_s:
            self.interval = min(2 * self.interval, MAX_INTERVAL_FACTOR * self.every_n_episodes)
        elif duration_s < self.max_share / 4 * gap_s:
            self.interval = max(self.interval // 2, self.every_n_episodes)


def _check_settings(
    every_n_episodes: int, flush_timeout_s: float, max_retries: int, backoff_s: float, max_share: float
) -> None:
    require(isinstance(every_n_episodes, int) and every_n_episodes > 0,
            f"MirrorSync.every_n_episodes={every_n_episodes!r} must be a positive integer")  # fmt: skip
    require(flush_timeout_s > 0, f"MirrorSync.flush_timeout_s={flush_timeout_s!r} must be a positive number of seconds")
    require(isinstance(max_retries, int) and max_retries >= 0,
            f"MirrorSync.max_retries={max_retries!r} must be an integer >= 0")  # fmt: skip
    require(backoff_s >= 0, f"MirrorSync.backoff_s={backoff_s!r} must be a number of seconds >= 0")
    require(0 < max_share < 1, f"MirrorSync.max_share={max_share!r} must be a fraction strictly between 0 and 1")
