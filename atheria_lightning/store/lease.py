"""The mirror's lease: which session owns a run's mirror now, so that two machines never both write it.

Layout (``<mirror>/<experiment>/lease/``)::

    g00000001.json  {"version": 1, "generation": 1, "session": "3f2a…", "host": "a1b2c3", "boot": "…", "pid": 4242,
                     "started": 1732600000.0, "heartbeat": 1732600300.0, "released": false}
    g00000002.json  the next session's

A session that starts with a mirror takes the next generation by creating ``g<G+1>.json`` with an atomic create where
the filesystem has one (a local folder: ``O_EXCL``; ``memory://``; s3fs from 2024.12 on, whose ``mode="xb"`` is S3's
``If-None-Match``); elsewhere (Drive's FUSE mount seen from two VMs, older s3fs, sftp) it writes the file and reads it
back, which catches a rival that wrote first but not one that writes in the same moment. The holder of the highest
generation owns the mirror; it rewrites its own file as a heartbeat at each sync and every :data:`HEARTBEAT_S` seconds
in between, and marks it released when the session ends. Before each sync the owner checks that no ``g<G+1>.json``
exists: when one does, the session is *superseded* and uploads nothing more.

A start is refused while the highest generation is held by a live session: not released, heartbeat younger than
:data:`STALE_AFTER_S`, and not a process of this machine that has died. ``--take_over`` takes it all the same.
Lease files are untrusted input like every mirror file: read bounded, validated, and only names ``gNNNNNNNN.json``.
"""

from __future__ import annotations

import json
import logging
import os
import posixpath
import re
import socket
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace

from fsspec import AbstractFileSystem
from fsspec.implementations.local import LocalFileSystem
from fsspec.implementations.memory import MemoryFileSystem

from atheria_lightning.errors import ConfigError
from atheria_lightning.files import atomic_write, join

log = logging.getLogger(__name__)

LEASE_FOLDER = "lease"
LEASE_VERSION = 1
#: The owner rewrites its lease file at least this often while its session lives (also at every sync).
HEARTBEAT_S = 60.0
#: A lease whose heartbeat is older than this is free: its session is gone (a killed VM, a closed tab).
STALE_AFTER_S = 300.0
#: Lease files kept on the mirror: the owner's and a few before it, for ``atheria status`` and for a person.
KEEP_GENERATIONS = 3
#: A lease file is a few hundred bytes; anything longer is not ours and is not read further.
MAX_LEASE_BYTES = 4096
_NAME = re.compile(r"g(\d{8,9})\.json")
#: Generations stop here: a forged number beyond it (on the mirror, in its manifest) cannot be followed.
MAX_GENERATION = 999_999_999


def lease_name(generation: int) -> str:
    return f"g{generation:08d}.json"


def this_machine() -> tuple[str, str]:
    """This machine's host name and boot id: a process of this machine that has died frees its lease at once."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as handle:
            boot = handle.read(64).strip()
    except OSError:
        boot = ""
    return socket.gethostname(), boot


@dataclass(frozen=True)
class Holder:
    """One session's claim on the mirror, as its lease file says."""

    generation: int
    session: str
    host: str
    boot: str
    pid: int
    started: float
    heartbeat: float
    released: bool = False

    def to_json(self) -> bytes:
        return json.dumps({"version": LEASE_VERSION, **asdict(self)}, indent=1).encode()

    def describe(self, now: float) -> str:
        """``host a1b2c3 pid 4242, started 12 min ago, last heartbeat 20 s ago``"""
        return (f"host {self.host} pid {self.pid}, started {_ago(now - self.started)}, "
                f"last heartbeat {_ago(now - self.heartbeat)}")  # fmt: skip

    def is_gone(self) -> bool:
        """A process of this very machine (same host and boot) that no longer runs, or whose pid was reused; or an
        earlier session of this very process (a notebook's previous cell, a curriculum's previous phase) that could
        not give its lease back."""
        host, boot = this_machine()
        if self.host != host or self.boot != boot or not boot:
            return False  # another machine's process cannot be looked at: its heartbeat says whether it lives
        if self.pid == os.getpid():
            return True
        try:
            import psutil

            process = psutil.Process(self.pid)
            return process.create_time() > self.started + 1.0  # the pid now names a later process
        except Exception:  # no such process (psutil.NoSuchProcess), or psutil missing: the pid is gone
            return not _pid_exists(self.pid)

    def is_live(self, now: float) -> bool:
        # A heartbeat from the future (a forged file, a badly wrong clock) proves nothing: it is stale too.
        return not self.released and abs(now - self.heartbeat) < STALE_AFTER_S and not self.is_gone()


def parse_holder(data: bytes, generation: int) -> Holder | None:
    """A lease file's holder; None when it is not one this store writes (or claims another generation)."""
    try:
        raw = json.loads(data)
    except ValueError:
        return None
    if not isinstance(raw, dict) or raw.get("version") != LEASE_VERSION or raw.get("generation") != generation:
        return None
    texts = {key: raw.get(key) for key in ("session", "host", "boot")}
    numbers = {key: raw.get(key) for key in ("started", "heartbeat")}
    pid = raw.get("pid")
    if not all(isinstance(value, str) and len(value) <= 256 for value in texts.values()):
        return None
    if not all(isinstance(value, int | float) and not isinstance(value, bool) for value in numbers.values()):
        return None
    if not (isinstance(pid, int) and not isinstance(pid, bool) and pid >= 0):
        return None
    return Holder(generation, texts["session"], texts["host"], texts["boot"], pid, float(numbers["started"]),
                  float(numbers["heartbeat"]), raw.get("released") is True)  # fmt: skip


class MirrorInUse(ConfigError):
    """Another live session owns the mirror: this start is refused (exit code 5)."""


class Superseded(Exception):
    """A later session took the mirror over: this one must not upload anything more."""

    def __init__(self, successor: Holder | None, generation: int) -> None:
        self.successor, self.generation = successor, generation
        super().__init__(f"generation {generation}")


class Lease:
    """This session's lease on one run's mirror folder ``root`` (on ``fs``)."""

    def __init__(self, fs: AbstractFileSystem, root: str, url: str, clock: Callable[[], float] = time.time) -> None:
        self.fs, self.folder, self.url, self.clock = fs, join(root, LEASE_FOLDER), url, clock
        self.mine: Holder | None = None
        self._last_beat = 0.0

    @property
    def generation(self) -> int:
        return self.mine.generation if self.mine is not None else 0

    # -- reading --
    def generations(self) -> list[int]:
        """The generations whose lease files exist, oldest first (names other than ``gNNNNNNNN.json`` ignored)."""
        try:
            names = [posixpath.basename(path.rstrip("/")) for path in self.fs.ls(self.folder, detail=False)]
        except FileNotFoundError:
            return []
        return sorted(int(match.group(1)) for match in map(_NAME.fullmatch, names) if match)

    def read(self, generation: int) -> Holder | None:
        """The holder of ``generation``; None when its file is missing or not a lease file of this store."""
        try:
            with self.fs.open(join(self.folder, lease_name(generation)), "rb") as handle:
                data = handle.read(MAX_LEASE_BYTES + 1)
        except FileNotFoundError:
            return None
        return parse_holder(data, generation) if len(data) <= MAX_LEASE_BYTES else None

    def holder(self) -> tuple[int, Holder | None]:
        """The highest generation on the mirror and its holder (None: a damaged or vanished file, which holds
        nothing but still counts as taken); ``(0, None)`` for a mirror no session has leased."""
        self.fs.invalidate_cache(self.folder)
        found = self.generations()
        return (found[-1], self.read(found[-1])) if found else (0, None)

    # -- taking, keeping, giving back --
    def acquire(self, take_over: bool, at_least: int = 0) -> Holder | None:
        """Take the next generation (above ``at_least`` too: the mirror manifest's own); returns the live or
        unreleased holder it was taken from, if any. Raises :class:`MirrorInUse` while another session holds it."""
        for _ in range(3):  # another session may take the same generation at the same moment: look again
            top, holder = self.holder()
            now = self.clock()
            previous = None if holder is None or holder.released or holder.is_gone() else holder
            if previous is not None and previous.is_live(now) and not take_over:
                raise MirrorInUse(
                    f"mirror_url={self.url!r} is in use by another session ({previous.describe(now)}); if that session "
                    "is gone (a closed tab, a stopped VM), run the same command with --take_over, or wait: a lease "
                    f"whose heartbeat is {STALE_AFTER_S / 60:.0f} min old is taken over without it"
                )
            host, boot = this_machine()
            generation = max(top, at_least) + 1
            if generation > MAX_GENERATION:
                raise ConfigError(
                    f"mirror_url={self.url!r}: its lease numbers are used up ({self.folder} or its MANIFEST.json "
                    "names a forged generation); move lease/ aside, then run the same command again"
                )
            mine = Holder(generation, uuid.uuid4().hex, host, boot, os.getpid(), now, now)
            if self._create(mine):
                self.mine, self._last_beat = mine, now
                self._prune(mine.generation)
                return previous
        raise MirrorInUse(f"mirror_url={self.url!r}: other sessions keep taking its lease at the same time; stop all "
                          "but one, then run the same command again")  # fmt: skip

    def check(self) -> None:
        """Raise :class:`Superseded` when a later session has taken the mirror over (a ``g<G+1>.json`` exists)."""
        if self.mine is None:
            return
        self.fs.invalidate_cache(self.folder)
        later = [generation for generation in self.generations() if generation > self.mine.generation]
        if later:
            raise Superseded(self.read(later[-1]), later[-1])

    def heartbeat(self, force: bool = False) -> None:
        """Rewrite this session's lease file with the time now (at most every ``HEARTBEAT_S / 2`` unless
        ``force``), after :meth:`check`: a superseded session never writes its lease again."""
        now = self.clock()
        if self.mine is None or (not force and now - self._last_beat < HEARTBEAT_S / 2):
            return
        self.check()
        self._write(replace(self.mine, heartbeat=now))
        self._last_beat = now

    def release(self) -> None:
        """Mark this session's lease released, so that the next session starts without ``--take_over``."""
        if self.mine is None:
            return
        try:
            self.check()
            self._write(replace(self.mine, heartbeat=self.clock(), released=True))
        except Superseded:
            pass
        self.mine = None

    # -- files --
    def _write(self, holder: Holder) -> None:
        atomic_write(self.fs, join(self.folder, lease_name(holder.generation)), lambda out: out.write(holder.to_json()))
        self.mine = holder

    def _create(self, holder: Holder) -> bool:
        """Create ``holder``'s lease file only if no file of its generation exists; False when one does."""
        path, data = join(self.folder, lease_name(holder.generation)), holder.to_json()
        if isinstance(self.fs, LocalFileSystem):
            os.makedirs(os.path.dirname(path), exist_ok=True)
            try:
                descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                return False
            with os.fdopen(descriptor, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            return True
        if _has_exclusive_create(self.fs):
            try:
                with self.fs.open(path, "xb") as handle:
                    handle.write(data)
            except FileExistsError:
                return False
            return True
        # No atomic create here: look first, write, read back. A rival writing in the same moment may still win
        # both reads; the owner's check before each sync then finds at most one of the two (docs/GUIDE.md).
        if self.fs.exists(path):
            return False
        self.fs.pipe_file(path, data)
        self.fs.invalidate_cache(self.folder)
        return self.read(holder.generation) == holder

    def _prune(self, newest: int) -> None:
        for generation in self.generations():
            if generation <= newest - KEEP_GENERATIONS:
                try:
                    self.fs.rm(join(self.folder, lease_name(generation)))
                except FileNotFoundError:
                    pass


def _has_exclusive_create(fs: AbstractFileSystem) -> bool:
    """Whether ``fs.open(path, "xb")`` fails when the file exists, atomically on the service's side."""
    if isinstance(fs, MemoryFileSystem):
        return True  # one process's dictionary: its existence check and write cannot interleave with another's
    module = type(fs).__module__.split(".")[0]
    if module == "s3fs":
        import s3fs

        return _version(getattr(s3fs, "__version__", "0")) >= (2024, 12)  # If-None-Match on PutObject
    return False


def _version(text: str) -> tuple[int, ...]:
    parts = re.findall(r"\d+", text)[:2]
    return tuple(int(part) for part in parts)


def _pid_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _ago(seconds: float) -> str:
    if seconds < -5:
        return "in the future"
    seconds = max(0.0, seconds)
    if seconds < 120:
        return f"{seconds:.0f} s ago"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min ago"
    return f"{seconds / 3600:.1f} h ago"
