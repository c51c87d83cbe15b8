"""RunStore: the one owner of a run folder's checkpoints, its manifest, retention, the mirror and the choices.

A facade: the start of a session is :mod:`~atheria_lightning.store.reconcile`, the writes
:mod:`~atheria_lightning.store.writer`, the mirror :mod:`~atheria_lightning.store.mirror`. One save reads in three
files: ``SmartCheckpoint`` asks :meth:`RunStore.save`, whose :class:`Save` travels with Lightning's save to
:class:`StoreCheckpointIO`, which hands the state to the :class:`~atheria_lightning.store.writer.Writer`; each
written file goes to the mirror's :class:`~atheria_lightning.store.uploader.Uploader`.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import lightning.pytorch as pl
import torch
from fsspec.implementations.local import LocalFileSystem
from lightning.fabric.plugins import CheckpointIO
from typing_extensions import Self, override

from atheria_lightning.files import atomic_write
from atheria_lightning.store import reconcile, retention
from atheria_lightning.store.manifest import CHECKPOINTS, LAST, META_KEY, QUARANTINE, Entry, best_name, unsound
from atheria_lightning.store.mirror import Mirror, MirrorStatus, remote_run_dir
from atheria_lightning.store.retry import Retry
from atheria_lightning.store.writer import Folder, Save, Writer, checkpoint_path, serialized

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Checkpoint:
    """A verified checkpoint of the run: where it is and what its manifest entry says."""

    path: str
    name: str
    episode: int
    metric: float | None
    #: "local", "mirror" (downloaded at this start), "explicit", or where a previous version's copy came from
    source: str = "local"


class UsesRunStore:
    """Mixin of the callbacks that act on the run's files through a :class:`RunStore` handed to them.

    ``AtheriaCLI`` builds one store per run and calls :meth:`use_store` on each such callback; a script with a plain
    ``Trainer`` does the same by hand.
    """

    store: RunStore | None = None

    def use_store(self, store: RunStore) -> Self:
        self.store = store
        return self


class RunStore:
    """The run folder's files: checkpoints, ``MANIFEST.json``, retention, the mirror, resume and best choices.

    Only global rank 0 writes: the CLI calls :meth:`start` there, and Lightning calls the store's
    :attr:`checkpoint_io` there only. Every method is safe to call on other ranks.

    Args:
        run_dir: ``<run_root>/<experiment_name>``; checkpoints live in ``<run_dir>/checkpoints``.
        async_write: Write files in a background thread (the training thread only serializes the state).

    Example::

        store = RunStore("runs/demo")
        trainer = Trainer(plugins=[store.checkpoint_io],
                          callbacks=[SmartCheckpoint().use_store(store), MirrorSync(url).use_store(store)])
    """

    def __init__(self, run_dir: str | os.PathLike[str], async_write: bool = True) -> None:
        self.run_dir = os.path.abspath(os.fspath(run_dir))
        self.checkpoint_dir = os.path.join(self.run_dir, CHECKPOINTS)
        self.async_write = async_write
        self.top_k = 5
        self.monitor: str | None = None
        self.checkpoint_io = StoreCheckpointIO(self)
        self._writer: Writer | None = None  # made by open(), with the folder it writes into
        self._mirror: Mirror | None = None
        self._previous: tuple[str, str] | None = None  # (root, label) searched for a previous version's run
        self._flush_deadline: float | None = None

    # -- configuration (by the callbacks, before training) --
    def keep_best(self, top_k: int, monitor: str | None = None) -> None:
        """Keep the ``top_k`` best checkpoints by ``monitor`` (and ``last.ckpt``); applied at the next write and at
        start. Every checkpoint written records ``monitor``, so a resume can refuse to rank by another metric."""
        self.top_k = top_k
        self.monitor = monitor

    def set_mirror(
        self,
        url: str,
        storage_options: dict[str, Any] | None = None,
        flush_timeout_s: float = 120.0,
        max_retries: int = 4,
        backoff_s: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Any] = time.sleep,
    ) -> None:
        """Mirror the run to ``<url>/<experiment_name>``; nothing is contacted until :meth:`start` or a sync."""
        fs, root = remote_run_dir(url, os.path.basename(self.run_dir), storage_options)
        self._mirror = Mirror(self.run_dir, self.wait, lambda: self.top_k, url, fs, root, flush_timeout_s,
                              Retry(max_retries, backoff_s, sleep), clock)  # fmt: skip

    @property
    def has_mirror(self) -> bool:
        return self._mirror is not None

    def look_in_previous_versions(self, root: str, label: str = "previous version") -> None:
        """When a start finds no checkpoint (local or mirrored), copy the run from a previous version's read-only
        output under ``root`` (Kaggle's ``/kaggle/input``): see :mod:`~atheria_lightning.store.previous`.
        ``label`` names that origin in the resume line."""
        self._previous = (root, label)

    # -- start of a session --
    def start(self, with_mirror: bool = True, with_previous: bool = True, take_over: bool = False) -> Checkpoint | None:
        """Reconcile the run folder (and the mirror), then return the checkpoint to resume from, if any.

        Local: temporary files of killed writes are removed, a damaged manifest is rebuilt from the files, listed
        files that fail verification and files that do not load go to ``checkpoints/corrupt/``. Mirror: reached
        (``ConfigError`` when not), its manifest read (rebuilt when damaged), every checkpoint it has newer than
        the local one downloaded and verified, and whatever it lacks queued for upload at once. Previous version
        (``with_previous``, after :meth:`look_in_previous_versions`): only when neither has a checkpoint, the run
        is copied from it, verified. Retention is applied. The resume point is the newest verified checkpoint
        whose weights are finite.

        With a mirror, this session first takes its lease (:mod:`~atheria_lightning.store.lease`): refused with
        ``MirrorInUse`` while another live session holds it, unless ``take_over``.
        """
        folder = self._folder()
        mirror = self._mirror if with_mirror else None
        downloaded: set[str] = set()
        if mirror is not None:
            reconcile.connect_mirror(mirror, take_over)
            downloaded = reconcile.download_newer(folder, mirror)
            restored = mirror.download_plain_folders()
            if restored:
                print(f"mirror: restored {restored} file(s) of earlier sessions' logs/ and exports/", flush=True)
        copied: dict[str, str] = {}
        root, label = self._previous or ("", "")
        if with_previous and root and not folder.entries():
            copied = reconcile.copy_previous(folder, self.run_dir, root, label)
        reconcile.set_aside_beyond_top_k(folder, self.top_k, with_mirror=self._mirror is not None)
        if mirror is not None:
            mirror.reconcile(folder.entries())
        point = self.resume_point()
        if point is not None and point.name in downloaded:
            point = replace(point, source="mirror")
        elif point is not None and point.name in copied:
            point = replace(point, source=f"{label}: {copied[point.name]}, copied to")
        return point

    def start_mirror(self, take_over: bool = False) -> None:
        """Reach the mirror (``ConfigError`` when not), take its lease and queue what it lacks; a no-op once done
        or without one."""
        if self._mirror is None or self._mirror.opened:
            return
        folder = self._folder()
        reconcile.connect_mirror(self._mirror, take_over)
        self._mirror.open()
        self._mirror.reconcile(folder.entries())

    @property
    def superseded_by(self) -> str | None:
        """Who took this run's mirror over from this session, in words; None while it owns it (or has none)."""
        return self._mirror.superseded_by() if self._mirror is not None else None

    def open(self) -> None:
        """Read (or rebuild) the local manifest and check every file it lists; once per store."""
        self._folder()

    def _folder(self) -> Folder:
        return self._opened().folder

    def _opened(self) -> Writer:
        """The writer, and the folder it writes into, made at the first call (:func:`reconcile.open_folder`)."""
        if self._writer is None:
            folder = reconcile.open_folder(self.run_dir, self.checkpoint_dir, self._send)
            self._writer = Writer(folder, self.async_write, lambda: self.top_k)
        return self._writer

    def _send(self, name: str, entry: Entry | None) -> None:
        if self._mirror is not None:
            self._mirror.enqueue(name, entry)

    # -- the choices --
    def resume_point(self) -> Checkpoint | None:
        """The newest listed checkpoint that is sound (see :func:`unsound`; one that is not moves to ``corrupt/``)."""
        folder = self._folder()
        for name, entry in folder.copy().newest_first():
            path = folder.path(name)
            problem = unsound(path)
            if problem is None:
                return Checkpoint(path, name, entry.episode, entry.metric)
            log.warning("checkpoint %s is not resumed from: %s; moved to %s/", path, problem, QUARANTINE)
            folder.quarantine(name)
        return None

    def best(self) -> Checkpoint | None:
        """The checkpoint to export or to start a next phase from: the lowest finite metric among the best files,
        else the newest checkpoint; verified, with finite weights."""
        folder = self._folder()
        manifest = folder.copy()
        for name, entry in retention.best(manifest.files) + manifest.newest_first():
            path = folder.path(name)
            if folder.matches(name, entry) and unsound(path) is None:
                return Checkpoint(path, name, entry.episode, entry.metric)
        return None

    def entries(self) -> dict[str, Entry]:
        """The listed checkpoints, name -> entry (a copy)."""
        return self._folder().entries()

    def newest_episode(self) -> int:
        """The episode count of the newest listed checkpoint; -1 when there is none."""
        return self._folder().copy().newest_episode()

    def enters_top_k(self, metric: float) -> bool:
        """Whether a checkpoint with ``metric`` would be among the ``top_k`` best kept."""
        return retention.enters_top_k(metric, self._folder().kept_metrics(), self.top_k)

    # -- writes (training thread asks, the writer thread does) --
    def save(
        self, trainer: pl.Trainer, kind: str, episode: int, metric: float | None = None, hold: bool = False
    ) -> None:
        """Save the trainer's state as ``last.ckpt`` (``kind="last"``) or ``best-eNNNNNN.ckpt`` (``"best"``).

        Call it on every rank (Lightning's save is collective); rank 0 serializes the state now and writes it in
        the background. With ``hold``, the serialized state waits for :meth:`confirm` (kept when the next episode
        proves it sound, dropped when it does not). What is asked travels with the save, as the storage options
        Lightning hands to :class:`StoreCheckpointIO`.
        """
        save = Save(LAST if kind == "last" else best_name(episode), episode, metric, hold)
        self._raise_pending_error()
        trainer.save_checkpoint(checkpoint_path(self.checkpoint_dir, save.name), weights_only=False,
                                storage_options=save)  # fmt: skip
        if save.name != LAST and trainer.is_global_zero and not hold:
            self._folder().expect_best(save.name, metric)

    def write_checkpoint(
        self, checkpoint: dict[str, Any], kind: str, episode: int, metric: float | None = None
    ) -> None:
        """Queue a Lightning checkpoint dict as ``last.ckpt`` or ``best-eNNNNNN.ckpt``, without a Trainer (rank 0).

        What :meth:`save` does once Lightning has gathered the state; for tools and tests that have the dict.
        """
        save = Save(LAST if kind == "last" else best_name(episode), episode, metric)
        if save.name != LAST:
            self._folder().expect_best(save.name, metric)
        self._queue(save, checkpoint)

    def accept(self, checkpoint: dict[str, Any], path: str, save: Save | None) -> None:
        """From Lightning (rank 0, training thread): serialize the state that :meth:`save` asked for."""
        if save is None or os.path.abspath(path) != checkpoint_path(self.checkpoint_dir, save.name):
            _refuse_foreign_save(path, self.checkpoint_dir)
            data = serialized(checkpoint)
            atomic_write(LocalFileSystem(), os.path.abspath(path), lambda handle: handle.write(data))
            return
        self._queue(save, checkpoint)

    def _queue(self, save: Save, checkpoint: dict[str, Any]) -> None:
        checkpoint[META_KEY] = save.meta(self.monitor)
        self._opened().queue(save, checkpoint)

    def copy_last_to_best(self, trainer: pl.Trainer, episode: int, metric: float) -> None:
        """Keep the ``last.ckpt`` just queued (this episode, this metric) also as ``best-eNNNNNN.ckpt``, copied by
        the writer thread: the training thread does not gather the state again."""
        if trainer.is_global_zero:
            self._opened().copy_last(best_name(episode), episode, metric)

    def confirm(self, sound: bool) -> None:
        """Decide a held save: written when ``sound`` (the next episode's loss was finite), else dropped."""
        if self._writer is not None:
            self._writer.confirm(sound)

    def wait(self, timeout: float | None = None) -> bool:
        """Wait (at most ``timeout``) for the queued writes; True when every one is on disk and listed."""
        return self._writer.wait(timeout) if self._writer is not None else True

    def raise_write_error(self) -> None:
        """Wait for the queued writes and raise the first that failed (disk full, I/O error), if any."""
        self.wait()
        self._raise_pending_error()

    @property
    def max_write_seconds(self) -> float:
        """The longest write of a checkpoint so far, from its first byte to its listing."""
        return self._writer.max_write_seconds if self._writer is not None else 0.0

    def _raise_pending_error(self) -> None:
        if self._writer is not None:
            self._writer.raise_pending_error()

    # -- mirror --
    def request_sync(self) -> None:
        """Ask the mirror for a sync in the background (no-op without a mirror)."""
        if self._mirror is not None:
            self._mirror.request()

    def flush(self, timeout_s: float | None = None) -> bool:
        """Wait for the queued writes, then for a mirror sync that sends them, within ``timeout_s`` in all.

        A flush means the run is about to stop: a save held for its proof (:meth:`save`'s ``hold``) is written now,
        as nothing has shown it unsound. Returns True when everything saved is on the mirror (or there is no mirror).
        """
        self.confirm(sound=True)
        timeout_s = self._bounded(timeout_s)
        started = time.monotonic()
        self.wait(timeout_s)
        if self._mirror is None:
            return True
        left = None if timeout_s is None else max(0.0, timeout_s - (time.monotonic() - started))
        return self._mirror.flush(left)

    def limit_flush(self, deadline: float) -> None:
        """Every later flush ends by ``deadline`` (``time.monotonic()`` seconds): a session about to be killed."""
        self._flush_deadline = deadline if self._flush_deadline is None else min(deadline, self._flush_deadline)

    def close(self, timeout_s: float | None = None) -> MirrorStatus | None:
        """The final flush (bounded), then stop the background threads; the mirror's status (None without one)."""
        self.flush(timeout_s)
        if self._writer is not None:
            self._writer.stop()
        if self._mirror is None:
            return None
        self._mirror.stop()
        return self.mirror_status()

    def mirror_status(self) -> MirrorStatus | None:
        if self._mirror is None:
            return None
        local = self._writer.folder.copy().newest_episode() if self._writer is not None else -1
        return self._mirror.status(local)

    @property
    def last_sync_seconds(self) -> float:
        return self._mirror.last_sync_seconds if self._mirror is not None else 0.0

    @property
    def syncs_ended(self) -> int:
        return self._mirror.syncs_ended if self._mirror is not None else 0

    @property
    def sync_failures(self) -> int:
        return self._mirror.failures if self._mirror is not None else 0

    def _bounded(self, timeout_s: float | None) -> float | None:
        if self._flush_deadline is None:
            return timeout_s
        left = max(0.0, self._flush_deadline - time.monotonic())
        return left if timeout_s is None else min(timeout_s, left)


def _refuse_foreign_save(path: str, checkpoint_dir: str) -> None:
    if os.path.dirname(os.path.abspath(path)) == checkpoint_dir:
        raise ValueError(f"{path}: the run's checkpoints/ folder is written by its RunStore only; save elsewhere")


class StoreCheckpointIO(CheckpointIO):
    """Lightning's checkpoint plugin of a :class:`RunStore`: saves go to the store, loads are ``weights_only``.

    ``AtheriaCLI`` passes it to the Trainer (``plugins``); it is what ``trainer.save_checkpoint`` reaches. A save
    that :meth:`RunStore.save` asked for comes with its :class:`Save` as ``storage_options``.
    """

    def __init__(self, store: RunStore) -> None:
        self.store = store

    @override
    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: str | os.PathLike[str], storage_options: Any | None = None
    ) -> None:
        save = storage_options if isinstance(storage_options, Save) else None
        self.store.accept(checkpoint, os.fspath(path), save)

    @override
    def load_checkpoint(
        self, path: str | os.PathLike[str], map_location: Any | None = None, weights_only: bool | None = None
    ) -> dict:
        # Always weights_only: a checkpoint can come from a shared Drive or bucket.
        if not os.path.exists(path):
            raise FileNotFoundError(f"Checkpoint file not found: {path}")
        with open(path, "rb") as handle:
            return torch.load(handle, map_location=map_location, weights_only=True)

    @override
    def remove_checkpoint(self, path: str | os.PathLike[str]) -> None:
        raise ValueError(f"{path}: checkpoints are removed by the run store's retention only")

    @override
    def teardown(self) -> None:
        self.store.raise_write_error()
