"""RunLock: one trainer per run folder; a second one exits with a clear message and writes nothing."""

from __future__ import annotations

import json
import os
import socket
import time
import uuid
from pathlib import Path
from types import TracebackType

from filelock import FileLock, Timeout

from atheria_lightning.errors import ConfigError

LOCK_NAME = ".atheria.lock"
# The holder's record lives beside the lock file, not in it: where a filesystem has no flock, filelock falls back
# to a lock that keeps its own record in the lock file.
HOLDER_NAME = ".atheria.lock.json"
# A trainer that is just finishing releases the folder within this; waiting longer would only delay the refusal.
ACQUIRE_TIMEOUT_S = 0.5


class RunLock:
    """An OS lock on ``<run_dir>/.atheria.lock``; the holder's run id, host, pid and start time are written to
    ``<run_dir>/.atheria.lock.json`` so that a refused trainer can say who holds the folder.

    The kernel drops the lock when its process ends, SIGKILL included, so the files a killed run leaves behind never
    block the next one, and the lock is per machine, so a folder copied from another machine never blocks either. A
    second trainer on a held folder raises :class:`ConfigError` naming the holder and changes no file. Both files are
    removed on release.

    Example::

        with RunLock("runs/demo"):
            trainer.fit(model, datamodule=datamodule)
    """

    def __init__(self, run_dir: str | os.PathLike[str]) -> None:
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_NAME
        self.holder_path = self.run_dir / HOLDER_NAME
        self.run_id = uuid.uuid4().hex[:12]
        # A mode without group or other write spares the folder filelock's probe (a scratch file) before it creates
        # the lock file. Not thread-local: the lock belongs to the run, not to the thread that took it.
        self._lock = FileLock(self.path, timeout=ACQUIRE_TIMEOUT_S, mode=0o644, thread_local=False)

    def acquire(self) -> RunLock:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        try:
            self._lock.acquire()
        except Timeout:
            raise ConfigError(
                f"run folder {self.run_dir} is in use by {self._describe_holder()}: "
                "wait for it to finish or choose another experiment_name"
            ) from None
        record = {"run_id": self.run_id, "host": socket.gethostname(), "pid": os.getpid(), "started": time.time()}
        try:
            self.holder_path.write_text(json.dumps(record))
        except BaseException:  # e.g. a full disk: a lock we cannot describe must not stay held
            self.release()
            raise
        return self

    def release(self) -> None:
        if not self._lock.is_locked:
            return
        # Unlinked while still held: a process that opened the old file and locks it after the release finds it
        # unlinked and retries on the new path (filelock checks), so two processes never lock different files.
        self.holder_path.unlink(missing_ok=True)
        self.path.unlink(missing_ok=True)
        self._lock.release()

    def _describe_holder(self) -> str:
        try:
            holder = json.loads(self.holder_path.read_text())
        except (OSError, ValueError):  # the holder is writing its record, or has just removed it
            holder = None
        if not isinstance(holder, dict):
            return "another run"
        return f"run {holder.get('run_id')} (pid {holder.get('pid')} on {holder.get('host')})"

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(
        self, kind: type[BaseException] | None, value: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.release()
