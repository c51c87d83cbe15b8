"""Atomic writes, measured copies and sha256 on any fsspec filesystem: the file I/O under the run store."""

from __future__ import annotations

import hashlib
import logging
import os
import secrets
from collections.abc import Callable
from typing import IO, Any

from fsspec import AbstractFileSystem
from fsspec.implementations.local import LocalFileSystem

log = logging.getLogger(__name__)

#: Temporary files are named ``.<target>.tmp-<random>`` in the target's folder; a new run removes leftovers.
TMP_MARKER = ".tmp-"
CHUNK = 1 << 20


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

    def matches(self, size: int, sha256: str) -> bool:
        """True when what went through has this size and sha256."""
        return self.size == size and self.hexdigest() == sha256


class TooLarge(OSError):
    """More bytes came than a bounded copy allows."""


def copy_measured(source: IO[bytes], target: IO[bytes], limit: int | None = None) -> MeasuredWriter:
    """Stream ``source`` into ``target``; returns what went through, measured. With ``limit``, :class:`TooLarge`
    once more than ``limit`` bytes came (a file that grows, or whose listed size lied)."""
    copied = MeasuredWriter(target)
    for chunk in iter(lambda: source.read(CHUNK), b""):
        copied.write(chunk)
        if limit is not None and copied.size > limit:
            raise TooLarge(f"more than {limit} bytes")
    return copied


def verify(fs: AbstractFileSystem, path: str, size: int, sha256: str) -> bool:
    """True when ``path`` exists with this size and sha256 (size first: cheap, catches truncation)."""
    try:
        if int(fs.size(path)) != size:
            return False
        return sha256_of(fs, path) == sha256
    except (FileNotFoundError, OSError):
        return False


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
    stores carry out as a single PUT followed by a server-side copy. ``before_replace`` is called with the complete
    (locally: fsynced) temporary file just before the rename or move; what it raises leaves the target as it was.
    """
    if isinstance(fs, LocalFileSystem):
        _atomic_write_local(path, write, before_replace)
        return
    tmp = tmp_path_for(path)
    try:
        with fs.open(tmp, "wb") as handle:
            write(handle)
        if before_replace is not None:
            before_replace(tmp)
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
