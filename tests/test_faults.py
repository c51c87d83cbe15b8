"""Faults a platform throws at a run: a full disk mid-save, and checkpoints planted to run code."""

from __future__ import annotations

import errno
import functools
import hashlib
import json
import pickle
from pathlib import Path

import pytest
import torch
from conftest import demo_args, run_dir

from atheria_lightning import checkpoint_io
from atheria_lightning.cli import main
from atheria_lightning.manifest import read_manifest, verify
from atheria_lightning.module import QCAModule

LOCAL = __import__("fsspec").filesystem("file")


def test_disk_full_during_a_save_is_loud_and_keeps_the_previous_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    assert main(demo_args(tmp_path, "--trainer.max_steps", "3", episodes=12, val_every=3, mirror=False)) == 0
    folder = run_dir(tmp_path) / "checkpoints"
    before = read_manifest(LOCAL, str(folder))
    files_before = sorted(p.name for p in folder.iterdir())

    real_save = torch.save

    def full_disk(obj, handle, *args, **kwargs):
        handle.write(b"partial")  # the write gets somewhere, then the device is full
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint_io.torch, "save", full_disk)
    capsys.readouterr()
    assert main(demo_args(tmp_path, episodes=12, val_every=3, mirror=False)) == 1
    err = capsys.readouterr().err
    assert "no space left" in err and "previous checkpoints are intact" in err
    monkeypatch.setattr(checkpoint_io.torch, "save", real_save)

    after = read_manifest(LOCAL, str(folder))
    assert after.files == before.files, "the manifest still lists exactly the previous checkpoints"
    for name, entry in after.files.items():
        assert verify(LOCAL, str(folder / name), entry)
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


@pytest.mark.parametrize("where", ["local", "mirror"])
def test_a_planted_checkpoint_is_refused_and_never_runs_code(
    where: str, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    assert main(demo_args(tmp_path, "--trainer.max_steps", "3", episodes=12, val_every=3)) == 0
    sentinel = tmp_path / "PWNED"
    folder = run_dir(tmp_path) / "checkpoints" if where == "local" else tmp_path / "mirror" / "demo" / "checkpoints"
    _plant(folder, "last.ckpt", sentinel, episode=999 if where == "mirror" else 3)
    capsys.readouterr()
    assert main(demo_args(tmp_path, episodes=12, val_every=3)) == 2
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


@pytest.fixture
def s3_server(monkeypatch: pytest.MonkeyPatch):
    """A real S3 protocol peer on 127.0.0.1 (moto's server), reached by the real s3fs client."""
    moto_server = pytest.importorskip("moto.server")
    pytest.importorskip("s3fs")
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    for key, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                       "AWS_DEFAULT_REGION": "us-east-1"}.items():  # fmt: skip
        monkeypatch.setenv(key, value)
    endpoint = f"http://{host}:{port}"
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()
    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": endpoint})
    fs.mkdir("atheria-runs")
    yield endpoint
    s3fs.S3FileSystem.clear_instance_cache()
    server.stop()


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
    remote = read_manifest(fs, "atheria-runs/mirror/demo/checkpoints")
    local = read_manifest(LOCAL, str(run_dir(tmp_path) / "checkpoints"))
    assert {n: e.sha256 for n, e in remote.files.items()} == {n: e.sha256 for n, e in local.files.items()}
    for name, entry in remote.files.items():
        assert verify(fs, f"atheria-runs/mirror/demo/checkpoints/{name}", entry)

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
    from atheria_lightning import cli

    original = cli.QCAModule.__init__

    @functools.wraps(original)  # the CLI reads the signature
    def patched(self, *args, **kwargs):
        original(self, *args, **kwargs)
        OutOfMemoryAt(self, episode=3, times=times)

    monkeypatch.setattr(cli.QCAModule, "__init__", patched)
    return main(demo_args(tmp_path, episodes=8, val_every=4, mirror=False))


def test_out_of_memory_once_is_retried_after_freeing_the_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    assert _fit_with_oom(tmp_path, monkeypatch, times=1) == 0
    assert "episode 3 ran out of GPU memory: emptying the cache and trying once more" in caplog.text
    assert read_manifest(LOCAL, str(run_dir(tmp_path) / "checkpoints")).files["last.ckpt"].episode == 8


def test_out_of_memory_twice_saves_the_last_finished_episode_and_suggests_smaller_settings(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    assert _fit_with_oom(tmp_path, monkeypatch, times=2) == 3
    err = capsys.readouterr().err.strip()
    assert err.startswith("atheria: error: out of GPU memory at episode 3") and "universes_per_episode" in err, err
    last = read_manifest(LOCAL, str(run_dir(tmp_path) / "checkpoints")).files["last.ckpt"]
    assert last.episode == 3, "episodes 0-2 finished; the failing episode 3 is not counted"
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
    real_atomic_write = checkpoint_io.atomic_write

    def slow_atomic_write(*args, **kwargs):
        release.wait(timeout=20.0)
        return real_atomic_write(*args, **kwargs)

    monkeypatch.setattr(checkpoint_io, "atomic_write", slow_atomic_write)
    io = checkpoint_io.AtomicCheckpointIO()
    weights = torch.zeros(4)
    io.save_checkpoint({"state_dict": {"w": weights}, checkpoint_io.META_KEY: {"episode": 3}}, tmp_path / "last.ckpt")
    weights.add_(1.0)  # while the write is still queued
    release.set()
    io.teardown()
    saved = torch.load(tmp_path / "last.ckpt", weights_only=True)
    assert torch.equal(saved["state_dict"]["w"], torch.zeros(4)), "the weights as they were at the save"
    assert "last.ckpt" in read_manifest(LOCAL, str(tmp_path)).files


def test_a_kill_between_replacing_last_ckpt_and_listing_it_still_resumes_from_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from atheria_lightning.checkpoint_io import META_KEY, AtomicCheckpointIO
    from atheria_lightning.resume import find_resume_checkpoint

    io = AtomicCheckpointIO(async_write=False)
    target = tmp_path / "last.ckpt"
    io.save_checkpoint({"w": torch.zeros(3), META_KEY: {"episode": 10}}, target)

    real_write = checkpoint_io.write_manifest
    calls = {"n": 0}

    def killed_after_rename(fs, folder, manifest):
        calls["n"] += 1
        if calls["n"] == 2:  # the write that would list the renamed file: the process dies here
            raise KeyboardInterrupt("SIGKILL stand-in")
        real_write(fs, folder, manifest)

    monkeypatch.setattr(checkpoint_io, "write_manifest", killed_after_rename)
    with pytest.raises(KeyboardInterrupt):
        io.save_checkpoint({"w": torch.ones(3), META_KEY: {"episode": 20}}, target)
    monkeypatch.setattr(checkpoint_io, "write_manifest", real_write)

    point = find_resume_checkpoint(str(tmp_path))
    assert point is not None and point.path == str(target) and point.episode == 20
    assert torch.equal(torch.load(target, weights_only=True)["w"], torch.ones(3))
    assert not read_manifest(LOCAL, str(tmp_path)).pending, "the interrupted replacement is settled"


def test_a_mirror_killed_between_moving_last_ckpt_and_listing_it_still_serves_a_verified_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from atheria_lightning.callbacks import mirror as mirror_module
    from atheria_lightning.checkpoint_io import META_KEY, AtomicCheckpointIO
    from atheria_lightning.resume import find_resume_checkpoint

    run = tmp_path / "run"
    io = AtomicCheckpointIO(async_write=False)
    io.save_checkpoint({"w": torch.zeros(3), META_KEY: {"episode": 10}}, run / "checkpoints" / "last.ckpt")
    mirror = mirror_module.MirrorSync(str(tmp_path / "mirror"), run_dir=str(run), max_retries=0)
    mirror.connect()
    assert mirror.sync_once()
    io.save_checkpoint({"w": torch.ones(3), META_KEY: {"episode": 20}}, run / "checkpoints" / "last.ckpt")

    real_write = mirror_module.write_manifest
    calls = {"n": 0}

    def killed_before_listing(fs, folder, manifest):
        calls["n"] += 1
        if calls["n"] == 2:  # after the journal and the move: the mirror dies before its final manifest
            raise OSError(errno.EIO, "connection lost")
        real_write(fs, folder, manifest)

    monkeypatch.setattr(mirror_module, "write_manifest", killed_before_listing)
    assert not mirror.sync_once()
    monkeypatch.setattr(mirror_module, "write_manifest", real_write)

    remote = (LOCAL, str(tmp_path / "mirror" / "run" / "checkpoints"))
    point = find_resume_checkpoint(str(tmp_path / "fresh" / "checkpoints"), remote)
    assert point is not None and point.source == "mirror" and point.episode == 20
    assert torch.equal(torch.load(point.path, weights_only=True)["w"], torch.ones(3))


def test_a_copy_of_a_damaged_checkpoint_is_refused_and_nothing_is_listed(tmp_path: Path) -> None:
    io = checkpoint_io.AtomicCheckpointIO(async_write=False)
    best, last = tmp_path / "best-e000004.ckpt", tmp_path / "last.ckpt"
    io.save_checkpoint({"weights": torch.ones(3), checkpoint_io.META_KEY: {"episode": 4}}, best)
    io.copy_checkpoint(best, tmp_path / "copy.ckpt")  # a sound file copies, listed with its episode
    listed = read_manifest(LOCAL, str(tmp_path)).files
    assert listed["copy.ckpt"].sha256 == listed["best-e000004.ckpt"].sha256 and listed["copy.ckpt"].episode == 4

    with open(best, "ab") as handle:
        handle.write(b"bit rot")  # the listed file no longer matches its entry
    with pytest.raises(FileNotFoundError, match="not a verified checkpoint"):
        io.copy_checkpoint(best, last)
    assert not last.exists() and "last.ckpt" not in read_manifest(LOCAL, str(tmp_path)).files


def test_each_listed_checkpoint_is_described_by_the_bytes_on_disk(tmp_path: Path) -> None:
    # The writer hashes what it writes instead of reading the file back: the entry must still be the file's own.
    io = checkpoint_io.AtomicCheckpointIO()
    best, last = tmp_path / "best-e000007.ckpt", tmp_path / "last.ckpt"
    io.save_checkpoint({"weights": torch.randn(1000), checkpoint_io.META_KEY: {"episode": 7, "metric": 0.5}}, best)
    io.copy_checkpoint(best, last)
    io.save_checkpoint({"weights": torch.randn(10), checkpoint_io.META_KEY: {"episode": 8}}, last)  # replaced in place
    io.teardown()
    listed = read_manifest(LOCAL, str(tmp_path)).files
    assert set(listed) == {best.name, last.name}
    for path in (best, last):
        data = path.read_bytes()
        assert (listed[path.name].size, listed[path.name].sha256) == (len(data), hashlib.sha256(data).hexdigest())
    assert (listed[best.name].episode, listed[best.name].metric, listed[last.name].episode) == (7, 0.5, 8)


def test_a_mirror_checkpoint_whose_bytes_changed_is_not_downloaded(tmp_path: Path) -> None:
    from atheria_lightning.resume import find_resume_checkpoint

    mirror = tmp_path / "mirror"
    io = checkpoint_io.AtomicCheckpointIO(async_write=False)
    io.save_checkpoint({"w": torch.zeros(3), checkpoint_io.META_KEY: {"episode": 10}}, mirror / "best-e000010.ckpt")
    io.save_checkpoint({"w": torch.ones(3), checkpoint_io.META_KEY: {"episode": 20}}, mirror / "last.ckpt")
    data = bytearray((mirror / "last.ckpt").read_bytes())
    data[-1] ^= 0xFF  # same size, different bytes: caught by the sha256 of the download itself
    (mirror / "last.ckpt").write_bytes(bytes(data))

    local = tmp_path / "fresh" / "checkpoints"
    point = find_resume_checkpoint(str(local), (LOCAL, str(mirror)))
    assert point is not None and point.source == "mirror" and point.episode == 10
    assert not (local / "last.ckpt").exists() and "last.ckpt" not in read_manifest(LOCAL, str(local)).files
