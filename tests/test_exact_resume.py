"""Exact resume: the random-number states a checkpoint carries, and Lightning's demo LightningTransformer (dropout,
a shuffled DataLoader), a module no one here wrote, killed and resumed at an epoch boundary, ending with the
uninterrupted run's weights, bit for bit, on the CPU."""

from __future__ import annotations

import json
import logging
import random
import re
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO, env_without_warnings, wait_for_first_checkpoint
from lightning.pytorch import Trainer, seed_everything
from lightning.pytorch.demos.boring_classes import BoringModel
from lightning.pytorch.trainer.states import TrainerStatus
from transformer_run import STEPS_PER_EPOCH, UserTransformer

from atheria_lightning.callbacks import SmartCheckpoint
from atheria_lightning.data import EpisodeDataModule
from atheria_lightning.module import QCAModule
from atheria_lightning.store import RunStore

RUN = str(Path(__file__).resolve().parent / "transformer_run.py")
STEPS = 5 * STEPS_PER_EPOCH
MID_EPOCH = "in the middle of an epoch"  # the warning at a resume that cannot replay exactly


def draws() -> list[float]:
    """A few numbers from each global generator (and CUDA's, where there is one)."""
    numbers = [*torch.rand(3).tolist(), *np.random.rand(3).tolist(), random.random()]
    return numbers + (torch.rand(3, device="cuda").tolist() if torch.cuda.is_available() else [])


def scramble() -> None:
    torch.manual_seed(12345)  # CUDA's too
    np.random.seed(12345)
    random.seed(12345)


def test_a_checkpoint_written_by_the_store_loads_weights_only_and_restores_the_random_number_states(
    tmp_path: Path,
) -> None:
    torch.manual_seed(3)
    if torch.cuda.is_available():
        torch.cuda.init()  # its states are saved once CUDA is in use
    draws()  # away from the seeds: states in the middle of their streams
    state = SmartCheckpoint().state_dict()
    expected = draws()  # what the run drew after the save
    store = RunStore(tmp_path / "run", async_write=False)
    store.write_checkpoint({"state_dict": {}, "callbacks": {SmartCheckpoint().state_key: state}}, "last", 1)
    scramble()

    loaded = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)  # no numpy objects
    SmartCheckpoint().load_state_dict(loaded["callbacks"]["SmartCheckpoint"])
    assert draws() == expected


def fit_transformer(root: Path, steps: int, validate: bool) -> tuple[dict[str, torch.Tensor], int | None]:
    """The demo transformer to ``steps`` steps in this process, resuming from the run store of ``root``: its weights
    and the step it resumed from. Without validation, ``last.ckpt`` is saved at the end of an epoch's last batch
    instead of after the validation that follows it, and Lightning resumes the two differently."""
    seed_everything(7, verbose=False)
    model = UserTransformer()
    store = RunStore(root / "run")
    checkpoints = SmartCheckpoint(every_n_episodes=STEPS_PER_EPOCH, monitor="val_loss").use_store(store)
    trainer = Trainer(max_steps=steps, limit_val_batches=None if validate else 0, logger=False,
                      enable_progress_bar=False, enable_model_summary=False, plugins=[store.checkpoint_io],
                      callbacks=[checkpoints])  # fmt: skip
    point = store.start()
    trainer.fit(model, ckpt_path=point.path if point else None)
    store.close()
    return model.state_dict(), point.episode if point else None


@pytest.mark.parametrize("validate", [True, False], ids=["saved-after-validation", "saved-at-the-last-batch"])
def test_a_resume_at_an_epoch_boundary_replays_the_uninterrupted_run(validate: bool, tmp_path: Path) -> None:
    whole, _ = fit_transformer(tmp_path / "whole", 3 * STEPS_PER_EPOCH, validate)
    fit_transformer(tmp_path / "resumed", 2 * STEPS_PER_EPOCH, validate)
    again, resumed_at = fit_transformer(tmp_path / "resumed", 3 * STEPS_PER_EPOCH, validate)
    assert resumed_at == 2 * STEPS_PER_EPOCH
    assert [name for name in whole if not torch.equal(whole[name], again[name])] == []


def fit_boring(root: Path, steps: int, ckpt_path: str | None = None) -> Trainer:
    """BoringModel (4 batches an epoch) to ``steps`` steps through the run store of ``root``, a last.ckpt every 2
    steps, resuming from ``ckpt_path`` or else the store's newest checkpoint."""
    store = RunStore(root / "run")
    trainer = Trainer(max_steps=steps, limit_train_batches=4, limit_val_batches=1, logger=False,
                      enable_progress_bar=False, enable_model_summary=False, plugins=[store.checkpoint_io],
                      callbacks=[SmartCheckpoint(every_n_episodes=2).use_store(store)])  # fmt: skip
    point = store.start()
    trainer.fit(BoringModel(), ckpt_path=ckpt_path or (point.path if point else None))
    store.close()
    return trainer


def warnings_of(caplog: pytest.LogCaptureFixture, text: str) -> list[logging.LogRecord]:
    return [record for record in caplog.records if text in record.getMessage()]


@pytest.mark.parametrize("states", ["missing", "malformed"])
def test_a_checkpoint_without_sound_states_still_resumes(
    states: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    fit_boring(tmp_path, steps=4)
    checkpoint = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)
    if states == "missing":  # a checkpoint of an earlier version
        checkpoint["callbacks"].pop("SmartCheckpoint", None)
    else:
        checkpoint["callbacks"]["SmartCheckpoint"]["rng"]["numpy"]["keys"] = torch.zeros(3, dtype=torch.int64)
    torch.save(checkpoint, tmp_path / "earlier.ckpt")
    with caplog.at_level(logging.WARNING, logger="atheria_lightning.callbacks.checkpoint"):
        trainer = fit_boring(tmp_path / "again", steps=6, ckpt_path=str(tmp_path / "earlier.ckpt"))
    assert trainer.state.status == TrainerStatus.FINISHED and trainer.global_step == 6
    assert len(warnings_of(caplog, "random-number states are not restored")) == (states == "malformed")


@pytest.mark.parametrize(("steps", "warns"), [(4, False), (6, True)], ids=["epoch-boundary", "mid-epoch"])
def test_a_resume_in_the_middle_of_an_epoch_of_a_plain_dataloader_warns_once(
    steps: int, warns: bool, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    fit_boring(tmp_path, steps=steps)  # last.ckpt at step 4 (the end of epoch 1) or 6 (half-way through epoch 2)
    with caplog.at_level(logging.WARNING, logger="atheria_lightning.callbacks.checkpoint"):
        trainer = fit_boring(tmp_path, steps=steps + 3)
    assert trainer.global_step == steps + 3
    assert len(warnings_of(caplog, MID_EPOCH)) == warns


def test_a_resume_in_the_middle_of_the_episode_stream_does_not_warn(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Its one open-ended epoch makes every resume a mid-epoch one; it replays exactly, and says so.
    for episodes in (4, 6):
        store = RunStore(tmp_path / "run")
        trainer = Trainer(max_epochs=-1, logger=False, enable_progress_bar=False, enable_model_summary=False,
                          val_check_interval=2, check_val_every_n_epoch=None, num_sanity_val_steps=0,
                          plugins=[store.checkpoint_io],
                          callbacks=[SmartCheckpoint(every_n_episodes=2).use_store(store)])  # fmt: skip
        point = store.start()
        model = QCAModule(architecture="MLP", d_state=2, hidden_channels=4, grid_size=8, qca_steps=2)
        with caplog.at_level(logging.WARNING, logger="atheria_lightning.callbacks.checkpoint"):
            trainer.fit(model, datamodule=EpisodeDataModule(total_episodes=episodes, val_every_episodes=2),
                        ckpt_path=point.path if point else None)  # fmt: skip
        store.close()
    assert point is not None and point.episode == 4 and trainer.global_step == 6
    assert not warnings_of(caplog, MID_EPOCH)


def command(folder: Path, pace: float = 0.0) -> list[str]:
    return [sys.executable, "-u", RUN, str(folder / "run"), str(folder / "mirror"), str(STEPS), str(pace)]


def finish(folder: Path) -> str:
    done = subprocess.run(command(folder), capture_output=True, text=True, cwd=REPO, env=env_without_warnings(),
                          timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout


def last(folder: Path) -> tuple[dict[str, torch.Tensor], float]:
    """The final weights in ``last.ckpt`` and the validation loss its manifest entry records."""
    checkpoints = folder / "run" / "checkpoints"
    entry = json.loads((checkpoints / "MANIFEST.json").read_text())["files"]["last.ckpt"]
    state = torch.load(checkpoints / "last.ckpt", map_location="cpu", weights_only=True)
    assert state["global_step"] == entry["episode"] == STEPS
    return state["state_dict"], entry["metric"]


@pytest.mark.slow  # three training subprocesses
def test_a_transformer_killed_and_resumed_at_an_epoch_boundary_ends_with_the_uninterrupted_weights(
    tmp_path: Path,
) -> None:
    finish(tmp_path / "whole")

    killed = tmp_path / "killed"
    process = subprocess.Popen(command(killed, pace=0.2), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True, cwd=REPO, env=env_without_warnings())  # fmt: skip
    try:
        wait_for_first_checkpoint(killed / "run", episode=2 * STEPS_PER_EPOCH)
        process.send_signal(signal.SIGKILL)
        process.wait(30)
    finally:
        process.kill()
    out = finish(killed)  # the same command again: it resumes after the kill
    resumed = re.search(r"resumed from step (\d+)", out)
    assert resumed, out[-3000:]
    step = int(resumed.group(1))
    assert 2 * STEPS_PER_EPOCH <= step < STEPS and step % STEPS_PER_EPOCH == 0, "an epoch boundary, before the end"

    (whole, whole_loss), (again, again_loss) = last(tmp_path / "whole"), last(killed)
    assert whole.keys() == again.keys()
    differ = [name for name in whole if not torch.equal(whole[name], again[name])]
    assert not differ, f"resumed at step {step}: {len(differ)} of {len(whole)} tensors differ, e.g. {differ[:3]}"
    assert again_loss == whole_loss
