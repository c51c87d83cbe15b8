"""The run's copy on a mirror (a Drive folder, a bucket): its queue of uploads, the thread that sends them, and its
manifest as this process last wrote it."""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import posixpath
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import IO, Any

import fsspec
from fsspec import AbstractFileSystem
from fsspec.core import url_to_fs
from fsspec.implementations.local import LocalFileSystem
from fsspec.registry import known_implementations
from fsspec.utils import get_protocol

from atheria_lightning.errors import ConfigError, require
from atheria_lightning.files import TMP_MARKER, atomic_write, copy_measured, join, tmp_path_for, verify
from atheria_lightning.store import retention
from atheria_lightning.store.lease import HEARTBEAT_S, Holder, Lease, Superseded
from atheria_lightning.store.manifest import (
    BEYOND_TOP_K,
    CHECKPOINTS,
    QUARANTINE,
    DamagedManifest,
    Entry,
    Manifest,
    Side,
    adopt_unlisted,
    episode_in,
    read_as_is,
    read_or_rebuild,
    same,
    settle,
    write_manifest,
)

log = logging.getLogger(__name__)

#: Errors of a mirror's layout, not of its connection: a file where a folder should be (the lease's, a
#: checkpoint's), or the other way round. They stay until a person moves what is in the way.
IN_THE_WAY: tuple[type[OSError], ...] = (FileExistsError, NotADirectoryError, IsADirectoryError)

#: Folders copied to the mirror file by file when their size or mtime changed; checkpoints go through the queue.
PLAIN_FOLDERS = ("logs", "exports")
#: Protocols named in the error for an unknown one: the ones this app is used with.
COMMON_PROTOCOLS = ("a plain folder", "file://", "memory://", "s3://", "gs://", "gcs://", "sftp://")
#: Optional dependency groups of atheria_lightning that provide a protocol's filesystem.
EXTRAS = {"s3": "s3", "s3a": "s3", "gs": "gcs", "gcs": "gcs"}
#: Marks "not queued" apart from ``None`` (queued for removal) in the mirror's queue.
_NOTHING = object()
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


class _LocalFileChanged(Exception):
    """The local file no longer matches the entry it was queued with (replaced or removed since)."""


class Mirror:
    """The run's copy on a mirror: a queue of what to send, a worker thread that sends it, and the mirror's manifest.

    What the mirror holds is known from its manifest, read once at the start and then kept by this object, the
    only writer; each local write or removal is queued here by name, the newest entry winning.

    Args:
        run_dir: The local run folder (its ``checkpoints/``, ``logs/`` and ``exports/`` are sent).
        wait_for_writes: Waits (bounded) for the local writes already queued, so that their entries are queued here.
        top_k: How many best checkpoints the mirror keeps (asked at each sync: the run's setting may come later).
        url: ``mirror_url``, for messages; ``fs`` and ``root`` are its filesystem and the run's folder there.
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
        max_retries: int,
        backoff_s: float,
        clock: Callable[[], float],
        sleep: Callable[[float], Any],
    ) -> None:
        self.run_dir, self.wait_for_writes, self.top_k = run_dir, wait_for_writes, top_k
        self.url, self.fs, self.root = url, fs, root.rstrip("/")
        self.flush_timeout_s, self.max_retries, self.backoff_s = flush_timeout_s, max_retries, backoff_s
        self.clock, self.sleep = clock, sleep
        self.side = Side(fs, join(self.root, CHECKPOINTS), "mirror")
        self.lease = Lease(fs, self.root, url)
        #: Set once a later session has taken the mirror over; nothing is uploaded after that.
        self.superseded: Superseded | None = None
        self.remote: Manifest | None = None  # the mirror's manifest as last read or written
        self.queue: dict[str, Entry | None] = {}  # name -> entry to upload, or None to remove
        self.failures = 0
        self.syncs_ended = 0
        self.last_sync_seconds = 0.0
        self._connected = False
        self._plain_stamps: dict[str, tuple[int, float | None]] = {}
        self._made_dirs: set[str] = set()
        # Progress a failed attempt keeps for the retry: files sent and verified but not yet listed, and the
        # replacements journalled in the mirror's manifest.
        self._verified: dict[str, Entry] = {}
        self._journalled: dict[str, Entry] = {}
        self._rewrite = False  # the mirror's manifest must be written again, even if this session's view is unchanged
        self._beyond: dict[str, str] = {}  # best files this session set aside beyond top_k -> where they went
        self._queue_lock = threading.Lock()
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
            self._retrying(self._probe)
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
            at_least = self._retrying(lambda: read_as_is(self.side), give_up=(FileNotFoundError, DamagedManifest))
            at_least = at_least.generation
        except (OSError, DamagedManifest):  # none yet, or damaged: the lease files alone number the sessions
            at_least = 0
        try:
            return self._retrying(lambda: self.lease.acquire(take_over, at_least), give_up=(ConfigError,))
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

    def open(self) -> Manifest:
        """Read the mirror's manifest (rebuilt from its files when damaged; unlisted files adopted), once."""
        if self.remote is None:
            remote, changed = self._retrying(lambda: read_or_rebuild(self.side))
            sizes = self.side.sizes()
            journal = dict(remote.pending)
            # A pending entry is a replacement the mirror was killed in: whichever entry the file matches wins.
            changed |= settle(remote, lambda name, entry: sizes.get(name) == entry.size
                             and verify(self.fs, join(self.side.folder, name), entry.size, entry.sha256))  # fmt: skip
            # One that matches nothing yet stays journalled until this session's first sync: the session taken over
            # from may be past its last check, its file about to land (a download then reads the manifest again).
            remote.pending = {name: entry for name, entry in journal.items() if remote.files.get(name) != entry}
            for name, entry in list(remote.files.items()):
                if sizes.get(name) != entry.size:
                    log.warning("mirror %s/%s is missing or not the size MANIFEST.json says: not trusted",
                                self.side.folder, name)  # fmt: skip
                    del remote.files[name]
            changed |= adopt_unlisted(remote, self.side)
            self.remote = remote
            if changed:
                try:
                    self._write_manifest(remote)
                except Superseded as superseded:  # taken over since this session's lease: it trains on, unsent
                    self._supersede(superseded)
        return Manifest(dict(self.remote.files))

    def reconcile(self, local: dict[str, Entry]) -> None:
        """Queue every local checkpoint the mirror lacks (or holds older), then ask for a sync at once."""
        assert self.remote is not None
        with self._queue_lock:
            for name, entry in local.items():
                theirs = self.remote.files.get(name)
                if not same(theirs, entry):
                    self.queue[name] = entry
        self.request()

    def download(self, name: str, entry: Entry, local_path: str, journal: Callable[[str, Entry], None]) -> bool:
        """Copy a mirror checkpoint beside its local target, check size and sha256, then move it into place.

        Returns False when the bytes do not match the entry (the mirror's file is then moved to its ``corrupt/``
        and unlisted). Raises ``ConfigError`` when the mirror cannot be read (after the retries): training from an
        older local state would later replace the mirror's newer file.
        """
        try:
            matched = self._retrying(lambda: self._download_once(name, entry, local_path, journal),
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
            assert self.remote is not None
            self.remote.files.pop(name, None)
            self._write_manifest(self.remote)
            self.side.quarantine(name)
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
        self.remote = None
        return self.open()

    def download_plain_folders(self) -> int:
        """Copy the mirror's ``logs/`` and ``exports/`` files that the local run folder lacks; their count.

        On a new machine this brings back the TensorBoard events of earlier sessions, so that one ``logs/`` holds the
        run's whole history (see :func:`copy_plain_files` for what is skipped). A failure costs the history, not the
        training: it is one warning.
        """
        copied = copy_plain_files(self.fs, self.root, self.run_dir, retrying=self._retrying)
        for key, target in copied.items():
            stat = os.stat(target)  # as the sync stamps local files: it is on the mirror, not sent back
            self._plain_stamps[key] = (stat.st_size, stat.st_mtime)
        return len(copied)

    def _download_once(self, name: str, entry: Entry, local_path: str, journal: Callable[[str, Entry], None]) -> bool:
        return download_verified(self.side, name, entry, local_path, journal)

    # -- queue and worker --
    def enqueue(self, name: str, entry: Entry | None) -> None:
        with self._queue_lock:
            self.queue[name] = entry

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
            return done and self._last_ok and not self.queue

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
        remote = self.remote.newest_episode() if self.remote is not None else -1
        behind = bool(self.queue) or not self._last_ok or remote < local_episode
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
                self._retrying(self._sync_attempt, give_up=(Superseded,))
            except Superseded as superseded:
                self._supersede(superseded)
                return False
            except Exception as err:  # whatever the backend raises, training must go on
                self.failures += 1
                self.syncs_ended += 1
                log.warning("mirror sync to %s failed after %d retries (%d failures so far): %s",
                            self.root, self.max_retries, self.failures, err)  # fmt: skip
                return False
            self.last_sync_seconds = self.clock() - started
            self.syncs_ended += 1
            return True

    def _sync_attempt(self) -> None:
        if self.remote is None:
            self.open()
        self._check_owner()
        self._sync_checkpoints()
        for folder in PLAIN_FOLDERS:
            self._sync_plain_folder(folder)
        self.lease.heartbeat()

    def _check_owner(self) -> None:
        """Before anything is replaced: raise :class:`Superseded` when a later session holds the lease or wrote the
        manifest; take the manifest as the mirror has it now when another writer changed it meanwhile."""
        self.lease.check()
        try:
            fresh = read_as_is(self.side)
        except FileNotFoundError:
            return  # nothing listed yet (or removed by a person): this session's view stands
        except DamagedManifest:
            return  # rewritten from this session's view at the end of this sync
        if fresh.generation > self.lease.generation:
            raise Superseded(None, fresh.generation)
        assert self.remote is not None
        if fresh.generation < self.lease.generation and fresh.files != self.remote.files:
            self._heal_late_write()
        elif fresh.files != self.remote.files:
            log.warning("mirror %s: MANIFEST.json was changed by another writer since this session wrote it; "
                        "continuing from what it lists now (no upload replaces a newer episode)",
                        self.side.folder)  # fmt: skip
            self.remote = Manifest(dict(fresh.files))

    def _heal_late_write(self) -> None:
        """A superseded session's write that was under way when this session took the lease landed afterwards
        (no object store offers a write conditional on another file): this session's view stands, and every file it
        lists whose bytes that write replaced is sent again."""
        assert self.remote is not None
        replaced = [name for name, entry in self.remote.files.items()
                    if not verify(self.fs, join(self.side.folder, name), entry.size, entry.sha256)]  # fmt: skip
        log.warning("mirror %s: a superseded session wrote MANIFEST.json after this session took the lease; "
                    "listing this session's files again%s", self.side.folder,
                    f", sending {', '.join(replaced)} again" if replaced else "")  # fmt: skip
        with self._queue_lock:
            for name in replaced:
                self.queue.setdefault(name, self.remote.files.pop(name))
        self._rewrite = True

    def _sync_checkpoints(self) -> None:
        assert self.remote is not None
        with self._queue_lock:
            batch = dict(self.queue)
        uploads = {name: entry for name, entry in batch.items()
                   if entry is not None and not same(self.remote.files.get(name), entry)}  # fmt: skip
        older = self._older_than_the_mirror(uploads)
        uploads = {name: entry for name, entry in uploads.items() if name not in older}
        changed = []
        with contextlib.ExitStack() as held:
            # Each file is opened now, as queued: the store replaces files by rename, so what is read is the queued
            # state even when a newer one lands during this sync. Opened after the journal, last.ckpt of a run that
            # saves every episode would be newer than its entry at every sync on a slow mirror, and never be listed.
            sources = {name: held.enter_context(source) for name in uploads
                       if (source := self._open_local(name)) is not None}  # fmt: skip
            if uploads and uploads != self._journalled:  # a retry finds its journal already written
                # Every file about to be sent is journalled first: a kill after a move still leaves files that
                # verify against their pending entry, which the next start lists (with their metric) instead of
                # setting aside.
                self._write_manifest(Manifest(dict(self.remote.files), dict(uploads)))
                self._journalled = dict(uploads)
            for name, entry in uploads.items():
                if same(self._verified.get(name), entry):
                    continue  # sent and verified by an earlier attempt of this sync
                self.lease.heartbeat()  # a long upload to a slow Drive must not look like a session that is gone
                self._verified.pop(name, None)  # from the move into place until verified, its content is unknown
                if name in sources and self._upload_checkpoint(name, entry, sources[name]):
                    self._verified[name] = entry
                else:
                    changed.append(name)
        listed = dict(self.remote.files)
        listed.update({name: entry for name, entry in uploads.items() if name not in changed})
        removed = [name for name, entry in batch.items() if entry is None and listed.pop(name, None) is not None]
        kept = Manifest(listed)
        beyond = retention.beyond_top_k(kept.files, self.top_k())  # the mirror keeps top_k, whatever it held
        for name in beyond:
            del kept.files[name]
        if kept.files != self.remote.files or self._journalled or self._rewrite:
            self._write_manifest(kept)
        self.remote, self._journalled, self._rewrite = kept, {}, False
        for name in kept.files:
            self._verified.pop(name, None)
        # Only after the manifest that no longer lists them. What the mirror held beyond top_k (a lower top_k than
        # an earlier session's) is set aside; a later removal by the local retention deletes it there.
        for name in beyond:
            self._beyond[name] = self.side.set_aside(name, BEYOND_TOP_K)
        if beyond:
            log.warning("mirror %s: %d best checkpoint(s) beyond top_k=%d moved to %s/, not deleted: %s",
                        self.side.folder, len(beyond), self.top_k(), BEYOND_TOP_K,
                        ", ".join(sorted(beyond)))  # fmt: skip
        removed += [name for name, entry in batch.items() if entry is None and name in self._beyond]
        for name in removed:
            try:
                self.fs.rm(self._beyond.pop(name, None) or join(self.side.folder, name))
            except FileNotFoundError:
                pass
        with self._queue_lock:  # done with, unless a newer write queued the name again meanwhile
            for name, entry in batch.items():
                if name not in changed and self.queue.get(name, _NOTHING) == entry:
                    del self.queue[name]

    def _older_than_the_mirror(self, uploads: dict[str, Entry]) -> set[str]:
        """Names whose upload would replace a newer episode on the mirror: the mirror never goes backwards."""
        assert self.remote is not None
        older = set()
        for name, entry in uploads.items():
            theirs = self.remote.files.get(name)
            if theirs is not None and theirs.episode > entry.episode:
                log.warning("mirror %s/%s holds episode %d, newer than this session's %d: not replaced",
                            self.side.folder, name, theirs.episode, entry.episode)  # fmt: skip
                older.add(name)
        return older

    def _open_local(self, name: str) -> IO[bytes] | None:
        """The local checkpoint ``name``, open for reading; None when it was removed (retention) since queued."""
        try:
            return open(os.path.join(self.run_dir, CHECKPOINTS, name), "rb")
        except FileNotFoundError:
            log.debug("mirror: %s was removed locally since it was queued", name)
            return None

    def _upload_checkpoint(self, name: str, entry: Entry, source: IO[bytes]) -> bool:
        """Upload and verify one checkpoint from ``source`` (read from its start: a retry reads it again); False
        when its bytes are not the queued entry's."""
        target = join(self.side.folder, name)
        source.seek(0)
        try:
            self._upload(source, target, entry)
        except _LocalFileChanged as err:
            log.debug("mirror: %s changed locally since it was queued; its newer entry follows (%s)", name, err)
            return False
        if not verify(self.fs, target, entry.size, entry.sha256):
            raise OSError(f"{target}: size or sha256 differs from MANIFEST.json after upload")
        return True

    def _sync_plain_folder(self, folder: str) -> None:
        local_fs, local_dir = LocalFileSystem(), os.path.join(self.run_dir, folder)
        try:
            infos = local_fs.find(local_dir, detail=True)
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
                source = open(path, "rb")
            except FileNotFoundError:
                continue  # removed locally meanwhile
            with source:
                self._upload(source, join(self.root, key), expected=None)
            self._plain_stamps[key] = stamp

    def _upload(self, source: IO[bytes], remote_path: str, expected: Entry | None) -> None:
        """Stream ``source`` to ``remote_path`` atomically; with ``expected``, abort unless the bytes match it."""
        self._ensure_parent(remote_path)
        # The lease is checked once more just before the file replaces what is there: a session taken over during a
        # long upload leaves the successor's file alone.
        atomic_write(self.fs, remote_path, lambda target: _copy_checked(source, target, expected),
                     before_replace=lambda _: self.lease.check())  # fmt: skip

    def _ensure_parent(self, remote_path: str) -> None:
        # Local folders get theirs from atomic_write; object stores have none; others (sftp, webdav) need them.
        parent = posixpath.dirname(remote_path)
        if isinstance(self.fs, LocalFileSystem) or parent in self._made_dirs:
            return
        self.fs.makedirs(parent, exist_ok=True)
        self._made_dirs.add(parent)

    def _write_manifest(self, manifest: Manifest) -> None:
        manifest.generation = self.lease.generation
        write_manifest(self.side, manifest, before_replace=lambda _: self.lease.check())

    def _retrying(self, attempt: Callable[[], Any], give_up: tuple[type[BaseException], ...] = ()) -> Any:
        """``attempt()``, retried with backoff; the ``give_up`` errors, and a file or folder where the other should
        be (:data:`IN_THE_WAY`), are raised at once: no retry changes them."""
        for retry in range(self.max_retries + 1):
            try:
                return attempt()
            except (*give_up, *IN_THE_WAY):
                raise
            except Exception as err:
                if retry == self.max_retries:
                    raise
                # Jitter, so that runs sharing a bucket or a Drive account do not retry in step.
                delay = self.backoff_s * 2**retry * random.uniform(0.5, 1.5)
                log.debug("mirror attempt %d failed (%s), retrying in %.1f s", retry + 1, err, delay)
                self.sleep(delay)
        return None


#: The largest ``logs/`` or ``exports/`` file a start copies from a mirror or a previous version: a long run's
#: TensorBoard events and exported model stay far below it; a planted (or sparse) giant would fill the disk.
PLAIN_FILE_LIMIT = 512 * 2**20


def plain_files(fs: AbstractFileSystem, folder: str) -> dict[str, dict[str, Any]]:
    """The regular files under ``folder``, relative to it with ``/`` -> their listing info; links are neither
    listed nor entered, a missing folder is empty."""
    try:
        if fs.info(folder).get("islink"):
            return {}
    except FileNotFoundError:
        return {}
    found: dict[str, dict[str, Any]] = {}
    top = None
    for root, folders, files in fs.walk(folder, detail=True):
        top = root if top is None else top  # walk is top-down: its first folder is ``folder`` as fs writes it
        for name in [name for name, info in folders.items() if info.get("islink")]:
            del folders[name]  # pruned: a link to a folder may lead anywhere
        found.update({posixpath.relpath(posixpath.join(root, name), top): info for name, info in sorted(files.items())
                      if info.get("type") == "file" and not info.get("islink")})  # fmt: skip
    return found


def _too_big_or_sparse(fs: AbstractFileSystem, path: str, info: dict[str, Any]) -> str | None:
    """Why a plain file is not copied, or None: over :data:`PLAIN_FILE_LIMIT`, or sparse (mostly holes: a few
    blocks on disk that read as gigabytes of zeros)."""
    size = int(info.get("size") or 0)
    if isinstance(fs, LocalFileSystem) and size > 2**20:
        try:
            blocks = os.stat(path, follow_symlinks=False).st_blocks * 512
        except (OSError, AttributeError):  # no st_blocks on this platform: the size bound alone
            blocks = size
        if blocks < size // 2:
            return f"a sparse file ({size} bytes listed, {blocks} on disk)"
    if size > PLAIN_FILE_LIMIT:
        return f"{size} bytes, over the {PLAIN_FILE_LIMIT // 2**20} MiB copied of a logs/ or exports/ file"
    return None


def copy_plain_files(
    fs: AbstractFileSystem, source_run: str, run_dir: str, retrying: Callable[[Callable[[], Any]], Any] | None = None
) -> dict[str, str]:
    """Copy the files of ``source_run``'s ``logs/`` and ``exports/`` (on ``fs``: a mirror, a previous version's
    read-only folder) that ``run_dir`` lacks; returns ``"logs/…"`` -> the local path written, for each.

    The source is untrusted: links, temporary files of interrupted writes and anything but regular files are
    skipped, and no target may resolve outside ``run_dir/<folder>``. A local file is never replaced (this machine
    wrote it, or a copy is there already). Each copy is atomic, with this process's permissions. A folder that
    cannot be listed or a file that cannot be read is one warning: the history, not the training, is at stake.
    ``retrying`` wraps the listing (the mirror's retries for a backend's transient errors).
    """
    copied: dict[str, str] = {}
    for folder in PLAIN_FOLDERS:
        source_dir, local_dir = join(source_run, folder), os.path.realpath(os.path.join(run_dir, folder))
        try:
            listed = functools.partial(plain_files, fs, source_dir)
            listing = retrying(listed) if retrying is not None else listed()
        except Exception as err:  # each backend has its own errors for an unreadable folder
            log.warning("%s: not listed (%s); earlier sessions' %s/ stays there", source_dir, err, folder)
            continue
        for relative, info in listing.items():
            target = os.path.realpath(os.path.join(local_dir, *relative.split("/")))
            inside = os.path.commonpath([target, local_dir]) == local_dir and target != local_dir
            if TMP_MARKER in posixpath.basename(relative) or not inside or os.path.lexists(target):
                continue
            refused = _too_big_or_sparse(fs, join(source_dir, relative), info)
            if refused is not None:
                log.warning("%s/%s: not copied: %s", source_dir, relative, refused)
                continue
            try:
                with fs.open(join(source_dir, relative), "rb") as source:
                    bounded = functools.partial(copy_measured, source, limit=PLAIN_FILE_LIMIT)
                    atomic_write(LocalFileSystem(), target, bounded)
            except Exception as err:  # a history file is not worth failing the start of training
                log.warning("%s/%s: not copied (%s)", source_dir, relative, err)
                continue
            copied[f"{folder}/{relative}"] = target
    return copied


def download_verified(
    side: Side, name: str, entry: Entry, local_path: str, journal: Callable[[str, Entry], None]
) -> bool:
    """Copy ``side``'s checkpoint ``name`` beside ``local_path``, check its size, sha256 and episode against
    ``entry``, then journal it and move it into place; False (nothing moved, ``side`` untouched) when they differ."""
    os.makedirs(os.path.dirname(local_path), exist_ok=True)
    tmp = tmp_path_for(local_path)
    try:
        with side.fs.open(join(side.folder, name), "rb") as source, open(tmp, "wb") as target:
            copied = copy_measured(source, target)
            target.flush()
            os.fsync(target.fileno())
        if not copied.matches(entry.size, entry.sha256) or episode_in(tmp, name) != entry.episode:
            return False  # the bytes, or the episode the manifest claims for them, are not what it lists
        journal(name, entry)
        os.replace(tmp, local_path)
        return True
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _copy_checked(source: IO[bytes], target: IO[bytes], expected: Entry | None) -> None:
    copied = copy_measured(source, target)
    if expected is not None and not copied.matches(expected.size, expected.sha256):
        digest = copied.hexdigest()[:12]
        raise _LocalFileChanged(f"read {copied.size} bytes with sha256 {digest}..., the queued entry says otherwise")
