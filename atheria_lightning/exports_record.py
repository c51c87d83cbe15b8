"""``exports/EXPORTS.json``: the checkpoint state a run's exports were made from, so that stale ones are remade.

At the end of every session (:func:`make_exports`) the run's best checkpoint becomes ``exports/model.ts``, then
``summary.png`` and ``report.md`` are drawn from ``training_log.json`` (which gets ``exported_model`` first). A
session killed in between (SIGKILL, a lost Colab or Kaggle machine) leaves a mix: the new model beside the previous
session's report, a log without its ``exported_model``. Its final checkpoint is already written, so the next start
of the same command finds the run finished and trains nothing: without a record it would keep that mix, and send
it to the mirror. So once every export is in place, ``EXPORTS.json`` is written, last and atomically::

    {"format_version": 1, "written_at": "2025-01-01T12:00:00+00:00",
     "newest_checkpoint": {"file": "last.ckpt", "episode": 60, "sha256": "..."},
     "exported_model": {"file": "best-e000054.ckpt", "episode": 54, "sha256": "..."},
     "files": {"model.ts": {"size": 171411, "sha256": "..."}, "summary.png": {...}, "report.md": {...},
               "training_log.json": {...}}}

``newest_checkpoint`` is the newest checkpoint listed in ``MANIFEST.json`` then (at an equal episode ``last.ckpt``),
``exported_model`` the checkpoint ``model.ts`` was made from (null when none was exported), both as the manifest
lists them (through :meth:`RunStore.entries`: only the store reads the manifest); ``files`` the size and sha256 of
each export present. A start that finds the run finished asks :func:`stale_reason` whether the record still
describes the run: no record (a session killed before writing it, or a run older than the record), a newest
checkpoint or a model source not listed as recorded, or a file missing or not the one recorded all mean the exports
are made again from the final checkpoint before the final flush sends them to the mirror (and ``training_log.json``
from that checkpoint's copy of the log, when the killed session never wrote it:
:meth:`~atheria_lightning.callbacks.TrainingLog.catch_up`). The files are compared by content, not only named: the
mirror sends ``exports/`` file by file in name order, ``EXPORTS.json`` first, so a copy restored from a mirror whose
last upload was cut short can hold a new record beside an old report. A record is read as untrusted input (it may
come from a shared mirror): it is only compared, and only the files named in :data:`RECORDED` are ever read.
"""

from __future__ import annotations

import json
import os
from datetime import datetime, timezone
from typing import Any

from fsspec.implementations.local import LocalFileSystem

from atheria_lightning.export import MODEL_FILE, export_best
from atheria_lightning.files import atomic_write, sha256_of
from atheria_lightning.report import EXPORTS, LOG_FILE, write_report
from atheria_lightning.store import Entry, RunStore
from atheria_lightning.store.manifest import LAST

__all__ = ["RECORDED", "RECORD_FILE", "make_exports", "read_record", "stale_reason", "write_record"]

#: The record, in the run's ``exports/``.
RECORD_FILE = "EXPORTS.json"
RECORD_VERSION = 1
#: The exports a record vouches for, when present: the model, the report's two files, and the log they come from.
RECORDED = (MODEL_FILE, "summary.png", "report.md", LOG_FILE)


def make_exports(store: RunStore, run_dir: str) -> tuple[str, dict[str, Any] | None]:
    """The run's exports, on global rank 0 before the store's final flush: the best checkpoint to ``model.ts``,
    ``summary.png`` and ``report.md`` from ``training_log.json``, then ``EXPORTS.json``, last.

    Returns:
        report.md's path, and what :func:`~atheria_lightning.export.export_best` returned (None: no model).

    Raises:
        ConfigError: ``training_log.json`` is missing or unreadable, or a file cannot be written.
    """
    exports = os.path.join(run_dir, EXPORTS)
    exported = export_best(store, exports)
    report = write_report(run_dir, exported_model=exported)
    write_record(store, exports, exported)
    return report, exported


def write_record(store: RunStore, exports_dir: str, exported: dict[str, Any] | None) -> str:
    """Write ``EXPORTS.json`` for the exports now in ``exports_dir``; returns its path. Call it after every export
    is written: a record vouches for the files as they are."""
    entries = store.entries()
    source = exported.get("from_checkpoint") if exported is not None else None
    record = {
        "format_version": RECORD_VERSION,
        "written_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "newest_checkpoint": _listed(entries, _newest(entries)),
        "exported_model": _listed(entries, source),
        "files": _files(exports_dir),
    }
    path = os.path.join(exports_dir, RECORD_FILE)
    data = json.dumps(record, indent=1).encode()
    atomic_write(LocalFileSystem(), path, lambda handle: handle.write(data))
    return path


def read_record(exports_dir: str) -> dict[str, Any] | None:
    """``EXPORTS.json`` of ``exports_dir`` as a dict; None when it is missing, unreadable or not a record."""
    try:
        with open(os.path.join(exports_dir, RECORD_FILE), "rb") as handle:
            record = json.loads(handle.read())
    except (OSError, ValueError):
        return None
    valid = isinstance(record, dict) and record.get("format_version") == RECORD_VERSION
    return record if valid and isinstance(record.get("files"), dict) else None


def stale_reason(store: RunStore, run_dir: str) -> str | None:
    """Why the exports of ``run_dir`` are not those of its newest checkpoint, in a few words; None when they are."""
    exports = os.path.join(run_dir, EXPORTS)
    record = read_record(exports)
    if record is None:
        return f"no readable {EXPORTS}/{RECORD_FILE} says what they were made from"
    entries = store.entries()
    newest = _newest(entries)
    made = record.get("newest_checkpoint")
    if made != _listed(entries, newest):
        episode = made.get("episode") if isinstance(made, dict) else None
        at = f"at episode {episode}" if isinstance(episode, int) else "from another checkpoint"
        now = f"{newest} of episode {entries[newest].episode}" if newest is not None else "none"
        return f"they were made {at}, the run's newest checkpoint is {now}"
    model = record.get("exported_model")
    source = model.get("file") if isinstance(model, dict) else None
    if model is not None and (not isinstance(source, str) or model != _listed(entries, source)):
        return f"the checkpoint {MODEL_FILE} was made from is no longer listed as it was"
    files = _files(exports)
    if files != record["files"]:
        # Only the names this module knows are quoted: the record's own keys are untrusted text.
        changed = [name for name in RECORDED if files.get(name) != record["files"].get(name)] or [RECORD_FILE]
        return f"{', '.join(changed)}: missing, or not as recorded"
    return None


def _newest(entries: dict[str, Entry]) -> str | None:
    """The newest listed checkpoint's name, as the store resumes from it: at an equal episode ``last.ckpt``."""
    if not entries:
        return None
    return max(entries.items(), key=lambda item: (item[1].episode, item[0] == LAST))[0]


def _listed(entries: dict[str, Entry], name: str | None) -> dict[str, Any] | None:
    entry = entries.get(name) if name is not None else None
    return None if entry is None else {"file": name, "episode": entry.episode, "sha256": entry.sha256}


def _files(exports_dir: str) -> dict[str, dict[str, Any]]:
    """Size and sha256 of each file of :data:`RECORDED` present in ``exports_dir``."""
    local, found = LocalFileSystem(), {}
    for name in RECORDED:
        path = os.path.join(exports_dir, name)
        try:
            found[name] = {"size": os.path.getsize(path), "sha256": sha256_of(local, path)}
        except OSError:  # missing or unreadable: not what a record vouches for, so a start makes it again
            continue
    return found
