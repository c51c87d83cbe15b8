"""The mirror a run names, and the run against it: up to date, behind, ahead, or unknown from here."""

from __future__ import annotations

from typing import Any, NamedTuple

from fsspec import AbstractFileSystem
from fsspec.implementations.local import LocalFileSystem
from fsspec.utils import get_protocol

from atheria_lightning.errors import ConfigError
from atheria_lightning.files import join
from atheria_lightning.platform import default_mirror_url
from atheria_lightning.status.read import CONFIG_FILE, manifest_written, read_manifest
from atheria_lightning.status.values import as_int, as_list, as_text, callback_args, one_line
from atheria_lightning.store.manifest import CHECKPOINTS, MANIFEST_NAME, Manifest, same
from atheria_lightning.store.mirror import remote_run_dir

__all__ = ["NOT_FOLLOWED", "MirrorPlace", "compare_with_mirror", "mirror_location", "self_report"]


#: What the status says of a mirror it names without reading it.
NOT_FOLLOWED = f"is not read (named in {CONFIG_FILE}): atheria status --follow-mirror compares with it"


class MirrorPlace(NamedTuple):
    """Where a run's config says it is mirrored."""

    #: The mirror's folder as messages name it.
    shown: str
    #: Its filesystem, opened only with ``--follow-mirror``; None without it.
    fs: AbstractFileSystem | None
    #: Its folder on ``fs``; without ``fs``, the path of a mirror on a local path (else None: nothing is opened).
    folder: str | None


def mirror_location(config: dict[str, Any], experiment: str, follow: bool) -> MirrorPlace | str | None:
    """Where the session's config says the run is mirrored (opened if ``follow``); a line saying why it cannot be
    opened from here; or None without a mirror."""
    # MirrorSync's own url, else mirror_url: the trainer's order. "auto" is resolved for this platform, as the
    # trainer did on its own (a run folder is read on the machine that trains it).
    sync = callback_args(config, "MirrorSync")
    url = sync.get("url") or config.get("mirror_url")
    if url == "auto":
        url = default_mirror_url()
    if not isinstance(url, str) or not url.strip():
        return None
    options = sync.get("storage_options")
    shown = as_text(join(url, experiment)) or "?"
    if not follow:  # a path is only a name too: it may be a network mount, an automounted host, a share
        local = get_protocol(url) == "file"
        return MirrorPlace(shown, None, LocalFileSystem._strip_protocol(join(url, experiment)) if local else None)
    try:
        fs, folder = remote_run_dir(url, experiment, options if isinstance(options, dict) else None)
    except ConfigError as err:
        return f"{shown} cannot be opened from here ({one_line(err)})"
    return MirrorPlace(shown, fs, folder)


def compare_with_mirror(
    manifest: Manifest | None, mirror: MirrorPlace | str | None
) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """A run folder (or a copy of one) against the mirror its config names."""
    if mirror is None:
        return {
            "state": "none",
            "url": None,
            "episode": None,
            "detail": f"none (mirror_url null, or no {CONFIG_FILE} naming one)",
        }, None
    if isinstance(mirror, str):
        return {"state": "unknown", "url": None, "episode": None, "detail": mirror}, None
    mirror_dir, fs, root = mirror
    if fs is None:
        return {"state": "not read", "url": mirror_dir, "episode": None, "detail": f"the mirror {NOT_FOLLOWED}"}, None
    unknown = {"state": "unknown", "url": mirror_dir, "episode": None}
    remote, state = read_manifest(fs, root, f"{mirror_dir}/")
    last_sync = manifest_written(remote, fs, root)
    if remote is None:
        if state["state"] == "missing":
            detail = f"{mirror_dir} has no {CHECKPOINTS}/{MANIFEST_NAME} (nothing synced yet, or not reachable here)"
        else:
            detail = state["detail"]
        return {**unknown, "detail": detail}, last_sync
    theirs = remote.newest_episode()
    mirror = {"url": mirror_dir, "episode": theirs if theirs >= 0 else None}
    if manifest is None:
        return {
            **mirror,
            "state": "unknown",
            "detail": f"the mirror holds episode {max(theirs, 0)}; this folder's manifest cannot be read",
        }, last_sync
    ours = manifest.newest_episode()
    unsent = sorted(name for name, entry in manifest.files.items() if not same(remote.files.get(name), entry))
    if theirs > ours:
        return {
            **mirror,
            "state": "ahead",
            "detail": f"ahead: the mirror holds episode {theirs}, this folder {max(ours, 0)} (trained elsewhere since)",
        }, last_sync
    if unsent:
        return {
            **mirror,
            "state": "behind",
            "detail": f"behind: the mirror holds episode {max(theirs, 0)}, this folder {ours} "
            f"(not sent yet: {', '.join(unsent)})",
        }, last_sync
    return {**mirror, "state": "up to date", "detail": f"up to date at episode {ours}"}, last_sync


def self_report(manifest: Manifest | None, log: dict[str, Any], total: int | None, run: str) -> dict[str, Any]:
    """A mirror against what its own training_log.json says the run folder held when the log was written."""
    status: dict[str, Any] = {"state": "unknown", "url": run, "episode": None}
    if manifest is None:
        return {**status, "detail": "its manifest cannot be read"}
    newest = manifest.newest_episode()
    status["episode"] = newest if newest >= 0 else None
    logged_done = as_int(log.get("episodes_done"))
    logged = {
        str(as_text(item.get("file"))): (as_int(item.get("episode")), as_int(item.get("size")))
        for item in as_list(log.get("checkpoints"))
        if isinstance(item, dict)
    }
    listed = {name: (entry.episode, entry.size) for name, entry in manifest.files.items()}
    missing = sorted(name for name, described in logged.items() if listed.get(name) != described)
    if logged_done is None:
        return {**status, "detail": "no training_log.json to compare with; the run folder cannot be seen from here"}
    if newest > logged_done:  # the log is older than the checkpoints: nothing to compare them with
        return {
            **status,
            "detail": f"unknown: checkpoints up to episode {newest}, newer than its training_log.json "
            f"(episode {logged_done}): a session is running, or ended without writing it",
        }
    if missing or logged_done > newest:
        lacks = f" (lacks {', '.join(missing)})" if missing else ""
        return {
            **status,
            "state": "behind",
            "detail": f"behind: its training_log.json says the run reached episode {logged_done}, its newest "
            f"checkpoint is episode {max(newest, 0)}{lacks}: the last sync did not finish",
        }
    if total is not None and newest >= total:
        return {
            **status,
            "state": "up to date",
            "detail": f"up to date: the run finished (episode {newest} of "
            f"{total}) and every checkpoint it listed is here",
        }
    return {
        **status,
        "detail": f"unknown from here: it holds all its training_log.json lists (episode {logged_done}); "
        "a later session may have trained further",
    }
