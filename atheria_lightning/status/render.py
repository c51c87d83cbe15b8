"""``atheria status``'s two outputs: the lines it prints, and the one JSON object of ``--json``."""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

from atheria_lightning.report import LOG_FILE
from atheria_lightning.status.values import iso_seconds

__all__ = ["status_json", "status_lines"]


def status_json(status: dict[str, Any]) -> str:
    """The status as the line ``--json`` prints: strict JSON (the status holds no NaN or infinity)."""
    return json.dumps(status, allow_nan=False)


def status_lines(status: dict[str, Any], now: float | None = None) -> list[str]:
    """The status as the lines ``atheria status`` prints."""
    now = status["checked_at"] if now is None else now
    mirror = status["mirror"]
    shown = f" [{mirror['url']}]" if mirror.get("url") and mirror["url"] != status["run"] else ""
    return [
        f"run:         {status['run']} ({_where_text(status['where'])})",
        f"experiment:  {status['experiment']}" + (f" (phase {status['phase']})" if status["phase"] else ""),
        f"episode:     {_progress_text(status)}",
        "time:        " + (", ".join(_time_used(status)) or f"not recorded (no readable {LOG_FILE})"),
        *_log_age(status, now),
        f"best:        {_best_text(status['best'])}",
        f"checkpoint:  {_checkpoint_text(status['last_checkpoint'], now)}",
        *_sync_lines(status, now),
        f"mirror:      {mirror['detail']}{shown}",
        f"lock:        {_lock_text(status['lock'], now)}",
        *(f"{part + ':':<13}{status[part]['detail']}" for part in ("manifest", "log") if status[part]["state"] != "ok"),
    ]


def _progress_text(status: dict[str, Any]) -> str:
    episode, total, newest = status["episode"], status["total_episodes"], status["last_checkpoint"]
    progress = "none yet" if episode is None else f"{episode} of {total if total is not None else '?'}"
    if episode is not None and total:
        progress += " (finished)" if episode >= total else f" ({100.0 * episode / total:.0f}%)"
    if newest is not None:
        progress += f", newest checkpoint {newest['file']} at episode {newest['episode']}"
    return progress


def _time_used(status: dict[str, Any]) -> list[str]:
    used = []
    if status["sessions"] is not None:
        used.append(f"{status['sessions']} session(s)")
    if status["training_hours"] is not None:
        used.append(f"{_duration(status['training_hours'] * 3600.0)} of training")
    if status["seconds_per_episode"] is not None:
        used.append(f"{status['seconds_per_episode']:.3g} s/episode in the last session")
    if status["recent_seconds_per_episode"] is not None:
        used.append(f"{status['recent_seconds_per_episode']:.3g} s/episode since (from the checkpoints' save times)")
    if status["hours_left"]:
        used.append(f"about {_duration(status['hours_left'] * 3600.0)} of training left at that pace")
    return used


def _log_age(status: dict[str, Any], now: float) -> list[str]:
    """A line under ``time:`` where the checkpoints are newer than the log its figures come from."""
    newest, log_written = status["last_checkpoint"], iso_seconds(status["log"].get("written_at"))
    if log_written is not None and newest is not None and newest["at"] and newest["at"] > log_written + 1:
        return [
            f"             as of {LOG_FILE}, written {_when(log_written, now)}: the checkpoints are newer "
            "(a session is running, or ended without writing it)"
        ]
    return []


def _best_text(best: dict[str, Any] | None) -> str:
    if best is None:
        return "none yet (no best checkpoint listed)"
    return f"{best['monitor']} {best['value']:.4g} at episode {best['episode']} ({best['file']})"


def _checkpoint_text(newest: dict[str, Any] | None, now: float) -> str:
    if newest is None:
        return "none saved yet"
    return f"last saved {_when(newest['at'], now)}{_source(newest['source'])}"


def _sync_lines(status: dict[str, Any], now: float) -> list[str]:
    mirror, sync = status["mirror"], status["last_sync"]
    if sync is not None:
        recorded = ", when the mirror's MANIFEST.json was last written" if sync["source"] != "file time" else ""
        return [f"sync:        last {_when(sync['at'], now)}{recorded}{_source(sync['source'])}"]
    if mirror["state"] == "not read":
        return ["sync:        not checked (the mirror is not read without --follow-mirror)"]
    if mirror["state"] != "none":
        return ["sync:        unknown (no readable MANIFEST.json on the mirror)"]
    return []


def _where_text(where: str) -> str:
    return {
        "run folder": "the run folder",
        "mirror": "a mirror: a copy the trainer syncs",
        "copy": "a copy: not where its run folder or mirror were recorded, e.g. the mirror synced here",
    }.get(where, where)


def _lock_text(lock: dict[str, Any], now: float) -> str:
    if lock["since"] is not None and lock["state"] in ("held", "unknown"):
        return f"{lock['detail']}, since {_when(lock['since'], now)}"
    return lock["detail"]


def _source(source: str) -> str:
    return " (the file's modification time: no time recorded)" if source == "file time" else ""


def _when(at: float | None, now: float) -> str:
    if at is None:
        return "at an unknown time"
    stamp = datetime.fromtimestamp(at).astimezone().strftime("%Y-%m-%d %H:%M:%S %Z")
    age = now - at
    if age < -60:
        return f"{stamp} (ahead of this clock by {_duration(-age)})"
    return f"{stamp} ({_duration(max(age, 0.0))} ago)"


def _duration(seconds: float) -> str:
    if seconds < 10:
        return f"{seconds:.1f} s"
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min"
    if seconds < 48 * 3600:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"
