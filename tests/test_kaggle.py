"""Kaggle across versions: a new version resumes from the previous version's read-only output under /kaggle/input
(here a folder named by ATHERIA_KAGGLE_INPUT), verified, copied into the local run folder, the input untouched."""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import shutil
import stat
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import demo_args, make_read_only, snapshot

from atheria_lightning.cli import main
from atheria_lightning.platform import KAGGLE_INPUT_ENV, KAGGLE_INPUT_ROOT, Platform, kaggle_input_root
from atheria_lightning.store import copies

EPISODES = 4


@pytest.fixture(scope="module")
def previous(tmp_path_factory: pytest.TempPathFactory) -> dict[int, Path]:
    """A previous version's run folder of the demo experiment after 2 and after 4 episodes (kept apart)."""
    root = tmp_path_factory.mktemp("previous")
    snapshots = {}
    with pytest.MonkeyPatch.context() as patch:  # set up before each test's own isolation: an input must not leak in
        for var in ("KAGGLE_KERNEL_RUN_TYPE", KAGGLE_INPUT_ENV):
            patch.delenv(var, raising=False)
        for episodes in (2, EPISODES):
            args = demo_args(root, "--trainer.max_steps", str(episodes), episodes=EPISODES, val_every=2, mirror=False)
            assert main(args) == 0
            snapshots[episodes] = root / f"demo-{episodes}"
            shutil.copytree(root / "runs" / "demo", snapshots[episodes])
    return snapshots


@pytest.fixture
def on_kaggle(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """Kaggle's environment, with its input root in ``tmp_path/input``; returns that root."""
    monkeypatch.setenv("KAGGLE_KERNEL_RUN_TYPE", "Interactive")
    monkeypatch.setenv(KAGGLE_INPUT_ENV, str(tmp_path / "input"))
    (tmp_path / "input").mkdir()
    return tmp_path / "input"


def attach(run: Path, input_root: Path, *where: str) -> Path:
    """Put a copy of ``run`` at ``input_root/<where…>/demo``, as Kaggle attaches a notebook's output."""
    target = input_root.joinpath(*where, "demo")
    shutil.copytree(run, target)
    return target


def new_version(tmp_path: Path, *extra: str, episodes: int = 6) -> list[str]:
    return demo_args(tmp_path / "new", *extra, episodes=episodes, val_every=2, mirror=False)


def local_run(tmp_path: Path) -> Path:
    return tmp_path / "new" / "runs" / "demo"


def logged(caplog: pytest.LogCaptureFixture) -> str:
    return "\n".join(record.getMessage() for record in caplog.records)


def rewrite_manifest(run: Path, change: Any) -> None:
    path = run / "checkpoints" / "MANIFEST.json"
    data = json.loads(path.read_text())
    change(data["files"])
    path.write_text(json.dumps(data))


def test_a_new_version_resumes_from_the_previous_versions_output(
    previous: dict[int, Path], on_kaggle: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    attached = attach(previous[EPISODES], on_kaggle, "my-notebook", "atheria_runs")
    make_read_only(on_kaggle)
    before = snapshot(on_kaggle)

    assert main(new_version(tmp_path)) == 0

    out = capsys.readouterr().out
    last = attached / "checkpoints" / "last.ckpt"
    run = local_run(tmp_path)
    assert (f"resuming from episode 4 of 6 (67%) [kaggle input: {last}, copied to: "
            f"{run / 'checkpoints' / 'last.ckpt'}]") in out  # fmt: skip
    assert f"kaggle input: copied the run of {attached} (episode 4) into {run}" in out
    assert snapshot(on_kaggle) == before, "the input is never written"
    # The history continues: the previous TensorBoard events beside this session's, every episode in the log.
    previous_events = {path.name for path in (attached / "logs").glob("events.out.tfevents.*")}
    events = {path.name for path in (run / "logs").glob("events.out.tfevents.*")}
    assert previous_events and previous_events < events
    log = json.loads((run / "exports" / "training_log.json").read_text())
    assert [row["episode"] for row in log["episodes"]] == list(range(6))
    assert log["time"]["sessions"] == 3, "two sessions of the previous version, then this one"
    for path in run.rglob("*"):  # copies are this run's files, not read-only like the input
        assert path.stat().st_mode & stat.S_IWUSR, path


def test_the_input_is_ignored_when_the_local_run_has_checkpoints(
    previous: dict[int, Path], on_kaggle: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    shutil.copytree(previous[2], local_run(tmp_path))
    attach(previous[EPISODES], on_kaggle, "my-notebook", "atheria_runs")

    assert main(new_version(tmp_path)) == 0

    out = capsys.readouterr().out
    assert f"resuming from episode 2 of 6 (33%) [local: {local_run(tmp_path)}" in out
    assert "kaggle input" not in out


def test_resume_never_starts_afresh_whatever_the_input_holds(
    previous: dict[int, Path], on_kaggle: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    attach(previous[EPISODES], on_kaggle, "my-notebook", "atheria_runs")

    assert main(new_version(tmp_path, "--resume", "never", episodes=2)) == 0

    out = capsys.readouterr().out
    assert "resuming" not in out and "kaggle input" not in out


def test_the_input_root_is_kaggles_on_kaggle_or_the_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(KAGGLE_INPUT_ENV, raising=False)
    assert kaggle_input_root() is None, "off Kaggle, without the variable, nothing is searched"
    assert kaggle_input_root(Platform.COLAB) is None
    monkeypatch.setenv("KAGGLE_KERNEL_RUN_TYPE", "Batch")
    assert kaggle_input_root() == KAGGLE_INPUT_ROOT == "/kaggle/input"
    monkeypatch.setenv(KAGGLE_INPUT_ENV, "/somewhere/else")
    assert kaggle_input_root() == "/somewhere/else"
    monkeypatch.delenv("KAGGLE_KERNEL_RUN_TYPE")
    assert kaggle_input_root() == "/somewhere/else"


def test_several_previous_runs_the_newest_sound_one_is_taken(
    previous: dict[int, Path], on_kaggle: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    older = attach(previous[2], on_kaggle, "version-1")
    newer = attach(previous[EPISODES], on_kaggle, "version-2", "output", "atheria_runs")
    # Claims a later episode for bytes that do not hold it: checked where it is, and passed over.
    forged = attach(previous[EPISODES], on_kaggle, "forged", "a", "b", "c")
    rewrite_manifest(forged, lambda files: [entry.update(episode=900) for entry in files.values()])
    make_read_only(on_kaggle)
    before = snapshot(on_kaggle)

    assert main(new_version(tmp_path)) == 0

    out = capsys.readouterr().out
    assert f"[kaggle input: {newer / 'checkpoints' / 'last.ckpt'}, copied to:" in out
    assert f"the newest of 2 found, not taken: {older} (episode 2)" in out
    assert str(forged) not in out
    assert snapshot(on_kaggle) == before


def test_hostile_names_in_the_input_write_nothing_outside_the_run_folder(
    previous: dict[int, Path], on_kaggle: Path, tmp_path: Path, capsys: pytest.CaptureFixture,
    caplog: pytest.LogCaptureFixture,
) -> None:  # fmt: skip
    attached = attach(previous[EPISODES], on_kaggle, "my-notebook", "atheria_runs")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.txt").write_text("not the run's")

    def escape(files: dict[str, Any]) -> None:
        files["../../escape.ckpt"] = dict(files["last.ckpt"])
        files[str(tmp_path / "absolute.ckpt")] = dict(files["last.ckpt"])

    rewrite_manifest(attached, escape)
    shutil.copy(attached / "checkpoints" / "last.ckpt", attached / "escape.ckpt")
    (attached / "logs" / "leak.txt").symlink_to(outside / "secret.txt")
    (attached / "logs" / "elsewhere").symlink_to(outside, target_is_directory=True)
    shutil.rmtree(attached / "exports")
    (attached / "exports").symlink_to(outside, target_is_directory=True)
    make_read_only(on_kaggle)
    before = snapshot(tmp_path, leave_out=tmp_path / "new")

    with caplog.at_level(logging.WARNING, logger="atheria_lightning.store"):
        assert main(new_version(tmp_path)) == 0

    assert f"resuming from episode 4 of 6 (67%) [kaggle input: {attached / 'checkpoints' / 'last.ckpt'}" in (
        capsys.readouterr().out
    )
    assert "lists '../../escape.ckpt': refused" in logged(caplog)
    assert f"lists '{tmp_path / 'absolute.ckpt'}': refused" in logged(caplog)
    assert snapshot(tmp_path, leave_out=tmp_path / "new") == before, "nothing written outside the run folder"
    run = local_run(tmp_path)
    assert not (run / "logs" / "leak.txt").exists() and not (run / "logs" / "elsewhere").exists()
    assert not (run / "exports" / "secret.txt").exists()
    assert sorted(path.name for path in (run / "checkpoints").glob("*.ckpt")) == [
        "best-e000002.ckpt", "best-e000004.ckpt", "best-e000006.ckpt", "last.ckpt"
    ]  # fmt: skip


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _forge(path: Path) -> None:
    """Replace a checkpoint by one that holds an object beside its state, and list its true hash: only the
    ``weights_only`` load can refuse it."""
    torch.save({"state_dict": {}, "atheria": {"episode": 4}, "payload": argparse.Namespace(x=1)}, path)
    data = path.read_bytes()
    rewrite_manifest(path.parents[1], lambda files: files[path.name].update(
        size=len(data), sha256=hashlib.sha256(data).hexdigest()))  # fmt: skip


@pytest.mark.parametrize(("damage", "why"), [(_truncate, "its size or sha256 is not what MANIFEST.json lists"),
                                             (_forge, "it does not load with weights_only=True")],
                         ids=["truncated", "forged"])  # fmt: skip
def test_a_damaged_checkpoint_in_the_input_is_passed_over_for_the_next_sound_one(
    damage: Any, why: str, previous: dict[int, Path], on_kaggle: Path, tmp_path: Path, capsys: pytest.CaptureFixture,
    caplog: pytest.LogCaptureFixture,
) -> None:  # fmt: skip
    attached = attach(previous[EPISODES], on_kaggle, "my-notebook", "atheria_runs")
    damage(attached / "checkpoints" / "last.ckpt")
    make_read_only(on_kaggle)
    before = snapshot(on_kaggle)

    with caplog.at_level(logging.WARNING, logger="atheria_lightning.store"):
        assert main(new_version(tmp_path)) == 0

    best = attached / "checkpoints" / "best-e000004.ckpt"
    assert f"resuming from episode 4 of 6 (67%) [kaggle input: {best}, copied to:" in capsys.readouterr().out
    assert f"{attached / 'checkpoints' / 'last.ckpt'} is not used: {why}" in logged(caplog)
    assert snapshot(on_kaggle) == before


def test_an_input_without_a_sound_checkpoint_means_a_new_run(
    previous: dict[int, Path], on_kaggle: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    attached = attach(previous[EPISODES], on_kaggle, "my-notebook", "atheria_runs")
    for path in (attached / "checkpoints").glob("*.ckpt"):
        _truncate(path)
    make_read_only(on_kaggle)
    before = snapshot(on_kaggle)

    assert main(new_version(tmp_path, episodes=2)) == 0

    out = capsys.readouterr().out
    assert f"kaggle input: no sound checkpoint in {attached}: starting a new run" in out
    assert "resuming" not in out and "copied the run" not in out
    previous_logs = {path.name for path in (attached / "logs").iterdir()}
    assert not previous_logs & {path.name for path in (local_run(tmp_path) / "logs").glob("events.*")}, (
        "nothing of the unsound run came along"
    )
    assert snapshot(on_kaggle) == before


def test_a_giant_or_sparse_file_in_the_input_is_not_copied_and_said_once(
    previous: dict[int, Path], on_kaggle: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    attached = attach(previous[EPISODES], on_kaggle, "my-notebook", "atheria_runs")
    with open(attached / "exports" / "holes.bin", "wb") as handle:
        handle.truncate(3 * 2**30)  # 3 GiB listed, nothing on disk: reading it would write 3 GiB of zeros
    (attached / "logs" / "big.bin").write_bytes(b"x" * (2 * 2**20))
    (attached / "logs" / "small.txt").write_text("kept")
    monkeypatch.setattr(copies, "PLAIN_FILE_LIMIT", 2**20)  # a 2 MiB file stands in for one over 512 MiB
    make_read_only(on_kaggle)
    with caplog.at_level(logging.WARNING, logger="atheria_lightning.store"):
        assert main(new_version(tmp_path)) == 0
    run = local_run(tmp_path)
    assert not (run / "exports" / "holes.bin").exists() and not (run / "logs" / "big.bin").exists()
    assert (run / "logs" / "small.txt").read_text() == "kept"
    said = logged(caplog)
    assert said.count("holes.bin: not copied: ") == 1 and said.count("big.bin: not copied: ") == 1, said
    assert "big.bin: not copied: 2097152 bytes, over the 1 MiB copied of a logs/ or exports/ file" in said
    assert "holes.bin: not copied: a sparse file (3221225472 bytes listed, " in said, said
