"""Two processes (DDP on CPU, gloo): the guard stops both at the same episode, rank 0 alone writes, resume works."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, callbacks_config, demo_args, env_without_warnings, run_dir, wait_for_first_checkpoint

pytestmark = [
    pytest.mark.skipif(sys.platform != "linux", reason="DDP on CPU is exercised on Linux"),
    pytest.mark.slow,  # two training processes per test: out of the quick loop
]


def _ddp_fit(tmp_path: Path, guard_hours: float, episodes: int) -> subprocess.CompletedProcess:
    extra = callbacks_config(tmp_path, guard_hours=guard_hours, every=5, sync=5, monitor_every=1000)
    args = demo_args(tmp_path, "--config", extra, "--trainer.strategy", "ddp", "--trainer.devices", "2",
                     episodes=episodes, val_every=5)  # fmt: skip
    return subprocess.run([sys.executable, "-u", "-m", "atheria_lightning.cli", *args], capture_output=True,
                          text=True, cwd=REPO, env=env_without_warnings(), timeout=400)  # fmt: skip


def test_guard_stops_both_ranks_together_and_a_two_rank_run_resumes(tmp_path: Path) -> None:
    # 0.012 h = 43 s from process start, stop point 39 s: start-up takes part of it, training the rest.
    first = _ddp_fit(tmp_path, guard_hours=0.012, episodes=100000)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    stopped = re.findall(r"stopped at episode (\d+) of 100000", first.stdout)
    assert len(stopped) == 1, "one message, from rank 0 only"
    episode = int(stopped[0])
    local = json.loads((run_dir(tmp_path) / "checkpoints" / "MANIFEST.json").read_text())["files"]
    assert local["last.ckpt"]["episode"] == episode
    mirror = json.loads((tmp_path / "mirror" / "demo" / "checkpoints" / "MANIFEST.json").read_text())["files"]
    assert mirror["last.ckpt"]["sha256"] == local["last.ckpt"]["sha256"]
    assert len(list((run_dir(tmp_path) / "logs").glob("events.out.tfevents.*"))) == 1, "rank 0 alone logs"

    second = _ddp_fit(tmp_path, guard_hours=1.0, episodes=episode + 4)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert f"resuming from episode {episode} of {episode + 4}" in second.stdout
    assert f"episodes: 4 this session, {episode + 4} of {episode + 4} in the run" in second.stdout


def test_sigterm_to_one_rank_stops_every_rank_with_a_checkpoint(tmp_path: Path) -> None:
    import signal

    import psutil

    extra = callbacks_config(tmp_path, guard_hours=1.0, every=5, sync=5, monitor_every=1000)
    args = demo_args(tmp_path, "--config", extra, "--trainer.strategy", "ddp", "--trainer.devices", "2",
                     episodes=100000, val_every=5)  # fmt: skip
    process = subprocess.Popen([sys.executable, "-u", "-m", "atheria_lightning.cli", *args], stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, cwd=REPO, env=env_without_warnings())  # fmt: skip
    try:
        manifest = wait_for_first_checkpoint(run_dir(tmp_path))
        ranks = [
            p
            for p in psutil.Process(process.pid).children(recursive=True)
            if "atheria_lightning" in " ".join(p.cmdline())
        ]
        assert ranks, "the DDP launcher starts rank 1 as a child process"
        ranks[0].send_signal(signal.SIGTERM)  # rank 1 only
        out, _ = process.communicate(timeout=180)
    finally:
        process.kill()
    assert process.returncode == 0, out[-3000:]
    stopped = re.search(r"stopped at episode (\d+) of 100000 .*stop requested on another rank", out)
    assert stopped, out[-3000:]
    local = json.loads(manifest.read_text())["files"]
    assert local["last.ckpt"]["episode"] == int(stopped.group(1))


def _probed_ddp_fit(tmp_path: Path, *extra: str, episodes: int, **probe: int) -> list[dict]:
    """A two-rank DDP fit with :class:`rank_probe.RankProbe`; what each rank ended with."""
    settings = "".join(f", {key}: {value}" for key, value in probe.items())
    config = tmp_path / "probe.yaml"
    config.write_text(f"""trainer:
  callbacks:
    - class_path: rank_probe.RankProbe
      init_args: {{folder: {tmp_path / "ranks"}{settings}}}
""")
    args = demo_args(tmp_path, "--config", str(config), "--trainer.strategy", "ddp", "--trainer.devices", "2", *extra,
                     episodes=episodes, val_every=100, mirror=False)  # fmt: skip
    env = {**env_without_warnings(), "PYTHONPATH": str(REPO / "tests")}
    done = subprocess.run([sys.executable, "-u", "-m", "atheria_lightning.cli", *args], capture_output=True,
                          text=True, cwd=REPO, env=env, timeout=180)  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return [json.loads((tmp_path / "ranks" / f"rank{rank}.json").read_text()) for rank in (0, 1)]


def test_every_rank_lowers_the_learning_rate_at_the_same_episode_and_keeps_the_same_weights(tmp_path: Path) -> None:
    # ReduceLROnPlateau steps on train/loss every episode on every rank. Each rank rolls out its own universes, so a
    # per-rank loss would lower the learning rate at different episodes on different ranks and the replicas would
    # drift apart (DDP averages gradients, not weights). With lr_patience 0 almost every episode lowers it.
    ranks = _probed_ddp_fit(tmp_path, "--model.lr_patience", "0", "--model.max_noise", "0.2", episodes=12)
    assert len(set(ranks[0]["lrs"])) > 2, "the learning rate was lowered, so the test can tell the ranks apart"
    assert ranks[0]["lrs"] == ranks[1]["lrs"]
    assert ranks[0]["weights_sum"] == ranks[1]["weights_sum"]
    assert ranks[0]["weights_abs_sum"] == ranks[1]["weights_abs_sum"]


def test_a_nan_loss_on_one_rank_skips_the_episode_on_every_rank(tmp_path: Path) -> None:
    # Skipping on rank 1 alone would leave rank 0 waiting forever in the gradient all-reduce (the timeout fails it).
    ranks = _probed_ddp_fit(tmp_path, episodes=6, nan_on_rank=1, nan_at_episode=3)
    assert [rank["skipped"] for rank in ranks] == [1, 1]
    assert math.isfinite(ranks[0]["weights_sum"]), "the NaN gradients never reached the weights"
    assert ranks[0]["weights_sum"] == ranks[1]["weights_sum"]


def test_checkpointed_rollouts_train_under_ddp_and_keep_the_ranks_weights_equal(tmp_path: Path) -> None:
    # Each segment's gradients reach the weights through the graph, so DDP's reducer sees each weight ready once per
    # episode. torch's reentrant checkpoint, which calls backward inside the backward, fails this: the ranks' weights
    # drift apart without an error (158.674 against 158.572 after 4 episodes).
    ranks = _probed_ddp_fit(tmp_path, "--model.checkpoint_every", "1", episodes=4)
    assert math.isfinite(ranks[0]["weights_sum"])
    assert ranks[0]["weights_sum"] == ranks[1]["weights_sum"]
    assert ranks[0]["weights_abs_sum"] == ranks[1]["weights_abs_sum"]
