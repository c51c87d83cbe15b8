"""``--max_hours``: this session's budget, set on the command line over the preset's TimeLimitGuard."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import demo_args, run_dir

from atheria_lightning.callbacks import time_guard
from atheria_lightning.cli import main


def test_max_hours_sets_this_sessions_budget_over_the_presets(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    # The budget counts from the process's start: a session a minute old is past 90% of 0.0005 h (1.6 s), so the
    # guard stops after the first episode, with a checkpoint, where the preset's 0.25 h would train all 6.
    monkeypatch.setattr(time_guard, "process_age_seconds", lambda: 60.0)
    assert main(demo_args(tmp_path, "--max_hours", "0.0005")) == 0
    out = capsys.readouterr().out
    assert "stopped at episode 1 of 6" in out and "of the 0.0005 h budget" in out
    assert (run_dir(tmp_path) / "checkpoints" / "last.ckpt").is_file()

    assert main(demo_args(tmp_path)) == 0  # the next session, with the preset's budget: it finishes the run
    out = capsys.readouterr().out
    assert "resuming from episode 1 of 6" in out and "TimeLimitGuard.max_hours 0.0005 -> 0.25" in out


@pytest.mark.parametrize("hours", ["0", "-2"])
def test_a_bad_max_hours_is_one_line_before_anything_is_created(
    hours: str, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    assert main(demo_args(tmp_path, "--max_hours", hours)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"atheria: error: max_hours={float(hours)!r} must be a number of hours")
    assert not (tmp_path / "runs").exists() and not (tmp_path / "mirror").exists()
