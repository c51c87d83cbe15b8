"""SIGKILL storm in CI: 10 kills, a third near a checkpoint write; every rerun resumes within every_n_episodes."""

from __future__ import annotations

import sys
from pathlib import Path

from conftest import REPO

sys.path.insert(0, str(REPO / "scripts"))
import chaos  # noqa: E402


def test_sigkill_storm_never_loses_more_than_every_n_episodes(tmp_path: Path) -> None:
    report = chaos.storm(tmp_path / "storm", kills=10, every=10, seed=1)
    assert report.failures == []
    assert report.kills == 10 and report.near_write_kills >= 3
    assert report.resumes == 10, "every rerun resumed from a verified checkpoint"
    assert report.max_episodes_lost <= 10
    assert chaos.tmp_files(tmp_path / "storm") == [], "temporary files left by kills are removed at the next start"
