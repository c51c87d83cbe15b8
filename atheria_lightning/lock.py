"""RunLock: one trainer per run folder; a second one exits with a clear message and writes nothing."""

from __future__ import annotations

import json
import os
import socket
import time
import uuid
from pathlib import Path
from types import TracebackType

import psutil

from atheria_lightning.errors import ConfigError

LOCK_NAME = ".atheria.lock"


class RunLock:
    """An exclusive lock file ``<run_dir>/.atheria.lock`` holding the run id, host, pid and start time.

    Taken with ``O_CREAT | O_EXCL`` (atomic on local disks). A lock left by a process that is gone (same host, pid
    no longer running, e.g. after SIGKILL) is taken over; a live one raises :class:`ConfigError`.
    """

    def __init__(self, run_dir: str | os.PathLike[str]) -> None:
        self.path = Path(run_dir) / LOCK_NAME
        self.run_id = uuid.uuid4().hex[:12]
        self._held = False

    def acquire(self) -> RunLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        record = {"run_id": self.run_id, "host": socket.gethostname(), "pid": os.getpid(), "started": time.time()}
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self._holder()
                if holder is not None and self._alive(holder):
                    who = f"run {holder.get('run_id')} (pid {holder.get('pid')} on {holder.get('host')})"
                    raise ConfigError(
                        f"run folder {self.path.parent} is in use by {who}: "
                        "wait for it to finish or choose another experiment_name"
                    ) from None
                self.path.unlink(missing_ok=True)  # stale: its process is gone
                continue
            with os.fdopen(fd, "w") as handle:
                json.dump(record, handle)
            self._held = True
            return self
        raise ConfigError(f"could not take the lock {self.path}: another process keeps creating it")

    def release(self) -> None:
        if self._held:
            holder = self._holder()
            if holder is not None and holder.get("run_id") == self.run_id:
                self.path.unlink(missing_ok=True)
            self._held = False

    def _holder(self) -> dict | None:
        try:
            return json.loads(self.path.read_text())
        except (FileNotFoundError, ValueError, OSError):
            return None

    @staticmethod
    def _alive(holder: dict) -> bool:
        if holder.get("host") != socket.gethostname():
            # Another machine: a Colab session's local disk is gone with it, so a lock seen elsewhere is a
            # copied folder; treat it as stale rather than blocking the run forever.
            return False
        pid = holder.get("pid")
        if not isinstance(pid, int) or pid == os.getpid():
            return False
        try:
            process = psutil.Process(pid)
            return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
        except psutil.Error:
            return False

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(
        self, kind: type[BaseException] | None, value: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.release()
