"""The run's copy on a mirror (a Drive folder, a bucket): where it is, this session's lease on it, the thread that
sends the queue (:mod:`~atheria_lightning.store.uploader`), and what a start downloads from it."""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import fsspec
from fsspec import AbstractFileSystem
from fsspec.core import url_to_fs
from fsspec.registry import known_implementations
from fsspec.utils import get_protocol

from atheria_lightning.errors import ConfigError, require
from atheria_lightning.files import TMP_MARKER, join
from atheria_lightning.store.copies import copy_plain_files, download_verified
from atheria_lightning.store.lease import HEARTBEAT_S, Holder, Lease, Superseded
from atheria_lightning.store.manifest import (
    CHECKPOINTS,
    QUARANTINE,
    DamagedManifest,
    Entry,
    Manifest,
    Side,
    read_as_is,
)
from atheria_lightning.store.retry import Retry
from atheria_lightning.store.uploader import Uploader

log = logging.getLogger(__name__)

#: Protocols named in the error for an unknown one: the ones this app is used with.
COMMON_PROTOCOLS = ("a plain folder", "file://", "memory://", "s3://", "gs://", "gcs://", "sftp://")
#: Optional dependency groups of atheria_lightning that provide a protocol's filesystem.
EXTRAS = {"s3": "s3", "s3a": "s3", "gs": "gcs", "gcs": "gcs"}
#: After a bounded flush the mirror worker is idle or stuck in a hung upload; waiting longer would not help.
JOIN_TIMEOUT_S = 5.0


@dataclass(frozen=True)
class MirrorStatus:
    """Where the mirror stands against the local folder."""

    remote: str
    local_episode: int
    mirror_episode: int
    behind: bool
    failures: int
    #: The session that took the mirror over from this one, described; None while this session owns it.
    superseded_by: str | None = None

    def line(self) -> str:
        if self.superseded_by is not None:
            return (f"mirror taken over by another session ({self.superseded_by}): this session stopped uploading "
                    f"with the mirror at episode {max(self.mirror_episode, 0)}; its own checkpoints up to episode "
                    f"{self.local_episode} stay in the local run folder; the run goes on in that session")  # fmt: skip
        if self.behind:
            return (f"mirror behind: episode {max(self.mirror_episode, 0)} of {self.local_episode} "
                    f"({self.remote}) — run the same command again to retry")  # fmt: skip
        return f"mirror: up to date at episode {self.local_episode} ({self.remote})"


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


class MirrorChanged(FileNotFoundError):
    """A file the mirror's manifest listed when it was read is gone or replaced: read the manifest again."""


class Mirror:
    """The run's copy on a mirror: this session's lease, the worker thread that sends the :class:`Uploader`'s queue,
    and the downloads of a start.

    Args:
        run_dir: The local run folder (its ``checkpoints/``, ``logs/`` and ``exports/`` are sent).
        wait_for_writes: Waits (bounded) for the local writes already queued, so that their entries are queued here.
        top_k: How many best checkpoints the mirror keeps (asked at each sync: the run's setting may come later).
        url: ``mirror_url``, for messages; ``fs`` and ``root`` are its filesystem and the run's folder there.
        retry: The one retry policy of every mirror operation.
    """

    def __init__(
        self,
        run_dir: str,
        wait_for_writes: Callable[[float], bool],
        top_k: Callable[[], int],
        url: str,
        fs: AbstractFileSystem,
        root: str,
        flush_timeout_s: float,
        retry: Retry,
        clock: Callable[[], float],
    ) -> None:
        self.run_dir, self.wait_for_writes, self.top_k = run_dir, wait_for_writes, top_k
        self.url, self.fs, self.root = url, fs, root.rstrip("/")
        self.flush_timeout_s, self.retry, self.clock = flush_timeout_s, retry, clock
        self.side = Side(fs, join(self.root, CHECKPOINTS), "mirror")
        self.lease = Lease(fs, self.root, url)
        #: Set once a later session has taken the mirror over; nothing is uploaded after that.
        self.superseded: Superseded | None = None
        self.uploader = Uploader(run_dir, self.side, self.root, self.lease, top_k, retry, self._supersede)
        self.failures = 0
        self.syncs_ended = 0
        self.last_sync_seconds = 0.0
        self._connected = False
        self._sync_lock = threading.Lock()
        self._cond = threading.Condition()
        self._pending = False
        self._started = 0
        self._finished = 0
        self._last_ok = True
        self._worker: threading.Thread | None = None
        self._stop: threading.Event | None = None

    # -- start --
    def connect(self) -> None:
        """Prove the mirror writable, or raise :class:`ConfigError` (before any training)."""
        if self._connected:
            return
        try:
            self.retry(self._probe)
        except Exception as err:
            raise ConfigError(f"mirror_url={self.url!r} is not reachable: cannot write {self.root} ({err})") from err
        self._connected = True

    def acquire(self, take_over: bool) -> Holder | None:
        """Take the mirror's lease for this session (after :meth:`connect`, before the manifest is read); the
        session it was taken from, when that one had not released it. Raises ``MirrorInUse`` (a ``ConfigError``)
        while another live session holds it and ``take_over`` is False."""
        if self.lease.mine is not None:
            return None
        try:
            # Not there (a new mirror) or damaged: no retry changes that, and a new mirror must not wait for one.
            at_least = self.retry(lambda: read_as_is(self.side), give_up=(FileNotFoundError, DamagedManifest))
            at_least = at_least.generation
        except (OSError, DamagedManifest):  # none yet, or damaged: the lease files alone number the sessions
            at_least = 0
        try:
            return self.retry(lambda: self.lease.acquire(take_over, at_least), give_up=(ConfigError,))
        except ConfigError:
            raise
        except Exception as err:  # e.g. a file where the lease folder should be: nothing trains without the lease
            raise ConfigError(f"mirror_url={self.url!r}: the lease of this session cannot be written in "
                              f"{self.lease.folder} ({err}); move aside what is there, then run the same command "
                              "again") from err  # fmt: skip

    def superseded_by(self) -> str | None:
        """Who took the mirror over from this session, in words; None while it owns the mirror."""
        if self.superseded is None:
            return None
        successor = self.superseded.successor
        if successor is None:
            return f"lease generation {self.superseded.generation}"
        return f"{successor.describe(time.time())}, lease generation {successor.generation}"

    def _probe(self) -> None:
        self.fs.makedirs(self.root, exist_ok=True)
        probe = join(self.root, f".mirror-probe{TMP_MARKER}{os.getpid()}")
        self.fs.pipe_file(probe, b"ok")
        self.fs.rm(probe)

    @property
    def opened(self) -> bool:
        """Whether this session has read the mirror's manifest (at its start, or at its first sync)."""
        return self.uploader.opened

    def open(self) -> Manifest:
        """Read the mirror's manifest (rebuilt from its files when damaged; unlisted files adopted), once."""
        return self.uploader.open()

    def reconcile(self, local: dict[str, Entry]) -> None:
        """Queue every local checkpoint the mirror lacks (or holds older), then ask for a sync at once."""
        self.uploader.reconcile(local)
        self.request()

    def download(self, name: str, entry: Entry, local_path: str, journal: Callable[[str, Entry], None]) -> bool:
        """Copy a mirror checkpoint beside its local target, check size and sha256, then move it into place.

        Returns False when the bytes do not match the entry (the mirror's file is then moved to its ``corrupt/``
        and unlisted). Raises ``ConfigError`` when the mirror cannot be read (after the retries): training from an
        older local state would later replace the mirror's newer file.
        """
        try:
            matched = self.retry(lambda: self._download_once(name, entry, local_path, journal),
                                give_up=(FileNotFoundError,))  # fmt: skip
        except FileNotFoundError as err:
            # Listed when the manifest was read, gone now: the caller reads the manifest again.
            raise MirrorChanged(f"{name} vanished from the mirror while this start read it ({err})") from err
        except Exception as err:  # each backend raises its own types for a lost connection or a denied read
            raise ConfigError(
                f"mirror_url={self.url!r} holds {name} of episode {entry.episode}, which could not be downloaded "
                f"({err}); nothing was trained: run the same command again when the mirror is reachable, or set "
                "mirror_url to null to train from the local checkpoints"
            ) from err
        if not matched and self._listing_changed(name, entry):
            # The session this one took over from replaced the file after the manifest was read (its sync was past
            # its check): the file is newer, not corrupt. The caller reads the manifest again.
            raise MirrorChanged(f"{name} was replaced on the mirror while this start read it")
        if not matched:
            log.warning("mirror %s/%s does not match its MANIFEST.json entry (bytes or episode): not downloaded, "
                        "moved to the mirror's %s/", self.side.folder, name, QUARANTINE)  # fmt: skip
            try:  # unlisting it writes the mirror's manifest, which a session that took over now owns
                self.uploader.drop(name)
            except Superseded as superseded:
                self._supersede(superseded)
        return matched

    def _listing_changed(self, name: str, entry: Entry) -> bool:
        """Whether the mirror's manifest now lists (or journals) ``name`` otherwise than ``entry``."""
        try:
            fresh = read_as_is(self.side)
        except (OSError, DamagedManifest):
            return False
        return fresh.files.get(name) != entry or name in fresh.pending

    def reread(self) -> Manifest:
        """Read the mirror's manifest again (it changed since :meth:`open`: a file it listed is gone)."""
        self.uploader.forget()
        return self.open()

    def download_plain_folders(self) -> int:
        """Copy the mirror's ``logs/`` and ``exports/`` files that the local run folder lacks; their count.

        On a new machine this brings back the TensorBoard events of earlier sessions, so that one ``logs/`` holds the
        run's whole history (see :func:`copy_plain_files` for what is skipped). A failure costs the history, not the
        training: it is one warning.
        """
        copied = copy_plain_files(self.fs, self.root, self.run_dir, retrying=self.retry)
        for key, target in copied.items():
            self.uploader.stamp(key, os.stat(target))  # it is on the mirror: not sent back
        return len(copied)

    def _download_once(self, name: str, entry: Entry, local_path: str, journal: Callable[[str, Entry], None]) -> bool:
        return download_verified(self.side, name, entry, local_path, journal)

    # -- queue and worker --
    def enqueue(self, name: str, entry: Entry | None) -> None:
        self.uploader.enqueue(name, entry)

    def request(self) -> None:
        self._start_worker()
        with self._cond:
            self._pending = True
            self._cond.notify_all()

    def flush(self, timeout_s: float | None) -> bool:
        """Request a sync and wait (at most ``timeout_s``) for one that started after this call; True when it
        completed and nothing is left in the queue."""
        if not self._connected or self.lease.mine is None:
            return False  # never reached, or refused its lease: this session writes nothing on the mirror
        timeout_s = self.flush_timeout_s if timeout_s is None else timeout_s
        self._start_worker()
        with self._cond:
            target = self._started + 1
            self._pending = True
            self._cond.notify_all()
            done = self._cond.wait_for(lambda: self._finished >= target, timeout=timeout_s)
            return done and self._last_ok and not self.uploader.queued()

    def stop(self) -> None:
        """Stop the worker, then give the lease back (the session is over: the next one needs no take-over)."""
        worker, stop = self._worker, self._stop
        self._worker = self._stop = None
        if worker is not None and stop is not None:
            with self._cond:
                stop.set()
                self._cond.notify_all()
            worker.join(JOIN_TIMEOUT_S)
        if self.superseded is None and self._connected:
            try:
                with self._sync_lock:
                    self.lease.release()
            except Exception as err:  # an unreachable mirror: the lease goes stale by itself
                log.warning("mirror: the lease of this session was not released (%s); the next session takes it "
                            "over once its heartbeat is old", err)  # fmt: skip

    def status(self, local_episode: int) -> MirrorStatus:
        remote = self.uploader.newest_episode()
        behind = self.uploader.queued() or not self._last_ok or remote < local_episode
        return MirrorStatus(join(self.root, ""), local_episode, remote, behind, self.failures, self.superseded_by())

    def _start_worker(self) -> None:
        if self._worker is not None:
            return
        self._stop = threading.Event()
        self._worker = threading.Thread(target=self._work, args=(self._stop,), name="atheria-mirror", daemon=True)
        self._worker.start()

    def _work(self, stop: threading.Event) -> None:
        while True:
            with self._cond:
                # Between syncs the lease still needs its heartbeat, or another session would take it over.
                woken = self._cond.wait_for(lambda: self._pending or stop.is_set(), timeout=HEARTBEAT_S)
                if stop.is_set():
                    return
                if woken:
                    self._pending = False
                    self._started += 1
            if not woken:
                self._heartbeat()  # outside the condition: a request must never wait for the network
                continue
            try:
                ok = self._sync()
            except Exception:  # a bug here must not kill the thread and leave flush waiting on nothing
                log.exception("mirror: unexpected error in the sync thread")
                ok = False
            with self._cond:
                self._finished += 1
                self._last_ok = ok
                self._cond.notify_all()

    def _heartbeat(self) -> None:
        with self._sync_lock:
            if self.superseded is not None:
                return
            try:
                self.lease.heartbeat(force=True)
            except Superseded as superseded:
                self._supersede(superseded)
            except Exception as err:  # the next sync retries, and counts a failure if it must
                log.debug("mirror: lease heartbeat failed (%s)", err)

    def _supersede(self, superseded: Superseded) -> None:
        self.superseded = superseded
        log.warning("mirror %s was taken over by another session (%s): this session uploads nothing more",
                    self.root, self.superseded_by())  # fmt: skip

    # -- one sync --
    def _sync(self) -> bool:
        self.wait_for_writes(self.flush_timeout_s)  # the writes already queued first, so their entries are queued
        with self._sync_lock:
            if self.superseded is not None or self.lease.mine is None:
                return False  # superseded, or never given the lease (a refused start): nothing is written
            started = self.clock()
            try:
                self.connect()
                self.retry(self._sync_attempt, give_up=(Superseded,))
            except Superseded as superseded:
                self._supersede(superseded)
                return False
            except Exception as err:  # whatever the backend raises, training must go on
                self.failures += 1
                self.syncs_ended += 1
                log.warning("mirror sync to %s failed after %d retries (%d failures so far): %s",
                            self.root, self.retry.max_retries, self.failures, err)  # fmt: skip
                return False
            self.last_sync_seconds = self.clock() - started
            self.syncs_ended += 1
            return True

    def _sync_attempt(self) -> None:
        if not self.opened:
            self.open()
        self.uploader.sync()
