"""RunStore: the one owner of a run folder's checkpoints, its manifest, retention, the mirror and the choices."""

from __future__ import annotations

import logging
import math
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, replace
from io import BytesIO
from typing import IO, Any

import lightning.pytorch as pl
import torch
from fsspec.implementations.local import LocalFileSystem
from lightning.fabric.plugins import CheckpointIO
from lightning.fabric.utilities.cloud_io import _load as pl_load
from lightning.fabric.utilities.types import _PATH
from lightning_utilities.core.apply_func import apply_to_collection
from typing_extensions import Self, override

from atheria_lightning.errors import ConfigError, require
from atheria_lightning.files import MeasuredWriter, atomic_write, copy_measured, remove_stale_tmp, verify
from atheria_lightning.store import retention
from atheria_lightning.store.manifest import (
    BEYOND_TOP_K,
    CHECKPOINTS,
    LAST,
    MANIFEST_NAME,
    META_KEY,
    QUARANTINE,
    Entry,
    LocalSide,
    Manifest,
    adopt_unlisted,
    best_name,
    is_checkpoint_name,
    kind_of,
    read_or_rebuild,
    settle,
    unsound,
    write_manifest,
)
from atheria_lightning.store.mirror import Mirror, MirrorChanged, MirrorStatus, remote_run_dir
from atheria_lightning.store.previous import examine, find_run_folders, newest_first
from atheria_lightning.store.retry import Retry
from atheria_lightning.store.transfer import copy_plain_files, download_verified

log = logging.getLogger(__name__)

#: How often a start reads the mirror's manifest again when listed files vanish under it before giving up.
VANISHED_REREADS = 3


@dataclass(frozen=True)
class Checkpoint:
    """A verified checkpoint of the run: where it is and what its manifest entry says."""

    path: str
    name: str
    episode: int
    metric: float | None
    #: "local", "mirror" (downloaded at this start), "explicit", or where a previous version's copy came from
    source: str = "local"


@dataclass
class _SaveRequest:
    name: str
    episode: int
    metric: float | None
    hold: bool


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
        self.max_write_seconds = 0.0
        self._local = LocalFileSystem()
        self._manifest: Manifest | None = None
        self._lock = threading.Lock()  # the manifest, between the training thread and the writer thread
        self._queued_best: dict[str, float] = {}  # best files asked for and not yet listed: name -> metric
        self._executor: ThreadPoolExecutor | None = None
        self._futures: list[Future] = []
        self._error: BaseException | None = None
        self._request: _SaveRequest | None = None
        self._held: tuple[_SaveRequest, memoryview] | None = None
        self._state_write: Future | None = None  # the newest serialized state queued for writing
        self._last_queued: int | None = None  # the episode of the newest last.ckpt queued (written or on its way)
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
        self.open()
        downloaded: set[str] = set()
        if with_mirror and self._mirror is not None:
            self._connect_mirror(take_over)
            downloaded = self._download_newer(self._mirror.open())
            restored = self._mirror.download_plain_folders()
            if restored:
                print(f"mirror: restored {restored} file(s) of earlier sessions' logs/ and exports/", flush=True)
        copied: dict[str, str] = {}
        root, label = self._previous or ("", "")
        if with_previous and root and not self._entries():
            copied = self._copy_previous(root, label)
        self._set_aside_beyond_top_k()
        if with_mirror and self._mirror is not None:
            self._mirror.reconcile(self._entries())
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
        self.open()
        self._connect_mirror(take_over)
        self._mirror.open()
        self._mirror.reconcile(self._entries())

    def _connect_mirror(self, take_over: bool) -> None:
        assert self._mirror is not None
        self._mirror.connect()
        previous = self._mirror.acquire(take_over)
        if previous is not None:
            print(f"mirror: taken over from another session ({previous.describe(time.time())}); that session "
                  "stops uploading at its next sync", flush=True)  # fmt: skip

    @property
    def superseded_by(self) -> str | None:
        """Who took this run's mirror over from this session, in words; None while it owns it (or has none)."""
        return self._mirror.superseded_by() if self._mirror is not None else None

    def open(self) -> None:
        """Read (or rebuild) the local manifest and check every file it lists; once per store."""
        if self._manifest is not None:
            return
        folder = self.checkpoint_dir
        for path in (self.run_dir, folder):
            require(not os.path.exists(path) or os.path.isdir(path),
                    f"{path} is a file, where the run's folder should be: move it aside")  # fmt: skip
        manifest = self._path(MANIFEST_NAME)
        require(not os.path.isdir(manifest), f"{manifest} is a folder, where the manifest should be: move it aside")
        for stale in remove_stale_tmp(self._local, folder) if os.path.isdir(folder) else []:
            log.info("removed a partial file left by an interrupted write: %s", stale)
        manifest, changed = read_or_rebuild(LocalSide(folder))
        changed |= settle(manifest, self._matches)
        for name, entry in list(manifest.files.items()):
            if not self._matches(name, entry):
                log.warning("checkpoint %s does not match MANIFEST.json (truncated or corrupt): moved to %s/",
                            self._path(name), QUARANTINE)  # fmt: skip
                del manifest.files[name]
                LocalSide(folder).quarantine(name)
                changed = True
        changed |= adopt_unlisted(manifest, LocalSide(folder))
        self._manifest = manifest
        if LAST in manifest.files:
            self._last_queued = manifest.files[LAST].episode
        if changed:
            self._write_manifest()

    def _download_newer(self, remote: Manifest) -> set[str]:
        """Bring every mirror checkpoint the local folder lacks, or has older, into it, verified; their names.

        A listed file that vanished or was replaced before it was downloaded (the retention or a last upload of the
        session this one took the mirror over from) means the manifest changed: it is read again, a few times at
        most.
        """
        assert self._mirror is not None
        downloaded: set[str] = set()
        for _ in range(VANISHED_REREADS):
            try:
                self._download_listed(remote, downloaded)
                return downloaded
            except MirrorChanged as err:
                log.warning("mirror: %s: reading its manifest again", err)
                remote = self._mirror.reread()
        raise ConfigError(
            f"mirror_url={self._mirror.url!r} keeps changing while this session starts (listed checkpoints vanish "
            "before they can be read): another session is writing it; stop that session, then run the same command "
            "again"
        )

    def _download_listed(self, remote: Manifest, downloaded: set[str]) -> None:
        assert self._mirror is not None and self._manifest is not None
        for name, entry in sorted(remote.files.items(), key=lambda item: -item[1].episode):
            mine = self._manifest.files.get(name)
            if mine is not None and (mine.sha256 == entry.sha256 or mine.episode >= entry.episode):
                continue
            if self._mirror.download(name, entry, self._path(name), self._journal):
                self._list(name, entry)
                downloaded.add(name)

    def _copy_previous(self, root: str, label: str) -> dict[str, str]:
        """Copy the run from the previous version under ``root`` with the newest sound checkpoint: its listed
        checkpoints (verified again as they are copied) and its ``logs/`` and ``exports/``. Nothing is written
        under ``root``. Returns the names copied -> where each came from."""
        folders = find_run_folders(root, os.path.basename(self.run_dir), skip=self.run_dir)
        candidates = [run for run in map(examine, folders) if run is not None]
        if not candidates:
            if folders:
                print(f"{label}: no sound checkpoint in {', '.join(folders)}: starting a new run", flush=True)
            return {}
        for chosen in newest_first(candidates):
            copied = {}
            for name, entry in chosen.manifest.newest_first():
                if download_verified(chosen.side, name, entry, self._path(name), self._journal):
                    self._list(name, entry)
                    copied[name] = os.path.join(chosen.side.folder, name)
                else:
                    log.warning("%s/%s no longer matches what was checked: not copied", chosen.side.folder, name)
            if copied:
                break
        else:
            return {}
        files = len(copy_plain_files(LocalFileSystem(), chosen.run_dir, self.run_dir))
        others = [run.describe() for run in candidates if run is not chosen]
        print(f"{label}: copied the run of {chosen.describe()} into {self.run_dir} ({len(copied)} checkpoint(s), "
              f"{files} file(s) of logs/ and exports/)"
              + (f"; the newest of {len(candidates)} found, not taken: {', '.join(others)}" if others else ""),
              flush=True)  # fmt: skip
        return copied

    def resume_point(self) -> Checkpoint | None:
        """The newest listed checkpoint that is sound (see :func:`unsound`; one that is not moves to ``corrupt/``)."""
        self.open()
        for name, entry in self._manifest_copy().newest_first():
            path = self._path(name)
            problem = unsound(path)
            if problem is None:
                return Checkpoint(path, name, entry.episode, entry.metric)
            log.warning("checkpoint %s is not resumed from: %s; moved to %s/", path, problem, QUARANTINE)
            self._unlist_and_quarantine(name)
        return None

    def best(self) -> Checkpoint | None:
        """The checkpoint to export or to start a next phase from: the lowest finite metric among the best files,
        else the newest checkpoint; verified, with finite weights."""
        self.open()
        manifest = self._manifest_copy()
        for name, entry in retention.best(manifest.files) + manifest.newest_first():
            path = self._path(name)
            if self._matches(name, entry) and unsound(path) is None:
                return Checkpoint(path, name, entry.episode, entry.metric)
        return None

    def entries(self) -> dict[str, Entry]:
        """The listed checkpoints, name -> entry (a copy)."""
        self.open()
        return self._entries()

    def newest_episode(self) -> int:
        """The episode count of the newest listed checkpoint; -1 when there is none."""
        self.open()
        return self._manifest_copy().newest_episode()

    # -- writes (training thread asks, the writer thread does) --
    def save(
        self, trainer: pl.Trainer, kind: str, episode: int, metric: float | None = None, hold: bool = False
    ) -> None:
        """Save the trainer's state as ``last.ckpt`` (``kind="last"``) or ``best-eNNNNNN.ckpt`` (``"best"``).

        Call it on every rank (Lightning's save is collective); rank 0 serializes the state now and writes it in
        the background. With ``hold``, the serialized state waits for :meth:`confirm` (kept when the next episode
        proves it sound, dropped when it does not).
        """
        name = LAST if kind == "last" else best_name(episode)
        self._raise_pending_error()
        self._request = _SaveRequest(name, episode, metric, hold)
        try:
            trainer.save_checkpoint(self._path(name), weights_only=False)
        finally:
            self._request = None
        if name != LAST and trainer.is_global_zero and not hold:
            with self._lock:
                self._queued_best[name] = metric if metric is not None else math.inf

    def copy_last_to_best(self, trainer: pl.Trainer, episode: int, metric: float) -> None:
        """Keep the ``last.ckpt`` just queued (this episode, this metric) also as ``best-eNNNNNN.ckpt``, copied by
        the writer thread: the training thread does not gather the state again."""
        name = best_name(episode)
        if trainer.is_global_zero:
            with self._lock:
                self._queued_best[name] = metric
            self._submit(self._copy, LAST, name, episode, metric)

    def enters_top_k(self, metric: float) -> bool:
        """Whether a checkpoint with ``metric`` would be among the ``top_k`` best kept."""
        self.open()
        with self._lock:
            files = dict(self._manifest.files)  # type: ignore[union-attr]
            queued = [value for name, value in self._queued_best.items() if name not in files]
        kept = [entry.metric for name, entry in files.items() if name != LAST]
        return retention.enters_top_k(metric, kept + queued, self.top_k)

    def confirm(self, sound: bool) -> None:
        """Decide a held save: written when ``sound`` (the next episode's loss was finite), else dropped."""
        if self._held is None:
            return
        request, data = self._held
        self._held = None
        if sound:
            self._submit_state(request, data)
            return
        log.warning("the state of episode %d led to a non-finite loss: not saved; last.ckpt keeps episode %s",
                    request.episode, self._last_queued if self._last_queued is not None else "none")  # fmt: skip

    def wait(self, timeout: float | None = None) -> bool:
        """Wait (at most ``timeout``) for the queued writes; True when every one is on disk and listed."""
        with self._lock:
            futures = [future for future in self._futures if not future.done()]
        done, not_done = wait(futures, timeout=timeout)
        return not not_done

    def raise_write_error(self) -> None:
        """Wait for the queued writes and raise the first that failed (disk full, I/O error), if any."""
        self.wait()
        self._raise_pending_error()

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
        self._stop_executor()
        if self._mirror is None:
            return None
        self._mirror.stop()
        return self.mirror_status()

    def mirror_status(self) -> MirrorStatus | None:
        if self._mirror is None:
            return None
        local = self._manifest_copy().newest_episode() if self._manifest is not None else -1
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

    # -- the writer thread --
    def _accept(self, checkpoint: dict[str, Any], path: str) -> None:
        """From Lightning (rank 0, training thread): serialize the state asked for by :meth:`save`."""
        request = self._request
        if request is None or os.path.abspath(path) != self._path(request.name):
            _refuse_foreign_save(path, self.checkpoint_dir)
            data = serialized(checkpoint)
            atomic_write(self._local, os.path.abspath(path), lambda handle: handle.write(data))
            return
        self._queue(request, checkpoint)

    def write_checkpoint(
        self, checkpoint: dict[str, Any], kind: str, episode: int, metric: float | None = None
    ) -> None:
        """Queue a Lightning checkpoint dict as ``last.ckpt`` or ``best-eNNNNNN.ckpt``, without a Trainer (rank 0).

        What :meth:`save` does once Lightning has gathered the state; for tools and tests that have the dict.
        """
        name = LAST if kind == "last" else best_name(episode)
        if name != LAST:
            with self._lock:
                self._queued_best[name] = metric if metric is not None else math.inf
        self._queue(_SaveRequest(name, episode, metric, hold=False), checkpoint)

    def _queue(self, request: _SaveRequest, checkpoint: dict[str, Any]) -> None:
        checkpoint[META_KEY] = {"episode": request.episode, "metric": request.metric, "monitor": self.monitor}
        data = serialized(checkpoint)
        if request.hold:
            self._held = (request, data)
        else:
            self._submit_state(request, data)

    def _submit_state(self, request: _SaveRequest, data: memoryview) -> None:
        """Queue a serialized state's write, once the previous one is written: a disk slower than training then
        slows training, instead of letting unwritten states pile up in memory (and in what a kill would lose)."""
        if self._state_write is not None:
            self._state_write.result()
        self._state_write = self._submit(self._write, request, data)
        if request.name == LAST:
            self._last_queued = request.episode

    def _submit(self, fn: Callable[..., None], *args: Any) -> Future | None:
        """Run ``fn`` in the writer thread, after what is queued (at once, on this thread, without async_write)."""
        self._raise_pending_error()
        if not self.async_write:
            fn(*args)
            self._raise_pending_error()
            return None
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="atheria-store")
        future = self._executor.submit(fn, *args)
        with self._lock:
            self._futures = [queued for queued in self._futures if not queued.done()]
            self._futures.append(future)
        return future

    def _write(self, request: _SaveRequest, data: memoryview) -> None:
        self._guarded(self._write_file, request.name, lambda handle: handle.write(data), request.episode,
                      request.metric)  # fmt: skip

    def _copy(self, source: str, target: str, episode: int, metric: float) -> None:
        entry = self._manifest_copy().files.get(source)
        if entry is None or entry.episode != episode:
            self._fail(FileNotFoundError(f"cannot keep {target}: {source} of episode {episode} is not listed"))
            return

        def produce(handle: IO[bytes]) -> None:
            with open(self._path(source), "rb") as original:
                if not copy_measured(original, handle).matches(entry.size, entry.sha256):
                    raise OSError(f"{self._path(source)} no longer matches MANIFEST.json: not copied to {target}")

        self._guarded(self._write_file, target, produce, episode, metric)

    def _guarded(self, fn: Callable[..., None], *args: Any) -> None:
        if self._error is not None:
            return  # an earlier write failed: keep everything as it is until the error surfaces
        try:
            fn(*args)
        except BaseException as err:  # surfaced on the training thread at the next save, flush or teardown
            self._fail(err)

    def _fail(self, err: BaseException) -> None:
        log.error("checkpoint write failed, earlier checkpoints are kept: %s", err)
        self._error = err

    def _write_file(self, name: str, produce: Callable[[IO[bytes]], None], episode: int, metric: float | None) -> None:
        """Write ``name`` atomically: journalled as pending before its rename, listed after it, then retention."""
        self.open()
        started = time.monotonic()
        measured: dict[str, Any] = {}

        def write(handle: IO[bytes]) -> None:
            measured["file"] = MeasuredWriter(handle)
            produce(measured["file"])  # type: ignore[arg-type]

        def journal(tmp: str) -> None:
            written = measured["file"]
            if os.path.getsize(tmp) != written.size:
                raise OSError(f"{tmp} holds {os.path.getsize(tmp)} bytes after {written.size} were written")
            measured["entry"] = Entry(episode, written.size, written.hexdigest(), metric, kind_of(name), time.time())
            self._journal(name, measured["entry"])

        atomic_write(self._local, self._path(name), write, before_replace=journal)
        # A best file goes to the mirror's queue after the removal it causes: a sync never sees top_k + 1 of them
        # and takes the one pushed out for a surplus to set aside.
        self._list(name, measured["entry"], send=name == LAST)
        self.max_write_seconds = max(self.max_write_seconds, time.monotonic() - started)
        if name != LAST:
            self._retain()
            if self._mirror is not None and name in self._entries():  # unless retention took it at once
                self._mirror.enqueue(name, measured["entry"])

    def _journal(self, name: str, entry: Entry) -> None:
        with self._lock:
            self._manifest.pending[name] = entry  # type: ignore[union-attr]
        self._write_manifest()

    def _list(self, name: str, entry: Entry, send: bool = True) -> None:
        with self._lock:
            self._manifest.files[name] = entry  # type: ignore[union-attr]
            self._manifest.pending.pop(name, None)  # type: ignore[union-attr]
            self._queued_best.pop(name, None)
        self._write_manifest()
        if send and self._mirror is not None:
            self._mirror.enqueue(name, entry)

    def _retain(self) -> None:
        """Remove the best files beyond ``top_k`` (listed ones only: they are unlisted first, then deleted)."""
        for name in retention.beyond_top_k(self._manifest_copy().files, self.top_k):
            self._remove(name)

    def _set_aside_beyond_top_k(self) -> None:
        """At the start, best files beyond ``top_k`` are there because ``top_k`` is lower than an earlier session's
        (or a copied folder held more): moved to ``checkpoints/beyond_top_k/``, never deleted, and said. The mirror
        does the same with its own at its first sync."""
        surplus = retention.beyond_top_k(self._manifest_copy().files, self.top_k)
        if not surplus:
            return
        LocalSide(self.checkpoint_dir).make_aside_folder(BEYOND_TOP_K)  # before the manifest changes
        with self._lock:
            for name in surplus:
                self._manifest.files.pop(name, None)  # type: ignore[union-attr]
        self._write_manifest()  # unlisted first: a kill before the move leaves files the next start adopts
        for name in surplus:
            LocalSide(self.checkpoint_dir).set_aside(name, BEYOND_TOP_K)
        also = " (the mirror's too, at its first sync)" if self._mirror is not None else ""
        print(f"top_k={self.top_k}: {len(surplus)} best checkpoint(s) beyond it moved to "
              f"{os.path.join(self.checkpoint_dir, BEYOND_TOP_K)}/{also}, not deleted: {', '.join(sorted(surplus))}",
              flush=True)  # fmt: skip

    def _remove(self, name: str) -> None:
        # Unlist first, then delete: a crash in between leaves an unlisted file, which the next start adopts.
        with self._lock:
            removed = self._manifest.files.pop(name, None) is not None  # type: ignore[union-attr]
        if not removed:
            return
        self._write_manifest()
        try:
            os.remove(self._path(name))
        except FileNotFoundError:
            pass
        if self._mirror is not None:
            self._mirror.enqueue(name, None)

    def _unlist_and_quarantine(self, name: str) -> None:
        with self._lock:
            self._manifest.files.pop(name, None)  # type: ignore[union-attr]
        self._write_manifest()
        LocalSide(self.checkpoint_dir).quarantine(name)

    def _write_manifest(self) -> None:
        write_manifest(LocalSide(self.checkpoint_dir), self._manifest_copy())

    # -- small helpers --
    def _matches(self, name: str, entry: Entry) -> bool:
        return verify(self._local, self._path(name), entry.size, entry.sha256)

    def _path(self, name: str) -> str:
        if name != MANIFEST_NAME and not is_checkpoint_name(name):
            raise ValueError(f"{name!r} is not a checkpoint name of the run store")
        return os.path.join(self.checkpoint_dir, name)

    def _manifest_copy(self) -> Manifest:
        with self._lock:
            manifest = self._manifest or Manifest()
            return Manifest(dict(manifest.files), dict(manifest.pending), manifest.updated)

    def _entries(self) -> dict[str, Entry]:
        return dict(self._manifest_copy().files)

    def _bounded(self, timeout_s: float | None) -> float | None:
        if self._flush_deadline is None:
            return timeout_s
        left = max(0.0, self._flush_deadline - time.monotonic())
        return left if timeout_s is None else min(timeout_s, left)

    def _raise_pending_error(self) -> None:
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    def _stop_executor(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None


def _refuse_foreign_save(path: str, checkpoint_dir: str) -> None:
    if os.path.dirname(os.path.abspath(path)) == checkpoint_dir:
        raise ValueError(f"{path}: the run's checkpoints/ folder is written by its RunStore only; save elsewhere")


def _on_cpu(tensor: torch.Tensor) -> torch.Tensor:
    # The file holds CPU tensors, so that any machine can load it without a map_location; a CPU tensor is not copied.
    return tensor.detach().cpu()


def serialized(checkpoint: dict[str, Any]) -> memoryview:
    """``checkpoint`` as the bytes ``torch.save`` writes, with every tensor on the CPU.

    The bytes are the point-in-time copy of the state: training may change the tensors as soon as this returns.
    Pickling holds Python's interpreter lock, so it is done here, on the caller's thread, and the writer thread
    only writes, hashes and fsyncs, which release it (HISTORY.md, "plot process, checkpoint serialization").
    """
    buffer = BytesIO()
    torch.save(apply_to_collection(checkpoint, torch.Tensor, _on_cpu), buffer)
    return buffer.getbuffer()


class StoreCheckpointIO(CheckpointIO):
    """Lightning's checkpoint plugin of a :class:`RunStore`: saves go to the store, loads are ``weights_only``.

    ``AtheriaCLI`` passes it to the Trainer (``plugins``); it is what ``trainer.save_checkpoint`` reaches.
    """

    def __init__(self, store: RunStore) -> None:
        self.store = store

    @override
    def save_checkpoint(self, checkpoint: dict[str, Any], path: _PATH, storage_options: Any | None = None) -> None:
        self.store._accept(checkpoint, os.fspath(path))

    @override
    def load_checkpoint(self, path: _PATH, map_location: Any | None = None, weights_only: bool | None = None) -> dict:
        # Always weights_only: a checkpoint can come from a shared Drive or bucket.
        if not os.path.exists(path):
            raise FileNotFoundError(f"Checkpoint file not found: {path}")
        return pl_load(path, map_location=map_location, weights_only=True)

    @override
    def remove_checkpoint(self, path: _PATH) -> None:
        raise ValueError(f"{path}: checkpoints are removed by the run store's retention only")

    @override
    def teardown(self) -> None:
        self.store.raise_write_error()
