"""MANIFEST.json: what it may list, how it is read (or rebuilt from the files) and written; nothing else touches one.

Layout (``<run>/checkpoints/MANIFEST.json``, the same on the mirror, where ``generation`` names the lease of the
session that wrote it)::

    {"version": 1, "updated": 1732600000.0, "generation": 3,
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
import os
import posixpath
import re
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from io import BytesIO
from typing import Any

from fsspec import AbstractFileSystem
from fsspec.implementations.local import LocalFileSystem

from atheria_lightning.errors import ConfigError
from atheria_lightning.files import atomic_write, join

log = logging.getLogger(__name__)

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
#: Best files beyond ``top_k`` at a session's start (a lower ``top_k`` than an earlier session's) are moved here, on
#: either side: a setting changed, and nothing saved is deleted because of that.
BEYOND_TOP_K = "beyond_top_k"
#: Key of the settings each callback records in a checkpoint as it is built (``SmartCheckpoint.top_k`` -> 5), keyed
#: as the CLI names them: a resume reports those that changed.
SETTINGS_KEY = "atheria_settings"
#: Key of the metadata the store puts into every checkpoint it writes: the episode count and the monitored metric,
#: so that a manifest can be rebuilt from the files alone.
META_KEY = "atheria"


def best_name(episode: int) -> str:
    """The file name of the best checkpoint kept at ``episode``."""
    return f"best-e{episode:06d}.ckpt"


def is_checkpoint_name(name: str) -> bool:
    """True for the only names a manifest may list: ``last.ckpt`` and ``best-eNNNNNN.ckpt``."""
    return name == LAST or _BEST.fullmatch(name) is not None


def kind_of(name: str) -> str:
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


class DamagedManifest(ValueError):
    """A manifest that is not JSON, or not of the expected shape."""


@dataclass
class Manifest:
    files: dict[str, Entry] = field(default_factory=dict)
    pending: dict[str, Entry] = field(default_factory=dict)
    updated: float = 0.0
    #: On a mirror: the lease generation of the session that wrote it (see :mod:`~atheria_lightning.store.lease`).
    generation: int = 0

    def to_json(self) -> bytes:
        files = {name: asdict(entry) for name, entry in sorted(self.files.items())}
        data: dict[str, Any] = {"version": MANIFEST_VERSION, "updated": self.updated, "files": files}
        if self.generation:
            data["generation"] = self.generation
        if self.pending:
            data["pending"] = {name: asdict(entry) for name, entry in sorted(self.pending.items())}
        return json.dumps(data, indent=1).encode()

    def newest_first(self) -> list[tuple[str, Entry]]:
        """Entries by episode, newest first; at an equal episode ``last.ckpt`` first."""
        return sorted(self.files.items(), key=lambda item: (item[1].episode, item[0] == LAST), reverse=True)

    def newest_episode(self) -> int:
        return max((entry.episode for entry in self.files.values()), default=-1)


#: (manifest, refused name) pairs already warned about in this process.
_REFUSED: set[tuple[str, str]] = set()


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
    generation = data.get("generation", 0)
    if not (_is_int(generation) and 0 <= generation < 10**9):
        raise DamagedManifest("'generation' must be a whole number from 0 to 999999999")
    manifest = Manifest(updated=_number(data.get("updated", 0.0), "updated"), generation=generation)
    for key, section in sections.items():
        for name, raw in section.items():
            if not isinstance(name, str) or not is_checkpoint_name(name):
                # Once per manifest and name: a mirror's manifest is read at the start and again before each sync.
                seen = (where, repr(name))
                level = logging.DEBUG if seen in _REFUSED else logging.WARNING
                _REFUSED.add(seen)
                log.log(level, "%s lists %r: refused (a manifest entry must be last.ckpt or best-eNNNNNN.ckpt)",
                        where, name)  # fmt: skip
                continue
            getattr(manifest, key)[name] = _entry(raw, name)
    return manifest


def _entry(raw: Any, name: str) -> Entry:
    if not isinstance(raw, dict):
        raise DamagedManifest(f"entry {name!r} is not a mapping")
    episode, size, sha256 = raw.get("episode"), raw.get("size"), raw.get("sha256")
    # Below 2**63 (a tensor's int64; any real count): far larger ones overflow a float in any arithmetic on them.
    if not (_is_int(episode) and 0 <= episode < 2**63 and _is_int(size) and 0 <= size < 2**63):
        raise DamagedManifest(f"entry {name!r} needs whole numbers episode and size from 0 to 2**63 - 1")
    if not isinstance(sha256, str) or _SHA256.fullmatch(sha256) is None:
        raise DamagedManifest(f"entry {name!r} needs a sha256 of 64 hex digits")
    metric = raw.get("metric")
    metric = None if metric is None else _number(metric, f"{name}.metric")
    return Entry(episode, size, sha256, metric, kind_of(name), _number(raw.get("saved_at", 0.0), f"{name}.saved_at"))


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
    import torch  # here, not at the top: `atheria status` reads manifests on machines without torch

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


def episode_in(path: str, name: str) -> int | None:
    """The episode count a checkpoint file says it holds (read as a rebuild reads it; mmap, ``weights_only``)."""
    import torch

    try:
        return _meta_of(torch.load(path, map_location="cpu", weights_only=True, mmap=True), name)[0]
    except Exception:  # not a checkpoint: no episode to trust
        return None


def unsound(path: str) -> str | None:
    """Why the checkpoint at ``path`` must not be resumed from or exported, or None when it may.

    It must load with ``weights_only=True`` (a file from a mirror is untrusted input) and every floating tensor of
    its ``state_dict`` must be finite.
    """
    import torch

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


class Side:
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

    def make_aside_folder(self, subfolder: str) -> None:
        """Create ``subfolder`` (``corrupt/``, ``unlisted/``, ``beyond_top_k/``); ``ConfigError`` in one line when
        something else has its name, before anything is moved."""
        folder = join(self.folder, subfolder)
        try:
            if not isinstance(self.fs, LocalFileSystem):
                self.fs.makedirs(folder, exist_ok=True)
            else:
                os.makedirs(folder, exist_ok=True)
        except (FileExistsError, NotADirectoryError) as err:
            raise ConfigError(f"{folder} is not a folder ({err}): the run store sets files aside there; move it "
                              "away, then run the same command again") from err  # fmt: skip

    def set_aside(self, name: str, subfolder: str) -> str:
        """Move ``name`` into ``subfolder`` with a time stamp, never deleting anything; where it went."""
        source = join(self.folder, name)
        target = join(join(self.folder, subfolder), f"{name}.{time.time_ns()}")
        self.make_aside_folder(subfolder)
        try:
            self.fs.mv(source, target)
        except FileNotFoundError:
            pass
        return target


class LocalSide(Side):
    def __init__(self, folder: str) -> None:
        super().__init__(LocalFileSystem(), folder, "checkpoints")


def read_or_rebuild(side: Side) -> tuple[Manifest, bool]:
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


def read_as_is(side: Side) -> Manifest:
    """The folder's manifest exactly as written, for a folder this process must never write (a previous version's
    read-only output): nothing is rebuilt, adopted, settled or moved; entries with names the store does not write
    are refused as always.

    Raises:
        DamagedManifest: Not a manifest this store writes. ``OSError`` (``FileNotFoundError``) when unreadable.
    """
    where = join(side.folder, MANIFEST_NAME)
    with side.fs.open(where, "rb") as handle:
        return _parse_manifest(handle.read(), where)


def parse_as_is(data: bytes, where: str) -> Manifest:
    """:func:`read_as_is` of a manifest's bytes read elsewhere (``atheria status`` bounds its reads); ``where``
    names it in warnings.

    Raises:
        DamagedManifest: Not a manifest this store writes.
    """
    return _parse_manifest(data, where)


def adopt_unlisted(manifest: Manifest, side: Side) -> bool:
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


def _adopt(manifest: Manifest, side: Side, names: list[str]) -> None:
    for name in names:
        try:
            data = side.read(name)
            episode, metric = _describe_checkpoint(data, name)
        except (OSError, ValueError) as err:
            log.warning("%s/%s does not load as a checkpoint (%s): moved to %s/", side.folder, name, err, QUARANTINE)
            side.quarantine(name)
            continue
        entry = Entry(episode, len(data), hashlib.sha256(data).hexdigest(), metric, kind_of(name), time.time())
        manifest.files[name] = entry
        manifest.pending.pop(name, None)


def settle(manifest: Manifest, matches: Callable[[str, Entry], bool]) -> bool:
    """Finish writes a kill interrupted: a file matching its pending entry takes that entry. True when any pending."""
    if not manifest.pending:
        return False
    for name, entry in manifest.pending.items():
        if matches(name, entry):
            manifest.files[name] = entry
    manifest.pending.clear()
    return True


def write_manifest(side: Side, manifest: Manifest, before_replace: Callable[[str], Any] | None = None) -> None:
    """Write ``manifest`` into ``side``'s folder atomically (a reader sees the old one or the new one);
    ``before_replace`` as in :func:`atomic_write`."""
    manifest.updated = time.time()
    data = manifest.to_json()
    if not isinstance(side.fs, LocalFileSystem):
        side.fs.makedirs(side.folder, exist_ok=True)  # object stores have no folders; sftp and webdav need them
    atomic_write(side.fs, join(side.folder, MANIFEST_NAME), lambda handle: handle.write(data), before_replace)


def same(entry: Entry | None, other: Entry) -> bool:
    """The same bytes: size and sha256 (the episode and metric describe them)."""
    return entry is not None and entry.sha256 == other.sha256 and entry.size == other.size
