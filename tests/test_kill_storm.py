"""SIGKILL storm in CI: 10 kills, most aimed inside the run store's writes, with the mirror on; every rerun resumes
from a sound checkpoint, and the run ends with the losses of an uninterrupted one and a complete mirror."""

from __future__ import annotations

import sys
from pathlib import Path

from conftest import REPO

sys.path.insert(0, str(REPO / "scripts"))
import chaos  # noqa: E402


def test_sigkill_storm_aimed_at_the_stores_writes_loses_nothing_saved(tmp_path: Path) -> None:
    report = chaos.storm(tmp_path / "storm", kills=10, every=10, seed=1, episodes=120)
    assert report.failures == []
    assert report.kills == 10 and sum(report.aimed_kills.values()) >= 6
    assert set(report.aimed_kills) == {"checkpoint", "manifest", "upload", "mirror-manifest"}
    assert report.resumes == 10, "every rerun resumed from a sound checkpoint"
    assert report.max_episodes_lost <= 2 * 10 + 1
    assert report.listings_checked > 0 and report.most_best_files <= 5
    assert report.losses_equal_uninterrupted and report.final_episode == report.total_episodes >= 120
    assert report.mirror_complete_at_end
    assert chaos.tmp_files(tmp_path / "storm") == [], "temporary files left by kills are removed at the next start"
