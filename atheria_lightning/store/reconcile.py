"""The start of a session: the local run folder repaired, what the mirror has newer downloaded (verified), and,
when neither has a checkpoint, the run of a previous (Kaggle) version copied in; then retention and the mirror's
queue of what it lacks."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable

from fsspec.implementations.local import LocalFileSystem

from atheria_lightning.errors import ConfigError, require
from atheria_lightning.files import remove_stale_tmp, verify
from atheria_lightning.store import retention
from atheria_lightning.store.copies import copy_plain_files, download_verified
from atheria_lightning.store.manifest import (
    BEYOND_TOP_K,
    MANIFEST_NAME,
    QUARANTINE,
    Entry,
    LocalSide,
    Manifest,
    adopt_unlisted,
    read_or_rebuild,
    settle,
)
from atheria_lightning.store.mirror import Mirror, MirrorChanged
from atheria_lightning.store.previous import examine, find_run_folders, newest_first
from atheria_lightning.store.writer import Folder, checkpoint_path

log = logging.getLogger(__name__)

#: How often a start reads the mirror's manifest again when listed files vanish under it before giving up.
VANISHED_REREADS = 3


def open_folder(run_dir: str, checkpoint_dir: str, send: Callable[[str, Entry | None], None]) -> Folder:
    """Read (or rebuild) the local manifest and check every file it lists: temporary files of killed writes are
    removed, a killed write's journal settled, listed files that fail verification moved to ``corrupt/``, unlisted
    checkpoints adopted; the manifest is written again when any of that changed it."""
    for path in (run_dir, checkpoint_dir):
        require(not os.path.exists(path) or os.path.isdir(path),
                f"{path} is a file, where the run's folder should be: move it aside")  # fmt: skip
    manifest_path = checkpoint_path(checkpoint_dir, MANIFEST_NAME)
    require(not os.path.isdir(manifest_path),
            f"{manifest_path} is a folder, where the manifest should be: move it aside")  # fmt: skip
    local = LocalFileSystem()
    for stale in remove_stale_tmp(local, checkpoint_dir) if os.path.isdir(checkpoint_dir) else []:
        log.info("removed a partial file left by an interrupted write: %s", stale)

    def matches(name: str, entry: Entry) -> bool:
        return verify(local, checkpoint_path(checkpoint_dir, name), entry.size, entry.sha256)

    manifest, changed = read_or_rebuild(LocalSide(checkpoint_dir))
    changed |= settle(manifest, matches)
    for name, entry in list(manifest.files.items()):
        if not matches(name, entry):
            log.warning("checkpoint %s does not match MANIFEST.json (truncated or corrupt): moved to %s/",
                        checkpoint_path(checkpoint_dir, name), QUARANTINE)  # fmt: skip
            del manifest.files[name]
            LocalSide(checkpoint_dir).quarantine(name)
            changed = True
    changed |= adopt_unlisted(manifest, LocalSide(checkpoint_dir))
    folder = Folder(checkpoint_dir, manifest, send)
    if changed:
        folder.write_manifest()
    return folder


def connect_mirror(mirror: Mirror, take_over: bool) -> None:
    """Reach the mirror and take its lease, saying so when it was taken over from another session."""
    mirror.connect()
    previous = mirror.acquire(take_over)
    if previous is not None:
        print(f"mirror: taken over from another session ({previous.describe(time.time())}); that session "
              "stops uploading at its next sync", flush=True)  # fmt: skip


def download_newer(folder: Folder, mirror: Mirror) -> set[str]:
    """Bring every mirror checkpoint the local folder lacks, or has older, into it, verified; their names.

    A listed file that vanished or was replaced before it was downloaded (the retention or a last upload of the
    session this one took the mirror over from) means the manifest changed: it is read again, a few times at
    most.
    """
    remote = mirror.open()
    downloaded: set[str] = set()
    for _ in range(VANISHED_REREADS):
        try:
            _download_listed(folder, mirror, remote, downloaded)
            return downloaded
        except MirrorChanged as err:
            log.warning("mirror: %s: reading its manifest again", err)
            remote = mirror.reread()
    raise ConfigError(
        f"mirror_url={mirror.url!r} keeps changing while this session starts (listed checkpoints vanish "
        "before they can be read): another session is writing it; stop that session, then run the same command "
        "again"
    )


def _download_listed(folder: Folder, mirror: Mirror, remote: Manifest, downloaded: set[str]) -> None:
    for name, entry in sorted(remote.files.items(), key=lambda item: -item[1].episode):
        mine = folder.entries().get(name)
        if mine is not None and (mine.sha256 == entry.sha256 or mine.episode >= entry.episode):
            continue
        if mirror.download(name, entry, folder.path(name), folder.journal):
            folder.list(name, entry)
            downloaded.add(name)


def copy_previous(folder: Folder, run_dir: str, root: str, label: str) -> dict[str, str]:
    """Copy the run from the previous version under ``root`` with the newest sound checkpoint: its listed
    checkpoints (verified again as they are copied) and its ``logs/`` and ``exports/``. Nothing is written
    under ``root``. Returns the names copied -> where each came from."""
    folders = find_run_folders(root, os.path.basename(run_dir), skip=run_dir)
    candidates = [run for run in map(examine, folders) if run is not None]
    if not candidates:
        if folders:
            print(f"{label}: no sound checkpoint in {', '.join(folders)}: starting a new run", flush=True)
        return {}
    for chosen in newest_first(candidates):
        copied = {}
        for name, entry in chosen.manifest.newest_first():
            if download_verified(chosen.side, name, entry, folder.path(name), folder.journal):
                folder.list(name, entry)
                copied[name] = os.path.join(chosen.side.folder, name)
            else:
                log.warning("%s/%s no longer matches what was checked: not copied", chosen.side.folder, name)
        if copied:
            break
    else:
        return {}
    files = len(copy_plain_files(LocalFileSystem(), chosen.run_dir, run_dir))
    others = [run.describe() for run in candidates if run is not chosen]
    print(f"{label}: copied the run of {chosen.describe()} into {run_dir} ({len(copied)} checkpoint(s), "
          f"{files} file(s) of logs/ and exports/)"
          + (f"; the newest of {len(candidates)} found, not taken: {', '.join(others)}" if others else ""),
          flush=True)  # fmt: skip
    return copied


def set_aside_beyond_top_k(folder: Folder, top_k: int, with_mirror: bool) -> None:
    """At the start, best files beyond ``top_k`` are there because ``top_k`` is lower than an earlier session's
    (or a copied folder held more): moved to ``checkpoints/beyond_top_k/``, never deleted, and said. The mirror
    does the same with its own at its first sync."""
    surplus = retention.beyond_top_k(folder.copy().files, top_k)
    if not surplus:
        return
    folder.side.make_aside_folder(BEYOND_TOP_K)  # before the manifest changes
    folder.unlist(surplus)  # unlisted first: a kill before the move leaves files the next start adopts
    for name in surplus:
        folder.side.set_aside(name, BEYOND_TOP_K)
    also = " (the mirror's too, at its first sync)" if with_mirror else ""
    print(f"top_k={top_k}: {len(surplus)} best checkpoint(s) beyond it moved to "
          f"{os.path.join(folder.dir, BEYOND_TOP_K)}/{also}, not deleted: {', '.join(sorted(surplus))}",
          flush=True)  # fmt: skip
