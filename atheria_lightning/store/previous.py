"""A previous version's run folder, read-only: a source the store copies from when the local folder has nothing.

Kaggle keeps a notebook version's ``/kaggle/working`` as its output, and a later version sees that output (when it
is added as an input) read-only under ``/kaggle/input/…``. A previous run of the same experiment there is any
folder ``<experiment_name>/checkpoints/MANIFEST.json`` at most :data:`MAX_DEPTH` folders below the root.

Each candidate is checked where it is, without writing anything there: its manifest as written (never rebuilt
from the files), then its listed checkpoints newest first until one matches its entry (size, sha256, episode) and
loads with ``weights_only=True`` with finite weights. The candidate with the newest such checkpoint is copied into
the local run folder: its listed checkpoints through the same verified download as a mirror's, and its ``logs/``
and ``exports/`` file by file. Nothing read from a candidate names a path outside the local run folder: checkpoint
names are the manifest's rules (``last.ckpt``, ``best-eNNNNNN.ckpt``), plain files are regular files under
``logs/`` or ``exports/``, links are not followed.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

from fsspec.implementations.local import LocalFileSystem

from atheria_lightning.files import join, verify
from atheria_lightning.store.manifest import (
    CHECKPOINTS,
    MANIFEST_NAME,
    DamagedManifest,
    Entry,
    Manifest,
    Side,
    episode_in,
    read_as_is,
    settle,
    unsound,
)

log = logging.getLogger(__name__)

#: How many folders may lie between the root and ``<experiment_name>``: ``/kaggle/input/<slug>/atheria_runs/<name>``
#: needs 2, and Kaggle has nested inputs deeper (``/kaggle/input/<kind>/<owner>/<slug>/…``).
MAX_DEPTH = 6


@dataclass(frozen=True)
class PreviousRun:
    """A previous version's run folder that holds a sound checkpoint; ``manifest`` lists only what may be copied."""

    run_dir: str
    manifest: Manifest
    newest: Entry  # the newest checkpoint verified where it is

    @property
    def side(self) -> Side:
        return Side(LocalFileSystem(), os.path.join(self.run_dir, CHECKPOINTS), "previous version")

    def describe(self) -> str:
        return f"{self.run_dir} (episode {self.newest.episode})"


def find_run_folders(root: str, experiment_name: str, skip: str) -> list[str]:
    """Folders named ``experiment_name`` under ``root`` that hold ``checkpoints/MANIFEST.json``, except ``skip``
    (the local run folder, should the root contain it); links to folders are not followed."""
    found: list[str] = []
    skip = os.path.realpath(skip)

    def scan(folder: str, depth: int) -> None:
        try:
            with os.scandir(folder) as entries:
                folders = sorted(entry.path for entry in entries if entry.is_dir(follow_symlinks=False))
        except OSError:  # unreadable or vanished: not a place a previous run can be read from
            return
        for path in folders:
            if os.path.realpath(path) == skip:
                continue
            if os.path.basename(path) == experiment_name and os.path.isfile(
                os.path.join(path, CHECKPOINTS, MANIFEST_NAME)
            ):
                found.append(path)
            elif depth < MAX_DEPTH:
                scan(path, depth + 1)

    if os.path.isdir(root):
        scan(root, 0)
    return found


def examine(run_dir: str) -> PreviousRun | None:
    """Check a candidate where it is (reads only); None, after one line saying why, when it has no sound checkpoint."""
    side = Side(LocalFileSystem(), os.path.join(run_dir, CHECKPOINTS), "previous version")
    where = join(side.folder, MANIFEST_NAME)
    try:
        manifest = read_as_is(side)
    except (DamagedManifest, OSError) as err:
        log.warning("%s cannot be read (%s): that previous run is not used", where, err)
        return None
    # A kill between a write's rename and its listing: the file matches its pending entry. Settled here only.
    settle(manifest, lambda name, entry: verify(side.fs, join(side.folder, name), entry.size, entry.sha256))
    for name, entry in manifest.newest_first():
        path = join(side.folder, name)
        problem = _problem(side, path, name, entry)
        if problem is None:
            return PreviousRun(run_dir, manifest, entry)
        log.warning("%s is not used: %s", path, problem)
        del manifest.files[name]
    log.warning("%s lists no sound checkpoint: that previous run is not used", where)
    return None


def _problem(side: Side, path: str, name: str, entry: Entry) -> str | None:
    if not verify(side.fs, path, entry.size, entry.sha256):
        return "its size or sha256 is not what MANIFEST.json lists (truncated, replaced or missing)"
    problem = unsound(path)
    if problem is None and episode_in(path, name) != entry.episode:
        return f"it does not hold episode {entry.episode}, which MANIFEST.json lists for it"
    return problem


def newest_first(candidates: list[PreviousRun]) -> list[PreviousRun]:
    """The candidates by their newest sound checkpoint, newest first (at an equal episode, the one saved last)."""
    return sorted(candidates, key=lambda run: (run.newest.episode, run.newest.saved_at), reverse=True)
