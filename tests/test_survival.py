"""Surviving the session: time guard, retention, mirror resume, corrupt checkpoints, exact resume, SIGKILL."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import types
from pathlib import Path

import fsspec
import pytest
from conftest import (
    REPO,
    FakeEpisodeClock,
    callbacks_config,
    demo_args,
    env_without_warnings,
    run_dir,
    wait_for,
    wait_for_first_checkpoint,
)
from fsspec.implementations.memory import MemoryFileSystem
from lightning.pytorch.callbacks import Callback
from test_cli import scalars

from atheria_lightning.callbacks import time_guard
from atheria_lightning.cli import AtheriaCLI, main

pytestmark = pytest.mark.slow  # trains in subprocesses or over several sessions: out of the quick loop


def manifest_of(folder: Path) -> dict:
    return json.loads((folder / "MANIFEST.json").read_text())["files"]


def losses(tmp_path: Path) -> list[float]:
    return [value for _, value in scalars(run_dir(tmp_path) / "logs", "train/loss")]


def test_guard_stops_before_the_budget_with_a_checkpoint_and_the_same_command_resumes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    clock = FakeEpisodeClock(seconds_per_episode=60.0)  # the guard's budget runs out fast
    monkeypatch.setattr(time_guard, "time", types.SimpleNamespace(monotonic=clock, time=time.time))
    # demo.yaml's guard: 0.25 h = 900 s, stop point 90% = 810 s; 60 s episodes
    args = demo_args(tmp_path, episodes=40, val_every=5)
    AtheriaCLI(args=args, trainer_defaults={"callbacks": [clock]})
    out = capsys.readouterr().out
    stopped = re.search(r"stopped at episode (\d+) of 40 \((\d+)%\), run the same command again to continue", out)
    assert stopped, out
    episode = int(stopped.group(1))
    assert episode * 60.0 <= 810.0, "the last episode must end before the stop point"
    assert episode * 60.0 + 60.0 * 1.25 > 810.0, "the guard should not stop much earlier than needed"
    last = manifest_of(run_dir(tmp_path) / "checkpoints")["last.ckpt"]
    assert last["episode"] == episode
    assert manifest_of(tmp_path / "mirror" / "demo" / "checkpoints")["last.ckpt"]["sha256"] == last["sha256"]

    clock.now = 0.0  # a new session
    AtheriaCLI(args=args, trainer_defaults={"callbacks": [clock]})
    assert f"resuming from episode {episode} of 40" in capsys.readouterr().out


def test_resumed_losses_equal_the_uninterrupted_run_bitwise(tmp_path: Path) -> None:
    straight, interrupted = tmp_path / "straight", tmp_path / "interrupted"
    assert main(demo_args(straight, episodes=8, val_every=3)) == 0
    assert main(demo_args(interrupted, "--trainer.max_steps", "5", episodes=8, val_every=3)) == 0
    assert manifest_of(run_dir(interrupted) / "checkpoints")["last.ckpt"]["episode"] == 5
    assert main(demo_args(interrupted, episodes=8, val_every=3)) == 0
    assert len(losses(straight)) == 8
    assert losses(interrupted) == losses(straight)


def test_retention_keeps_the_k_lowest_and_last_locally_and_on_the_mirror(tmp_path: Path) -> None:
    assert main(demo_args(tmp_path, episodes=16, val_every=1)) == 0  # 16 validations, top 5
    ranked = dict(scalars(run_dir(tmp_path) / "logs", "val/loss"))  # the presets' monitor
    assert len(ranked) == 16
    files = manifest_of(run_dir(tmp_path) / "checkpoints")
    best = {name: entry for name, entry in files.items() if name.startswith("best-")}
    assert len(best) == 5 and "last.ckpt" in files
    five_lowest = sorted(ranked.values())[:5]
    assert sorted(entry["metric"] for entry in best.values()) == pytest.approx(five_lowest, rel=1e-6)
    on_disk = {p.name for p in (run_dir(tmp_path) / "checkpoints").glob("*.ckpt")}
    assert on_disk == set(files)
    mirror = tmp_path / "mirror" / "demo" / "checkpoints"
    assert manifest_of(mirror) == files
    assert {p.name for p in mirror.glob("*.ckpt")} == set(files)


def test_local_run_folder_deleted_resume_comes_from_the_mirror(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(demo_args(tmp_path, "--trainer.max_steps", "4", episodes=8, val_every=2)) == 0
    mirrored_before = manifest_of(tmp_path / "mirror" / "demo" / "checkpoints")
    shutil.rmtree(tmp_path / "runs")
    capsys.readouterr()
    assert main(demo_args(tmp_path, episodes=8, val_every=2)) == 0
    out = capsys.readouterr().out
    assert "resuming from episode 4 of 8" in out and "[mirror:" in out
    assert "episodes: 4 this session, 8 of 8 in the run" in out
    # The whole verified set came back, so no best checkpoint was lost locally or on the mirror.
    after = manifest_of(run_dir(tmp_path) / "checkpoints")
    assert {n for n in mirrored_before if n.startswith("best-")} <= set(after)
    assert manifest_of(tmp_path / "mirror" / "demo" / "checkpoints") == after


@pytest.mark.parametrize("damage", ["truncate", "flip_byte", "zero_length", "unlisted"])
def test_damaged_last_checkpoint_falls_back_to_the_previous_valid_one(
    damage: str, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    args = demo_args(tmp_path, "--trainer.max_steps", "6", episodes=12, val_every=3, mirror=False)
    assert main(args) == 0
    folder = run_dir(tmp_path) / "checkpoints"
    last = folder / "last.ckpt"
    data = last.read_bytes()
    if damage == "truncate":
        last.write_bytes(data[: len(data) // 2])
    elif damage == "flip_byte":
        last.write_bytes(data[:100] + bytes([data[100] ^ 0xFF]) + data[101:])
    elif damage == "zero_length":
        last.write_bytes(b"")
    else:  # a checkpoint missing from a sound manifest is not trusted, however new
        manifest = json.loads((folder / "MANIFEST.json").read_text())
        del manifest["files"]["last.ckpt"]
        (folder / "MANIFEST.json").write_text(json.dumps(manifest))
    capsys.readouterr()
    assert main(demo_args(tmp_path, episodes=12, val_every=3, mirror=False)) == 0
    out = capsys.readouterr().out
    assert "resuming from episode 6 of 12" in out and "best-e000006.ckpt" in out
    aside = "unlisted" if damage == "unlisted" else "corrupt"
    assert list((folder / aside).glob("last.ckpt.*")), "the damaged file is moved aside, not deleted"


class QuotaMemoryFileSystem(MemoryFileSystem):
    """A Drive mount at quota: every second write fails with EIO. (Its own protocol: test_mirror registers another
    ``flakymem`` class, and whichever registers last would serve both.)"""

    protocol = "quotamem"
    calls = 0

    @classmethod
    def _strip_protocol(cls, path):  # type: ignore[override]
        return super()._strip_protocol(path.removeprefix("quotamem://") if isinstance(path, str) else path)

    def _open(self, path: str, mode: str = "rb", **kwargs: object):  # type: ignore[override]
        if "w" in mode:
            QuotaMemoryFileSystem.calls += 1
            if QuotaMemoryFileSystem.calls % 2 == 0:
                raise OSError(5, "Input/output error")
        return super()._open(path, mode, **kwargs)


def test_mirror_failing_every_second_call_still_ends_complete(tmp_path: Path) -> None:
    fsspec.register_implementation("quotamem", QuotaMemoryFileSystem, clobber=True)
    url = f"quotamem://survival-{os.getpid()}-{time.monotonic_ns()}"
    args = demo_args(tmp_path, episodes=8, val_every=2)
    args[args.index("--mirror_url") + 1] = url
    args += ["--config", callbacks_config(tmp_path, sync=2, backoff_s=0.01)]
    assert main(args) == 0
    fs = fsspec.filesystem("quotamem")
    remote = url.split("://", 1)[1] + "/demo/checkpoints"
    local = run_dir(tmp_path) / "checkpoints"
    remote_manifest = json.loads(fs.cat_file(f"{remote}/MANIFEST.json"))["files"]
    assert {n: e["sha256"] for n, e in remote_manifest.items()} == {
        n: e["sha256"] for n, e in manifest_of(local).items()
    }
    for name, entry in remote_manifest.items():
        assert hashlib.sha256(fs.cat_file(f"{remote}/{name}")).hexdigest() == entry["sha256"]


def test_sigkill_mid_training_resumes_losing_at_most_every_n_episodes(tmp_path: Path) -> None:
    every = 10  # demo.yaml: SmartCheckpoint(every_n_episodes=10)
    # ResourceMonitor prints "[episode k/400]" after every episode: how far the killed run got.
    extra = callbacks_config(tmp_path, every=every, monitor_every=1)
    args = demo_args(tmp_path, "--config", extra, episodes=400, val_every=50)
    command = [sys.executable, "-u", "-m", "atheria_lightning.cli", *args]
    log_path = tmp_path / "first.log"
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=REPO, env=env_without_warnings())
        try:
            wait_for_first_checkpoint(run_dir(tmp_path), 120)
            time.sleep(0.7)
        finally:
            process.send_signal(signal.SIGKILL)
            process.wait(30)
    reached = max(int(m) for m in re.findall(r"\[episode (\d+)/400\]", log_path.read_text()))
    assert reached < 400, "the run should have been killed mid-way"
    resumed = subprocess.run(command + ["--trainer.max_steps", "1"], capture_output=True, text=True, cwd=REPO,
                             env=env_without_warnings(), timeout=300)  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    episode = int(re.search(r"resuming from episode (\d+) of 400", resumed.stdout).group(1))
    # A save waits one episode for the loss that proves it sound, so a kill can cost every + 1 episodes.
    assert reached - every - 1 <= episode <= reached


def test_a_periodic_mirror_sync_carries_the_checkpoint_of_the_same_episode(tmp_path: Path) -> None:
    """SmartCheckpoint runs after MirrorSync in Lightning's order: the sync must still see this episode's file."""
    from lightning.pytorch import Trainer

    from atheria_lightning.callbacks import MirrorSync, SmartCheckpoint
    from atheria_lightning.data import EpisodeDataModule
    from atheria_lightning.module import QCAModule
    from atheria_lightning.store import RunStore

    seen: dict[int, int] = {}
    store = RunStore(tmp_path / "run")

    class MirrorProbe(Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            episode = batch["episode"] + 1
            if episode % 4 == 1 and episode > 1:  # the sync for episode - 1 was requested as this episode started
                # (the first sync ran at the start, for what the mirror lacked)
                assert wait_for(lambda: store.syncs_ended >= episode // 4 + 1, 30)
                remote = manifest_of(tmp_path / "mirror" / "run" / "checkpoints")
                seen[episode - 1] = remote["last.ckpt"]["episode"]

    mirror = MirrorSync(str(tmp_path / "mirror"), every_n_episodes=4, max_share=0.99).use_store(store)
    # The interval stays 4: on a loaded machine a sync can take longer than these millisecond episodes plus the
    # probe's wait, and a stretched interval would skip the sync this test waits for.
    mirror._adapt_interval = lambda duration_s, gap_s: None  # type: ignore[method-assign]
    checkpoint = SmartCheckpoint(every_n_episodes=4).use_store(store)
    # Validation every 4 episodes too, as the presets do: each save is made (and proven sound) right after it.
    trainer = Trainer(max_epochs=-1, logger=False, enable_progress_bar=False, val_check_interval=4,
                      check_val_every_n_epoch=None, default_root_dir=str(tmp_path / "run"), num_sanity_val_steps=0,
                      callbacks=[MirrorProbe(), mirror, checkpoint])  # fmt: skip
    model = QCAModule(architecture="MLP", d_state=2, hidden_channels=4, grid_size=8, qca_steps=2)
    trainer.fit(model, datamodule=EpisodeDataModule(total_episodes=14, val_every_episodes=4))
    store.close()
    assert seen == {4: 4, 8: 8, 12: 12}
