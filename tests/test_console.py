"""What a resumed run prints: one bar label, no negative rate, no expected-resume warnings, lines of their own."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import demo_args, env_without_warnings

pytestmark = pytest.mark.slow  # two trainings in subprocesses: out of the quick loop


def _atheria(args: list[str], cwd: Path) -> str:
    env = {**env_without_warnings(), "PYTHONWARNINGS": "default"}  # warnings shown, as a user sees them
    command = [sys.executable, "-m", "atheria_lightning.cli", *args]
    done = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout + done.stderr


def test_a_resumed_run_prints_one_bar_and_its_lines_cleanly(tmp_path: Path) -> None:
    bar = ["--trainer.enable_progress_bar", "true"]
    _atheria(demo_args(tmp_path, "--trainer.max_steps", "4", *bar, episodes=8, val_every=2), tmp_path)
    printed = _atheria(demo_args(tmp_path, *bar, episodes=8, val_every=2), tmp_path)
    lines = printed.replace("\r", "\n").splitlines()
    assert any(line.startswith("resuming from episode 4 of 8") for line in lines)
    labels = {line.split(":")[0].strip() for line in lines if re.search(r"\d+/\d+ \[", line) or "/?" in line}
    assert labels == {"episode"}, f"one bar label, not {labels}"
    assert not re.search(r"-\d[\d.]*it/s", printed), "no negative rate"
    assert any(line.startswith("time used: ") for line in lines), "the time line starts its own line"
    for noise in ("exists and is not empty", "conditioned on metric", "Tip:", "Restoring states", "LeafSpec"):
        assert noise not in printed, noise
