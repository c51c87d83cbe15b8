"""One session of a run: the run's lock, the store's start (reconcile, resume point), the resume checks, training,
the exports, the final flush and the exit code."""

from __future__ import annotations

import contextlib
import logging
import os
import pickle
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Trainer

from atheria_lightning.callbacks import MirrorSync, SmartCheckpoint, TimeLimitGuard, TrainingLog
from atheria_lightning.cli.messages import EXIT_MIRROR_BEHIND, EXIT_MIRROR_TAKEN, exit_status
from atheria_lightning.data import EpisodeDataModule
from atheria_lightning.errors import ConfigError, require
from atheria_lightning.exports_record import make_exports, stale_reason
from atheria_lightning.lock import RunLock
from atheria_lightning.loggers import RunLoggers
from atheria_lightning.module import QCAModule
from atheria_lightning.notifier import Notifier, progress_text
from atheria_lightning.settings import changed_settings, refuse_fixed_changes
from atheria_lightning.store import META_KEY, Checkpoint, MirrorStatus, RunStore
from atheria_lightning.store.manifest import LAST, SETTINGS_KEY, UNLISTED

log = logging.getLogger(__name__)

# Rank 0's resume choice, inherited by the DDP processes it launches.
RESUME_ENV = "ATHERIA_RESUME_CHECKPOINT"
#: What every checkpoint was ranked by before the store recorded the monitor in each file.
LEGACY_MONITOR = "val/combined"
#: How a session chooses its checkpoint: ``(ckpt_path, with_mirror)`` to the checkpoint, or None for a new run.
Resolve = Callable[[str | None, bool], Checkpoint | None]


def resume_point(
    store: RunStore, settings: Any, ckpt_path: str | None, with_mirror: bool, is_global_zero: bool
) -> Checkpoint | None:
    """Reconcile the run folder (and its mirror) through the store, then choose what to resume from.

    An explicit ``ckpt_path`` wins; else ``resume``: a path, ``never`` (refused when the run already has
    checkpoints: they would be overwritten), or ``auto`` (the newest sound checkpoint, local or mirrored; on
    Kaggle, when there is none, a previous version's, copied from ``/kaggle/input``).
    Under DDP only rank 0 looks (it may rebuild, quarantine or download files); the processes it launches
    inherit its choice through the environment.
    """
    if RESUME_ENV in os.environ and not is_global_zero:
        chosen = os.environ[RESUME_ENV]
        return Checkpoint(chosen, os.path.basename(chosen), -1, None, "rank 0") if chosen else None
    resume = ckpt_path or settings["resume"]
    point = store.start(with_mirror=with_mirror, with_previous=with_mirror and resume == "auto",
                        take_over=bool(settings.get("take_over")))  # fmt: skip
    if resume == "auto":
        return point
    if resume == "never":
        require(
            point is None,
            f"resume=never, but {store.checkpoint_dir} already holds checkpoints up to episode "
            f"{point.episode if point else 0}: a new run there would overwrite them; use resume=auto to continue "
            "it, or another experiment_name for a new run",
        )
        return None
    require(Path(resume).is_file(), f"ckpt_path={resume!r} is not a checkpoint file")
    return Checkpoint(str(resume), os.path.basename(resume), -1, None, "explicit")


class Session:
    """One session of ``atheria fit`` (or ``validate``) of the run in ``run_dir``, with what the CLI built for it.

    ``resolve`` chooses the checkpoint (the CLI's ``resolve_checkpoint``: a curriculum's phase starts from an
    earlier phase there); ``loggers`` continue the run's logs; ``training_log`` (None: no log) gets the run its
    exports; ``notifier`` (None: no ``--notify``) hears how the session ends.
    """

    def __init__(
        self, trainer: Trainer, store: RunStore, run_dir: str, resolve: Resolve, loggers: RunLoggers,
        training_log: TrainingLog | None = None, notifier: Notifier | None = None,
    ) -> None:  # fmt: skip
        self.trainer = trainer
        self.store = store
        self.run_dir = run_dir
        self.resolve = resolve
        self.loggers = loggers
        self.training_log = training_log
        self.notifier = notifier

    def fit(self, model: QCAModule, datamodule: EpisodeDataModule, ckpt_path: str | None = None, **kwargs: Any) -> int:
        """``trainer.fit`` from the resolved checkpoint, loaded with ``weights_only=True`` (untrusted input), under
        the run's lock; the exit code: 0, or 4 or 5 when the mirror is behind or taken over at the end."""
        with RunLock(self.run_dir) if self.trainer.is_global_zero else contextlib.nullcontext():
            status = self._fit(model, datamodule, ckpt_path, **kwargs)
            if status is None:
                return 0
            print(status.line(), flush=True)
            if status.superseded_by is not None:
                return EXIT_MIRROR_TAKEN
            return EXIT_MIRROR_BEHIND if status.behind else 0

    def _fit(
        self, model: QCAModule, datamodule: EpisodeDataModule, ckpt_path: str | None, **kwargs: Any
    ) -> MirrorStatus | None:
        trained, failure = False, None
        try:
            point = self.resolve(ckpt_path, True)
            os.environ[RESUME_ENV] = point.path if point else ""
            header = _peek_checkpoint(point.path) if point is not None else None
            if header is None or self._check_resume(point, header, model, datamodule):
                kwargs["weights_only"] = True
                # TensorBoard drops the events past the checkpoint; W&B picks the run this session continues.
                self.loggers.resume(header, start=self.trainer.is_global_zero)
                trained = True
                self.trainer.fit(model, datamodule=datamodule, ckpt_path=point.path if point else None, **kwargs)
        except BaseException as err:
            failure = err
            raise
        finally:
            status = self._close(trained, datamodule, failure)
        return status

    def _close(
        self, trained: bool, datamodule: EpisodeDataModule, failure: BaseException | None
    ) -> MirrorStatus | None:
        if trained:  # the loggers' files complete before the final flush mirrors them
            self.loggers.finish(failed=failure is not None)
            self._write_exports()  # also after a failed fit (exit 3): the model of the best sound checkpoint
        # The final flush, finished run or not: a mirror left behind by an earlier session catches up here.
        status = self.store.close() if self.trainer.is_global_zero else None
        if self.notifier is not None and self.trainer.is_global_zero:
            self._notify_end(datamodule, failure, status)
        return status

    def validate(
        self, model: QCAModule, datamodule: EpisodeDataModule, ckpt_path: str | None = None, **kwargs: Any
    ) -> Any:
        # Under the run's lock: choosing the checkpoint may repair the folder, which a training must not share.
        with RunLock(self.run_dir) if self.trainer.is_global_zero else contextlib.nullcontext():
            point = self.resolve(ckpt_path, False)
            kwargs["weights_only"] = True
            with self.loggers.command_line_redacted():
                return self.trainer.validate(model, datamodule=datamodule, ckpt_path=point.path if point else None,
                                             **kwargs)  # fmt: skip

    def _notify_end(
        self, datamodule: EpisodeDataModule, failure: BaseException | None, status: MirrorStatus | None
    ) -> None:
        """What only the command knows (the Notify callback sent finished or stopped): a failure with its exit code,
        a mirror left behind; then a bounded wait for the queued notifications."""
        assert self.notifier is not None
        if failure is not None:
            code, line = exit_status(failure)
            where = progress_text(datamodule.episodes_done, datamodule.total_episodes)
            if code:
                self.notifier.failed(code, where, line)
            else:
                self.notifier.ended(line)
        elif status is not None and status.superseded_by is not None:
            self.notifier.mirror_behind(EXIT_MIRROR_TAKEN, status.line())
        elif status is not None and status.behind:
            self.notifier.mirror_behind(EXIT_MIRROR_BEHIND, status.line())
        self.notifier.close()

    def _write_exports(self) -> bool:
        """After fit, on rank 0, for a run with a ``TrainingLog``: the best checkpoint to ``exports/model.ts``, then
        ``summary.png`` and ``report.md`` from ``training_log.json``, then ``EXPORTS.json`` (what they were made
        from: :mod:`~atheria_lightning.exports_record`), before the final flush sends them to the mirror.
        A failure here is one warning: the checkpoints, not the report, are what a run must keep."""
        if self.training_log is None or not self.trainer.is_global_zero:
            return False
        try:
            report, exported = make_exports(self.store, self.run_dir)
        except Exception as err:  # a report must never turn a finished training into a failure
            log.warning("the report of %s was not written: %s", self.run_dir, err)
            return False
        print(f"report: {report} (summary.png, training_log.json{', model.ts' if exported else ''})", flush=True)
        return True

    def _remake_stale_exports(
        self, point: Checkpoint, header: dict[str, Any], model: QCAModule, datamodule: EpisodeDataModule
    ) -> None:
        """A finished run whose exports are not those of its final checkpoint (its last session was killed while
        making them, or its mirror copy was cut short) gets them again, before the final flush sends them."""
        if self.training_log is None or not self.trainer.is_global_zero:
            return
        reason = stale_reason(self.store, self.run_dir)
        if reason is not None:
            if point.source != "explicit":  # a log that session never wrote is in its final checkpoint: ``header``
                self.training_log.catch_up(header, self.trainer, model, datamodule)
            if self._write_exports():
                print(f"exports made again from the final checkpoint: {reason}", flush=True)

    def _check_resume(
        self, point: Checkpoint, header: dict[str, Any], model: QCAModule, datamodule: EpisodeDataModule
    ) -> bool:
        """Refuse what cannot change between sessions, report what did; False when the run is already finished.

        ``header`` is the checkpoint's own metadata (weights_only): a manifest on a shared mirror may lie about it.
        """
        saved, now = _settings_by_key(header, model, datamodule, self.trainer.callbacks, self.store.monitor,
                                      str(self.trainer.precision))  # fmt: skip
        try:
            refuse_fixed_changes(saved, now)
        except ConfigError as err:
            raise ConfigError(f"{err} (the checkpoint: {_whence(point)}{_how_to_set_aside(point)})") from err
        episode = int(header.get(META_KEY, {}).get("episode", 0))
        total = datamodule.total_episodes
        suspicion = self._suspicious(point, episode, datamodule)
        if suspicion is not None:
            print(suspicion, flush=True)
        if episode >= total:
            self._remake_stale_exports(point, header, model, datamodule)
            print(f"run finished: episode {episode} of {total} (100%), nothing to do; "
                  "raise data.total_episodes to train further", flush=True)  # fmt: skip
            return False
        print(f"resuming from episode {episode} of {total} ({100.0 * episode / total:.0f}%) "
              f"[{point.source}: {point.path}]", flush=True)  # fmt: skip
        changes = changed_settings(saved, now)
        if changes:
            print(f"changed since that checkpoint, in effect from now on: {', '.join(changes)}", flush=True)
        return True

    def _suspicious(self, point: Checkpoint, episode: int, datamodule: EpisodeDataModule) -> str | None:
        """One line when the checkpoint to resume is at an episode nothing else of the run accounts for: beyond
        data.total_episodes, or a best file past last.ckpt by more than a save interval and a validation explain (a
        file planted on a shared mirror). It is still used: the run may have lost its other files."""
        last = self.store.entries().get(LAST)
        every = max((callback.every_n_episodes for callback in self.trainer.callbacks
                     if isinstance(callback, SmartCheckpoint)), default=10)  # fmt: skip
        if episode > datamodule.total_episodes:
            beyond = f"beyond data.total_episodes={datamodule.total_episodes}"
        elif point.name != LAST and last is not None and episode > last.episode + every + datamodule.val_every_episodes:
            beyond = f"{episode - last.episode} episodes past the run's {LAST} (episode {last.episode})"
        else:
            return None
        return (
            f"suspicious: {point.name} is at episode {episode}, {beyond}; it may not come from this run "
            f"({_whence(point)}){_how_to_set_aside(point)}"
        )


def _whence(point: Checkpoint) -> str:
    """Where a checkpoint came from, in words: "from the mirror, now at PATH"."""
    if point.source == "local":
        return f"local, {point.path}"
    if point.source == "explicit":
        return f"given as ckpt_path, {point.path}"
    return f"from the {point.source}, now at {point.path}"


def _how_to_set_aside(point: Checkpoint) -> str:
    if point.source == "explicit":
        return ""
    return (
        f"; to set it aside, move it into {os.path.join(os.path.dirname(point.path), UNLISTED)}/"
        + (" here and on the mirror" if point.source == "mirror" else "")
        + ", then run the same command again"
    )


def _peek_checkpoint(path: str) -> dict[str, Any]:
    """Read a checkpoint's metadata, weights only: anything else in it is refused, never loaded unsafely."""
    try:
        # mmap: reads the small header and the pickled metadata, not the tensors.
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except (RuntimeError, pickle.UnpicklingError, EOFError, ValueError) as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ConfigError(
            f"checkpoint refused: {path} is not a weights-only checkpoint of tensors and plain values ({reason}); "
            "move it aside or set resume to another checkpoint"
        ) from None


def _settings_by_key(
    header: dict[str, Any], model: QCAModule, datamodule: EpisodeDataModule, callbacks: list[Any],
    monitor: str | None, precision: str,
) -> tuple[dict[str, Any], dict[str, Any]]:  # fmt: skip
    """The checkpoint's settings and this session's, keyed as the CLI names them (``model.lr``, ``data.seed``)."""
    saved = {f"model.{key}": value for key, value in (header.get("hyper_parameters") or {}).items()}
    now = {f"model.{key}": value for key, value in model.hparams.items()}
    data = header.get(type(datamodule).__qualname__) or {}
    for key in ("seed", "total_episodes"):
        if key in data:
            saved[f"data.{key}"] = data[key]
        now[f"data.{key}"] = getattr(datamodule, key)
    meta = header.get(META_KEY)
    if isinstance(meta, dict) and monitor is not None:
        # Checkpoints written before the monitor was recorded were all ranked by val/combined, the only one then.
        saved["SmartCheckpoint.monitor"] = meta.get("monitor") or LEGACY_MONITOR
        now["SmartCheckpoint.monitor"] = monitor
    recorded = header.get(SETTINGS_KEY)
    recorded = recorded if isinstance(recorded, dict) else {}  # checkpoints of earlier versions recorded none
    now["trainer.precision"] = precision
    for callback in callbacks:
        if isinstance(callback, (SmartCheckpoint, MirrorSync)):
            now.update(callback.resume_settings())
    saved.update({key: value for key, value in recorded.items() if key in now})
    for guard in (callback for callback in callbacks if isinstance(callback, TimeLimitGuard)):
        hours = ((header.get("callbacks") or {}).get(guard.state_key) or {}).get("max_hours")
        if hours is not None:
            saved["TimeLimitGuard.max_hours"] = hours
        now["TimeLimitGuard.max_hours"] = guard.max_hours
    return saved, now
