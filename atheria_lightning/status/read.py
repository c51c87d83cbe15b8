"""The files of a run that status reads: each bounded and untrusted, in a local folder or at any fsspec URL."""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from fsspec import AbstractFileSystem
from fsspec.core import url_to_fs
from fsspec.utils import get_protocol

from atheria_lightning.errors import ConfigError
from atheria_lightning.lock import HOLDER_NAME, LOCK_NAME
from atheria_lightning.report import EXPORTS, LOG_FILE, MAX_LOG_BYTES, parse_training_log
from atheria_lightning.status.values import as_text, as_time, iso_seconds, one_line
from atheria_lightning.store.manifest import CHECKPOINTS, MANIFEST_NAME, DamagedManifest, Manifest, parse_as_is
from atheria_lightning.untrusted import (
    MAX_SMALL_FILE,
    UntrustedFileError,
    info_of,
    load_json,
    load_yaml,
    read_bounded,
)

__all__ = [
    "CONFIG_FILE",
    "RunFiles",
    "basename",
    "manifest_written",
    "mtime",
    "open_run",
    "read_config",
    "read_lock",
    "read_log",
    "read_manifest",
    "read_run",
]

#: The session's settings as LightningCLI saved them: where the run says its mirror is.
CONFIG_FILE = "logs/config.yaml"


@dataclass(frozen=True)
class RunFiles:
    """A run's files as read: each parsed, or absent with its state saying why."""

    fs: AbstractFileSystem
    root: str
    manifest: Manifest | None
    manifest_state: dict[str, Any]
    #: ``exports/training_log.json``; empty without a readable one.
    log: dict[str, Any]
    log_state: dict[str, Any]
    config: dict[str, Any]
    #: The lock's holder record, and whether the lock file itself is there.
    holder: dict[str, Any] | None
    lock_file: bool


def read_run(run: str) -> RunFiles:
    """Every file status reads of RUN (a folder or an fsspec URL), the mirror aside.

    Raises:
        ConfigError: ``run`` does not exist, cannot be opened, or holds none of a run's files.
    """
    fs, root = open_run(run)
    manifest, manifest_state = read_manifest(fs, root, "")
    training_log, log_state = read_log(fs, root)
    config = read_config(fs, root)
    holder, lock_file = read_lock(fs, root)
    if manifest_state["state"] == "missing" and log_state["state"] == "missing" and holder is None and not lock_file:
        raise ConfigError(
            f"RUN={run!r} is not a run folder: it has no {CHECKPOINTS}/{MANIFEST_NAME}, no {EXPORTS}/{LOG_FILE} "
            f"and no {LOCK_NAME}; give <run_root>/<experiment_name> or its mirror <mirror_url>/<experiment_name>"
        )
    return RunFiles(fs, root, manifest, manifest_state, training_log or {}, log_state, config, holder, lock_file)


def open_run(run: str) -> tuple[AbstractFileSystem, str]:
    """The filesystem and folder of RUN, a path or an fsspec URL; a ConfigError unless it is a folder there."""
    if get_protocol(run) == "file" and "://" not in run:
        run = os.path.expanduser(run)  # as a shell would have; fsspec leaves "~" alone
    try:
        fs, root = url_to_fs(run)
    except Exception as err:  # an unknown protocol, a missing package, bad credentials: each backend has its own
        raise ConfigError(f"RUN={run!r} cannot be opened: {one_line(err)}") from None
    root = root.rstrip("/") or root
    try:
        fs.invalidate_cache()  # s3fs and gcsfs cache listings; --watch must see new files
        found = fs.isdir(root)
    except Exception as err:  # unreachable, denied
        raise ConfigError(f"RUN={run!r} cannot be read: {one_line(err)}") from None
    if not found:
        raise ConfigError(f"RUN={run!r} does not exist (or is not a folder): give a run folder or its mirror URL")
    return fs, root


def read_manifest(fs: AbstractFileSystem, root: str, label: str) -> tuple[Manifest | None, dict[str, Any]]:
    """The manifest of the run folder ``root`` as written (never rebuilt: that reads checkpoints), and its state."""
    where = f"{label}{CHECKPOINTS}/{MANIFEST_NAME}"
    try:
        manifest = parse_as_is(read_bounded(fs, root, f"{CHECKPOINTS}/{MANIFEST_NAME}", MAX_SMALL_FILE), where)
    except FileNotFoundError:
        return None, {"state": "missing", "detail": f"{where} is missing (no checkpoint saved yet)"}
    except DamagedManifest as err:
        return None, {
            "state": "damaged",
            "detail": f"{where} is damaged ({one_line(err)}); the next fit rebuilds it from the checkpoint files",
        }
    except UntrustedFileError as err:  # a link, not a file, too large, unreadable
        return None, {"state": "damaged", "detail": f"{where} {one_line(err)}"}
    except Exception as err:  # nested too deep for json
        return None, {"state": "damaged", "detail": f"{where} cannot be read ({one_line(err)})"}
    return manifest, {"state": "ok", "detail": f"{where}: {len(manifest.files)} checkpoint(s) listed"}


def read_log(fs: AbstractFileSystem, root: str) -> tuple[dict[str, Any] | None, dict[str, Any]]:
    """``exports/training_log.json`` through the report's own parser, and its state."""
    where = f"{EXPORTS}/{LOG_FILE}"
    try:
        training_log = parse_training_log(read_bounded(fs, root, where, MAX_LOG_BYTES))
    except FileNotFoundError:
        state = {"state": "missing", "detail": f"{where} is missing (it is written when a session ends)"}
        return None, {**state, "written_at": None}
    except Exception as err:  # truncated, not JSON, not a log, unreadable, a link, too large
        return None, {"state": "damaged", "detail": f"{where} {one_line(err)}", "written_at": None}
    written = as_text(training_log.get("written_at"))
    return training_log, {
        "state": "ok",
        "detail": f"{where} written {written or 'at an unrecorded time'}",
        "written_at": written,
    }


def read_config(fs: AbstractFileSystem, root: str) -> dict[str, Any]:
    """``logs/config.yaml`` as a dict; empty when missing or not a mapping (it only adds to what the log says)."""
    try:
        config = load_yaml(read_bounded(fs, root, CONFIG_FILE, MAX_SMALL_FILE))
    except Exception:  # missing, unreadable, not YAML, a link, too large: the status says what it can without it
        return {}
    return config if isinstance(config, dict) else {}


def read_lock(fs: AbstractFileSystem, root: str) -> tuple[dict[str, Any] | None, bool]:
    """The lock's holder record (or None) and whether the lock file itself is there."""
    try:
        info_of(fs, root, LOCK_NAME)
        lock_file = True
    except Exception:  # absent, unreadable: as if absent
        lock_file = False
    try:
        holder = load_json(read_bounded(fs, root, HOLDER_NAME, MAX_SMALL_FILE))
    except Exception:  # none, or being written or removed right now
        return None, lock_file
    return (holder if isinstance(holder, dict) else None), lock_file


def manifest_written(manifest: Manifest | None, fs: AbstractFileSystem, root: str) -> dict[str, Any] | None:
    """When the manifest of a mirror's folder ``root`` was last written: at every sync that changed its checkpoints."""
    if manifest is not None and as_time(manifest.updated) is not None:
        return {"at": manifest.updated, "source": "mirror manifest"}
    at = mtime(fs, root, f"{CHECKPOINTS}/{MANIFEST_NAME}")
    return None if at is None else {"at": at, "source": "file time"}


def basename(root: str) -> str:
    return root.rstrip("/").rsplit("/", 1)[-1]


def mtime(fs: AbstractFileSystem, root: str, name: str) -> float | None:
    """The modification time of ``<root>/<name>`` from its fsspec ``info`` (each backend names it its own way), no
    link below ``root`` followed; or None."""
    try:
        info = info_of(fs, root, name)
    except Exception:  # missing or unreadable: no time to give
        return None
    for key in ("mtime", "LastModified", "last_modified", "updated", "created"):
        value = info.get(key)
        if isinstance(value, datetime):
            return as_time(value.timestamp())
        if as_time(value) is not None:
            return float(value)
        if isinstance(value, str) and (seconds := as_time(iso_seconds(value.replace("Z", "+00:00")))) is not None:
            return seconds
    return None
