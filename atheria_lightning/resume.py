"""Find the newest checkpoint that verifies against its manifest, locally or on the mirror."""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass

from fsspec import AbstractFileSystem
from fsspec.implementations.local import LocalFileSystem

from atheria_lightning.manifest import (
    ManifestEntry,
    copy_measured,
    join,
    read_manifest,
    remove_stale_tmp,
    tmp_path_for,
    verify,
    write_manifest,
)

log = logging.getLogger(__name__)

#: Checkpoints that fail verification are moved here, never deleted: a person may want to look at them.
QUARANTINE = "corrupt"


@dataclass(frozen=True)
class ResumePoint:
    """A verified checkpoint to resume from."""

    path: str
    episode: int
    source: str  # "local" or "mirror"


def find_resume_checkpoint(
    checkpoint_dir: str, mirror: tuple[AbstractFileSystem, str] | None = None
) -> ResumePoint | None:
    """The newest verified checkpoint of a run, downloading it when only the mirror has it.

    ``checkpoint_dir`` is the local ``checkpoints/`` folder; ``mirror`` the filesystem and path of the mirror's
    ``checkpoints/`` folder. A local file that fails its manifest check is moved to ``checkpoints/corrupt/`` and the
    next one is tried; a mirror file that fails is skipped. Temporary files of interrupted writes are removed.
    """
    local_fs = LocalFileSystem()
    if os.path.isdir(checkpoint_dir):
        remove_stale_tmp(local_fs, checkpoint_dir)
    local = _newest_verified_local(checkpoint_dir)
    if mirror is None:
        return local
    remote = _newest_from_mirror(mirror, checkpoint_dir, newer_than=local.episode if local else -1)
    return remote or local


def _newest_verified_local(checkpoint_dir: str) -> ResumePoint | None:
    fs = LocalFileSystem()
    _settle_pending(checkpoint_dir)
    manifest = read_manifest(fs, checkpoint_dir)
    for name, entry in manifest.newest_first():
        path = os.path.join(checkpoint_dir, name)
        if verify(fs, path, entry):
            return ResumePoint(path=path, episode=entry.episode, source="local")
        log.warning("checkpoint %s does not match its manifest (truncated or corrupt): moved aside", path)
        _quarantine(checkpoint_dir, name)
    return None


def _settle_pending(checkpoint_dir: str) -> None:
    """Finish a replacement that a kill interrupted: a file matching its journalled entry takes that entry."""
    fs = LocalFileSystem()
    manifest = read_manifest(fs, checkpoint_dir)
    if not manifest.pending:
        return
    for name, entry in manifest.pending.items():
        if verify(fs, os.path.join(checkpoint_dir, name), entry):
            manifest.files[name] = entry
    manifest.pending.clear()
    write_manifest(fs, checkpoint_dir, manifest)


def _quarantine(checkpoint_dir: str, name: str) -> None:
    """Move a bad checkpoint out of the way and unlist it, so it is neither loaded nor mirrored again."""
    fs = LocalFileSystem()
    manifest = read_manifest(fs, checkpoint_dir)
    manifest.files.pop(name, None)
    write_manifest(fs, checkpoint_dir, manifest)
    source = os.path.join(checkpoint_dir, name)
    if os.path.exists(source):
        folder = os.path.join(checkpoint_dir, QUARANTINE)
        os.makedirs(folder, exist_ok=True)
        os.replace(source, os.path.join(folder, f"{name}.{int(time.time())}"))


def _newest_from_mirror(
    mirror: tuple[AbstractFileSystem, str], checkpoint_dir: str, newer_than: int
) -> ResumePoint | None:
    fs, remote_dir = mirror
    try:
        manifest = read_manifest(fs, remote_dir)
    except Exception as err:  # an unreachable mirror must not prevent resuming from the local copy
        log.warning("could not read the mirror's manifest at %s: %s", remote_dir, err)
        return None
    # A replacement journalled as pending (the mirror was killed mid-upload) may be the newest complete file.
    candidates = manifest.newest_first() + sorted(manifest.pending.items(), key=lambda item: -item[1].episode)
    for name, entry in sorted(candidates, key=lambda item: -item[1].episode):
        if entry.episode <= newer_than:
            return None
        if _fetch(fs, remote_dir, checkpoint_dir, name, entry):
            # Bring back the rest of the verified set too (the top-k that last.ckpt refers to), so the
            # local folder, and after the next sync the mirror, keep every best checkpoint.
            for other, other_entry in manifest.files.items():
                if other != name and not verify(LocalFileSystem(), os.path.join(checkpoint_dir, other), other_entry):
                    _fetch(fs, remote_dir, checkpoint_dir, other, other_entry)
            return ResumePoint(path=os.path.join(checkpoint_dir, name), episode=entry.episode, source="mirror")
        log.warning("mirror checkpoint %s/%s does not match its manifest: skipped", remote_dir, name)
    return None


def _fetch(fs: AbstractFileSystem, remote_dir: str, checkpoint_dir: str, name: str, entry: ManifestEntry) -> bool:
    """Download one mirror checkpoint, verified, and list it in the local manifest."""
    if not _download_verified(fs, join(remote_dir, name), os.path.join(checkpoint_dir, name), entry):
        return False
    local_manifest = read_manifest(LocalFileSystem(), checkpoint_dir)
    local_manifest.files[name] = entry
    write_manifest(LocalFileSystem(), checkpoint_dir, local_manifest)
    return True


def _download_verified(fs: AbstractFileSystem, remote_path: str, local_path: str, entry: ManifestEntry) -> bool:
    """Copy a mirror file beside its local target, check size and sha256, and only then move it into place."""
    os.makedirs(os.path.dirname(local_path), exist_ok=True)
    tmp = tmp_path_for(local_path)
    try:
        with fs.open(remote_path, "rb") as source, open(tmp, "wb") as target:
            copied = copy_measured(source, target)
            target.flush()
            os.fsync(target.fileno())
        if not copied.matches(entry):
            return False
        os.replace(tmp, local_path)
        return True
    except OSError as err:
        log.warning("could not download %s: %s", remote_path, err)
        return False
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
