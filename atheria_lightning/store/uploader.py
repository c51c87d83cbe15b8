"""The mirror's manifest as this session last read or wrote it, the queue of what to send, and one sync: the
files queued sent and verified, journalled first, listed after, and what retention dropped removed last."""

from __future__ import annotations

import contextlib
import logging
import os
import posixpath
import threading
from collections.abc import Callable
from typing import IO

from fsspec.implementations.local import LocalFileSystem

from atheria_lightning.files import TMP_MARKER, atomic_write, copy_measured, join, verify
from atheria_lightning.store import retention
from atheria_lightning.store.copies import PLAIN_FOLDERS
from atheria_lightning.store.lease import Lease, Superseded
from atheria_lightning.store.manifest import (
    BEYOND_TOP_K,
    CHECKPOINTS,
    DamagedManifest,
    Entry,
    Manifest,
    Side,
    adopt_unlisted,
    read_as_is,
    read_or_rebuild,
    same,
    settle,
    write_manifest,
)
from atheria_lightning.store.retry import Retry

log = logging.getLogger(__name__)

#: Marks "not queued" apart from ``None`` (queued for removal) in the mirror's queue.
_NOTHING = object()


class _LocalFileChanged(Exception):
    """The local file no longer matches the entry it was queued with (replaced or removed since)."""


class Uploader:
    """What this session knows the mirror holds (its manifest, read once at the start and then kept here, the only
    writer) and what it has to send there (each local write or removal queued by name, the newest entry winning).

    Args:
        run_dir: The local run folder (its ``checkpoints/``, ``logs/`` and ``exports/`` are sent).
        side: The mirror's ``checkpoints/``; ``root`` is the run's folder there.
        lease: This session's lease, checked before each upload or manifest write lands.
        top_k: How many best checkpoints the mirror keeps (asked at each sync: the run's setting may come later).
        retry: The mirror's retry policy (for reading its manifest).
        supersede: Called when a manifest write finds the mirror taken over by a later session.
    """

    def __init__(
        self,
        run_dir: str,
        side: Side,
        root: str,
        lease: Lease,
        top_k: Callable[[], int],
        retry: Retry,
        supersede: Callable[[Superseded], None],
    ) -> None:
        self.run_dir, self.side, self.fs, self.root = run_dir, side, side.fs, root
        self.lease, self.top_k, self.retry, self.supersede = lease, top_k, retry, supersede
        self.remote: Manifest | None = None  # the mirror's manifest as last read or written
        self.queue: dict[str, Entry | None] = {}  # name -> entry to upload, or None to remove
        self._plain_stamps: dict[str, tuple[int, float | None]] = {}
        self._made_dirs: set[str] = set()
        # Progress a failed attempt keeps for the retry: files sent and verified but not yet listed, and the
        # replacements journalled in the mirror's manifest.
        self._verified: dict[str, Entry] = {}
        self._journalled: dict[str, Entry] = {}
        self._rewrite = False  # the mirror's manifest must be written again, even if this session's view is unchanged
        self._beyond: dict[str, str] = {}  # best files this session set aside beyond top_k -> where they went
        self.queue_lock = threading.Lock()

    def open(self) -> Manifest:
        """Read the mirror's manifest (rebuilt from its files when damaged; unlisted files adopted), once."""
        if self.remote is None:
            remote, changed = self.retry(lambda: read_or_rebuild(self.side))
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
                    self.supersede(superseded)
        return Manifest(dict(self.remote.files))

    @property
    def opened(self) -> bool:
        return self.remote is not None

    def forget(self) -> None:
        """The mirror's manifest changed since it was read: the next :meth:`open` reads it again."""
        self.remote = None

    def newest_episode(self) -> int:
        """The newest episode the mirror lists, as this session knows it; -1 before it is read."""
        return self.remote.newest_episode() if self.remote is not None else -1

    def queued(self) -> bool:
        """Whether anything is still to be sent or removed."""
        return bool(self.queue)

    def stamp(self, key: str, stat: os.stat_result) -> None:
        """``key`` (``logs/…``) is on the mirror as the local file ``stat`` describes: not sent until it changes."""
        self._plain_stamps[key] = (stat.st_size, stat.st_mtime)

    def reconcile(self, local: dict[str, Entry]) -> None:
        """Queue every local checkpoint the mirror lacks (or holds older)."""
        assert self.remote is not None
        with self.queue_lock:
            for name, entry in local.items():
                theirs = self.remote.files.get(name)
                if not same(theirs, entry):
                    self.queue[name] = entry

    def drop(self, name: str) -> None:
        """Unlist ``name`` from the mirror's manifest, then move its file to the mirror's ``corrupt/``."""
        assert self.remote is not None
        self.remote.files.pop(name, None)
        self._write_manifest(self.remote)
        self.side.quarantine(name)

    def enqueue(self, name: str, entry: Entry | None) -> None:
        with self.queue_lock:
            self.queue[name] = entry

    def sync(self) -> None:
        """One attempt at sending what is queued, once the mirror's manifest is read (the caller retries it)."""
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
        with self.queue_lock:
            for name in replaced:
                self.queue.setdefault(name, self.remote.files.pop(name))
        self._rewrite = True

    def _sync_checkpoints(self) -> None:
        assert self.remote is not None
        with self.queue_lock:
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
        with self.queue_lock:  # done with, unless a newer write queued the name again meanwhile
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


def _copy_checked(source: IO[bytes], target: IO[bytes], expected: Entry | None) -> None:
    copied = copy_measured(source, target)
    if expected is not None and not copied.matches(expected.size, expected.sha256):
        digest = copied.hexdigest()[:12]
        raise _LocalFileChanged(f"read {copied.size} bytes with sha256 {digest}..., the queued entry says otherwise")
