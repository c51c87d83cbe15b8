"""The survival layer around a LightningModule that is not Atheria's (Lightning's BoringModel): retention, the
mirror, a SIGKILL and a resume from the mirror alone; steps stand in for episodes."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from any_module_run import fit
from conftest import REPO, env_without_warnings, wait_for_first_checkpoint

pytestmark = pytest.mark.slow  # trains in subprocesses or over several sessions: out of the quick loop

RUN = str(Path(__file__).resolve().parent / "any_module_run.py")


def manifest(folder: Path) -> dict:
    return json.loads((folder / "MANIFEST.json").read_text())["files"]


def test_any_module_keeps_its_top_k_and_mirror_and_resumes_after_a_kill_and_from_the_mirror(tmp_path: Path) -> None:
    run, mirror = tmp_path / "runs" / "boring", tmp_path / "mirror"
    command = [sys.executable, "-u", RUN, str(run), str(mirror), "200"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO,
                               env=env_without_warnings())  # fmt: skip
    try:
        wait_for_first_checkpoint(run)
        process.send_signal(signal.SIGKILL)
        process.wait(30)
    finally:
        process.kill()
    killed_at = manifest(run / "checkpoints")["last.ckpt"]["episode"]  # steps, where a module has no episodes
    assert 0 < killed_at < 200

    _, resumed = fit(str(run), str(mirror), 120)  # the same run again: it resumes after the kill
    assert resumed is not None and resumed.episode == killed_at
    local = manifest(run / "checkpoints")
    assert local["last.ckpt"]["episode"] == 120
    bests = [name for name in local if name.startswith("best-")]
    assert 1 <= len(bests) <= 2, bests
    assert {n: e["sha256"] for n, e in manifest(mirror / "boring" / "checkpoints").items()} == {
        n: e["sha256"] for n, e in local.items()
    }

    shutil.rmtree(tmp_path / "runs")  # a new machine: only the mirror is left
    store, resumed = fit(str(run), str(mirror), 150)
    assert resumed is not None and resumed.source == "mirror" and resumed.episode == 120
    state = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert state["global_step"] == 150 and store.newest_episode() == 150
    assert len([name for name in manifest(run / "checkpoints") if name.startswith("best-")]) <= 2
