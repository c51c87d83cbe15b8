"""W&B across sessions, offline: one run id over every session of a run, its files inside the run folder (so mirrored),
and the summary naming the loggers in use."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import demo_args, env_without_warnings, run_dir

from atheria_lightning.cli import main
from atheria_lightning.loggers import ID_FILE, WandbRun

pytest.importorskip("wandb")

WANDB = ["--trainer.logger", "lightning.pytorch.loggers.WandbLogger"]


@pytest.fixture(autouse=True)
def _offline_wandb(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # Offline, and every folder W&B may write to under tmp_path: nothing reaches the network or the home folder.
    monkeypatch.setenv("WANDB_MODE", "offline")
    for var in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(var, str(tmp_path / "wandb-home" / var.lower()))
    for var in ("WANDB_API_KEY", "WANDB_RUN_ID", "WANDB_RESUME", "WANDB_PROJECT", "WANDB_NAME"):
        monkeypatch.delenv(var, raising=False)


def chosen_ids(out: str) -> list[tuple[str, str]]:
    """Each session's ``W&B: run <id> (<where the id came from>)`` line."""
    return re.findall(r"^W&B: run (\S+) \((.+?)\)", out, flags=re.MULTILINE)


def sessions(run: Path) -> dict[str, str]:
    """W&B's offline run folders under ``<run>/logs/wandb`` -> the run id of the ``run-<id>.wandb`` file in each."""
    found = {}
    for folder in sorted((run / "logs" / "wandb").glob("offline-run-*")):
        (record,) = folder.glob("run-*.wandb")
        found[folder.name] = record.name.removeprefix("run-").removesuffix(".wandb")
    return found


def checkpoint_id(run: Path) -> str:
    state = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    return state["callbacks"]["WandbRun"]["id"]


@pytest.mark.slow
def test_the_same_command_again_continues_the_same_wandb_run(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    run = run_dir(tmp_path)
    assert main(demo_args(tmp_path, *WANDB, "--trainer.max_steps", "2", episodes=4, val_every=2)) == 0
    first = capsys.readouterr().out
    ((run_id, source),) = chosen_ids(first)
    assert source == "new"
    assert json.loads((run / "logs" / "wandb_run.json").read_text()) == {"id": run_id}
    assert checkpoint_id(run) == run_id

    assert main(demo_args(tmp_path, *WANDB, episodes=4, val_every=2)) == 0
    second = capsys.readouterr().out
    assert "resuming from episode 2 of 4" in second
    assert chosen_ids(second) == [(run_id, "id from the checkpoint")]
    assert list(sessions(run).values()) == [run_id, run_id], "two sessions, both W&B's records of one run"
    assert checkpoint_id(run) == run_id
    # W&B's files are in the run folder only (not in the working folder, nor WANDB_DIR), and on the mirror.
    assert not (tmp_path / "wandb").exists() and not list((tmp_path / "wandb-home").rglob("offline-run-*"))
    assert list(sessions(tmp_path / "mirror" / "demo").values()) == [run_id, run_id]
    for out in (first, second):
        assert f"W&B (offline): wandb sync {run.resolve()}/logs/wandb/offline-run-*" in out
        assert "TensorBoard:" not in out, "no TensorBoard logger, no TensorBoard line"


@pytest.mark.slow
def test_a_session_without_wandb_keeps_the_run_id_for_the_next_one_with_it(
    tmp_path: Path, capsys: pytest.CaptureFixture, recwarn: pytest.WarningsRecorder
) -> None:
    run = run_dir(tmp_path)
    assert main(demo_args(tmp_path, *WANDB, "--trainer.max_steps", "2", episodes=6, val_every=2)) == 0
    ((run_id, _),) = chosen_ids(capsys.readouterr().out)
    recwarn.clear()
    assert main(demo_args(tmp_path, "--trainer.max_steps", "4", episodes=6, val_every=2)) == 0  # TensorBoard only
    assert "resuming from episode 2 of 6" in capsys.readouterr().out
    assert not [w for w in recwarn if "add the following callbacks" in str(w.message)], "no warning about W&B's state"
    assert checkpoint_id(run) == run_id, "the session without W&B passed the id on"
    assert main(demo_args(tmp_path, *WANDB, episodes=6, val_every=2)) == 0
    assert chosen_ids(capsys.readouterr().out) == [(run_id, "id from the checkpoint")]
    assert list(sessions(run).values()) == [run_id, run_id]


@pytest.mark.slow
def test_a_new_machine_continues_the_wandb_run_of_the_mirror(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(demo_args(tmp_path, *WANDB, "--trainer.max_steps", "2", episodes=4, val_every=2)) == 0
    ((run_id, _),) = chosen_ids(capsys.readouterr().out)
    shutil.rmtree(tmp_path / "runs")  # a new VM: only the mirror is left
    assert main(demo_args(tmp_path, *WANDB, episodes=4, val_every=2)) == 0
    out = capsys.readouterr().out
    assert "mirror: restored" in out and "resuming from episode 2 of 4" in out
    assert chosen_ids(out) == [(run_id, "id from the checkpoint")]
    run = run_dir(tmp_path)
    assert list(sessions(run).values()) == [run_id, run_id], "the first session's records came back beside the new"
    assert json.loads((run / "logs" / "wandb_run.json").read_text()) == {"id": run_id}


@pytest.mark.slow
def test_an_id_given_in_the_config_is_kept_and_tensorboard_beside_wandb_has_its_line(
    tmp_path: Path, capsys: pytest.CaptureFixture, caplog: pytest.LogCaptureFixture
) -> None:
    elsewhere = tmp_path / "elsewhere"
    config = tmp_path / "loggers.yaml"
    config.write_text(f"""trainer:
  logger:
    - class_path: atheria_lightning.loggers.BufferedTensorBoardLogger
      init_args: {{save_dir: {run_dir(tmp_path)}, name: logs, version: ""}}
    - class_path: lightning.pytorch.loggers.WandbLogger
      init_args: {{id: my-run-1, save_dir: {elsewhere}}}
""")
    assert main(demo_args(tmp_path, "--config", str(config), "--trainer.max_steps", "1", episodes=4)) == 0
    captured = capsys.readouterr()
    assert chosen_ids(captured.out) == [("my-run-1", "id from the config")]
    assert f"WandbLogger save_dir={str(elsewhere)!r} is not used" in caplog.text
    assert not elsewhere.exists(), "W&B's files went to the run folder"
    run = run_dir(tmp_path)
    assert list(sessions(run).values()) == ["my-run-1"]
    assert f"TensorBoard: tensorboard --logdir {tmp_path / 'runs'}" in captured.out
    assert "W&B (offline): wandb sync" in captured.out
    assert list((run / "logs").glob("events.out.tfevents.*")), "TensorBoard logged beside W&B"


def test_two_wandb_loggers_are_one_line_before_anything_is_created(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    config = tmp_path / "loggers.yaml"
    config.write_text("""trainer:
  logger:
    - class_path: lightning.pytorch.loggers.WandbLogger
    - class_path: lightning.pytorch.loggers.WandbLogger
""")
    assert main(demo_args(tmp_path, "--config", str(config))) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["atheria: error: trainer.logger lists 2 WandbLoggers: W&B records one run per process, so give one"]
    assert [path.name for path in tmp_path.iterdir()] == ["loggers.yaml"], "no run folder, no mirror, no W&B files"


@pytest.mark.slow
def test_wandb_online_without_an_api_key_is_one_line_before_training(tmp_path: Path) -> None:
    # A process of its own, as `!atheria fit` in a notebook: wandb keeps the settings of its first run per process.
    env = {key: value for key, value in env_without_warnings().items() if key != "WANDB_MODE"}
    env["HOME"] = str(tmp_path / "home")  # no ~/.netrc from `wandb login`
    command = [sys.executable, "-m", "atheria_lightning.cli", *demo_args(tmp_path, *WANDB, episodes=4)]
    done = subprocess.run(command, capture_output=True, text=True, env=env, stdin=subprocess.DEVNULL, timeout=120)
    assert done.returncode == 2, done.stderr
    (line,) = [line for line in done.stderr.splitlines() if line.startswith("atheria: error:")]
    assert line.startswith("atheria: error: trainer.logger WandbLogger cannot start its run (")
    assert "set WANDB_API_KEY" in line and "WANDB_MODE=offline" in line
    assert "Traceback" not in done.stderr and "episodes:" not in done.stdout
    assert not (run_dir(tmp_path) / "checkpoints" / "last.ckpt").exists()
    assert not (run_dir(tmp_path) / "logs" / ID_FILE).exists(), "the id is recorded once its run has started"


def test_a_wandb_logger_without_wandb_installed_is_one_line_before_anything_is_created(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    monkeypatch.setitem(sys.modules, "wandb", None)  # as Python sees a missing package: import and find_spec fail
    assert main(demo_args(tmp_path, *WANDB)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        "atheria: error: trainer.logger=lightning.pytorch.loggers.WandbLogger needs the wandb package: pip "
        "install wandb (the atheria_lightning[wandb] extra), or leave trainer.logger unset for TensorBoard"
    ]
    assert not (tmp_path / "runs").exists() and not (tmp_path / "mirror").exists()


def wandb_run(tmp_path: Path, **init_args: str) -> WandbRun:
    from lightning.pytorch.loggers import WandbLogger

    return WandbRun(WandbLogger(**init_args), str(tmp_path / "runs" / "demo"))


def header_with(run_id: object) -> dict:
    """A checkpoint's metadata as ``torch.load(weights_only=True)`` reads it, with WandbRun's saved state."""
    return {"callbacks": {"WandbRun": {"id": run_id}}}


def test_the_id_comes_from_the_config_then_the_checkpoint_then_the_run_folder(tmp_path: Path) -> None:
    id_file = tmp_path / "runs" / "demo" / "logs" / ID_FILE
    id_file.parent.mkdir(parents=True)
    id_file.write_text(json.dumps({"id": "fromfile"}))
    assert wandb_run(tmp_path, id="mine").resume(header_with("fromckpt"), start=False) == "mine"
    assert wandb_run(tmp_path).resume(header_with("fromckpt"), start=False) == "fromckpt", "the checkpoint first"
    assert wandb_run(tmp_path).resume(None, start=False) == "fromfile", "the file, without a checkpoint"
    assert wandb_run(tmp_path).resume({"callbacks": {}}, start=False) == "fromfile", "or one without an id"
    id_file.unlink()
    new = wandb_run(tmp_path)
    assert re.fullmatch(r"[a-z0-9]{8}", new.resume(header_with(None), start=False))
    assert new.state_dict() == {"id": new.id} and new.logger.version == new.id


@pytest.mark.parametrize("bad", ["../../x", "", 7, "a b", "x" * 65])
def test_an_id_read_from_a_checkpoint_or_the_file_is_used_only_when_it_is_a_plain_name(
    tmp_path: Path, bad: object, caplog: pytest.LogCaptureFixture
) -> None:
    id_file = tmp_path / "runs" / "demo" / "logs" / ID_FILE
    id_file.parent.mkdir(parents=True)
    id_file.write_text(json.dumps({"id": bad}))
    chosen = wandb_run(tmp_path).resume(header_with(bad), start=False)
    assert chosen != bad and re.fullmatch(r"[a-z0-9]{8}", chosen)
    assert "holds no usable run id" in caplog.text
    id_file.write_text("{not json")
    assert wandb_run(tmp_path).resume(header_with(bad), start=False) != bad
    assert "is not readable" in caplog.text


def test_wandbs_files_go_inside_the_run_folder_and_the_run_is_named_after_the_experiment(tmp_path: Path) -> None:
    run = wandb_run(tmp_path, save_dir=".")
    assert run.logger.save_dir == str(tmp_path / "runs" / "demo" / "logs")
    assert run.logger._wandb_init["name"] == "demo"
    assert run.logger._wandb_init["resume"] == "allow"
    assert wandb_run(tmp_path, name="mine").logger._wandb_init["name"] == "mine"
