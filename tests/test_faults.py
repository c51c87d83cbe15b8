"""Faults a platform throws at a run: a full disk mid-save, and checkpoints planted to run code."""

from __future__ import annotations

import errno
import functools
import hashlib
import json
import pickle
import re
from pathlib import Path

import pytest
import torch
from conftest import demo_args, run_dir

from atheria_lightning.cli import main
from atheria_lightning.errors import ConfigError
from atheria_lightning.module import QCAModule
from atheria_lightning.store import RunStore
from atheria_lightning.store import mirror as mirror_module
from atheria_lightning.store import writer as writer_module
from atheria_lightning.store.uploader import Uploader
from atheria_lightning.store.writer import Folder


def listed(folder: Path) -> dict[str, dict]:
    """The files MANIFEST.json lists in ``folder``, name -> entry."""
    return json.loads((folder / "MANIFEST.json").read_text())["files"]


def matches(path: Path, entry: dict) -> bool:
    data = path.read_bytes()
    return (len(data), hashlib.sha256(data).hexdigest()) == (entry["size"], entry["sha256"])


def state(value: float, size: int = 3) -> dict:
    return {"state_dict": {"w": torch.full((size,), value)}}


@pytest.mark.slow
def test_disk_full_during_a_save_is_loud_and_keeps_the_previous_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    assert main(demo_args(tmp_path, "--trainer.max_steps", "3", episodes=12, val_every=3, mirror=False)) == 0
    folder = run_dir(tmp_path) / "checkpoints"
    before = listed(folder)
    files_before = sorted(p.name for p in folder.iterdir())

    real_save = torch.save

    def full_disk(obj, handle, *args, **kwargs):
        handle.write(b"partial")  # the write gets somewhere, then the device is full
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(writer_module.torch, "save", full_disk)
    capsys.readouterr()
    assert main(demo_args(tmp_path, episodes=12, val_every=3, mirror=False)) == 1
    err = capsys.readouterr().err
    assert "no space left" in err and "previous checkpoints are intact" in err
    monkeypatch.setattr(writer_module.torch, "save", real_save)

    after = listed(folder)
    assert after == before, "the manifest still lists exactly the previous checkpoints"
    for name, entry in after.items():
        assert matches(folder / name, entry)
    assert sorted(p.name for p in folder.iterdir() if not p.name.startswith(".")) == files_before
    assert not [p for p in folder.iterdir() if ".tmp-" in p.name], "no partial file is left behind"


class PlantedPayload:
    """Unpickling this runs code: it would create the sentinel file."""

    def __init__(self, sentinel: str) -> None:
        self.sentinel = sentinel

    def __reduce__(self):
        return (open, (self.sentinel, "w"))


def _plant(folder: Path, name: str, sentinel: Path, episode: int) -> None:
    """A malicious checkpoint, listed in the manifest with its true sha256 (the attacker can edit both)."""
    data = pickle.dumps({"state_dict": {}, "payload": PlantedPayload(str(sentinel))})
    path = folder / name
    path.write_bytes(data)
    manifest = json.loads((folder / "MANIFEST.json").read_text())
    manifest["files"][name] = {"episode": episode, "size": len(data), "sha256": hashlib.sha256(data).hexdigest(),
                               "metric": 0.0, "kind": "last", "saved_at": 0.0}  # fmt: skip
    (folder / "MANIFEST.json").write_text(json.dumps(manifest))


@pytest.mark.slow
@pytest.mark.parametrize("where", ["local", "mirror"])
def test_a_planted_checkpoint_is_refused_set_aside_and_never_runs_code(
    where: str, tmp_path: Path, capsys: pytest.CaptureFixture, caplog: pytest.LogCaptureFixture
) -> None:
    assert main(demo_args(tmp_path, "--trainer.max_steps", "3", episodes=12, val_every=3)) == 0
    sentinel = tmp_path / "PWNED"
    folder = run_dir(tmp_path) / "checkpoints" if where == "local" else tmp_path / "mirror" / "demo" / "checkpoints"
    _plant(folder, "last.ckpt", sentinel, episode=999 if where == "mirror" else 3)
    capsys.readouterr()
    assert main(demo_args(tmp_path, "--trainer.max_steps", "4", episodes=12, val_every=3)) == 0
    assert re.search(r"resuming from episode 3 of 12 \(25%\) \[local: ", capsys.readouterr().out)
    if where == "local":
        assert "does not load with weights_only=True" in caplog.text
    else:  # refused before it is downloaded: it does not load, so it cannot hold the episode its entry claims
        assert "does not match its MANIFEST.json entry (bytes or episode): not downloaded" in caplog.text
    assert list((folder / "corrupt").glob("last.ckpt.*")), "set aside where it was found, not deleted"
    assert not sentinel.exists(), "the planted code must never run"


@pytest.mark.slow
def test_a_planted_checkpoint_given_as_ckpt_path_is_refused_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    assert main(demo_args(tmp_path, "--trainer.max_steps", "3", episodes=12, val_every=3, mirror=False)) == 0
    sentinel, planted = tmp_path / "PWNED", tmp_path / "gift.ckpt"
    planted.write_bytes(pickle.dumps({"state_dict": {}, "payload": PlantedPayload(str(sentinel))}))
    capsys.readouterr()
    assert main(demo_args(tmp_path, "--ckpt_path", str(planted), episodes=12, val_every=3, mirror=False)) == 2
    err = capsys.readouterr().err
    assert "checkpoint refused" in err and err.count("\n") == 1, err
    assert not sentinel.exists(), "the planted code must never run"


def test_a_checkpoint_naming_a_callable_to_instantiate_is_refused(tmp_path: Path) -> None:
    assert main(demo_args(tmp_path, episodes=3, val_every=3, mirror=False)) == 0
    ckpt = run_dir(tmp_path) / "checkpoints" / "last.ckpt"
    state = torch.load(ckpt, weights_only=True)
    state["hyper_parameters"]["_instantiator"] = "os.system"
    torch.save(state, ckpt)
    with pytest.raises(ValueError, match="not in the allowlist"):
        QCAModule.load_from_checkpoint(ckpt, weights_only=True)


@pytest.mark.slow
def test_mirror_to_a_real_s3_peer_and_resume_from_it(
    s3_server: str, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    import shutil

    import s3fs

    extra = tmp_path / "s3.yaml"
    extra.write_text(f"""mirror_url: s3://atheria-runs/mirror
trainer:
  callbacks:
    - class_path: atheria_lightning.callbacks.SmartCheckpoint
      init_args: {{every_n_episodes: 2}}
    - class_path: atheria_lightning.callbacks.MirrorSync
      init_args:
        every_n_episodes: 2
        storage_options: {{client_kwargs: {{endpoint_url: "{s3_server}"}}}}
""")
    # The extra --config comes after demo_args' --mirror_url, so its s3:// mirror_url wins.
    assert main(demo_args(tmp_path, "--config", str(extra), "--trainer.max_steps", "4", episodes=8, val_every=2)) == 0
    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_server})
    remote = json.loads(fs.cat_file("atheria-runs/mirror/demo/checkpoints/MANIFEST.json"))["files"]
    local = listed(run_dir(tmp_path) / "checkpoints")
    assert {n: e["sha256"] for n, e in remote.items()} == {n: e["sha256"] for n, e in local.items()}
    for name, entry in remote.items():
        data = fs.cat_file(f"atheria-runs/mirror/demo/checkpoints/{name}")
        assert hashlib.sha256(data).hexdigest() == entry["sha256"]

    shutil.rmtree(tmp_path / "runs")  # a new Colab session: the local disk is gone
    capsys.readouterr()
    assert main(demo_args(tmp_path, "--config", str(extra), episodes=8, val_every=2)) == 0
    out = capsys.readouterr().out
    assert "resuming from episode 4 of 8" in out and "[mirror:" in out


class OutOfMemoryAt:
    """Raises the CUDA out-of-memory error from the episode's forward pass, as a too-big universe would on a GPU."""

    def __init__(self, module: QCAModule, episode: int, times: int) -> None:
        self.run_episode, self.episode, self.left = module.run_episode, episode, times
        module.run_episode = self

    def __call__(self, seed: int, episode: int, noise: float):
        if episode == self.episode and self.left > 0:
            self.left -= 1
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return self.run_episode(seed, episode, noise)


def _fit_with_oom(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, times: int) -> int:
    from atheria_lightning.cli import app as cli

    original = cli.QCAModule.__init__

    @functools.wraps(original)  # the CLI reads the signature
    def patched(self, *args, **kwargs):
        original(self, *args, **kwargs)
        OutOfMemoryAt(self, episode=3, times=times)

    monkeypatch.setattr(cli.QCAModule, "__init__", patched)
    return main(demo_args(tmp_path, episodes=8, val_every=4, mirror=False))


@pytest.mark.slow
def test_out_of_memory_once_is_retried_after_freeing_the_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    assert _fit_with_oom(tmp_path, monkeypatch, times=1) == 0
    assert "episode 3 ran out of GPU memory: emptying the cache and trying once more" in caplog.text
    assert listed(run_dir(tmp_path) / "checkpoints")["last.ckpt"]["episode"] == 8


@pytest.mark.slow
def test_out_of_memory_twice_saves_the_last_finished_episode_and_suggests_smaller_settings(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    assert _fit_with_oom(tmp_path, monkeypatch, times=2) == 3
    err = capsys.readouterr().err.strip()
    assert err.startswith("atheria: error: out of GPU memory at episode 3") and "universes_per_episode" in err, err
    last = listed(run_dir(tmp_path) / "checkpoints")["last.ckpt"]
    assert last["episode"] == 3, "episodes 0-2 finished; the failing episode 3 is not counted"
    monkeypatch.undo()
    capsys.readouterr()
    assert main(demo_args(tmp_path, episodes=8, val_every=4, mirror=False)) == 0
    assert "resuming from episode 3 of 8" in capsys.readouterr().out


def test_a_background_write_saves_the_state_of_the_moment_training_asked_for_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Training goes on while the file is written: the next optimizer step changes the weights in place.
    import threading

    release = threading.Event()
    real_atomic_write = writer_module.atomic_write

    def slow_atomic_write(*args, **kwargs):
        release.wait(timeout=20.0)
        return real_atomic_write(*args, **kwargs)

    monkeypatch.setattr(writer_module, "atomic_write", slow_atomic_write)
    store = RunStore(tmp_path)
    weights = torch.zeros(4)
    store.write_checkpoint({"state_dict": {"w": weights}}, "last", 3)
    weights.add_(1.0)  # while the write is still queued
    release.set()
    store.raise_write_error()
    saved = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert torch.equal(saved["state_dict"]["w"], torch.zeros(4)), "the weights as they were at the save"
    assert "last.ckpt" in listed(tmp_path / "checkpoints")


def _die_at_manifest_write(
    monkeypatch: pytest.MonkeyPatch, target: object, method: str, nth: int, error: BaseException
) -> None:
    """The ``nth`` manifest write through ``target.<method>`` dies with ``error`` (a kill stand-in)."""
    real = getattr(target, method)
    calls = {"n": 0}

    def dying(self, *args):
        calls["n"] += 1
        if calls["n"] == nth:
            raise error
        return real(self, *args)

    monkeypatch.setattr(target, method, dying)


def test_a_kill_between_replacing_last_ckpt_and_listing_it_still_resumes_from_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = RunStore(tmp_path, async_write=False)
    store.write_checkpoint(state(0.0), "last", 10)
    # The journal (pending entry) is written before the rename; the write after it, which lists the file, dies.
    _die_at_manifest_write(monkeypatch, Folder, "write_manifest", 2, KeyboardInterrupt("SIGKILL stand-in"))
    with pytest.raises(KeyboardInterrupt):
        store.write_checkpoint(state(1.0), "last", 20)
    monkeypatch.undo()

    point = RunStore(tmp_path).start()
    target = tmp_path / "checkpoints" / "last.ckpt"
    assert point is not None and point.path == str(target) and point.episode == 20
    assert torch.equal(torch.load(target, weights_only=True)["state_dict"]["w"], torch.ones(3))
    assert "pending" not in json.loads((tmp_path / "checkpoints" / "MANIFEST.json").read_text())


def test_a_mirror_killed_between_moving_last_ckpt_and_listing_it_still_serves_a_verified_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run = tmp_path / "run"
    store = RunStore(run, async_write=False)
    store.set_mirror(str(tmp_path / "mirror"), max_retries=0, sleep=lambda seconds: None)
    store.write_checkpoint(state(0.0), "last", 10)
    store.start_mirror()
    assert store.flush(10)
    store.write_checkpoint(state(1.0), "last", 20)
    # After the journal and the move, the mirror dies before its final manifest.
    _die_at_manifest_write(monkeypatch, Uploader, "_write_manifest", 2, OSError(errno.EIO, "connection lost"))
    assert not store.flush(10)
    monkeypatch.undo()
    store.close()

    fresh = RunStore(tmp_path / "fresh" / "run")
    fresh.set_mirror(str(tmp_path / "mirror"), sleep=lambda seconds: None)
    point = fresh.start()
    assert point is not None and point.source == "mirror" and point.episode == 20
    assert torch.equal(torch.load(point.path, weights_only=True)["state_dict"]["w"], torch.ones(3))
    fresh.close()


def test_a_copy_of_a_damaged_checkpoint_is_refused_and_nothing_is_listed(tmp_path: Path) -> None:
    store = RunStore(tmp_path, async_write=False)
    store.write_checkpoint(state(1.0), "last", 4, metric=0.5)
    with open(tmp_path / "checkpoints" / "last.ckpt", "ab") as handle:
        handle.write(b"bit rot")  # the listed file no longer matches its entry
    trainer = type("T", (), {"is_global_zero": True})()
    with pytest.raises(OSError, match="no longer matches MANIFEST.json"):
        store.copy_last_to_best(trainer, 4, 0.5)
    assert not (tmp_path / "checkpoints" / "best-e000004.ckpt").exists()
    assert "best-e000004.ckpt" not in listed(tmp_path / "checkpoints")


def test_each_listed_checkpoint_is_described_by_the_bytes_on_disk(tmp_path: Path) -> None:
    # The writer hashes what it writes instead of reading the file back: the entry must still be the file's own.
    store = RunStore(tmp_path)
    store.write_checkpoint(state(0.5, size=1000), "last", 7, metric=0.5)
    store.copy_last_to_best(type("T", (), {"is_global_zero": True})(), 7, 0.5)
    store.write_checkpoint(state(2.0, size=10), "last", 8)  # replaced in place
    store.raise_write_error()
    folder = tmp_path / "checkpoints"
    entries = listed(folder)
    assert set(entries) == {"best-e000007.ckpt", "last.ckpt"}
    for name, entry in entries.items():
        assert matches(folder / name, entry), name
    assert (entries["best-e000007.ckpt"]["episode"], entries["best-e000007.ckpt"]["metric"]) == (7, 0.5)
    assert entries["last.ckpt"]["episode"] == 8


def test_a_mirror_checkpoint_whose_bytes_changed_is_not_downloaded(tmp_path: Path) -> None:
    source = RunStore(tmp_path / "first" / "run", async_write=False)
    source.set_mirror(str(tmp_path / "mirror"), sleep=lambda seconds: None)
    source.write_checkpoint(state(0.0), "best", 10, metric=1.0)
    source.write_checkpoint(state(1.0), "last", 20)
    source.start_mirror()
    assert source.flush(10)
    source.close()
    last = tmp_path / "mirror" / "run" / "checkpoints" / "last.ckpt"
    data = bytearray(last.read_bytes())
    data[-1] ^= 0xFF  # same size, different bytes: caught by the sha256 of the download itself
    last.write_bytes(bytes(data))

    fresh = RunStore(tmp_path / "fresh" / "run")
    fresh.set_mirror(str(tmp_path / "mirror"), sleep=lambda seconds: None)
    point = fresh.start()
    assert point is not None and point.source == "mirror" and point.episode == 10
    local = tmp_path / "fresh" / "run" / "checkpoints"
    assert not (local / "last.ckpt").exists() and "last.ckpt" not in listed(local)
    assert list((last.parent / "corrupt").glob("last.ckpt.*")), "the mirror's damaged file is set aside, not deleted"
    assert "last.ckpt" not in listed(last.parent)
    fresh.close()


def test_a_newer_mirror_checkpoint_that_cannot_be_read_stops_the_start_in_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Training from the older local state would later replace the mirror's newer file with an older one.
    run = tmp_path / "run"
    source = RunStore(tmp_path / "first" / "run", async_write=False)
    source.set_mirror(str(tmp_path / "mirror"), sleep=lambda seconds: None)
    source.write_checkpoint(state(1.0), "last", 20)
    source.start_mirror()
    assert source.flush(10)
    source.close()
    RunStore(run, async_write=False).write_checkpoint(state(0.0), "last", 10)  # an older local copy
    real_open = mirror_module.Mirror._download_once

    def unreadable(self, name, *args):
        raise ConnectionError("Drive went away")

    monkeypatch.setattr(mirror_module.Mirror, "_download_once", unreadable)
    stale = RunStore(run)
    stale.set_mirror(str(tmp_path / "mirror"), max_retries=1, sleep=lambda seconds: None)
    with pytest.raises(ConfigError, match="could not be downloaded .*nothing was trained"):
        stale.start()
    monkeypatch.setattr(mirror_module.Mirror, "_download_once", real_open)
    assert listed(tmp_path / "mirror" / "run" / "checkpoints")["last.ckpt"]["episode"] == 20
