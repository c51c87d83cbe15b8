"""One TensorBoard history over all sessions: each episode has one train/loss point, also after a new machine."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from conftest import demo_args, run_dir
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from atheria_lightning.cli import main


def steps(log_dir: Path, tag: str = "train/loss") -> list[int]:
    """The steps of ``tag`` as TensorBoard shows them (its reader applies the restart markers of later sessions)."""
    events = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    events.Reload()
    return sorted(event.step for event in events.Scalars(tag)) if tag in events.Tags()["scalars"] else []


def test_a_resume_from_an_older_checkpoint_logs_each_episode_once(tmp_path: Path) -> None:
    logs = run_dir(tmp_path) / "logs"
    assert main(demo_args(tmp_path, episodes=8, val_every=2)) == 0
    assert steps(logs) == list(range(8))
    # As after a kill: the events of episodes 5-8 were logged, and the run goes on from the state of episode 4.
    older = tmp_path / "older.ckpt"
    shutil.copy(run_dir(tmp_path) / "checkpoints" / "best-e000004.ckpt", older)
    for checkpoint in (run_dir(tmp_path) / "checkpoints").glob("*.ckpt"):
        checkpoint.unlink()
    (run_dir(tmp_path) / "checkpoints" / "MANIFEST.json").unlink()
    shutil.rmtree(tmp_path / "mirror")
    assert main(demo_args(tmp_path, "--resume", str(older), episodes=8, val_every=2)) == 0
    assert len(list(logs.glob("events.out.tfevents.*"))) == 2, "two sessions, two event files"
    assert steps(logs) == list(range(8)), "each episode once, across both sessions"
    assert steps(logs, "val/loss") == [1, 3, 5, 7]


def test_a_new_machine_gets_the_earlier_sessions_logs_from_the_mirror(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    assert main(demo_args(tmp_path, episodes=4, val_every=2)) == 0
    shutil.rmtree(tmp_path / "runs")  # a new VM: only the mirror is left
    capsys.readouterr()
    assert main(demo_args(tmp_path, episodes=8, val_every=2)) == 0
    out = capsys.readouterr().out
    assert "mirror: restored" in out and "resuming from episode 4 of 8" in out
    assert f"TensorBoard: tensorboard --logdir {tmp_path / 'runs'}" in out and "W&B" not in out
    logs = run_dir(tmp_path) / "logs"
    assert steps(logs) == list(range(8)), "the first session's episodes are back beside the second's"
    assert steps(tmp_path / "mirror" / "demo" / "logs") == list(range(8)), "and the mirror has the whole history"


def test_tensorboard_shows_the_loss_the_learning_rate_the_universe_and_the_run_settings(tmp_path: Path) -> None:
    from tensorboard.plugins.hparams import metadata

    assert main(demo_args(tmp_path, episodes=10, val_every=5)) == 0
    events = EventAccumulator(str(run_dir(tmp_path) / "logs"), size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    tags = events.Tags()
    assert {"train/loss", "train/lr", "val/loss", "val/combined", "vm/elapsed_hours"} <= set(tags["scalars"])
    assert "epoch" not in tags["scalars"], "no card of a constant epoch"
    # TensorBoard shows one section per prefix, alphabetically, and opens on the first: the loss, then validation.
    sections = sorted({tag.split("/")[0] for tag in tags["scalars"]})
    assert sections == ["train", "val", "vm"], sections
    assert [image.step for image in events.Images("universe/final")] == [4, 9], "one picture per validation"
    assert [image.step for image in events.Images("universe/initial")] == [4], "the initial state once"
    assert events.Images("universe/final")[0].width >= 128
    experiment = metadata.parse_experiment_plugin_data(
        events.summary_metadata["_hparams_/experiment"].plugin_data.content
    )
    assert [info.name.tag for info in experiment.metric_infos] == ["val/loss", "train/loss"]
    assert {"lr", "grid_size", "architecture"} <= {info.name for info in experiment.hparam_infos}


def test_a_mirror_listing_cannot_write_outside_the_run_folder(tmp_path: Path) -> None:
    import fsspec

    from atheria_lightning.store import RunStore

    fs = fsspec.filesystem("memory")
    root = f"/hostile-{tmp_path.name}"
    fs.pipe_file(f"{root}/demo/logs/events.ok", b"ok")
    fs.pipe_file(f"{root}/demo/logs/sub/../../../../escape.txt", b"evil")  # a forged name climbing out
    fs.pipe_file(f"{root}/demo/logs/half.tmp-1", b"t")  # an upload killed halfway
    local = tmp_path / "runs" / "demo"
    (local / "logs").mkdir(parents=True)
    (local / "logs" / "events.ok").write_bytes(b"mine")
    store = RunStore(local)
    store.set_mirror(f"memory://{root}")
    try:
        assert store.start() is None
    finally:
        store.close()
    written = sorted(str(path.relative_to(tmp_path)) for path in tmp_path.rglob("*") if path.is_file())
    assert written == ["runs/demo/logs/events.ok"], written
    assert (local / "logs" / "events.ok").read_bytes() == b"mine", "a local file is never replaced"
    fs.rm(root, recursive=True)


@pytest.mark.parametrize("module", ["atheria_lightning.loggers", "atheria_lightning.scalars"])
def test_a_config_naming_the_tensorboard_logger_by_its_earlier_module_trains_and_logs(
    tmp_path: Path, module: str
) -> None:
    # The GUIDE's second --config for TensorBoard beside another logger named the class by its module of the
    # time; a config a user kept from then must still start.
    logs = run_dir(tmp_path) / "logs"
    extra = tmp_path / "loggers.yaml"
    extra.write_text(
        f"trainer:\n  logger:\n    - class_path: {module}.BufferedTensorBoardLogger\n"
        f"      init_args: {{save_dir: {run_dir(tmp_path)}, name: logs, version: ''}}\n"
    )
    assert main(demo_args(tmp_path, "--config", str(extra), episodes=3, val_every=3, mirror=False)) == 0
    assert steps(logs) == [0, 1, 2]
