"""Where a run stands, judged from what status/read.py read: progress, pace, best, lock, mirror."""

from __future__ import annotations

import itertools
import os
import socket
import time
from typing import Any

import psutil
from fsspec import AbstractFileSystem
from fsspec.implementations.local import LocalFileSystem

from atheria_lightning.lock import HOLDER_NAME, LOCK_NAME
from atheria_lightning.status.mirror import (
    NOT_FOLLOWED,
    MirrorPlace,
    compare_with_mirror,
    mirror_location,
    self_report,
)
from atheria_lightning.status.read import (
    RunFiles,
    basename,
    manifest_written,
    mtime,
    read_run,
)
from atheria_lightning.status.values import (
    as_int,
    as_list,
    as_number,
    as_text,
    as_time,
    callback_args,
    iso_seconds,
    lookup,
)
from atheria_lightning.store import retention
from atheria_lightning.store.manifest import CHECKPOINTS, Entry, Manifest, kind_of

__all__ = ["run_status"]

#: A process started this long after the lock record's time is another process that reused the pid.
PID_START_SLACK_S = 2.0


def run_status(run: str, now: float | None = None, follow_mirror: bool = False) -> dict[str, Any]:
    """The status of run ``run`` (a folder or an fsspec URL) as the dict ``--json`` prints; ``follow_mirror``
    reads the mirror that ``run``'s config names, too.

    Raises:
        ConfigError: ``run`` does not exist, cannot be opened, or holds none of a run's files.
    """
    now = time.time() if now is None else now
    files = read_run(run)
    log, config, local = files.log, files.config, isinstance(files.fs, LocalFileSystem)
    # Only a local RUN can be a trainer's run folder; a mirror's own config is never followed elsewhere.
    mirror = mirror_location(config, basename(files.root), follow_mirror) if local else None
    where = _where(files.fs, files.root, log, config, mirror)
    newest = _newest(files.manifest, files.fs, files.root)
    progress = _progress(files.manifest, log, config, newest)
    mirror_state, last_sync = _mirror_status(files, mirror, where, progress["total_episodes"], run)
    return {
        "run": run,
        "where": where,
        "experiment": as_text(log.get("experiment")) or as_text(config.get("experiment_name")) or basename(files.root),
        "phase": as_text(log.get("phase")),
        **progress,
        "best": _best(files.manifest, log, config),
        "last_checkpoint": newest,
        "last_sync": last_sync,
        "mirror": mirror_state,
        "lock": _lock_status(files.holder, files.lock_file, where, local),
        "manifest": files.manifest_state,
        "log": files.log_state,
        "checked_at": now,
    }


def _progress(
    manifest: Manifest | None, log: dict[str, Any], config: dict[str, Any], newest: dict[str, Any] | None
) -> dict[str, Any]:
    """The status's keys from ``episode`` to ``hours_left``: how far the run is, the time it took, the time left."""
    log_done = as_int(log.get("episodes_done"))
    episodes = [value for value in (newest["episode"] if newest else None, log_done) if value is not None]
    episode = max(episodes) if episodes else None
    total = as_int(log.get("total_episodes")) or as_int(lookup(config, "data", "total_episodes"))
    sessions = [session for session in as_list(log.get("sessions")) if isinstance(session, dict)]
    seconds_per_episode = _seconds_per_episode(sessions)
    log_written = iso_seconds(as_text(log.get("written_at")))
    recent = _recent_seconds_per_episode(manifest, log_written)
    pace = recent if recent is not None else seconds_per_episode
    left = None
    if pace is not None and total is not None and episode is not None:
        left = as_number(max(0, total - episode) * pace / 3600.0)  # None where absurd values overflow
    time_used = log.get("time") if isinstance(log.get("time"), dict) else {}
    return {
        "episode": episode,
        "total_episodes": total,
        "sessions": as_int(time_used.get("sessions")),
        "training_hours": as_number(time_used.get("total_training_hours")),
        "seconds_per_episode": seconds_per_episode,
        "recent_seconds_per_episode": recent,
        "hours_left": left,
    }


def _mirror_status(
    files: RunFiles, mirror: MirrorPlace | str | None, where: str, total: int | None, run: str
) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """The status's ``mirror`` and ``last_sync``: a run folder against its mirror, or what a mirror says of itself."""
    state, last_sync = (None, None) if where == "mirror" else compare_with_mirror(files.manifest, mirror)
    if state is None or (where == "copy" and state["state"] in ("unknown", "none", "not read")):
        # A mirror, or a copy whose recorded mirror is not read or out of reach here (the Drive mirror synced to a
        # laptop, where mirror_url "auto" means none), knows only what it says about itself.
        named = state if where == "copy" and state["state"] == "not read" else None
        state = self_report(files.manifest, files.log, total, run)
        last_sync = manifest_written(files.manifest, files.fs, files.root)
        if named is not None:
            state["detail"] += f"; its recorded mirror {named['url']} {NOT_FOLLOWED}"
    return {key: state[key] for key in ("state", "url", "episode", "detail")}, last_sync


def _where(
    fs: AbstractFileSystem, root: str, log: dict[str, Any], config: dict[str, Any], mirror: MirrorPlace | str | None
) -> str:
    """What RUN is: the trainer's run folder, its mirror, or a copy of the run (neither)."""
    if not isinstance(fs, LocalFileSystem):
        return "mirror"  # a trainer writes its run folder on its own disk
    # Paths from the files are compared as text, never looked up: looking one up may mount or call a host.
    here = {os.path.abspath(root), os.path.realpath(root)}
    if isinstance(mirror, MirrorPlace) and isinstance(mirror.fs, LocalFileSystem | None):  # a path, not a URL
        if mirror.folder and _at(mirror.folder, here):
            return "mirror"
    recorded = as_text(log.get("run_dir"))
    if recorded is None and as_text(config.get("run_root")) and as_text(config.get("experiment_name")):
        recorded = os.path.join(str(config["run_root"]), str(config["experiment_name"]))
    if recorded is None or _at(recorded, here):
        return "run folder"
    return "copy"


def _at(path: str, here: set[str]) -> bool:
    return os.path.abspath(os.path.expanduser(path)) in here


def _newest(manifest: Manifest | None, fs: AbstractFileSystem, root: str) -> dict[str, Any] | None:
    if not manifest or not manifest.files:
        return None
    name, entry = manifest.newest_first()[0]
    if as_time(entry.saved_at) is not None:
        return {"file": name, "episode": entry.episode, "at": entry.saved_at, "source": "manifest"}
    # Manifests of earlier versions recorded no save time: the file's own time is the next best.
    return {
        "file": name,
        "episode": entry.episode,
        "at": mtime(fs, root, f"{CHECKPOINTS}/{name}"),
        "source": "file time",
    }


def _best(manifest: Manifest | None, log: dict[str, Any], config: dict[str, Any]) -> dict[str, Any] | None:
    """The best checkpoint kept, by the store's retention rule: of the manifest, else of the log's list."""
    configured = callback_args(config, "SmartCheckpoint").get("monitor")
    monitor = as_text(log.get("monitor")) or as_text(configured) or "val/combined"
    ranked = retention.best(manifest.files if manifest is not None else _logged_entries(log))
    if not ranked:
        return None
    name, entry = ranked[0]
    return {"monitor": monitor, "value": as_number(entry.metric), "episode": entry.episode, "file": name}


def _logged_entries(log: dict[str, Any]) -> dict[str, Entry]:
    """The checkpoints the log lists (the manifest's entries when its session ended) as entries to rank: without
    their hash, which ranking never reads."""
    entries: dict[str, Entry] = {}
    for item in as_list(log.get("checkpoints")):
        if isinstance(item, dict):
            name = as_text(item.get("file")) or "?"
            episode, size, metric = as_int(item.get("episode")) or 0, as_int(item.get("size")) or 0, item.get("metric")
            entries[name] = Entry(episode, size, sha256="", metric=as_number(metric), kind=kind_of(name))
    return entries


def _seconds_per_episode(sessions: list[dict[str, Any]]) -> float | None:
    """The last recorded session's pace (the recent one: a resumed run may be on another GPU)."""
    for session in reversed(sessions):
        count, seconds = as_int(session.get("episodes")), as_number(session.get("training_seconds"))
        if count and seconds is not None:
            return seconds / count
    return None


#: Consecutive checkpoints looked at for the recent pace: the newest, where the current session is.
RECENT_PAIRS = 4


def _recent_seconds_per_episode(manifest: Manifest | None, since: float | None) -> float | None:
    """The pace of the sessions the log does not hold yet, from the save times of checkpoints written after it
    (``since``, to the second; all of them without a log): the fastest of the newest few consecutive pairs, because
    a pair across a restart also holds the time the run was down."""
    if manifest is None:
        return None
    fresh = [entry for entry in manifest.files.values() if since is None or entry.saved_at > since + 1]
    saved = sorted((entry.episode, entry.saved_at) for entry in fresh if as_time(entry.saved_at) is not None)
    paces = [(later_at - at) / (later - episode) for (episode, at), (later, later_at) in itertools.pairwise(saved)
             if later > episode and later_at > at]  # fmt: skip
    return min(paces[-RECENT_PAIRS:]) if paces else None


def _lock_status(holder: dict[str, Any] | None, lock_file: bool, where: str, local: bool) -> dict[str, Any]:
    status: dict[str, Any] = {"state": "unknown", "host": None, "pid": None, "since": None, "run_id": None}
    if holder is None:
        if lock_file:
            detail = f"{LOCK_NAME} is there without a readable {HOLDER_NAME} (a trainer starting, or killed early)"
        elif where == "run folder":
            return {**status, "state": "free", "detail": "free: no trainer holds this folder"}
        else:
            detail = (
                "not mirrored (it stays in the trainer's own run folder): whether a trainer runs cannot be "
                "seen from here"
            )
        return {**status, "detail": detail}
    host, pid = as_text(holder.get("host")), as_int(holder.get("pid"))
    since, run_id = as_time(holder.get("started")), as_text(holder.get("run_id"))
    status.update(host=host, pid=pid, since=since, run_id=run_id)
    who = f"run {run_id} (pid {pid} on {host})"
    if not local or host != socket.gethostname() or not pid:
        return {**status, "detail": f"recorded by {who}: its process cannot be checked from here"}
    if _alive(pid, since):
        return {**status, "state": "held", "detail": f"held by {who}"}
    return {
        **status,
        "state": "stale",
        "detail": f"free: {who} is no longer running (killed); its record stays until the next fit",
    }


def _alive(pid: int, since: float | None) -> bool:
    """Whether ``pid`` is the live process that wrote the record at ``since`` (not a later one reusing its pid)."""
    try:
        process = psutil.Process(pid)
        if process.status() == psutil.STATUS_ZOMBIE:
            return False  # ended: its lock went with its file descriptors
        return since is None or process.create_time() <= since + PID_START_SLACK_S
    except psutil.NoSuchProcess:
        return False
    except psutil.AccessDenied:  # someone else's process: alive, and not ours to inspect further
        return True
