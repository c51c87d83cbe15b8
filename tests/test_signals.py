"""Stopping as platforms do: SIGTERM and SIGINT stop cleanly with a checkpoint; a second trainer is refused."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, demo_args, env_without_warnings, run_dir, wait_for_first_checkpoint

from atheria_lightning.cli import main

pytestmark = pytest.mark.slow  # trains in subprocesses or over several sessions: out of the quick loop


def _start_long_run(tmp_path: Path) -> subprocess.Popen:
    command = [sys.executable, "-u", "-m", "atheria_lightning.cli", *demo_args(tmp_path, episodes=5000, val_every=50)]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO,
                            env=env_without_warnings())  # fmt: skip


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_stop_signal_saves_flushes_the_mirror_and_exits_zero(signum: int, tmp_path: Path) -> None:
    process = _start_long_run(tmp_path)
    try:
        wait_for_first_checkpoint(run_dir(tmp_path))
        process.send_signal(signum)
        out, _ = process.communicate(timeout=120)
    finally:
        process.kill()
    assert process.returncode == 0, out[-3000:]
    stopped = re.search(r"stopped at episode (\d+) of 5000 .*run the same command again to continue", out)
    assert stopped, out[-3000:]
    episode = int(stopped.group(1))
    local = json.loads((run_dir(tmp_path) / "checkpoints" / "MANIFEST.json").read_text())["files"]
    mirror = json.loads((tmp_path / "mirror" / "demo" / "checkpoints" / "MANIFEST.json").read_text())["files"]
    assert local["last.ckpt"]["episode"] == episode
    assert mirror["last.ckpt"]["sha256"] == local["last.ckpt"]["sha256"], "the mirror is flushed before exit"
    assert not (run_dir(tmp_path) / ".atheria.lock").exists(), "the lock is released"


def test_a_second_trainer_on_the_same_run_folder_is_refused_and_writes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    process = _start_long_run(tmp_path)
    try:
        wait_for_first_checkpoint(run_dir(tmp_path))
        process.send_signal(signal.SIGSTOP)  # freeze the first run so the folder stays still while we look
        before = {p: p.stat().st_mtime_ns for p in run_dir(tmp_path).rglob("*")}
        mirror_before = sorted((tmp_path / "mirror").rglob("*"))
        assert main(demo_args(tmp_path, episodes=5000, val_every=50)) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("atheria: error: run folder") and "is in use by run" in err and "\n" not in err
        assert {p: p.stat().st_mtime_ns for p in run_dir(tmp_path).rglob("*")} == before
        assert sorted((tmp_path / "mirror").rglob("*")) == mirror_before
    finally:
        process.kill()
        process.wait(30)
