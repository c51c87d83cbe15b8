"""MANIFEST.json of a checkpoint folder, sha256 verification and atomic writes, on any fsspec filesystem.

The manifest is the only source of trust: a checkpoint file not listed in it, or whose size or sha256 differs from
its entry, is never loaded. It is written last, after the files it lists are complete.

Layout::

    {"version": 1, "updated": 1732600000.0,
     "files": {"last.ckpt": {"episode": 40, "metric": 1.23, "size": 1391075, "sha256": "ab...", "kind": "last",
                             "saved_at": 1732600000.0}}}
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import secrets
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import IO, Any

from fsspec import AbstractFileSystem
from fsspec.implementations.local import LocalFileSystem

log = logging.getLogger(__name__)

MANIFEST_NAME = "MANIFEST.json"
MANIFEST_VERSION = 1
#: Temporary files are named ``.<target>.tmp-<random>`` in the target's folder; a new run removes leftovers.
TMP_MARKER = ".tmp-"
CHUNK = 1 << 20


@dataclass
class ManifestEntry:
    """What a trusted checkpoint file must be: its episode, quality metric, size and sha256."""

    episode: int
    size: int
    sha256: str
    metric: float | None = None
    kind: str = "best"  # "best" (top-k), "last" or "emergency"
    saved_at: float = field(default_factory=time.time)


@dataclass
class Manifest:
    """The files of one checkpoint folder that may be trusted.

    ``pending`` journals a replacement of a listed file (``last.ckpt`` is rewritten in place): its new entry is
    recorded before the rename and moved to ``files`` after it, so a kill between the two leaves a file that
    verifies against one of the two entries, never an unverifiable one.
    """

    files: dict[str, ManifestEntry] = field(default_factory=dict)
    updated: float = 0.0
    pending: dict[str, ManifestEntry] = field(default_factory=dict)

    def to_json(self) -> str:
        data = {"version": MANIFEST_VERSION, "updated": self.updated,
                "files": {name: asdict(entry) for name, entry in sorted(self.files.items())}}  # fmt: skip
        if self.pending:
            data["pending"] = {name: asdict(entry) for name, entry in sorted(self.pending.items())}
        return json.dumps(data, indent=1)

    @classmethod
    def from_json(cls, text: str) -> Manifest:
        data = json.loads(text)
        if not isinstance(data, dict) or data.get("version") != MANIFEST_VERSION:
            raise ValueError(f"unknown manifest version {data.get('version') if isinstance(data, dict) else data!r}")
        files = {name: ManifestEntry(**entry) for name, entry in data.get("files", {}).items()}
        pending = {name: ManifestEntry(**entry) for name, entry in data.get("pending", {}).items()}
        return cls(files=files, updated=float(data.get("updated", 0.0)), pending=pending)

    def newest_first(self) -> list[tuple[str, ManifestEntry]]:
        """Entries by episode, newest first; at equal episode ``last``/``emergency`` before ``best``."""
        return sorted(self.files.items(), key=lambda item: (item[1].episode, item[1].kind != "best", item[1].saved_at),
                      reverse=True)  # fmt: skip


def sha256_of(fs: AbstractFileSystem, path: str) -> str:
    digest = hashlib.sha256()
    with fs.open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


class MeasuredWriter:
    """A binary handle whose writes are also counted and hashed: the size and sha256 of what went through it.

    Measuring a file as it is written (or copied) spares reading it back to describe or check it.
    """

    def __init__(self, handle: IO[bytes]) -> None:
        self._handle = handle
        self._digest = hashlib.sha256()
        self.size = 0

    def write(self, data: Any) -> int:
        written = self._handle.write(data)  # a buffered file writes all of it or raises
        self._digest.update(data)
        self.size += memoryview(data).nbytes
        return written

    def hexdigest(self) -> str:
        return self._digest.hexdigest()

    def matches(self, entry: ManifestEntry) -> bool:
        """True when what went through has the entry's size and sha256."""
        return self.size == entry.size and self.hexdigest() == entry.sha256


def copy_measured(source: IO[bytes], target: IO[bytes]) -> MeasuredWriter:
    """Stream ``source`` into ``target``; returns what went through, measured."""
    copied = MeasuredWriter(target)
    for chunk in iter(lambda: source.read(CHUNK), b""):
        copied.write(chunk)
    return copied


def verify(fs: AbstractFileSystem, path: str, entry: ManifestEntry) -> bool:
    """True when ``path`` exists with the entry's size and sha256 (size first: cheap, catches truncation)."""
    try:
        if int(fs.size(path)) != entry.size:
            return False
        return sha256_of(fs, path) == entry.sha256
    except (FileNotFoundError, OSError):
        return False


def read_manifest(fs: AbstractFileSystem, folder: str) -> Manifest:
    """The folder's manifest; an empty one when it is missing or unreadable (then nothing there is trusted)."""
    path = join(folder, MANIFEST_NAME)
    try:
        with fs.open(path, "r") as handle:
            return Manifest.from_json(handle.read())
    except FileNotFoundError:
        return Manifest()
    except (OSError, ValueError, TypeError) as err:
        log.warning("ignoring unreadable %s: %s", path, err)
        return Manifest()


def write_manifest(fs: AbstractFileSystem, folder: str, manifest: Manifest) -> None:
    manifest.updated = time.time()
    data = manifest.to_json().encode()
    atomic_write(fs, join(folder, MANIFEST_NAME), lambda handle: handle.write(data))


def join(folder: str, name: str) -> str:
    return f"{folder.rstrip('/')}/{name}"


def tmp_path_for(path: str) -> str:
    """A temporary name in the target's own folder: the final rename then never crosses a filesystem."""
    folder, name = os.path.split(path)
    return os.path.join(folder, f".{name}{TMP_MARKER}{secrets.token_hex(4)}")


def atomic_write(
    fs: AbstractFileSystem,
    path: str,
    write: Callable[[IO[bytes]], Any],
    before_replace: Callable[[str], Any] | None = None,
) -> None:
    """Write ``path`` so that readers see either the old file or the complete new one, never a partial file.

    Local disks (and mounted Drive folders): a temporary file beside the target, flushed and fsynced, then
    ``os.replace`` and an fsync of the folder. Other filesystems: a temporary name then a move, which object
    stores carry out as a single PUT followed by a server-side copy. ``before_replace`` (local only) is called with
    the complete, fsynced temporary file just before the rename.
    """
    if isinstance(fs, LocalFileSystem):
        _atomic_write_local(path, write, before_replace)
        return
    tmp = tmp_path_for(path)
    try:
        with fs.open(tmp, "wb") as handle:
            write(handle)
        fs.mv(tmp, path)
    finally:
        if fs.exists(tmp):
            fs.rm(tmp)


def _atomic_write_local(
    path: str, write: Callable[[IO[bytes]], Any], before_replace: Callable[[str], Any] | None = None
) -> None:
    path = os.path.abspath(path)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = tmp_path_for(path)
    try:
        with open(tmp, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        if before_replace is not None:
            before_replace(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    _fsync_folder(os.path.dirname(path))


def _fsync_folder(folder: str) -> None:
    """Make the rename itself durable (no-op where folders cannot be opened, e.g. Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def remove_stale_tmp(fs: AbstractFileSystem, folder: str) -> list[str]:
    """Delete temporary files left by a process killed mid-write; returns what was removed."""
    try:
        names = fs.ls(folder, detail=False)
    except FileNotFoundError:
        return []
    stale = [name for name in names if TMP_MARKER in os.path.basename(name.rstrip("/"))]
    for name in stale:
        try:
            fs.rm(name)
        except (FileNotFoundError, OSError) as err:
            log.warning("could not remove stale temporary file %s: %s", name, err)
    return stale
