"""Copies into the local run folder from a side it does not trust (a mirror, a previous version's read-only
folder): checkpoints verified before they move into place, ``logs/`` and ``exports/`` file by file, bounded."""

from __future__ import annotations

import functools
import logging
import os
import posixpath
from collections.abc import Callable
from typing import Any

from fsspec import AbstractFileSystem
from fsspec.implementations.local import LocalFileSystem

from atheria_lightning.files import TMP_MARKER, TooLarge, atomic_write, copy_measured, join, tmp_path_for
from atheria_lightning.store.manifest import Entry, Side, episode_in

log = logging.getLogger(__name__)

#: Folders copied to the mirror file by file when their size or mtime changed; checkpoints go through the queue.
PLAIN_FOLDERS = ("logs", "exports")
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
            try:  # never more than the listed size onto this disk: a mirror's file can grow or be swapped
                copied = copy_measured(source, target, limit=entry.size)
            except TooLarge:
                return False
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
