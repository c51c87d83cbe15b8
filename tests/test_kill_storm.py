"""SIGKILL storm in CI: 10 kills, most aimed inside the run store's writes, with the mirror on; every rerun resumes
from a sound checkpoint, and the run ends with the losses of an uninterrupted one and a complete mirror. Then two
machines on one mirror: take-overs, refusals and kills, and the mirror never loses or goes back on what it listed."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, env_without_warnings

pytestmark = pytest.mark.slow  # trains in subprocesses or over several sessions: out of the quick loop

CHAOS = REPO / "scripts" / "chaos.py"


def run_storm(workdir: Path, *options: str, report: str = "storm") -> tuple[dict, subprocess.CompletedProcess]:
    """``scripts/chaos.py`` as the soak run starts it; returns its report (its JSON line ``{"<report>": ...}``) and
    the finished process."""
    command = [sys.executable, str(CHAOS), "--workdir", str(workdir), *options]
    done = subprocess.run(command, capture_output=True, text=True, cwd=REPO, env=env_without_warnings(), timeout=1800)
    lines = [line for line in done.stdout.splitlines() if line.startswith(f'{{"{report}"')]
    assert lines, f"chaos.py printed no report (exit {done.returncode}): {done.stdout[-2000:]}{done.stderr[-3000:]}"
    return json.loads(lines[-1])[report], done


def test_sigkill_storm_aimed_at_the_stores_writes_loses_nothing_saved(tmp_path: Path) -> None:
    report, done = run_storm(tmp_path, "--kills", "10", "--every", "10", "--episodes", "120", "--seed", "1")
    assert report["failures"] == []
    assert done.returncode == 0, done.stderr[-3000:]
    assert report["kills"] == 10 and sum(report["aimed_kills"].values()) >= 6
    assert set(report["aimed_kills"]) == {"checkpoint", "manifest", "upload", "mirror-manifest"}
    assert report["resumes"] == 10, "every rerun resumed from a sound checkpoint"
    assert report["max_episodes_lost"] <= 2 * 10 + 1
    assert report["listings_checked"] > 0 and report["most_best_files"] <= 5
    assert report["losses_equal_uninterrupted"] and report["final_episode"] == report["total_episodes"] >= 120
    assert report["mirror_complete_at_end"]
    left = [path for path in (tmp_path / "storm" / "runs").rglob("*") if ".tmp-" in path.name]
    assert left == [], "temporary files left by kills are removed at the next start"


def test_two_machines_on_one_mirror_take_over_are_refused_and_lose_nothing_listed(tmp_path: Path) -> None:
    # The schedule comes from the seed: round 0 is A then B with --take_over, nothing killed; round 1 B then A;
    # round 2 both at once, neither with --take_over.
    report, done = run_storm(tmp_path, "--two-machines", "3", "--seed", "1", report="two_machines")
    assert report["failures"] == [], report["round_log"]
    assert done.returncode == 0, done.stderr[-3000:]
    assert report["rounds"] == 3 and set(report["orders"]) == {"a_then_b", "b_then_a", "at_once"}
    assert report["take_overs"] >= 1 and report["superseded_exits"] >= 1, report["round_log"]
    assert report["refusals"] >= 1, "of two starts at once without --take_over, one is refused"
    assert set(report["exit_codes"]) <= {"0", "5", "-9"}
    assert report["fresh_resumes"] == 3, "after each round a fresh machine resumed from the mirror's newest episode"
    assert report["max_episode"] > 0 and report["listings_seen"] >= 3 and report["files_verified"] > 0
