"""A setting changed between sessions: nothing saved is deleted because of it, the resume says what changed, and a
checkpoint that cannot be resumed (or that nothing else of the run accounts for) is named with where it came from."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any

import lightning
import pytest
import torch
from conftest import CONFIGS, TINY, callbacks_config

from atheria_lightning.cli import main
from atheria_lightning.module import QCAModule

EXPERIMENT = "demo"


def fit(tmp_path: Path, root: str, *extra: str, episodes: int = 16, **callbacks: Any) -> list[str]:
    return ["fit", "--config", str(CONFIGS / "demo.yaml"), "--config", callbacks_config(tmp_path, **callbacks),
            "--run_root", str(tmp_path / root), "--mirror_url", str(tmp_path / "mirror"),
            "--data.total_episodes", str(episodes), "--data.val_every_episodes", "2", *TINY, *extra]  # fmt: skip


def listed(folder: Path) -> dict[str, Any]:
    return json.loads((folder / "checkpoints" / "MANIFEST.json").read_text())["files"]


def set_aside(folder: Path) -> dict[str, str]:
    """``checkpoints/beyond_top_k/``: original name -> sha256 of the bytes there."""
    where = folder / "checkpoints" / "beyond_top_k"
    return {path.name.rsplit(".", 1)[0]: hashlib.sha256(path.read_bytes()).hexdigest()
            for path in where.iterdir()} if where.exists() else {}  # fmt: skip


def test_a_lower_top_k_sets_the_surplus_aside_on_both_sides_and_the_resume_lists_every_change(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    assert main(fit(tmp_path, "runs", every=2, sync=2)) == 0
    local, mirror = tmp_path / "runs" / EXPERIMENT, tmp_path / "mirror" / EXPERIMENT
    first = {name: entry for name, entry in listed(local).items() if name.startswith("best-")}
    before = {name: entry["sha256"] for name, entry in first.items()}
    assert len(before) == 5
    capsys.readouterr()

    assert main(fit(tmp_path, "runs", "--trainer.precision", "bf16-mixed", episodes=17, every=4, sync=3,
                    top_k=2)) == 0  # fmt: skip
    out = capsys.readouterr().out
    moved = re.search(r"top_k=2: 3 best checkpoint\(s\) beyond it moved to (\S+)/ \(the mirror's too, at its first "
                      r"sync\), not deleted: (.+)", out)  # fmt: skip
    assert moved, out[-3000:]
    assert moved.group(1) == str(local / "checkpoints" / "beyond_top_k")
    names = moved.group(2).split(", ")
    ranked = sorted(first, key=lambda name: first[name]["metric"])
    assert names == sorted(ranked[2:]), "the three ranked lowest are set aside, the two best stay"
    assert set_aside(local) == {name: before[name] for name in names}, "the same bytes, locally"
    assert set_aside(mirror) == {name: before[name] for name in names}, "and on the mirror"
    changes = re.search(r"changed since that checkpoint, in effect from now on: (.+)", out)
    assert changes, out[-3000:]
    for change in ("SmartCheckpoint.top_k 5 -> 2", "SmartCheckpoint.every_n_episodes 2 -> 4",
                   "MirrorSync.every_n_episodes 2 -> 3", "trainer.precision '32-true' -> 'bf16-mixed'",
                   "data.total_episodes 16 -> 17"):  # fmt: skip
        assert change in changes.group(1), changes.group(1)


def test_a_checkpoint_that_cannot_be_resumed_is_named_with_where_it_came_from(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    assert main(fit(tmp_path, "a")) == 0
    capsys.readouterr()
    # A new machine: its checkpoint comes from the mirror, with another operator shape asked for.
    code = main(fit(tmp_path, "b", "--model.hidden_channels", "6", episodes=20))
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    path = tmp_path / "b" / EXPERIMENT / "checkpoints" / "last.ckpt"
    assert "model.hidden_channels=6 differs from the checkpoint's 4" in err[0]
    assert f"(the checkpoint: from the mirror, now at {path}; to set it aside, move it into " in err[0], err[0]
    assert "here and on the mirror, then run the same command again)" in err[0]


def plant(mirror: Path, name: str, episode: int, state: dict[str, Any]) -> None:
    """A sound checkpoint put on the shared mirror by someone else, with a manifest entry that matches it."""
    state = dict(state, atheria=dict(state["atheria"], episode=episode, metric=-99.0))
    torch.save(state, mirror / "checkpoints" / name)
    data = (mirror / "checkpoints" / name).read_bytes()
    manifest = json.loads((mirror / "checkpoints" / "MANIFEST.json").read_text())
    manifest["files"][name] = dict(manifest["files"]["last.ckpt"], episode=episode, metric=-99.0, kind="best",
                                   size=len(data), sha256=hashlib.sha256(data).hexdigest())  # fmt: skip
    (mirror / "checkpoints" / "MANIFEST.json").write_text(json.dumps(manifest))


@pytest.mark.parametrize("episode", [999, 40], ids=["beyond-total", "past-the-others"])
def test_a_planted_checkpoint_nothing_else_accounts_for_is_called_suspicious_before_it_is_used(
    tmp_path: Path, capsys: pytest.CaptureFixture, episode: int
) -> None:
    assert main(fit(tmp_path, "a")) == 0
    mirror = tmp_path / "mirror" / EXPERIMENT
    state = torch.load(tmp_path / "a" / EXPERIMENT / "checkpoints" / "last.ckpt", weights_only=True)
    plant(mirror, f"best-e{episode:06d}.ckpt", episode, state)
    capsys.readouterr()
    assert main(fit(tmp_path, "b", episodes=90)) == 0
    out = capsys.readouterr().out
    said = re.search(rf"suspicious: best-e{episode:06d}\.ckpt is at episode {episode}, (.+)", out)
    assert said, out[-3000:]
    if episode > 90:
        assert said.group(1).startswith("beyond data.total_episodes=90; it may not come from this run")
        assert out.index("suspicious:") < out.index("run finished: episode 999 of 90")
    else:
        assert said.group(1).startswith("24 episodes past the run's last.ckpt (episode 16)")
        assert out.index("suspicious:") < out.index("resuming from episode 40")
    assert "from the mirror, now at" in said.group(1) and "here and on the mirror" in said.group(1)


def test_a_resume_from_the_run_own_checkpoints_is_not_suspicious(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(fit(tmp_path, "a", every=4)) == 0
    assert main(fit(tmp_path, "b", episodes=20, every=4)) == 0  # a new machine: from the mirror
    assert main(fit(tmp_path, "b", episodes=24, every=4)) == 0  # and from its own folder
    assert "suspicious" not in capsys.readouterr().out


def test_a_file_where_the_set_aside_folder_should_be_is_one_line_and_changes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    assert main(fit(tmp_path, "runs", every=2, sync=2)) == 0
    local = tmp_path / "runs" / EXPERIMENT
    (local / "checkpoints" / "beyond_top_k").write_text("not a folder")
    before = listed(local)
    capsys.readouterr()
    assert main(fit(tmp_path, "runs", episodes=18, top_k=2)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [err[0]] and f"{local / 'checkpoints' / 'beyond_top_k'} is not a folder" in err[0], err
    assert listed(local) == before, "nothing unlisted, nothing moved"


def test_a_forged_setting_in_a_checkpoint_is_shown_cut_short(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(fit(tmp_path, "runs", every=2, sync=2)) == 0
    last = tmp_path / "runs" / EXPERIMENT / "checkpoints" / "last.ckpt"
    state = torch.load(last, weights_only=True)
    state["atheria_settings"]["SmartCheckpoint.top_k"] = "x" * 10_000_000  # a file someone else wrote
    torch.save(state, last)
    manifest_path = last.parent / "MANIFEST.json"
    manifest = json.loads(manifest_path.read_text())
    data = last.read_bytes()
    manifest["files"]["last.ckpt"].update(size=len(data), sha256=hashlib.sha256(data).hexdigest())
    manifest_path.write_text(json.dumps(manifest))
    capsys.readouterr()
    assert main(fit(tmp_path, "runs", episodes=18, every=2, sync=2)) == 0
    line = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("changed since"))
    assert "SmartCheckpoint.top_k 'xxx" in line and len(line) < 400, line[:500]


def test_a_checkpoint_whose_hyper_parameters_carry_lightnings_own_entries_loads(tmp_path: Path) -> None:
    # LightningCLI adds "_class_path" and "_instantiator" to a model's hyper-parameters; QCAModule takes its
    # settings as keywords, so Lightning hands them back to it when a checkpoint is loaded (export, curriculum).
    model = QCAModule(architecture="MLP", d_state=2, hidden_channels=4, grid_size=8, qca_steps=2)
    path = tmp_path / "from_the_cli.ckpt"
    hyper_parameters = {**model.hparams, "_class_path": "atheria_lightning.module.QCAModule"}
    torch.save({"state_dict": model.state_dict(), "hyper_parameters": hyper_parameters,
                "pytorch-lightning_version": lightning.__version__}, path)  # fmt: skip
    loaded = QCAModule.load_from_checkpoint(path, weights_only=True)
    assert loaded.settings == model.settings
