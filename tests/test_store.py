"""The run store through the CLI, as a hostile user tries it: damaged manifests, a stale or forged mirror, top-k
after moved folders, a diverged run, and signals before training starts."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import REPO, demo_args, env_without_warnings, run_dir
from fsspec.implementations.memory import MemoryFileSystem

from atheria_lightning import export
from atheria_lightning.cli import main

CORRUPTIONS = {
    "deleted": None,
    "truncated": lambda text: text[: len(text) // 2],
    "garbage": lambda text: "\x00\x13 not json at all {[",
    "wrong_shape": lambda text: json.dumps({"version": 1, "files": {"last.ckpt": {"episode": "six", "size": -1}}}),
    "lists_nothing": lambda text: json.dumps({"version": 1, "files": {}}),
}


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def checkpoint_hashes(folder: Path) -> dict[str, str]:
    return {path.name: sha256(path) for path in folder.glob("*.ckpt")}


def manifest(folder: Path) -> dict[str, Any]:
    return json.loads((folder / "MANIFEST.json").read_text())["files"]


def damage(manifest_path: Path, how: str) -> None:
    corrupt = CORRUPTIONS[how]
    if corrupt is None:
        manifest_path.unlink()
    else:
        manifest_path.write_text(corrupt(manifest_path.read_text()))


def logged(caplog: pytest.LogCaptureFixture) -> str:
    return "\n".join(record.getMessage() for record in caplog.records)


# ----- 1. a damaged manifest never costs the run -----
@pytest.mark.slow
@pytest.mark.parametrize("how", list(CORRUPTIONS))
def test_a_damaged_local_manifest_is_rebuilt_and_the_run_resumes_from_the_newest(
    how: str, tmp_path: Path, capsys: pytest.CaptureFixture, caplog: pytest.LogCaptureFixture
) -> None:
    assert main(demo_args(tmp_path, "--trainer.max_steps", "6", episodes=12, val_every=3, mirror=False)) == 0
    folder = run_dir(tmp_path) / "checkpoints"
    bests = {name: digest for name, digest in checkpoint_hashes(folder).items() if name.startswith("best-")}
    assert bests, "the first session kept best checkpoints"
    damage(folder / "MANIFEST.json", how)
    capsys.readouterr()
    with caplog.at_level(logging.WARNING, logger="atheria_lightning.store"):
        assert main(demo_args(tmp_path, episodes=12, val_every=3, mirror=False)) == 0
    assert "resuming from episode 6 of 12" in capsys.readouterr().out
    assert re.search(r"MANIFEST\.json (was (missing|damaged)|lists no sound checkpoint)", logged(caplog))
    for name, digest in bests.items():  # listed again from their content, none overwritten or deleted
        assert sha256(folder / name) == digest, name
    assert manifest(folder)["last.ckpt"]["episode"] == 12


@pytest.mark.slow
@pytest.mark.parametrize("how", ["deleted", "garbage", "wrong_shape"])
def test_a_damaged_mirror_manifest_on_a_new_machine_is_rebuilt_and_no_mirror_file_is_lost(
    how: str, tmp_path: Path, capsys: pytest.CaptureFixture, caplog: pytest.LogCaptureFixture
) -> None:
    assert main(demo_args(tmp_path, "--trainer.max_steps", "6", episodes=12, val_every=3)) == 0
    mirror = tmp_path / "mirror" / "demo" / "checkpoints"
    bests = {name: digest for name, digest in checkpoint_hashes(mirror).items() if name.startswith("best-")}
    shutil.rmtree(tmp_path / "runs")  # a new machine: the local disk is gone
    damage(mirror / "MANIFEST.json", how)
    capsys.readouterr()
    with caplog.at_level(logging.WARNING, logger="atheria_lightning.store"):
        assert main(demo_args(tmp_path, episodes=12, val_every=3)) == 0
    out = capsys.readouterr().out
    assert "resuming from episode 6 of 12" in out and "[mirror:" in out
    assert "rebuilt from" in logged(caplog)
    for name, digest in bests.items():
        assert sha256(mirror / name) == digest, f"{name} on the mirror was deleted or overwritten"
    local = run_dir(tmp_path) / "checkpoints"
    assert {n: e["sha256"] for n, e in manifest(mirror).items()} == {n: e["sha256"] for n, e in manifest(local).items()}


# ----- 2. a mirror behind at the end says so, and the next start catches up -----
class ReadOnlyAfterFirstManifest(MemoryFileSystem):
    """A mirror that turns read-only once it holds a manifest (a Drive over quota, a revoked token)."""

    protocol = ("romem",)
    broken = False
    writable_again = False

    @classmethod
    def _strip_protocol(cls, path: Any) -> Any:
        return super()._strip_protocol(path.removeprefix("romem://") if isinstance(path, str) else path)

    def _open(self, path: str, mode: str = "rb", *args: Any, **kwargs: Any) -> Any:
        if mode[0] in "wxa" and type(self).broken and not type(self).writable_again:
            raise PermissionError(13, "Permission denied (read-only)")
        return super()._open(path, mode, *args, **kwargs)

    def mv(self, path1: str, path2: str, **kwargs: Any) -> None:
        super().mv(path1, path2, **kwargs)
        if str(path2).endswith("MANIFEST.json"):
            type(self).broken = True


def test_a_mirror_that_fails_near_the_end_is_reported_and_caught_up_by_the_next_start(
    tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    import fsspec

    fsspec.register_implementation("romem", ReadOnlyAfterFirstManifest, clobber=True)
    monkeypatch.setattr(ReadOnlyAfterFirstManifest, "broken", False)
    monkeypatch.setattr(ReadOnlyAfterFirstManifest, "writable_again", False)
    url = f"romem://behind-{os.getpid()}-{time.monotonic_ns()}"
    callbacks = tmp_path / "callbacks.yaml"
    callbacks.write_text("""trainer:
  callbacks:
    - class_path: atheria_lightning.callbacks.MirrorSync
      init_args: {every_n_episodes: 2, max_retries: 1, backoff_s: 0.0, flush_timeout_s: 10}
""")
    args = [*demo_args(tmp_path, episodes=8, val_every=4), "--mirror_url", url, "--config", str(callbacks)]
    assert main(args) == 4, "a run whose mirror is behind does not exit 0"
    out = capsys.readouterr().out.strip().splitlines()
    behind = re.fullmatch(r"mirror behind: episode (\d+) of 8 \(.*\) — run the same command again to retry", out[-1])
    assert behind and int(behind.group(1)) < 8, out[-6:]

    ReadOnlyAfterFirstManifest.writable_again = True
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "run finished: episode 8 of 8 (100%), nothing to do" in out
    assert out.strip().splitlines()[-1].startswith("mirror: up to date at episode 8")
    fs = fsspec.filesystem("romem")
    remote = json.loads(fs.cat_file(f"{url.split('://')[1]}/demo/checkpoints/MANIFEST.json"))["files"]
    local = manifest(run_dir(tmp_path) / "checkpoints")
    assert {n: e["sha256"] for n, e in remote.items()} == {n: e["sha256"] for n, e in local.items()}


# ----- 3. nothing from a mirror's manifest lands outside the run folder -----
@pytest.mark.slow
def test_a_forged_mirror_manifest_cannot_write_outside_the_run_folder(
    tmp_path: Path, capsys: pytest.CaptureFixture, caplog: pytest.LogCaptureFixture
) -> None:
    assert main(demo_args(tmp_path, "--trainer.max_steps", "4", episodes=8, val_every=2)) == 0
    shutil.rmtree(tmp_path / "runs")
    mirror = tmp_path / "mirror" / "demo" / "checkpoints"
    payload = b"export PATH=/evil:$PATH\n"
    entry = {"episode": 99, "size": len(payload), "sha256": hashlib.sha256(payload).hexdigest(), "metric": 0.0}
    outside = tmp_path / "outside.txt"
    forged_names = ["../../../outside.txt", str(outside), "sub/dir.ckpt", "other.ckpt", "..", "best-e1.ckpt"]
    for name in forged_names:  # each payload where a naive downloader would read it from
        target = Path(os.path.normpath(mirror / name)) if not os.path.isabs(name) else mirror / name.lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        if not target.is_dir():
            target.write_bytes(payload)
    data = json.loads((mirror / "MANIFEST.json").read_text())
    data["files"].update({name: {**entry, "kind": "best"} for name in forged_names})
    (mirror / "MANIFEST.json").write_text(json.dumps(data))
    outside.unlink(missing_ok=True)
    capsys.readouterr()
    with caplog.at_level(logging.WARNING, logger="atheria_lightning.store"):
        assert main(demo_args(tmp_path, episodes=8, val_every=2)) == 0
    assert "resuming from episode 4 of 8" in capsys.readouterr().out
    refused = [line for line in logged(caplog).splitlines() if "refused" in line]
    assert len(refused) == len(forged_names), refused
    assert not outside.exists(), "a mirror entry wrote outside the run folder"
    run = run_dir(tmp_path)
    written = {path.relative_to(run).parts[0] for path in run.rglob("*") if path.is_file()}
    assert written <= {"checkpoints", "logs", "exports", ".atheria.lock"}
    assert {path.name for path in (run / "checkpoints").iterdir() if path.is_file()} <= {
        "MANIFEST.json",
        "last.ckpt",
        *(name for name in manifest(run / "checkpoints") if name.startswith("best-")),
    }
    assert all(payload not in path.read_bytes() for path in run.rglob("*") if path.is_file())


# ----- 4. top-k holds however the folder moved -----
@pytest.mark.slow
def test_top_k_holds_across_a_copied_folder_and_a_mirror_only_resume_and_unlisted_files_are_set_aside(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    callbacks = tmp_path / "topk.yaml"
    callbacks.write_text("""trainer:
  callbacks:
    - class_path: atheria_lightning.callbacks.SmartCheckpoint
      init_args: {top_k: 2, every_n_episodes: 2}
    - class_path: atheria_lightning.callbacks.MirrorSync
      init_args: {every_n_episodes: 2}
    - class_path: atheria_lightning.callbacks.TrainingLog
""")

    def fit(root: str, steps: int) -> None:
        args = demo_args(tmp_path, "--config", str(callbacks), "--run_root", str(tmp_path / root), episodes=15,
                         val_every=1)  # fmt: skip
        assert main([*args, "--trainer.max_steps", str(steps)]) == 0

    fit("first", 5)
    shutil.copytree(tmp_path / "first", tmp_path / "copied")  # a copied folder, run from its new place
    stray = tmp_path / "copied" / "demo" / "checkpoints" / "best-e000077.ckpt"
    shutil.copy(tmp_path / "copied" / "demo" / "checkpoints" / "last.ckpt", stray)  # not in the manifest
    with caplog.at_level(logging.WARNING, logger="atheria_lightning.store"):
        fit("copied", 10)
    assert not stray.exists() and list((stray.parent / "unlisted").glob("best-e000077.ckpt.*")), "set aside"
    assert "not in MANIFEST.json, moved to unlisted/" in logged(caplog)
    fit("fresh", 15)  # a new machine: only the mirror is left to resume from

    history = json.loads((tmp_path / "fresh" / "demo" / "exports" / "training_log.json").read_text())
    scores = sorted(row["loss"] for row in history["validations"])  # the presets' monitor
    for folder in (tmp_path / "first", tmp_path / "copied", tmp_path / "fresh", tmp_path / "mirror"):
        checkpoints = folder / "demo" / "checkpoints"
        bests = sorted(p.name for p in checkpoints.glob("best-*.ckpt"))
        assert len(bests) <= 2, f"{folder.name}: {bests}"
        assert sorted(manifest(checkpoints)) == sorted([*bests, "last.ckpt"])
    final = manifest(tmp_path / "fresh" / "demo" / "checkpoints")
    kept = sorted(entry["metric"] for name, entry in final.items() if name != "last.ckpt")
    assert kept == pytest.approx(scores[:2], rel=1e-6), "the two best of every validation of the run"


# ----- 5. a diverged run keeps its last sound state, and a lower lr resumes from it -----
@pytest.mark.slow
def test_a_diverged_run_never_keeps_or_exports_its_state_and_a_lower_lr_resumes_from_the_last_sound_one(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    assert main(demo_args(tmp_path, "--trainer.max_steps", "10", episodes=40, val_every=5, mirror=False)) == 0
    folder = run_dir(tmp_path) / "checkpoints"
    sound = sha256(folder / "last.ckpt")
    capsys.readouterr()
    assert main(demo_args(tmp_path, "--model.lr", "1e6", episodes=40, val_every=5, mirror=False)) == 3
    out = capsys.readouterr().out
    assert "model.lr 0.003 -> 1000000.0" in out
    assert sha256(folder / "last.ckpt") == sound, "last.ckpt keeps the last sound state"
    for name, entry in manifest(folder).items():
        assert entry["episode"] <= 10 and (entry["metric"] is None or entry["metric"] == entry["metric"]), name
    model = export.load(run_dir(tmp_path) / "exports" / "model.ts")
    assert all(torch.isfinite(tensor).all() for tensor in model.state_dict().values())

    assert main(demo_args(tmp_path, "--model.lr", "1e-4", episodes=40, val_every=5, mirror=False)) == 0
    out = capsys.readouterr().out
    assert "resuming from episode 10 of 40" in out and "model.lr 0.003 -> 0.0001" in out
    state = torch.load(folder / "last.ckpt", map_location="cpu", weights_only=True)
    assert state["atheria"]["episode"] == 40
    assert {group["lr"] for group in state["optimizer_states"][0]["param_groups"]} == {1e-4}


# ----- 6. a stop signal before training ends the command cleanly -----
@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
@pytest.mark.parametrize("moment", ["importing", "building", "starting"])
def test_a_stop_signal_during_start_up_exits_zero_with_one_line(signum: int, moment: str, tmp_path: Path) -> None:
    args = demo_args(tmp_path, episodes=50, val_every=5)
    command = [sys.executable, "-u", "-m", "atheria_lightning.cli", *args]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO,
                               env=env_without_warnings())  # fmt: skip
    lines: list[str] = []
    try:
        if moment == "importing":
            time.sleep(1.0)  # torch and Lightning take seconds to import; the handlers are in place before them
        else:
            marker = "GPU available"  # Lightning built the trainer; the run store has not reconciled yet
            if moment == "starting":  # a second session, stopped while Lightning restores the checkpoint
                process.kill()
                process.wait()
                assert main([*args, "--trainer.max_steps", "10"]) == 0
                process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                           cwd=REPO, env=env_without_warnings())  # fmt: skip
                marker = "resuming from episode"
            assert process.stdout is not None
            for line in process.stdout:
                lines.append(line)
                if marker in line:
                    break
        process.send_signal(signum)
        out, _ = process.communicate(timeout=120)
    finally:
        process.kill()
    out = "".join(lines) + out
    assert process.returncode == 0, out[-3000:]
    assert "Traceback" not in out, out[-3000:]
    stopped = [line for line in out.splitlines() if line.startswith("atheria: stopped by")]
    assert stopped == [f"atheria: stopped by {signal.Signals(signum).name} outside training; everything saved is "
                       "kept: run the same command again to continue"], out[-3000:]  # fmt: skip
    assert "episode 1/" not in out and "[episode" not in out, "no episode ran"


@pytest.mark.slow
def test_a_mirror_entry_that_lies_about_its_episode_is_not_downloaded(
    tmp_path: Path, capsys: pytest.CaptureFixture, caplog: pytest.LogCaptureFixture
) -> None:
    assert main(demo_args(tmp_path, "--trainer.max_steps", "4", episodes=8, val_every=2)) == 0
    shutil.rmtree(tmp_path / "runs")
    mirror = tmp_path / "mirror" / "demo" / "checkpoints"
    data = json.loads((mirror / "MANIFEST.json").read_text())
    data["files"]["last.ckpt"]["episode"] = 999  # the bytes and their sha256 are right; the claim is not
    (mirror / "MANIFEST.json").write_text(json.dumps(data))
    capsys.readouterr()
    with caplog.at_level(logging.WARNING, logger="atheria_lightning.store"):
        assert main(demo_args(tmp_path, episodes=8, val_every=2)) == 0
    assert "resuming from episode 4 of 8" in capsys.readouterr().out
    assert "does not match its MANIFEST.json entry (bytes or episode)" in logged(caplog)
    assert list((mirror / "corrupt").glob("last.ckpt.*")), "set aside on the mirror, not deleted"
    assert manifest(mirror)["last.ckpt"]["episode"] == 8


@pytest.mark.parametrize("shape", ["checkpoints_is_a_file", "manifest_is_a_folder"])
def test_a_run_folder_of_the_wrong_shape_fails_in_one_line_before_training(
    shape: str, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    checkpoints = run_dir(tmp_path) / "checkpoints"
    if shape == "checkpoints_is_a_file":
        checkpoints.parent.mkdir(parents=True)
        checkpoints.write_text("not a folder")
    else:
        (checkpoints / "MANIFEST.json").mkdir(parents=True)
    assert main(demo_args(tmp_path, episodes=4, val_every=2, mirror=False)) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("atheria: error: ") and "move it aside" in err and "\n" not in err, err
    assert not (run_dir(tmp_path) / "logs").exists(), "nothing trained"
