"""RunLock: a second trainer on a run folder is refused with a message naming the holder; a killed holder, a release
or a folder copied from another machine leaves the folder free."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import REPO, env_without_warnings

from atheria_lightning.errors import ConfigError
from atheria_lightning.lock import HOLDER_NAME, LOCK_NAME, RunLock

# Takes the lock, prints its run id, holds it until its stdin closes, then releases it.
HOLDER = """
import sys
from atheria_lightning.lock import RunLock
lock = RunLock(sys.argv[1]).acquire()
print(lock.run_id, flush=True)
sys.stdin.read()
lock.release()
"""


@pytest.fixture
def holder(tmp_path: Path) -> Iterator[tuple[subprocess.Popen, str]]:
    """Another process holding the lock on ``tmp_path / "run"``, and its run id."""
    command = [sys.executable, "-c", HOLDER, str(tmp_path / "run")]
    process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=REPO,
                               env=env_without_warnings())  # fmt: skip
    try:
        yield process, process.stdout.readline().strip()
    finally:
        process.kill()
        process.wait(30)


def files_of(run_dir: Path) -> dict[str, tuple[int, bytes]]:
    return {path.name: (path.stat().st_mtime_ns, path.read_bytes()) for path in run_dir.iterdir()}


def test_a_second_trainer_is_refused_naming_the_holder_and_changes_no_file(
    tmp_path: Path, holder: tuple[subprocess.Popen, str]
) -> None:
    process, run_id = holder
    run_dir = tmp_path / "run"
    before = files_of(run_dir)
    message = f"run folder {run_dir} is in use by run {run_id} (pid {process.pid} on {socket.gethostname()}): "
    with pytest.raises(ConfigError, match="^" + message.replace("(", r"\(").replace(")", r"\)")):
        RunLock(run_dir).acquire()
    assert files_of(run_dir) == before


def test_the_lock_of_a_killed_trainer_is_free_at_once(tmp_path: Path, holder: tuple[subprocess.Popen, str]) -> None:
    process, _ = holder
    process.send_signal(signal.SIGKILL)
    process.wait(30)
    run_dir = tmp_path / "run"
    assert (run_dir / LOCK_NAME).exists(), "a killed trainer cannot remove its lock file"
    with RunLock(run_dir) as lock:
        assert json.loads((run_dir / HOLDER_NAME).read_text())["run_id"] == lock.run_id


def test_a_holder_that_ends_cleanly_removes_its_files_and_frees_the_folder(
    tmp_path: Path, holder: tuple[subprocess.Popen, str]
) -> None:
    process, _ = holder
    process.communicate(timeout=30)  # closes its stdin: it releases and exits
    assert process.returncode == 0
    assert list((tmp_path / "run").iterdir()) == []
    RunLock(tmp_path / "run").acquire().release()


def test_release_is_idempotent_and_only_the_holder_removes_the_files(tmp_path: Path) -> None:
    lock = RunLock(tmp_path).acquire()
    RunLock(tmp_path).release()  # never acquired: the holder's files stay
    assert {path.name for path in tmp_path.iterdir()} == {LOCK_NAME, HOLDER_NAME}
    lock.release()
    lock.release()
    assert list(tmp_path.iterdir()) == []
    RunLock(tmp_path).acquire().release()


def test_a_second_trainer_in_the_same_process_is_refused_too(tmp_path: Path) -> None:
    with RunLock(tmp_path), pytest.raises(ConfigError, match=rf"in use by run \w+ \(pid {os.getpid()} on "):
        RunLock(tmp_path).acquire()


def test_a_lock_copied_from_another_machine_does_not_block(tmp_path: Path) -> None:
    # A run folder restored from a Colab session that was holding it: its files came along, its lock did not.
    record = {"run_id": "0123456789ab", "host": "colab-vm-elsewhere", "pid": os.getppid(), "started": 0.0}
    (tmp_path / LOCK_NAME).write_text("")
    (tmp_path / HOLDER_NAME).write_text(json.dumps(record))
    with RunLock(tmp_path) as lock:
        holder = json.loads((tmp_path / HOLDER_NAME).read_text())
        assert holder["run_id"] == lock.run_id and holder["host"] == socket.gethostname()
    assert list(tmp_path.iterdir()) == []
