"""MirrorSync: copies the run folder to a persistent mirror (Drive, Kaggle output, S3, GCS) from a background thread."""

from __future__ import annotations

import errno
import logging
import os
import posixpath
import random
import threading
import time
from collections.abc import Callable
from concurrent import futures
from typing import IO, Any

import fsspec
import lightning.pytorch as pl
from fsspec import AbstractFileSystem
from fsspec.core import url_to_fs
from fsspec.implementations.local import LocalFileSystem
from fsspec.registry import known_implementations
from fsspec.utils import get_protocol
from lightning.pytorch.callbacks import Callback
from typing_extensions import override

from atheria_lightning.errors import ConfigError, require
from atheria_lightning.manifest import (
    MANIFEST_NAME,
    TMP_MARKER,
    Manifest,
    ManifestEntry,
    atomic_write,
    copy_measured,
    join,
    read_manifest,
    verify,
    write_manifest,
)
from atheria_lightning.scalars import send_to_loggers

__all__ = ["MirrorSync", "check_mirror_url", "remote_run_dir"]

log = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"
#: Folders copied file by file when their size or mtime changed; checkpoints go through the manifest instead.
PLAIN_FOLDERS = ("logs", "exports")
#: A slow mirror stretches the interval up to this many times ``every_n_episodes``, so a checkpoint still leaves
#: the machine every few hundred episodes however slow the link is.
MAX_INTERVAL_FACTOR = 16
#: After a bounded flush the worker is idle or stuck in a hung upload; waiting longer for it would not help.
JOIN_TIMEOUT_S = 5.0
#: Protocols named in the error for an unknown one: the ones this app is used with.
COMMON_PROTOCOLS = ("a plain folder", "file://", "memory://", "s3://", "gs://", "gcs://", "sftp://")
#: Optional dependency groups of atheria_lightning that provide a protocol's filesystem.
EXTRAS = {"s3": "s3", "s3a": "s3", "gs": "gcs", "gcs": "gcs"}
#: Marks "no entry" apart from ``None`` ("content unknown") in ``MirrorSync._uploaded``.
_UNKNOWN = object()


class _LocalFileChanged(Exception):
    """The local file no longer matches its manifest entry (replaced or deleted since the manifest was read)."""


def check_mirror_url(url: str) -> None:
    """Raise :class:`ConfigError` unless every protocol of ``url`` is known to fsspec (or registered) and importable.

    Nothing is contacted: this only checks that the URL could be opened, so it is cheap enough for ``__init__``.
    """
    require(isinstance(url, str) and bool(url.strip()), f"mirror_url={url!r} must be a folder path or an fsspec URL")
    for part in url.split("::"):  # chained URLs such as simplecache::s3://bucket/x
        protocol = get_protocol(part)
        require(
            protocol in fsspec.registry or protocol in known_implementations,
            f"mirror_url={url!r} has an unknown protocol {protocol!r}; use one of {', '.join(COMMON_PROTOCOLS)}",
        )
        try:
            fsspec.get_filesystem_class(protocol)
        except ImportError as err:
            extra = EXTRAS.get(protocol)
            hint = f'pip install "atheria_lightning[{extra}]"' if extra else f"install the package it needs ({err})"
            raise ConfigError(f"mirror_url={url!r} needs an optional package for {protocol}://: {hint}") from err


def remote_run_dir(
    url: str, experiment_name: str, storage_options: dict[str, Any] | None = None
) -> tuple[AbstractFileSystem, str]:
    """The filesystem and path of the mirror's copy of run ``experiment_name``: ``<url>/<experiment_name>``.

    Raises:
        ConfigError: When the URL's protocol is unknown or its package is missing, or the filesystem cannot be built
            from ``storage_options``. Nothing is read or written.
    """
    check_mirror_url(url)
    if get_protocol(url) == "file" and "://" not in url:
        url = os.path.expanduser(url)  # fsspec leaves "~" alone; a shell would have expanded it
    try:
        fs, root = url_to_fs(url, **(storage_options or {}))
    except Exception as err:  # each backend raises its own types for bad options or credentials
        # Only the option names: their values are often credentials.
        options = sorted(storage_options or {})
        raise ConfigError(f"mirror_url={url!r} cannot be opened with storage_options keys {options}: {err}") from err
    return fs, join(root, experiment_name)


class MirrorSync(Callback):
    """Keeps a persistent copy of the run folder (checkpoints, logs, exports) on a mirror that outlives the session.

    The local run folder is fast but dies with the Colab or Kaggle machine; the mirror is the second level. Every
    ``interval`` episodes rank 0 asks one background thread for a sync, so training never waits on the network.
    A sync uploads the checkpoints listed in the local ``checkpoints/MANIFEST.json`` that the mirror lacks, each
    streamed to a temporary name, moved into place and verified by size and sha256; then it writes the mirror's
    manifest (last, listing only verified files) and only then deletes the mirror's checkpoints that the new manifest
    no longer lists. ``logs/`` and ``exports/`` are copied file by file when their size or mtime changed.

    A file whose content no longer matches the local manifest (retention replaced or deleted it meanwhile) is not
    uploaded; the mirror keeps its older verified copy under that name, if any, until the next sync. A failed sync is
    retried with exponential backoff and jitter; when retries run out it counts as a failure, is logged once and
    training goes on: the mirror never raises into training and never touches local files.

    When a sync takes more than ``max_share`` of the wall time between two sync requests, the interval doubles (up to
    16 times ``every_n_episodes``); under a quarter of that share it halves back towards ``every_n_episodes``.

    Args:
        url: The mirror root: a folder (a mounted Google Drive folder, ``/kaggle/working``) or an fsspec URL
            (``s3://bucket/runs`` with s3fs, ``gs://bucket/runs`` with gcsfs). The run goes to
            ``<url>/<basename(run_dir)>``, laid out as the local run folder. ``None`` lets a preset list the callback
            without a URL; the CLI then sets the run's ``mirror_url`` with :meth:`set_url` before ``setup``.
        every_n_episodes: Episodes between sync requests, before any adaptation.
        storage_options: Passed to the fsspec filesystem (credentials, endpoint, ...).
        flush_timeout_s: Longest wait of :meth:`flush` (end of training, emergency stop, exception).
        max_retries: Retries of a failed sync before it counts as a failure.
        backoff_s: First retry delay; it doubles at each retry and is scaled by a random factor in [0.5, 1.5).
        max_share: Share of the wall time a sync may take before the interval doubles, in (0, 1).
        run_dir: The local run folder; ``trainer.default_root_dir`` when ``None``.
        clock: Monotonic clock in seconds, injectable so tests control the interval adaptation.
        sleep: Sleep between retries, injectable so tests never wait.

    Raises:
        ConfigError: In ``__init__`` for an out-of-range setting, an unknown protocol or a missing optional package
            (s3fs, gcsfs); in ``setup`` when no URL was set or the mirror cannot be written (before training starts).

    Logged on rank 0 after each sync ends (at the episode where training notices it), straight to the loggers:

    ============================  =========================================================================
    Key                           Meaning
    ============================  =========================================================================
    ``mirror/last_sync_seconds``  Duration of the last completed sync, retries included (once one ran)
    ``mirror/failures``           Syncs that failed after all their retries, since the run started
    ============================  =========================================================================

    Example::

        mirror = MirrorSync("/content/drive/MyDrive/atheria", every_n_episodes=50)
        trainer = Trainer(default_root_dir="runs/demo", callbacks=[mirror])
        # a time guard about to stop the run: mirror.flush(timeout_s=60)
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
        run_dir: str | None = None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Any] = time.sleep,
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
        self.run_dir = run_dir
        self._run_dir_arg = run_dir
        self._clock = clock
        self._sleep = sleep
        self.interval = every_n_episodes
        self.failures = 0
        self.last_sync_seconds: float | None = None
        self._syncs_ended = 0  # counted by the worker; the training thread logs when it moves
        self._syncs_logged = 0
        self.remote_path: str | None = None
        self._fs: AbstractFileSystem | None = None
        self._local_fs: AbstractFileSystem | None = None
        self._local_root = ""
        # What this process knows the mirror holds beyond its manifest: name -> entry, or None while a file is
        # being replaced (its content is then unknown until verified).
        self._uploaded: dict[str, ManifestEntry | None] = {}
        self._plain_stamps: dict[str, tuple[int, float | None]] = {}
        self._made_dirs: set[str] = set()
        self._episodes_since_request = 0
        self._sync_due = False
        # The trainer's strategy: a sync first waits for the checkpoint writes its IO has queued.
        self._strategy: Any = None
        self._loggers: list[Any] = []
        self._last_request_at: float | None = None
        # Worker hand-off: a pending flag, the gap before the pending periodic request, and counters of syncs that
        # started and finished, so flush can wait for one that started after it was called.
        self._cond = threading.Condition()
        self._sync_lock = threading.Lock()
        self._pending = False
        self._pending_gap: float | None = None
        self._started = 0
        self._finished = 0
        self._last_ok = True
        self._worker: threading.Thread | None = None
        self._stop: threading.Event | None = None

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        require(self.url is not None, "MirrorSync has no url: set mirror_url, or MirrorSync's url in the config")
        self.run_dir = self._run_dir_arg or trainer.default_root_dir
        problem = None
        if trainer.is_global_zero:
            try:
                self.connect()
            except ConfigError as err:
                problem = str(err)
        # Decided on rank 0 and shared, so every rank stops together on an unreachable mirror.
        problem = trainer.strategy.broadcast(problem, src=0)
        if problem:
            raise ConfigError(problem)
        if trainer.is_global_zero:
            self._strategy = trainer.strategy
            self._loggers = list(trainer.loggers)
            self._start_worker()

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if not trainer.is_global_zero or self._fs is None:
            return
        self._episodes_since_request += 1
        if self._episodes_since_request >= self.interval:
            # Not now: Lightning runs SmartCheckpoint after this callback, so this episode's checkpoint (and the
            # validation's) is queued only later. The request goes out at the next episode's start.
            self._episodes_since_request = 0
            self._sync_due = True
        if self._syncs_ended != self._syncs_logged:
            self._syncs_logged = self._syncs_ended
            metrics = {"mirror/failures": float(self.failures)}
            if self.last_sync_seconds is not None:
                metrics["mirror/last_sync_seconds"] = self.last_sync_seconds
            send_to_loggers(trainer, metrics)

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self._sync_due and trainer.is_global_zero and self._fs is not None:
            self._sync_due = False
            self._request(periodic=True)

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.is_global_zero:
            self.flush()

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self.close()

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self.close()

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"interval": self.interval, "failures": self.failures}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # Clamped: every_n_episodes may differ in the resumed session.
        interval = int(state_dict.get("interval", self.every_n_episodes))
        self.interval = min(max(interval, self.every_n_episodes), MAX_INTERVAL_FACTOR * self.every_n_episodes)
        self.failures = int(state_dict.get("failures", 0))

    def set_url(self, url: str) -> None:
        """Set the mirror root after construction (the CLI passes ``mirror_url``); checked as in ``__init__``."""
        check_mirror_url(url)
        self.url = url

    def connect(self) -> None:
        """Open the mirror's run folder and prove it writable, or raise :class:`ConfigError` (called by ``setup``)."""
        require(self.url is not None, "MirrorSync has no url: set mirror_url, or MirrorSync's url in the config")
        require(self.run_dir is not None, "MirrorSync needs run_dir, or trainer.default_root_dir through setup")
        run_dir = os.fspath(self.run_dir)
        self._local_fs, self._local_root = url_to_fs(run_dir)
        fs, remote = remote_run_dir(self.url, os.path.basename(run_dir.rstrip("/\\")), self.storage_options)
        try:
            self._retrying(lambda: self._probe(fs, remote))
        except Exception as err:
            raise ConfigError(f"mirror_url={self.url!r} is not reachable: cannot write {remote} ({err})") from err
        self._fs, self.remote_path = fs, remote
        self._uploaded, self._plain_stamps, self._made_dirs = {}, {}, set()
        self._episodes_since_request, self._last_request_at = 0, None  # a gap must not span two fits

    def sync_once(self) -> bool:
        """Run one sync in the calling thread, with its retries; ``True`` when it completed, ``False`` when it failed.

        Raises:
            ConfigError: Only when ``setup`` has not connected and connecting fails (or ``run_dir`` is unknown).
        """
        if self._fs is None:
            self.connect()
        return self._run_sync(gap_s=None)

    def flush(self, timeout_s: float | None = None) -> bool:
        """Request a sync and wait, at most ``timeout_s`` (default ``flush_timeout_s``), for one that started after
        this call to finish.

        Returns:
            ``True`` when such a sync completed, or when this process mirrors nothing (not rank 0, not set up);
            ``False`` on failure or timeout (the sync then goes on in the background).
        """
        if self._fs is None:
            return True
        owns_worker = self._worker is None
        if owns_worker:
            self._start_worker()
        try:
            return self._request_and_wait(self.flush_timeout_s if timeout_s is None else timeout_s)
        finally:
            if owns_worker:
                self._stop_worker(join_timeout_s=0.0)

    def close(self, timeout_s: float | None = None) -> None:
        """Bounded :meth:`flush`, then stop the worker. Idempotent; the next ``setup`` starts a new worker."""
        if self._worker is None:
            return
        if not self.flush(timeout_s):
            log.warning("mirror %s: the final sync did not complete; the mirror may lack the newest files",
                        self.remote_path)  # fmt: skip
        self._stop_worker(join_timeout_s=JOIN_TIMEOUT_S)

    # -- worker -------------------------------------------------------------------------------------------------

    def _start_worker(self) -> None:
        if self._worker is not None:
            return
        self._stop = threading.Event()
        self._worker = threading.Thread(target=self._work, args=(self._stop,), name="atheria-mirror", daemon=True)
        self._worker.start()

    def _stop_worker(self, join_timeout_s: float) -> None:
        worker, stop = self._worker, self._stop
        self._worker = self._stop = None
        if worker is None or stop is None:
            return
        with self._cond:
            stop.set()
            self._cond.notify_all()
        if join_timeout_s > 0:
            worker.join(join_timeout_s)

    def _work(self, stop: threading.Event) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._pending or stop.is_set())
                if stop.is_set():
                    return
                self._pending = False
                gap_s, self._pending_gap = self._pending_gap, None
                self._started += 1
            try:
                ok = self._run_sync(gap_s)
            except Exception:  # a bug here must not kill the thread and leave flush waiting on nothing
                log.exception("mirror: unexpected error in the sync thread")
                ok = False
            with self._cond:
                self._finished += 1
                self._last_ok = ok
                self._cond.notify_all()

    def _request(self, periodic: bool) -> None:
        # Loggers that buffer their events (BufferedTensorBoardLogger) write them out first, so the sync copies them.
        for logger in self._loggers:
            flush = getattr(logger, "flush", None)
            if callable(flush):
                flush()
        now = self._clock()
        with self._cond:
            if periodic:
                if self._last_request_at is not None:
                    self._pending_gap = now - self._last_request_at
                self._last_request_at = now
            self._pending = True
            self._cond.notify_all()

    def _request_and_wait(self, timeout_s: float) -> bool:
        with self._cond:
            target = self._started + 1
        self._request(periodic=False)
        with self._cond:
            done = self._cond.wait_for(lambda: self._finished >= target, timeout=timeout_s)
            return done and self._last_ok

    # -- one sync -----------------------------------------------------------------------------------------------

    def _await_checkpoint_writes(self) -> None:
        """Let the checkpoint writes already queued finish first, so the sync sees their manifest (bounded)."""
        # Read at sync time: SmartCheckpoint installs its IO in its own setup, after this callback's.
        pending = getattr(getattr(self._strategy, "checkpoint_io", None), "pending_writes", None)
        if callable(pending):
            futures.wait(pending(), timeout=self.flush_timeout_s)

    def _run_sync(self, gap_s: float | None) -> bool:
        self._await_checkpoint_writes()
        with self._sync_lock:
            started = self._clock()
            try:
                self._retrying(self._sync_attempt)
            except Exception as err:  # whatever the backend raises, training must go on
                self.failures += 1
                self._syncs_ended += 1
                log.warning("mirror sync to %s failed after %d retries (%d failures so far): %s",
                            self.remote_path, self.max_retries, self.failures, err)  # fmt: skip
                return False
            self.last_sync_seconds = self._clock() - started
            self._syncs_ended += 1
            self._adapt_interval(self.last_sync_seconds, gap_s)
            return True

    def _retrying(self, attempt: Callable[[], Any]) -> Any:
        for retry in range(self.max_retries + 1):
            try:
                return attempt()
            except Exception as err:
                if retry == self.max_retries:
                    raise
                # Jitter, so that runs sharing a bucket or a Drive account do not retry in step.
                delay = self.backoff_s * 2**retry * random.uniform(0.5, 1.5)
                log.debug("mirror attempt %d failed (%s), retrying in %.1f s", retry + 1, err, delay)
                self._sleep(delay)
        return None

    def _adapt_interval(self, duration_s: float, gap_s: float | None) -> None:
        if not gap_s or gap_s <= 0:
            return
        if duration_s > self.max_share * gap_s:
            self.interval = min(2 * self.interval, MAX_INTERVAL_FACTOR * self.every_n_episodes)
        elif duration_s < self.max_share / 4 * gap_s:
            self.interval = max(self.interval // 2, self.every_n_episodes)

    def _sync_attempt(self) -> None:
        self._sync_checkpoints()
        for folder in PLAIN_FOLDERS:
            self._sync_plain_folder(folder)

    def _sync_checkpoints(self) -> None:
        local_dir, remote_dir = self._local(CHECKPOINTS), self._remote(CHECKPOINTS)
        snapshot = read_manifest(self._local_fs, local_dir)
        # Nothing listed yet (first episodes, a fresh machine) or an unreadable manifest: an empty set must never
        # replace the mirror's.
        if not snapshot.files:
            return
        remote = read_manifest(self._fs, remote_dir)
        remote_sizes = self._remote_sizes(remote_dir)
        known = {**remote.files, **self._uploaded}
        self._journal_replacements(remote_dir, remote, snapshot, known)
        kept = Manifest()
        for name, entry in snapshot.files.items():
            previous = known.get(name)
            if _same(previous, entry) and remote_sizes.get(name) == entry.size:
                kept.files[name] = entry
            elif self._upload_checkpoint(name, entry):
                kept.files[name] = entry
            elif previous is not None and remote_sizes.get(name) == previous.size:
                kept.files[name] = previous  # the older verified copy beats none until the new one is uploaded
        if not kept.files:
            return  # nothing verified this time: keep the mirror as it is rather than empty it
        if kept.files != remote.files:
            write_manifest(self._fs, remote_dir, kept)
        for name in remote_sizes.keys() - kept.files.keys() - {MANIFEST_NAME}:
            self._fs.rm(join(remote_dir, name))
            self._uploaded.pop(name, None)

    def _journal_replacements(
        self, remote_dir: str, remote: Manifest, snapshot: Manifest, known: dict[str, ManifestEntry | None]
    ) -> None:
        """Before a listed remote file (last.ckpt) is overwritten, record its new entry as pending, so a mirror
        killed between the move and the manifest still holds a file that verifies against one of the two."""
        replacing = {name: entry for name, entry in snapshot.files.items()
                     if name in remote.files and not _same(known.get(name), entry)}  # fmt: skip
        if replacing and replacing != remote.pending:  # a retry finds its journal already written
            write_manifest(self._fs, remote_dir, Manifest(files=dict(remote.files), pending=replacing))

    def _upload_checkpoint(self, name: str, entry: ManifestEntry) -> bool:
        """Upload and verify one listed checkpoint; ``False`` when the local file no longer matches its entry."""
        if "/" in name or "\\" in name or name in (".", ".."):
            log.warning("mirror: ignoring manifest entry %r, not a plain file name", name)
            return False
        target = self._remote(CHECKPOINTS, name)
        before = self._uploaded.pop(name, _UNKNOWN)
        self._uploaded[name] = None  # from the move into place until verified, the mirror's content is unknown
        try:
            self._upload(self._local(CHECKPOINTS, name), target, entry)
        except _LocalFileChanged as err:
            # Aborted before the move: the mirror's copy is what it was.
            if before is _UNKNOWN:
                self._uploaded.pop(name)
            else:
                self._uploaded[name] = before
            log.debug("mirror: %s changed locally since the manifest was read, retried next sync (%s)", name, err)
            return False
        if not verify(self._fs, target, entry):
            raise OSError(errno.EIO, f"{target}: size or sha256 differs from the manifest after upload")
        self._uploaded[name] = entry
        return True

    def _sync_plain_folder(self, folder: str) -> None:
        local_dir = self._local(folder)
        try:
            infos = self._local_fs.find(local_dir, detail=True)
        except FileNotFoundError:
            return
        for path, info in sorted(infos.items()):
            relative = posixpath.relpath(path, local_dir)
            if info.get("type") != "file" or TMP_MARKER in posixpath.basename(path):
                continue
            key = f"{folder}/{relative}"
            stamp = (int(info["size"]), info.get("mtime"))  # taken before reading: a later append is copied next time
            if self._plain_stamps.get(key) == stamp:
                continue
            try:
                self._upload(path, self._remote(folder, relative), expected=None)
            except _LocalFileChanged:
                continue  # removed locally meanwhile
            self._plain_stamps[key] = stamp

    def _upload(self, local_path: str, remote_path: str, expected: ManifestEntry | None) -> None:
        """Stream ``local_path`` to ``remote_path`` atomically; with ``expected``, abort unless the bytes match it."""
        # Opened before the remote is touched, so that a local file gone missing is told apart from remote errors.
        try:
            source = self._local_fs.open(local_path, "rb")
        except FileNotFoundError as err:
            raise _LocalFileChanged(f"{local_path} was removed") from err
        with source:
            self._ensure_remote_parent(remote_path)
            atomic_write(self._fs, remote_path, lambda target: _copy_checked(source, target, expected))

    def _ensure_remote_parent(self, remote_path: str) -> None:
        # Local folders get theirs from atomic_write; object stores have none; others (sftp, webdav) need them.
        parent = posixpath.dirname(remote_path)
        if isinstance(self._fs, LocalFileSystem) or parent in self._made_dirs:
            return
        self._fs.makedirs(parent, exist_ok=True)
        self._made_dirs.add(parent)

    def _remote_sizes(self, remote_dir: str) -> dict[str, int]:
        self._fs.invalidate_cache(remote_dir)  # s3fs and gcsfs cache listings
        try:
            infos = self._fs.ls(remote_dir, detail=True)
        except FileNotFoundError:
            return {}
        return {posixpath.basename(info["name"].rstrip("/")): int(info.get("size") or 0)
                for info in infos if info.get("type") == "file"}  # fmt: skip

    def _probe(self, fs: AbstractFileSystem, remote: str) -> None:
        fs.makedirs(remote, exist_ok=True)
        probe = join(remote, f".mirror-probe{TMP_MARKER}{os.getpid()}")
        fs.pipe_file(probe, b"ok")
        fs.rm(probe)

    def _local(self, *parts: str) -> str:
        return "/".join([self._local_root.rstrip("/"), *parts])

    def _remote(self, *parts: str) -> str:
        assert self.remote_path is not None
        return "/".join([self.remote_path.rstrip("/"), *parts])


def _copy_checked(source: IO[bytes], target: IO[bytes], expected: ManifestEntry | None) -> None:
    copied = copy_measured(source, target)
    if expected is not None and not copied.matches(expected):
        digest = copied.hexdigest()[:12]
        raise _LocalFileChanged(f"read {copied.size} bytes with sha256 {digest}..., manifest says otherwise")


def _same(entry: ManifestEntry | None, other: ManifestEntry) -> bool:
    return entry is not None and entry.sha256 == other.sha256 and entry.size == other.size


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
