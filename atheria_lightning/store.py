"""RunStore: the one owner of a run folder's checkpoints, MANIFEST.json, retention, mirror uploads and choices.

Callbacks decide *when* (episode cadence, validation, time budget, signals); the store does *how*:

- every checkpoint write (atomic, hashed while written, journalled in ``MANIFEST.json`` before its rename, in a
  background thread) and every read or write of a ``MANIFEST.json``, local or mirrored, happens here;
- retention: ``last.ckpt`` plus the ``top_k`` best files by their metric, decided from the manifest itself, so it
  holds across kills, resumes and a changed folder;
- the mirror: each write tells the mirror's queue what to send; a sync sends what is queued, writes the mirror's
  manifest, then removes what retention dropped; a flush waits for that with a bound;
- the start of every session: a damaged manifest is rebuilt from the files, the mirror and the local folder are
  compared, what the mirror has newer is downloaded (verified), what it lacks is queued for upload;
- the choices: the checkpoint to resume from (newest) and the one to export or hand to the next phase (best).

Manifest layout (``<run>/checkpoints/MANIFEST.json``, the same on the mirror)::

    {"version": 1, "updated": 1732600000.0,
     "files": {"last.ckpt": {"episode": 40, "metric": 1.23, "size": 1391075, "sha256": "ab...", "kind": "last",
                             "saved_at": 1732600000.0}},
     "pending": {...}}

An entry's name is ``last.ckpt`` or ``best-eNNNNNN.ckpt``; any other name (a separator, ``..``, an absolute path)
is refused, so nothing read from a manifest is ever written outside ``<run>/checkpoints/``. ``pending`` journals a
write whose file may already be in place but is not yet listed: a kill between the rename and the listing leaves a
file that verifies against its pending entry.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import posixpath
import random
import re
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import asdict, dataclass, field, replace
from io import BytesIO
from typing import IO, Any

import fsspec
import lightning.pytorch as pl
import torch
from fsspec import AbstractFileSystem
from fsspec.core import url_to_fs
from fsspec.implementations.local import LocalFileSystem
from fsspec.registry import known_implementations
from fsspec.utils import get_protocol
from lightning.fabric.plugins import CheckpointIO
from lightning.fabric.utilities.cloud_io import _load as pl_load
from lightning.fabric.utilities.types import _PATH
from lightning_utilities.core.apply_func import apply_to_collection
from typing_extensions import Self, override

from atheria_lightning.errors import ConfigError, require
from atheria_lightning.files import (
    TMP_MARKER,
    MeasuredWriter,
    atomic_write,
    copy_measured,
    join,
    remove_stale_tmp,
    tmp_path_for,
    verify,
)

log = logging.getLogger(__name__)

__all__ = [
    "Checkpoint",
    "Entry",
    "MirrorStatus",
    "RunStore",
    "UsesRunStore",
    "best_name",
    "check_mirror_url",
    "is_checkpoint_name",
]

CHECKPOINTS = "checkpoints"
MANIFEST_NAME = "MANIFEST.json"
MANIFEST_VERSION = 1
LAST = "last.ckpt"
_BEST = re.compile(r"best-e(\d{6,9})\.ckpt")
_SHA256 = re.compile(r"[0-9a-f]{64}")
#: Files that fail verification or do not load are moved here, never deleted: a person may want to look at them.
QUARANTINE = "corrupt"
#: Checkpoint files a sound manifest does not list (not written by this run's store) are moved here, never deleted.
UNLISTED = "unlisted"
#: Key of the metadata the store puts into every checkpoint it writes: the episode count and the monitored metric,
#: so that a manifest can be rebuilt from the files alone.
META_KEY = "atheria"
#: Folders copied to the mirror file by file when their size or mtime changed; checkpoints go through the queue.
PLAIN_FOLDERS = ("logs", "exports")
#: Protocols named in the error for an unknown one: the ones this app is used with.
COMMON_PROTOCOLS = ("a plain folder", "file://", "memory://", "s3://", "gs://", "gcs://", "sftp://")
#: Optional dependency groups of atheria_lightning that provide a protocol's filesystem.
EXTRAS = {"s3": "s3", "s3a": "s3", "gs": "gcs", "gcs": "gcs"}
#: Marks "not queued" apart from ``None`` (queued for removal) in the mirror's queue.
_NOTHING = object()
#: After a bounded flush the mirror worker is idle or stuck in a hung upload; waiting longer would not help.
JOIN_TIMEOUT_S = 5.0


# ----- names and entries -----
def best_name(episode: int) -> str:
    """The file name of the best checkpoint kept at ``episode``."""
    return f"best-e{episode:06d}.ckpt"


def is_checkpoint_name(name: str) -> bool:
    """True for the only names a manifest may list: ``last.ckpt`` and ``best-eNNNNNN.ckpt``."""
    return name == LAST or _BEST.fullmatch(name) is not None


def _kind_of(name: str) -> str:
    return "last" if name == LAST else "best"


@dataclass(frozen=True)
class Entry:
    """What a trusted checkpoint file must be: its episode count, metric, size and sha256."""

    episode: int
    size: int
    sha256: str
    metric: float | None = None
    kind: str = "best"  # "last" or "best", always that of the file's name
    saved_at: float = 0.0

    @property
    def ranked_metric(self) -> float:
        """The metric for ranking best files: lower is better, a missing or non-finite one last."""
        return self.metric if self.metric is not None and math.isfinite(self.metric) else math.inf


class DamagedManifest(ValueError):
    """A manifest that is not JSON, or not of the expected shape."""


@dataclass
class Manifest:
    files: dict[str, Entry] = field(default_factory=dict)
    pending: dict[str, Entry] = field(default_factory=dict)
    updated: float = 0.0

    def to_json(self) -> bytes:
        files = {name: asdict(entry) for name, entry in sorted(self.files.items())}
        data: dict[str, Any] = {"version": MANIFEST_VERSION, "updated": self.updated, "files": files}
        if self.pending:
            data["pending"] = {name: asdict(entry) for name, entry in sorted(self.pending.items())}
        return json.dumps(data, indent=1).encode()

    def newest_first(self) -> list[tuple[str, Entry]]:
        """Entries by episode, newest first; at an equal episode ``last.ckpt`` first."""
        return sorted(self.files.items(), key=lambda item: (item[1].episode, item[0] == LAST), reverse=True)

    def newest_episode(self) -> int:
        return max((entry.episode for entry in self.files.values()), default=-1)

    def ranked_best(self) -> list[tuple[str, Entry]]:
        """Best files, the best first (lowest metric; at an equal metric the earlier episode)."""
        bests = [(name, entry) for name, entry in self.files.items() if name != LAST]
        return sorted(bests, key=lambda item: (item[1].ranked_metric, item[1].episode))


def _parse_manifest(text: str | bytes, where: str) -> Manifest:
    """A manifest from its JSON; entries with names the store does not write are refused, one line each.

    Raises:
        DamagedManifest: Not JSON, not version 1, or an entry of the wrong shape.
    """
    try:
        data = json.loads(text)
    except ValueError as err:
        raise DamagedManifest(f"not JSON ({err})") from None
    if not isinstance(data, dict) or data.get("version") != MANIFEST_VERSION:
        raise DamagedManifest(f"not a version-{MANIFEST_VERSION} manifest")
    sections = {key: data.get(key, {}) for key in ("files", "pending")}
    if not all(isinstance(section, dict) for section in sections.values()):
        raise DamagedManifest("'files' and 'pending' must be mappings")
    manifest = Manifest(updated=_number(data.get("updated", 0.0), "updated"))
    for key, section in sections.items():
        for name, raw in section.items():
            if not isinstance(name, str) or not is_checkpoint_name(name):
                log.warning("%s lists %r: refused (a manifest entry must be last.ckpt or best-eNNNNNN.ckpt)",
                            where, name)  # fmt: skip
                continue
            getattr(manifest, key)[name] = _entry(raw, name)
    return manifest


def _entry(raw: Any, name: str) -> Entry:
    if not isinstance(raw, dict):
        raise DamagedManifest(f"entry {name!r} is not a mapping")
    episode, size, sha256 = raw.get("episode"), raw.get("size"), raw.get("sha256")
    if not (_is_int(episode) and episode >= 0 and _is_int(size) and size >= 0):
        raise DamagedManifest(f"entry {name!r} needs whole numbers episode >= 0 and size >= 0")
    if not isinstance(sha256, str) or _SHA256.fullmatch(sha256) is None:
        raise DamagedManifest(f"entry {name!r} needs a sha256 of 64 hex digits")
    metric = raw.get("metric")
    metric = None if metric is None else _number(metric, f"{name}.metric")
    return Entry(episode, size, sha256, metric, _kind_of(name), _number(raw.get("saved_at", 0.0), f"{name}.saved_at"))


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _number(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise DamagedManifest(f"{what} must be a number")
    return float(value)


def _describe_checkpoint(data: bytes, name: str) -> tuple[int, float | None]:
    """The episode count and metric of a checkpoint, read from its content (``weights_only=True``).

    Raises:
        ValueError: It does not load as a Lightning checkpoint of tensors and plain values.
    """
    try:
        checkpoint = torch.load(BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as err:  # any unpickling or archive error: the file is not a checkpoint we can trust
        raise ValueError(" ".join(str(err).split())[:200] or type(err).__name__) from None
    return _meta_of(checkpoint, name)


def _meta_of(checkpoint: Any, name: str) -> tuple[int, float | None]:
    """A loaded checkpoint's episode count (the store's metadata, else the file name, else the global step) and
    metric; ``ValueError`` when it is not a Lightning checkpoint."""
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("state_dict"), dict):
        raise ValueError("not a Lightning checkpoint (no state_dict)")
    meta = checkpoint.get(META_KEY) if isinstance(checkpoint.get(META_KEY), dict) else {}
    episode = meta.get("episode")
    if not _is_int(episode):
        match = _BEST.fullmatch(name)
        episode = int(match.group(1)) if match else checkpoint.get("global_step")
    if not _is_int(episode) or episode < 0:
        raise ValueError("no episode count in it")
    metric = meta.get("metric")
    metric = float(metric) if isinstance(metric, int | float) and not isinstance(metric, bool) else None
    return int(episode), metric


def _episode_in(path: str, name: str) -> int | None:
    """The episode count a checkpoint file says it holds (read as a rebuild reads it; mmap, ``weights_only``)."""
    try:
        return _meta_of(torch.load(path, map_location="cpu", weights_only=True, mmap=True), name)[0]
    except Exception:  # not a checkpoint: no episode to trust
        return None


def unsound(path: str) -> str | None:
    """Why the checkpoint at ``path`` must not be resumed from or exported, or None when it may.

    It must load with ``weights_only=True`` (a file from a mirror is untrusted input) and every floating tensor of
    its ``state_dict`` must be finite.
    """
    try:
        try:
            checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:  # not a zip archive, where mmap fails first: the plain load says what it is
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # refused objects, a broken archive: never loaded any other way
        return f"it does not load with weights_only=True ({' '.join(str(err).split())[:160]})"
    state = checkpoint.get("state_dict") if isinstance(checkpoint, dict) else None
    if not isinstance(state, dict):
        return "it is not a Lightning checkpoint (no state_dict)"
    finite = all(torch.isfinite(value).all() for value in state.values()
                 if isinstance(value, torch.Tensor) and value.is_floating_point())  # fmt: skip
    return None if finite else "it holds non-finite weights (a diverged state)"


# ----- what the store hands out -----
@dataclass(frozen=True)
class Checkpoint:
    """A verified checkpoint of the run: where it is and what its manifest entry says."""

    path: str
    name: str
    episode: int
    metric: float | None
    source: str = "local"  # "local", "mirror" (downloaded at this start) or "explicit"


@dataclass(frozen=True)
class MirrorStatus:
    """Where the mirror stands against the local folder."""

    remote: str
    local_episode: int
    mirror_episode: int
    behind: bool
    failures: int

    def line(self) -> str:
        if self.behind:
            return (f"mirror behind: episode {max(self.mirror_episode, 0)} of {self.local_episode} "
                    f"({self.remote}) — run the same command again to retry")  # fmt: skip
        return f"mirror: up to date at episode {self.local_episode} ({self.remote})"


@dataclass
class _SaveRequest:
    name: str
    episode: int
    metric: float | None
    hold: bool


class UsesRunStore:
    """Mixin of the callbacks that act on the run's files through a :class:`RunStore` handed to them.

    ``AtheriaCLI`` builds one store per run and calls :meth:`use_store` on each such callback; a script with a plain
    ``Trainer`` does the same by hand.
    """

    store: RunStore | None = None

    def use_store(self, store: RunStore) -> Self:
        self.store = store
        return self


# ----- the store -----
class RunStore:
    """The run folder's files: checkpoints, ``MANIFEST.json``, retention, the mirror, resume and best choices.

    Only global rank 0 writes: the CLI calls :meth:`start` there, and Lightning calls the store's
    :attr:`checkpoint_io` there only. Every method is safe to call on other ranks.

    Args:
        run_dir: ``<run_root>/<experiment_name>``; checkpoints live in ``<run_dir>/checkpoints``.
        async_write: Write files in a background thread (the training thread only serializes the state).

    Example::

        store = RunStore("runs/demo")
        trainer = Trainer(plugins=[store.checkpoint_io],
                          callbacks=[SmartCheckpoint().use_store(store), MirrorSync(url).use_store(store)])
    """

    def __init__(self, run_dir: str | os.PathLike[str], async_write: bool = True) -> None:
        self.run_dir = os.path.abspath(os.fspath(run_dir))
        self.checkpoint_dir = os.path.join(self.run_dir, CHECKPOINTS)
        self.async_write = async_write
        self.top_k = 5
        self.checkpoint_io = StoreCheckpointIO(self)
        self.max_write_seconds = 0.0
        self._local = LocalFileSystem()
        self._manifest: Manifest | None = None
        self._lock = threading.Lock()  # the manifest, between the training thread and the writer thread
        self._queued_best: dict[str, float] = {}  # best files asked for and not yet listed: name -> metric
        self._executor: ThreadPoolExecutor | None = None
        self._futures: list[Future] = []
        self._error: BaseException | None = None
        self._request: _SaveRequest | None = None
        self._held: tuple[_SaveRequest, memoryview] | None = None
        self._state_write: Future | None = None  # the newest serialized state queued for writing
        self._last_queued: int | None = None  # the episode of the newest last.ckpt queued (written or on its way)
        self._mirror: _Mirror | None = None
        self._flush_deadline: float | None = None

    # -- configuration (by the callbacks, before training) --
    def keep_best(self, top_k: int) -> None:
        """Keep the ``top_k`` best checkpoints (and ``last.ckpt``); applied at the next write and at start."""
        self.top_k = top_k

    def set_mirror(
        self,
        url: str,
        storage_options: dict[str, Any] | None = None,
        flush_timeout_s: float = 120.0,
        max_retries: int = 4,
        backoff_s: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Any] = time.sleep,
    ) -> None:
        """Mirror the run to ``<url>/<experiment_name>``; nothing is contacted until :meth:`start` or a sync."""
        fs, root = remote_run_dir(url, os.path.basename(self.run_dir), storage_options)
        self._mirror = _Mirror(self, url, fs, root, flush_timeout_s, max_retries, backoff_s, clock, sleep)

    @property
    def has_mirror(self) -> bool:
        return self._mirror is not None

    # -- start of a session --
    def start(self, with_mirror: bool = True) -> Checkpoint | None:
        """Reconcile the run folder (and the mirror), then return the checkpoint to resume from, if any.

        Local: temporary files of killed writes are removed, a damaged manifest is rebuilt from the files, listed
        files that fail verification and files that do not load go to ``checkpoints/corrupt/``. Mirror: reached
        (``ConfigError`` when not), its manifest read (rebuilt when damaged), every checkpoint it has newer than
        the local one downloaded and verified, and whatever it lacks queued for upload at once. Retention is
        applied. The resume point is the newest verified checkpoint whose weights are finite.
        """
        self.open()
        downloaded: set[str] = set()
        if with_mirror and self._mirror is not None:
            self._mirror.connect()
            downloaded = self._download_newer(self._mirror.open())
        self._retain()
        if with_mirror and self._mirror is not None:
            self._mirror.reconcile(self._entries())
        point = self.resume_point()
        if point is not None and point.name in downloaded:
            point = replace(point, source="mirror")
        return point

    def start_mirror(self) -> None:
        """Reach the mirror (``ConfigError`` when not) and queue what it lacks; a no-op once done or without one."""
        if self._mirror is None or self._mirror.remote is not None:
            return
        self.open()
        self._mirror.connect()
        self._mirror.open()
        self._mirror.reconcile(self._entries())

    def open(self) -> None:
        """Read (or rebuild) the local manifest and check every file it lists; once per store."""
        if self._manifest is not None:
            return
        folder = self.checkpoint_dir
        for path in (self.run_dir, folder):
            require(not os.path.exists(path) or os.path.isdir(path),
                    f"{path} is a file, where the run's folder should be: move it aside")  # fmt: skip
        manifest = self._path(MANIFEST_NAME)
        require(not os.path.isdir(manifest), f"{manifest} is a folder, where the manifest should be: move it aside")
        for stale in remove_stale_tmp(self._local, folder) if os.path.isdir(folder) else []:
            log.info("removed a partial file left by an interrupted write: %s", stale)
        manifest, changed = _read_or_rebuild(_LocalSide(folder))
        changed |= _settle(manifest, self._matches)
        for name, entry in list(manifest.files.items()):
            if not self._matches(name, entry):
                log.warning("checkpoint %s does not match MANIFEST.json (truncated or corrupt): moved to %s/",
                            self._path(name), QUARANTINE)  # fmt: skip
                del manifest.files[name]
                _LocalSide(folder).quarantine(name)
                changed = True
        changed |= _adopt_unlisted(manifest, _LocalSide(folder))
        self._manifest = manifest
        if LAST in manifest.files:
            self._last_queued = manifest.files[LAST].episode
        if changed:
            self._write_manifest()

    def _download_newer(self, remote: Manifest) -> set[str]:
        """Bring every mirror checkpoint the local folder lacks, or has older, into it, verified; their names."""
        assert self._mirror is not None and self._manifest is not None
        downloaded = set()
        for name, entry in sorted(remote.files.items(), key=lambda item: -item[1].episode):
            mine = self._manifest.files.get(name)
            if mine is not None and (mine.sha256 == entry.sha256 or mine.episode >= entry.episode):
                continue
            if self._mirror.download(name, entry, self._path(name), self._journal):
                self._list(name, entry)
                downloaded.add(name)
        return downloaded

    def resume_point(self) -> Checkpoint | None:
        """The newest listed checkpoint that is sound (see :func:`unsound`; one that is not moves to ``corrupt/``)."""
        self.open()
        for name, entry in self._manifest_copy().newest_first():
            path = self._path(name)
            problem = unsound(path)
            if problem is None:
                return Checkpoint(path, name, entry.episode, entry.metric)
            log.warning("checkpoint %s is not resumed from: %s; moved to %s/", path, problem, QUARANTINE)
            self._unlist_and_quarantine(name)
        return None

    def best(self) -> Checkpoint | None:
        """The checkpoint to export or to start a next phase from: the lowest finite metric among the best files,
        else the newest checkpoint; verified, with finite weights."""
        self.open()
        manifest = self._manifest_copy()
        ranked = [item for item in manifest.ranked_best() if math.isfinite(item[1].ranked_metric)]
        for name, entry in ranked + manifest.newest_first():
            path = self._path(name)
            if self._matches(name, entry) and unsound(path) is None:
                return Checkpoint(path, name, entry.episode, entry.metric)
        return None

    def entries(self) -> dict[str, Entry]:
        """The listed checkpoints, name -> entry (a copy)."""
        self.open()
        return self._entries()

    def newest_episode(self) -> int:
        """The episode count of the newest listed checkpoint; -1 when there is none."""
        self.open()
        return self._manifest_copy().newest_episode()

    # -- writes (training thread asks, the writer thread does) --
    def save(
        self, trainer: pl.Trainer, kind: str, episode: int, metric: float | None = None, hold: bool = False
    ) -> None:
        """Save the trainer's state as ``last.ckpt`` (``kind="last"``) or ``best-eNNNNNN.ckpt`` (``"best"``).

        Call it on every rank (Lightning's save is collective); rank 0 serializes the state now and writes it in
        the background. With ``hold``, the serialized state waits for :meth:`confirm` (kept when the next episode
        proves it sound, dropped when it does not).
        """
        name = LAST if kind == "last" else best_name(episode)
        self._raise_pending_error()
        self._request = _SaveRequest(name, episode, metric, hold)
        try:
            trainer.save_checkpoint(self._path(name), weights_only=False)
        finally:
            self._request = None
        if name != LAST and trainer.is_global_zero and not hold:
            with self._lock:
                self._queued_best[name] = metric if metric is not None else math.inf

    def copy_last_to_best(self, trainer: pl.Trainer, episode: int, metric: float) -> None:
        """Keep the ``last.ckpt`` just queued (this episode, this metric) also as ``best-eNNNNNN.ckpt``, copied by
        the writer thread: the training thread does not gather the state again."""
        name = best_name(episode)
        if trainer.is_global_zero:
            with self._lock:
                self._queued_best[name] = metric
            self._submit(self._copy, LAST, name, episode, metric)

    def enters_top_k(self, metric: float) -> bool:
        """Whether a checkpoint with ``metric`` would be among the ``top_k`` best kept."""
        if not math.isfinite(metric):
            return False
        self.open()
        with self._lock:
            metrics = [entry.ranked_metric for name, entry in self._manifest.files.items() if name != LAST]  # type: ignore[union-attr]
            metrics += [value for name, value in self._queued_best.items() if name not in self._manifest.files]  # type: ignore[union-attr]
        return len(metrics) < self.top_k or metric < sorted(metrics)[self.top_k - 1]

    def confirm(self, sound: bool) -> None:
        """Decide a held save: written when ``sound`` (the next episode's loss was finite), else dropped."""
        if self._held is None:
            return
        request, data = self._held
        self._held = None
        if sound:
            self._submit_state(request, data)
            return
        log.warning("the state of episode %d led to a non-finite loss: not saved; last.ckpt keeps episode %s",
                    request.episode, self._last_queued if self._last_queued is not None else "none")  # fmt: skip

    def wait(self, timeout: float | None = None) -> bool:
        """Wait (at most ``timeout``) for the queued writes; True when every one is on disk and listed."""
        with self._lock:
            futures = [future for future in self._futures if not future.done()]
        done, not_done = wait(futures, timeout=timeout)
        return not not_done

    def raise_write_error(self) -> None:
        """Wait for the queued writes and raise the first that failed (disk full, I/O error), if any."""
        self.wait()
        self._raise_pending_error()

    # -- mirror --
    def request_sync(self) -> None:
        """Ask the mirror for a sync in the background (no-op without a mirror)."""
        if self._mirror is not None:
            self._mirror.request()

    def flush(self, timeout_s: float | None = None) -> bool:
        """Wait for the queued writes, then for a mirror sync that sends them, within ``timeout_s`` in all.

        A flush means the run is about to stop: a save held for its proof (:meth:`save`'s ``hold``) is written now,
        as nothing has shown it unsound. Returns True when everything saved is on the mirror (or there is no mirror).
        """
        self.confirm(sound=True)
        timeout_s = self._bounded(timeout_s)
        started = time.monotonic()
        self.wait(timeout_s)
        if self._mirror is None:
            return True
        left = None if timeout_s is None else max(0.0, timeout_s - (time.monotonic() - started))
        return self._mirror.flush(left)

    def limit_flush(self, deadline: float) -> None:
        """Every later flush ends by ``deadline`` (``time.monotonic()`` seconds): a session about to be killed."""
        self._flush_deadline = deadline if self._flush_deadline is None else min(deadline, self._flush_deadline)

    def close(self, timeout_s: float | None = None) -> MirrorStatus | None:
        """The final flush (bounded), then stop the background threads; the mirror's status (None without one)."""
        self.flush(timeout_s)
        self._stop_executor()
        if self._mirror is None:
            return None
        self._mirror.stop()
        return self.mirror_status()

    def mirror_status(self) -> MirrorStatus | None:
        if self._mirror is None:
            return None
        local = self._manifest_copy().newest_episode() if self._manifest is not None else -1
        return self._mirror.status(local)

    @property
    def last_sync_seconds(self) -> float:
        return self._mirror.last_sync_seconds if self._mirror is not None else 0.0

    @property
    def syncs_ended(self) -> int:
        return self._mirror.syncs_ended if self._mirror is not None else 0

    @property
    def sync_failures(self) -> int:
        return self._mirror.failures if self._mirror is not None else 0

    # -- the writer thread --
    def _accept(self, checkpoint: dict[str, Any], path: str) -> None:
        """From Lightning (rank 0, training thread): serialize the state asked for by :meth:`save`."""
        request = self._request
        if request is None or os.path.abspath(path) != self._path(request.name):
            _refuse_foreign_save(path, self.checkpoint_dir)
            data = serialized(checkpoint)
            atomic_write(self._local, os.path.abspath(path), lambda handle: handle.write(data))
            return
        self._queue(request, checkpoint)

    def write_checkpoint(
        self, checkpoint: dict[str, Any], kind: str, episode: int, metric: float | None = None
    ) -> None:
        """Queue a Lightning checkpoint dict as ``last.ckpt`` or ``best-eNNNNNN.ckpt``, without a Trainer (rank 0).

        What :meth:`save` does once Lightning has gathered the state; for tools and tests that have the dict.
        """
        name = LAST if kind == "last" else best_name(episode)
        if name != LAST:
            with self._lock:
                self._queued_best[name] = metric if metric is not None else math.inf
        self._queue(_SaveRequest(name, episode, metric, hold=False), checkpoint)

    def _queue(self, request: _SaveRequest, checkpoint: dict[str, Any]) -> None:
        checkpoint[META_KEY] = {"episode": request.episode, "metric": request.metric}
        data = serialized(checkpoint)
        if request.hold:
            self._held = (request, data)
        else:
            self._submit_state(request, data)

    def _submit_state(self, request: _SaveRequest, data: memoryview) -> None:
        """Queue a serialized state's write, once the previous one is written: a disk slower than training then
        slows training, instead of letting unwritten states pile up in memory (and in what a kill would lose)."""
        if self._state_write is not None:
            self._state_write.result()
        self._state_write = self._submit(self._write, request, data)
        if request.name == LAST:
            self._last_queued = request.episode

    def _submit(self, fn: Callable[..., None], *args: Any) -> Future | None:
        """Run ``fn`` in the writer thread, after what is queued (at once, on this thread, without async_write)."""
        self._raise_pending_error()
        if not self.async_write:
            fn(*args)
            self._raise_pending_error()
            return None
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="atheria-store")
        future = self._executor.submit(fn, *args)
        with self._lock:
            self._futures = [queued for queued in self._futures if not queued.done()]
            self._futures.append(future)
        return future

    def _write(self, request: _SaveRequest, data: memoryview) -> None:
        self._guarded(self._write_file, request.name, lambda handle: handle.write(data), request.episode,
                      request.metric)  # fmt: skip

    def _copy(self, source: str, target: str, episode: int, metric: float) -> None:
        entry = self._manifest_copy().files.get(source)
        if entry is None or entry.episode != episode:
            self._fail(FileNotFoundError(f"cannot keep {target}: {source} of episode {episode} is not listed"))
            return

        def produce(handle: IO[bytes]) -> None:
            with open(self._path(source), "rb") as original:
                if not copy_measured(original, handle).matches(entry.size, entry.sha256):
                    raise OSError(f"{self._path(source)} no longer matches MANIFEST.json: not copied to {target}")

        self._guarded(self._write_file, target, produce, episode, metric)

    def _guarded(self, fn: Callable[..., None], *args: Any) -> None:
        if self._error is not None:
            return  # an earlier write failed: keep everything as it is until the error surfaces
        try:
            fn(*args)
        except BaseException as err:  # surfaced on the training thread at the next save, flush or teardown
            self._fail(err)

    def _fail(self, err: BaseException) -> None:
        log.error("checkpoint write failed, earlier checkpoints are kept: %s", err)
        self._error = err

    def _write_file(self, name: str, produce: Callable[[IO[bytes]], None], episode: int, metric: float | None) -> None:
        """Write ``name`` atomically: journalled as pending before its rename, listed after it, then retention."""
        self.open()
        started = time.monotonic()
        measured: dict[str, Any] = {}

        def write(handle: IO[bytes]) -> None:
            measured["file"] = MeasuredWriter(handle)
            produce(measured["file"])  # type: ignore[arg-type]

        def journal(tmp: str) -> None:
            written = measured["file"]
            if os.path.getsize(tmp) != written.size:
                raise OSError(f"{tmp} holds {os.path.getsize(tmp)} bytes after {written.size} were written")
            measured["entry"] = Entry(episode, written.size, written.hexdigest(), metric, _kind_of(name), time.time())
            self._journal(name, measured["entry"])

        atomic_write(self._local, self._path(name), write, before_replace=journal)
        self._list(name, measured["entry"])
        self.max_write_seconds = max(self.max_write_seconds, time.monotonic() - started)
        if name != LAST:
            self._retain()

    def _journal(self, name: str, entry: Entry) -> None:
        with self._lock:
            self._manifest.pending[name] = entry  # type: ignore[union-attr]
        self._write_manifest()

    def _list(self, name: str, entry: Entry) -> None:
        with self._lock:
            self._manifest.files[name] = entry  # type: ignore[union-attr]
            self._manifest.pending.pop(name, None)  # type: ignore[union-attr]
            self._queued_best.pop(name, None)
        self._write_manifest()
        if self._mirror is not None:
            self._mirror.enqueue(name, entry)

    def _retain(self) -> None:
        """Remove the best files beyond ``top_k`` (listed ones only: they are unlisted first, then deleted)."""
        for name, _ in self._manifest_copy().ranked_best()[self.top_k :]:
            self._remove(name)

    def _remove(self, name: str) -> None:
        # Unlist first, then delete: a crash in between leaves an unlisted file, which the next start adopts.
        with self._lock:
            removed = self._manifest.files.pop(name, None) is not None  # type: ignore[union-attr]
        if not removed:
            return
        self._write_manifest()
        try:
            os.remove(self._path(name))
        except FileNotFoundError:
            pass
        if self._mirror is not None:
            self._mirror.enqueue(name, None)

    def _unlist_and_quarantine(self, name: str) -> None:
        with self._lock:
            self._manifest.files.pop(name, None)  # type: ignore[union-attr]
        self._write_manifest()
        _LocalSide(self.checkpoint_dir).quarantine(name)

    def _write_manifest(self) -> None:
        with self._lock:
            self._manifest.updated = time.time()  # type: ignore[union-attr]
            data = self._manifest.to_json()  # type: ignore[union-attr]
        atomic_write(self._local, self._path(MANIFEST_NAME), lambda handle: handle.write(data))

    # -- small helpers --
    def _matches(self, name: str, entry: Entry) -> bool:
        return verify(self._local, self._path(name), entry.size, entry.sha256)

    def _path(self, name: str) -> str:
        if name != MANIFEST_NAME and not is_checkpoint_name(name):
            raise ValueError(f"{name!r} is not a checkpoint name of the run store")
        return os.path.join(self.checkpoint_dir, name)

    def _manifest_copy(self) -> Manifest:
        with self._lock:
            manifest = self._manifest or Manifest()
            return Manifest(dict(manifest.files), dict(manifest.pending), manifest.updated)

    def _entries(self) -> dict[str, Entry]:
        return dict(self._manifest_copy().files)

    def _bounded(self, timeout_s: float | None) -> float | None:
        if self._flush_deadline is None:
            return timeout_s
        left = max(0.0, self._flush_deadline - time.monotonic())
        return left if timeout_s is None else min(timeout_s, left)

    def _raise_pending_error(self) -> None:
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    def _stop_executor(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None


def _refuse_foreign_save(path: str, checkpoint_dir: str) -> None:
    if os.path.dirname(os.path.abspath(path)) == checkpoint_dir:
        raise ValueError(f"{path}: the run's checkpoints/ folder is written by its RunStore only; save elsewhere")


def _on_cpu(tensor: torch.Tensor) -> torch.Tensor:
    # The file holds CPU tensors, so that any machine can load it without a map_location; a CPU tensor is not copied.
    return tensor.detach().cpu()


def serialized(checkpoint: dict[str, Any]) -> memoryview:
    """``checkpoint`` as the bytes ``torch.save`` writes, with every tensor on the CPU.

    The bytes are the point-in-time copy of the state: training may change the tensors as soon as this returns.
    Pickling holds Python's interpreter lock, so it is done here, on the caller's thread, and the writer thread
    only writes, hashes and fsyncs, which release it (HISTORY.md, "plot process, checkpoint serialization").
    """
    buffer = BytesIO()
    torch.save(apply_to_collection(checkpoint, torch.Tensor, _on_cpu), buffer)
    return buffer.getbuffer()


class StoreCheckpointIO(CheckpointIO):
    """Lightning's checkpoint plugin of a :class:`RunStore`: saves go to the store, loads are ``weights_only``.

    ``AtheriaCLI`` passes it to the Trainer (``plugins``); it is what ``trainer.save_checkpoint`` reaches.
    """

    def __init__(self, store: RunStore) -> None:
        self.store = store

    @override
    def save_checkpoint(self, checkpoint: dict[str, Any], path: _PATH, storage_options: Any | None = None) -> None:
        self.store._accept(checkpoint, os.fspath(path))

    @override
    def load_checkpoint(self, path: _PATH, map_location: Any | None = None, weights_only: bool | None = None) -> dict:
        # Always weights_only: a checkpoint can come from a shared Drive or bucket.
        if not os.path.exists(path):
            raise FileNotFoundError(f"Checkpoint file not found: {path}")
        return pl_load(path, map_location=map_location, weights_only=True)

    @override
    def remove_checkpoint(self, path: _PATH) -> None:
        raise ValueError(f"{path}: checkpoints are removed by the run store's retention only")

    @override
    def teardown(self) -> None:
        self.store.raise_write_error()


# ----- one side of a run: the local folder or the mirror -----
class _Side:
    """A checkpoints folder on some filesystem: list, read, quarantine."""

    def __init__(self, fs: AbstractFileSystem, folder: str, label: str) -> None:
        self.fs, self.folder, self.label = fs, folder.rstrip("/"), label

    def sizes(self) -> dict[str, int]:
        """Checkpoint-named files and their sizes (other names are not the store's)."""
        self.fs.invalidate_cache(self.folder)  # s3fs and gcsfs cache listings
        try:
            infos = self.fs.ls(self.folder, detail=True)
        except FileNotFoundError:
            return {}
        sizes = {posixpath.basename(info["name"].rstrip("/")): int(info.get("size") or 0)
                 for info in infos if info.get("type") == "file"}  # fmt: skip
        return {name: size for name, size in sizes.items() if is_checkpoint_name(name)}

    def read(self, name: str) -> bytes:
        with self.fs.open(join(self.folder, name), "rb") as handle:
            return handle.read()

    def quarantine(self, name: str) -> None:
        """Move ``name`` into ``corrupt/``."""
        self.set_aside(name, QUARANTINE)

    def set_aside(self, name: str, subfolder: str) -> None:
        """Move ``name`` into ``subfolder`` with a time stamp, never deleting anything."""
        source = join(self.folder, name)
        target = join(join(self.folder, subfolder), f"{name}.{time.time_ns()}")
        try:
            if not isinstance(self.fs, LocalFileSystem):
                self.fs.makedirs(posixpath.dirname(target), exist_ok=True)
            else:
                os.makedirs(os.path.dirname(target), exist_ok=True)
            self.fs.mv(source, target)
        except FileNotFoundError:
            pass


class _LocalSide(_Side):
    def __init__(self, folder: str) -> None:
        super().__init__(LocalFileSystem(), folder, "checkpoints")


def _read_or_rebuild(side: _Side) -> tuple[Manifest, bool]:
    """The folder's manifest, and whether it had to be rebuilt from the checkpoint files (missing or damaged)."""
    where = join(side.folder, MANIFEST_NAME)
    try:
        with side.fs.open(where, "rb") as handle:
            return _parse_manifest(handle.read(), where), False
    except FileNotFoundError:
        problem = "missing"
    except DamagedManifest as err:
        problem = f"damaged ({err})"
    except OSError as err:
        problem = f"unreadable ({err})"
    names = sorted(side.sizes())
    if not names:
        return Manifest(), False
    manifest = Manifest()
    _adopt(manifest, side, names)
    failed = len(names) - len(manifest.files)
    log.warning("%s was %s: rebuilt from the %d checkpoint file(s) there%s", where, problem, len(names),
                f" ({failed} did not load: moved to {QUARANTINE}/)" if failed else "")  # fmt: skip
    return manifest, True


def _adopt_unlisted(manifest: Manifest, side: _Side) -> bool:
    """Checkpoint-named files the manifest does not list: moved to ``unlisted/`` (never trusted, never deleted),
    unless the manifest lists nothing that verifies; then they are listed from their own content, as for a damaged
    manifest, so that a run never restarts from zero while checkpoints exist. True when the manifest changed."""
    unlisted = sorted(set(side.sizes()) - set(manifest.files))
    if not unlisted:
        return False
    if manifest.files:
        for name in unlisted:
            side.set_aside(name, UNLISTED)
        log.warning("%s: %d checkpoint file(s) not in MANIFEST.json, moved to %s/ (not trusted): %s",
                    side.folder, len(unlisted), UNLISTED, ", ".join(unlisted))  # fmt: skip
        return False
    _adopt(manifest, side, unlisted)
    log.warning("%s: MANIFEST.json lists no sound checkpoint; listed %d of %d file(s) there from their content",
                side.folder, len(manifest.files), len(unlisted))  # fmt: skip
    return True


def _adopt(manifest: Manifest, side: _Side, names: list[str]) -> None:
    for name in names:
        try:
            data = side.read(name)
            episode, metric = _describe_checkpoint(data, name)
        except (OSError, ValueError) as err:
            log.warning("%s/%s does not load as a checkpoint (%s): moved to %s/", side.folder, name, err, QUARANTINE)
            side.quarantine(name)
            continue
        entry = Entry(episode, len(data), hashlib.sha256(data).hexdigest(), metric, _kind_of(name), time.time())
        manifest.files[name] = entry
        manifest.pending.pop(name, None)


def _settle(manifest: Manifest, matches: Callable[[str, Entry], bool]) -> bool:
    """Finish writes a kill interrupted: a file matching its pending entry takes that entry. True when any pending."""
    if not manifest.pending:
        return False
    for name, entry in manifest.pending.items():
        if matches(name, entry):
            manifest.files[name] = entry
    manifest.pending.clear()
    return True


# ----- the mirror -----
def check_mirror_url(url: str) -> None:
    """Raise :class:`ConfigError` unless every protocol of ``url`` is known to fsspec (or registered) and importable.

    Nothing is contacted: this only checks that the URL could be opened, so it is cheap enough for ``__init__``.
    """
    require(isinstance(url, str) and bool(url.strip()), f"mirror_url={url!r} must be a folder path or an fsspec URL")
    for part in url.split("::"):  # chained URLs such as simplecache::s3://bucket/x
        protocol = get_protocol(part)
        require(
            protocol in fsspec.registry or protocol in known_implementations,
            f"mirror_url={url!r} has an unknown protocol {protocol!r}; use one of {', '.join(COMMON_PROTOCOLS)}",
        )
        try:
            fsspec.get_filesystem_class(protocol)
        except ImportError as err:
            extra = EXTRAS.get(protocol)
            hint = f'pip install "atheria_lightning[{extra}]"' if extra else f"install the package it needs ({err})"
            raise ConfigError(f"mirror_url={url!r} needs an optional package for {protocol}://: {hint}") from err


def remote_run_dir(
    url: str, experiment_name: str, storage_options: dict[str, Any] | None = None
) -> tuple[AbstractFileSystem, str]:
    """The filesystem and path of the mirror's copy of run ``experiment_name``: ``<url>/<experiment_name>``.

    Raises:
        ConfigError: When the URL's protocol is unknown or its package is missing, or the filesystem cannot be built
            from ``storage_options``. Nothing is read or written.
    """
    check_mirror_url(url)
    if get_protocol(url) == "file" and "://" not in url:
        url = os.path.expanduser(url)  # fsspec leaves "~" alone; a shell would have expanded it
    try:
        fs, root = url_to_fs(url, **(storage_options or {}))
    except Exception as err:  # each backend raises its own types for bad options or credentials
        # Only the option names: their values are often credentials.
        options = sorted(storage_options or {})
        raise ConfigError(f"mirror_url={url!r} cannot be opened with storage_options keys {options}: {err}") from err
    return fs, join(root, experiment_name)


class _LocalFileChanged(Exception):
    """The local file no longer matches the entry it was queued with (replaced or removed since)."""


class _Mirror:
    """The run's copy on a mirror: a queue of what to send, a worker thread that sends it, and the mirror's manifest.

    What the mirror holds is known from its manifest, read once at the start and then kept by this object, the
    only writer; each local write or removal is queued here by name, the newest entry winning.
    """

    def __init__(
        self,
        store: RunStore,
        url: str,
        fs: AbstractFileSystem,
        root: str,
        flush_timeout_s: float,
        max_retries: int,
        backoff_s: float,
        clock: Callable[[], float],
        sleep: Callable[[float], Any],
    ) -> None:
        self.store, self.url, self.fs, self.root = store, url, fs, root.rstrip("/")
        self.flush_timeout_s, self.max_retries, self.backoff_s = flush_timeout_s, max_retries, backoff_s
        self.clock, self.sleep = clock, sleep
        self.side = _Side(fs, join(self.root, CHECKPOINTS), "mirror")
        self.remote: Manifest | None = None  # the mirror's manifest as last read or written
        self.queue: dict[str, Entry | None] = {}  # name -> entry to upload, or None to remove
        self.failures = 0
        self.syncs_ended = 0
        self.last_sync_seconds = 0.0
        self._connected = False
        self._plain_stamps: dict[str, tuple[int, float | None]] = {}
        self._made_dirs: set[str] = set()
        # Progress a failed attempt keeps for the retry: files sent and verified but not yet listed, and the
        # replacements journalled in the mirror's manifest.
        self._verified: dict[str, Entry] = {}
        self._journalled: dict[str, Entry] = {}
        self._queue_lock = threading.Lock()
        self._sync_lock = threading.Lock()
        self._cond = threading.Condition()
        self._pending = False
        self._started = 0
        self._finished = 0
        self._last_ok = True
        self._worker: threading.Thread | None = None
        self._stop: threading.Event | None = None

    # -- start --
    def connect(self) -> None:
        """Prove the mirror writable, or raise :class:`ConfigError` (before any training)."""
        if self._connected:
            return
        try:
            self._retrying(self._probe)
        except Exception as err:
            raise ConfigError(f"mirror_url={self.url!r} is not reachable: cannot write {self.root} ({err})") from err
        self._connected = True

    def _probe(self) -> None:
        self.fs.makedirs(self.root, exist_ok=True)
        probe = join(self.root, f".mirror-probe{TMP_MARKER}{os.getpid()}")
        self.fs.pipe_file(probe, b"ok")
        self.fs.rm(probe)

    def open(self) -> Manifest:
        """Read the mirror's manifest (rebuilt from its files when damaged; unlisted files adopted), once."""
        if self.remote is None:
            remote, changed = self._retrying(lambda: _read_or_rebuild(self.side))
            sizes = self.side.sizes()
            # A pending entry is a replacement the mirror was killed in: whichever entry the file matches wins.
            changed |= _settle(remote, lambda name, entry: sizes.get(name) == entry.size
                             and verify(self.fs, join(self.side.folder, name), entry.size, entry.sha256))  # fmt: skip
            for name, entry in list(remote.files.items()):
                if sizes.get(name) != entry.size:
                    log.warning("mirror %s/%s is missing or not the size MANIFEST.json says: not trusted",
                                self.side.folder, name)  # fmt: skip
                    del remote.files[name]
            changed |= _adopt_unlisted(remote, self.side)
            self.remote = remote
            if changed:
                self._write_manifest(remote)
        return Manifest(dict(self.remote.files))

    def reconcile(self, local: dict[str, Entry]) -> None:
        """Queue every local checkpoint the mirror lacks (or holds older), then ask for a sync at once."""
        assert self.remote is not None
        with self._queue_lock:
            for name, entry in local.items():
                theirs = self.remote.files.get(name)
                if not _same(theirs, entry):
                    self.queue[name] = entry
        self.request()

    def download(self, name: str, entry: Entry, local_path: str, journal: Callable[[str, Entry], None]) -> bool:
        """Copy a mirror checkpoint beside its local target, check size and sha256, then move it into place.

        Returns False when the bytes do not match the entry (the mirror's file is then moved to its ``corrupt/``
        and unlisted). Raises ``ConfigError`` when the mirror cannot be read (after the retries): training from an
        older local state would later replace the mirror's newer file.
        """
        try:
            matched = self._retrying(lambda: self._download_once(name, entry, local_path, journal))
        except Exception as err:  # each backend raises its own types for a lost connection or a denied read
            raise ConfigError(
                f"mirror_url={self.url!r} holds {name} of episode {entry.episode}, which could not be downloaded "
                f"({err}); nothing was trained: run the same command again when the mirror is reachable, or set "
                "mirror_url to null to train from the local checkpoints"
            ) from err
        if not matched:
            log.warning("mirror %s/%s does not match its MANIFEST.json entry (bytes or episode): not downloaded, "
                        "moved to the mirror's %s/", self.side.folder, name, QUARANTINE)  # fmt: skip
            assert self.remote is not None
            self.remote.files.pop(name, None)
            self._write_manifest(self.remote)
            self.side.quarantine(name)
        return matched

    def _download_once(self, name: str, entry: Entry, local_path: str, journal: Callable[[str, Entry], None]) -> bool:
        os.makedirs(os.path.dirname(local_path), exist_ok=True)
        tmp = tmp_path_for(local_path)
        try:
            with self.fs.open(join(self.side.folder, name), "rb") as source, open(tmp, "wb") as target:
                copied = copy_measured(source, target)
                target.flush()
                os.fsync(target.fileno())
            if not copied.matches(entry.size, entry.sha256) or _episode_in(tmp, name) != entry.episode:
                return False  # the bytes, or the episode the manifest claims for them, are not what it lists
            journal(name, entry)
            os.replace(tmp, local_path)
            return True
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)

    # -- queue and worker --
    def enqueue(self, name: str, entry: Entry | None) -> None:
        with self._queue_lock:
            self.queue[name] = entry

    def request(self) -> None:
        self._start_worker()
        with self._cond:
            self._pending = True
            self._cond.notify_all()

    def flush(self, timeout_s: float | None) -> bool:
        """Request a sync and wait (at most ``timeout_s``) for one that started after this call; True when it
        completed and nothing is left in the queue."""
        if not self._connected:
            return False  # never reached: nothing was sent, and trying again here would only wait
        timeout_s = self.flush_timeout_s if timeout_s is None else timeout_s
        self._start_worker()
        with self._cond:
            target = self._started + 1
            self._pending = True
            self._cond.notify_all()
            done = self._cond.wait_for(lambda: self._finished >= target, timeout=timeout_s)
            return done and self._last_ok and not self.queue

    def stop(self) -> None:
        worker, stop = self._worker, self._stop
        self._worker = self._stop = None
        if worker is None or stop is None:
            return
        with self._cond:
            stop.set()
            self._cond.notify_all()
        worker.join(JOIN_TIMEOUT_S)

    def status(self, local_episode: int) -> MirrorStatus:
        remote = self.remote.newest_episode() if self.remote is not None else -1
        behind = bool(self.queue) or not self._last_ok or remote < local_episode
        return MirrorStatus(join(self.root, ""), local_episode, remote, behind, self.failures)

    def _start_worker(self) -> None:
        if self._worker is not None:
            return
        self._stop = threading.Event()
        self._worker = threading.Thread(target=self._work, args=(self._stop,), name="atheria-mirror", daemon=True)
        self._worker.start()

    def _work(self, stop: threading.Event) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._pending or stop.is_set())
                if stop.is_set():
                    return
                self._pending = False
                self._started += 1
            try:
                ok = self._sync()
            except Exception:  # a bug here must not kill the thread and leave flush waiting on nothing
                log.exception("mirror: unexpected error in the sync thread")
                ok = False
            with self._cond:
                self._finished += 1
                self._last_ok = ok
                self._cond.notify_all()

    # -- one sync --
    def _sync(self) -> bool:
        self.store.wait(self.flush_timeout_s)  # the writes already queued first, so their entries are queued here
        with self._sync_lock:
            started = self.clock()
            try:
                self.connect()
                self._retrying(self._sync_attempt)
            except Exception as err:  # whatever the backend raises, training must go on
                self.failures += 1
                self.syncs_ended += 1
                log.warning("mirror sync to %s failed after %d retries (%d failures so far): %s",
                            self.root, self.max_retries, self.failures, err)  # fmt: skip
                return False
            self.last_sync_seconds = self.clock() - started
            self.syncs_ended += 1
            return True

    def _sync_attempt(self) -> None:
        if self.remote is None:
            self.open()
        self._sync_checkpoints()
        for folder in PLAIN_FOLDERS:
            self._sync_plain_folder(folder)

    def _sync_checkpoints(self) -> None:
        assert self.remote is not None
        with self._queue_lock:
            batch = dict(self.queue)
        uploads = {name: entry for name, entry in batch.items()
                   if entry is not None and not _same(self.remote.files.get(name), entry)}  # fmt: skip
        replacing = {name: entry for name, entry in uploads.items() if name in self.remote.files}
        if replacing and replacing != self._journalled:  # a retry finds its journal already written
            # Before a listed file is overwritten: its new entry is journalled, so a kill after the move still
            # leaves a file that verifies against one of the two.
            self._write_manifest(Manifest(dict(self.remote.files), replacing))
            self._journalled = replacing
        changed = []
        for name, entry in uploads.items():
            if _same(self._verified.get(name), entry):
                continue  # sent and verified by an earlier attempt of this sync
            self._verified.pop(name, None)  # from the move into place until verified, its content is unknown
            if self._upload_checkpoint(name, entry):
                self._verified[name] = entry
            else:
                changed.append(name)
        listed = dict(self.remote.files)
        listed.update({name: entry for name, entry in uploads.items() if name not in changed})
        removed = [name for name, entry in batch.items() if entry is None and listed.pop(name, None) is not None]
        kept = Manifest(listed)
        for name, _ in kept.ranked_best()[self.store.top_k :]:  # the mirror keeps top_k too, whatever it held
            del kept.files[name]
            removed.append(name)
        if kept.files != self.remote.files or self._journalled:
            self._write_manifest(kept)
        self.remote, self._journalled = kept, {}
        for name in kept.files:
            self._verified.pop(name, None)
        for name in removed:  # only after the manifest that no longer lists them
            try:
                self.fs.rm(join(self.side.folder, name))
            except FileNotFoundError:
                pass
        with self._queue_lock:  # done with, unless a newer write queued the name again meanwhile
            for name, entry in batch.items():
                if name not in changed and self.queue.get(name, _NOTHING) == entry:
                    del self.queue[name]

    def _upload_checkpoint(self, name: str, entry: Entry) -> bool:
        """Upload and verify one checkpoint; False when the local file no longer matches the queued entry."""
        target = join(self.side.folder, name)
        try:
            self._upload(self.store._path(name), target, entry)
        except _LocalFileChanged as err:
            log.debug("mirror: %s changed locally since it was queued; its newer entry follows (%s)", name, err)
            return False
        if not verify(self.fs, target, entry.size, entry.sha256):
            raise OSError(f"{target}: size or sha256 differs from MANIFEST.json after upload")
        return True

    def _sync_plain_folder(self, folder: str) -> None:
        local_fs, local_dir = self.store._local, os.path.join(self.store.run_dir, folder)
        try:
            infos = local_fs.find(local_dir, detail=True)
        except FileNotFoundError:
            return
        for path, info in sorted(infos.items()):
            relative = posixpath.relpath(path, local_dir)
            if info.get("type") != "file" or TMP_MARKER in posixpath.basename(path):
                continue
            key = f"{folder}/{relative}"
            stamp = (int(info["size"]), info.get("mtime"))  # taken before reading: a later append is copied next time
            if self._plain_stamps.get(key) == stamp:
                continue
            try:
                self._upload(path, join(self.root, key), expected=None)
            except _LocalFileChanged:
                continue  # removed locally meanwhile
            self._plain_stamps[key] = stamp

    def _upload(self, local_path: str, remote_path: str, expected: Entry | None) -> None:
        """Stream ``local_path`` to ``remote_path`` atomically; with ``expected``, abort unless the bytes match it."""
        try:
            source = open(local_path, "rb")
        except FileNotFoundError as err:
            raise _LocalFileChanged(f"{local_path} was removed") from err
        with source:
            self._ensure_parent(remote_path)
            atomic_write(self.fs, remote_path, lambda target: _copy_checked(source, target, expected))

    def _ensure_parent(self, remote_path: str) -> None:
        # Local folders get theirs from atomic_write; object stores have none; others (sftp, webdav) need them.
        parent = posixpath.dirname(remote_path)
        if isinstance(self.fs, LocalFileSystem) or parent in self._made_dirs:
            return
        self.fs.makedirs(parent, exist_ok=True)
        self._made_dirs.add(parent)

    def _write_manifest(self, manifest: Manifest) -> None:
        manifest.updated = time.time()
        data = manifest.to_json()
        self._ensure_parent(join(self.side.folder, MANIFEST_NAME))
        atomic_write(self.fs, join(self.side.folder, MANIFEST_NAME), lambda handle: handle.write(data))

    def _retrying(self, attempt: Callable[[], Any]) -> Any:
        for retry in range(self.max_retries + 1):
            try:
                return attempt()
            except Exception as err:
                if retry == self.max_retries:
                    raise
                # Jitter, so that runs sharing a bucket or a Drive account do not retry in step.
                delay = self.backoff_s * 2**retry * random.uniform(0.5, 1.5)
                log.debug("mirror attempt %d failed (%s), retrying in %.1f s", retry + 1, err, delay)
                self.sleep(delay)
        return None


def _same(entry: Entry | None, other: Entry) -> bool:
    return entry is not None and entry.sha256 == other.sha256 and entry.size == other.size


def _copy_checked(source: IO[bytes], target: IO[bytes], expected: Entry | None) -> None:
    copied = copy_measured(source, target)
    if expected is not None and not copied.matches(expected.size, expected.sha256):
        digest = copied.hexdigest()[:12]
        raise _LocalFileChanged(f"read {copied.size} bytes with sha256 {digest}..., the queued entry says otherwise")
