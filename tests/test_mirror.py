"""The mirror: the store's uploads (verified, journalled, retried), MirrorSync's cadence, and the settings it checks."""

from __future__ import annotations

import json
import logging
import os
import sys
import uuid
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import fsspec
import lightning.pytorch as pl
import pytest
import torch
from fsspec.implementations.memory import MemoryFileSystem
from fsspec.registry import _registry  # the writable mapping behind fsspec.registry
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import Callback

from atheria_lightning.callbacks import MirrorSync, SmartCheckpoint
from atheria_lightning.callbacks.mirror import MAX_INTERVAL_FACTOR
from atheria_lightning.data import EpisodeDataModule
from atheria_lightning.errors import ConfigError
from atheria_lightning.files import sha256_of
from atheria_lightning.module import QCAModule
from atheria_lightning.store import RunStore, reconcile, remote_run_dir
from atheria_lightning.store import uploader as uploader_module
from atheria_lightning.store.copies import download_verified
from atheria_lightning.store.lease import Lease
from atheria_lightning.store.manifest import Entry


class FlakyMemoryFileSystem(MemoryFileSystem):
    """The shared in-memory store behind ``flakymem://``, failing every ``fail_every``-th file opened for writing.

    Only opens for writing count, so an upload (one open of its temporary file, then a move) fails at most once per
    attempt and each retry makes progress. Copies and removals are recorded in ``events`` to check their order.
    """

    protocol = ("flakymem",)
    fail_every = 0  # 0: never fail; 1: every write fails; 2: every second write fails
    writes = 0
    truncate_copies = False  # a move that loses a checkpoint's data: the upload then fails verification
    events: list[tuple[str, str]] = []

    @classmethod
    def _strip_protocol(cls, path: Any) -> Any:
        if isinstance(path, str):
            path = path.removeprefix("flakymem://")
        return super()._strip_protocol(path)

    def _open(self, path: str, mode: str = "rb", *args: Any, **kwargs: Any) -> Any:
        if mode[0] in "wxa":
            type(self).writes += 1
            if self.fail_every and type(self).writes % self.fail_every == 0:
                raise OSError(5, "Input/output error")
        return super()._open(path, mode, *args, **kwargs)

    def cp_file(self, path1: str, path2: str, **kwargs: Any) -> None:
        super().cp_file(path1, path2, **kwargs)
        if self.truncate_copies and str(path2).endswith(".ckpt"):
            self.store[self._strip_protocol(path2)].truncate(1)
        self.events.append(("copy", self._strip_protocol(path2)))

    def rm_file(self, path: str) -> None:
        super().rm_file(path)
        self.events.append(("rm", self._strip_protocol(path)))


fsspec.register_implementation("flakymem", FlakyMemoryFileSystem, clobber=True)


@pytest.fixture
def flaky(monkeypatch: pytest.MonkeyPatch) -> type[FlakyMemoryFileSystem]:
    monkeypatch.setattr(FlakyMemoryFileSystem, "fail_every", 0)
    monkeypatch.setattr(FlakyMemoryFileSystem, "writes", 0)
    monkeypatch.setattr(FlakyMemoryFileSystem, "truncate_copies", False)
    monkeypatch.setattr(FlakyMemoryFileSystem, "events", [])
    return FlakyMemoryFileSystem


@pytest.fixture
def mirror_root() -> Any:
    """A unique root in the shared memory store, emptied afterwards."""
    root = f"mirror-{uuid.uuid4().hex[:8]}"
    yield root
    for key in [k for k in MemoryFileSystem.store if k.startswith(f"/{root}/")]:
        del MemoryFileSystem.store[key]


def checkpoint(size: int = 64, seed: int = 0) -> dict[str, Any]:
    """A small Lightning-shaped checkpoint dict."""
    return {"state_dict": {"w": torch.randn(size, generator=torch.Generator().manual_seed(seed))}}


def save(store: RunStore, kind: str, episode: int, metric: float | None = None, size: int = 64) -> None:
    store.write_checkpoint(checkpoint(size, seed=episode), kind, episode, metric)
    store.wait()


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    """A run folder ``runs/exp`` with logs and an export (checkpoints come from each test's store)."""
    run = tmp_path / "runs" / "exp"
    (run / "logs" / "version_0").mkdir(parents=True)
    (run / "logs" / "version_0" / "events.out.tfevents.1").write_bytes(b"event-1")
    (run / "logs" / "metrics.jsonl").write_text('{"episode": 1}\n')
    (run / "exports").mkdir()
    (run / "exports" / "report.md").write_text("# report\n")
    return run


def make_store(run: Path, url: str, top_k: int = 5, **mirror: Any) -> RunStore:
    mirror.setdefault("sleep", lambda seconds: None)
    store = RunStore(run)
    store.keep_best(top_k)
    store.set_mirror(url, **mirror)
    return store


def with_checkpoints(store: RunStore) -> RunStore:
    save(store, "best", 10, metric=1.5)
    save(store, "last", 12)
    return store


def manifest_at(fs: Any, folder: str) -> dict[str, Any]:
    return json.loads(fs.cat_file(f"{folder}/MANIFEST.json"))["files"]


def assert_mirrored(url: str, run: Path) -> None:
    """The mirror's manifest lists exactly the local entries, its files verify, and nothing else is there."""
    fs, remote = remote_run_dir(url, run.name)
    local = json.loads((run / "checkpoints" / "MANIFEST.json").read_text())["files"]
    mirrored = manifest_at(fs, f"{remote}/checkpoints")
    assert {name: entry["sha256"] for name, entry in mirrored.items()} == {
        name: entry["sha256"] for name, entry in local.items()
    }
    for name, entry in mirrored.items():
        assert sha256_of(fs, f"{remote}/checkpoints/{name}") == entry["sha256"], name
    names = {os.path.basename(path) for path in fs.ls(f"{remote}/checkpoints", detail=False)}
    assert names == {*local, "MANIFEST.json"}


@pytest.mark.parametrize("kind", ["memory", "folder"])
def test_a_sync_sends_the_listed_checkpoints_logs_and_exports(kind: str, run_dir: Path, tmp_path: Path,
                                                             mirror_root: str) -> None:  # fmt: skip
    url = f"memory://{mirror_root}" if kind == "memory" else str(tmp_path / "drive" / "atheria")
    store = with_checkpoints(make_store(run_dir, url))
    store.start_mirror()
    assert store.flush(10)
    assert_mirrored(url, run_dir)
    fs, remote = remote_run_dir(url, "exp")
    assert fs.cat_file(f"{remote}/logs/version_0/events.out.tfevents.1") == b"event-1"
    assert fs.cat_file(f"{remote}/logs/metrics.jsonl") == b'{"episode": 1}\n'
    assert fs.cat_file(f"{remote}/exports/report.md") == b"# report\n"
    assert not [path for path in fs.find(remote) if ".tmp-" in path]
    status = store.mirror_status()
    assert status is not None and not status.behind and status.mirror_episode == 12
    assert store.sync_failures == 0 and store.syncs_ended >= 1


def test_a_second_sync_sends_only_what_changed(run_dir: Path, mirror_root: str, flaky: Any) -> None:
    store = with_checkpoints(make_store(run_dir, f"flakymem://{mirror_root}"))
    store.start_mirror()
    assert store.flush(10)
    writes = flaky.writes
    assert store.flush(10)
    assert flaky.writes == writes  # nothing changed: no upload, not even the manifest
    with open(run_dir / "logs" / "metrics.jsonl", "a") as handle:
        handle.write('{"episode": 2}\n')
    assert store.flush(10)
    assert flaky.writes == writes + 1
    fs, remote = remote_run_dir(f"memory://{mirror_root}", "exp")
    assert fs.cat_file(f"{remote}/logs/metrics.jsonl").count(b"episode") == 2


def test_retention_removes_from_the_mirror_only_after_its_new_manifest(run_dir: Path, mirror_root: str,
                                                                      flaky: Any) -> None:  # fmt: skip
    url = f"flakymem://{mirror_root}"
    store = with_checkpoints(make_store(run_dir, url, top_k=1))
    store.start_mirror()
    assert store.flush(10)
    flaky.events.clear()
    save(store, "best", 20, metric=1.0)  # better: best-e000010 leaves, locally and then on the mirror
    assert not (run_dir / "checkpoints" / "best-e000010.ckpt").exists()
    assert store.flush(10)
    assert_mirrored(url, run_dir)
    order = [f"{kind}:{os.path.basename(path)}" for kind, path in flaky.events]
    manifests = [index for index, event in enumerate(order) if event == "copy:MANIFEST.json"]
    # The journal (the new file as pending) first, the file, the manifest listing it, and only then the removal.
    assert manifests[0] < order.index("copy:best-e000020.ckpt") < manifests[1] < order.index("rm:best-e000010.ckpt")


def test_a_flaky_mirror_ends_complete_with_retries(run_dir: Path, mirror_root: str, flaky: Any) -> None:
    delays: list[float] = []
    url = f"flakymem://{mirror_root}"
    store = with_checkpoints(make_store(run_dir, url, max_retries=10, backoff_s=0.5, sleep=delays.append))
    store.start_mirror()
    flaky.fail_every = 2
    assert store.flush(30)
    assert_mirrored(url, run_dir)
    assert store.sync_failures == 0
    assert delays and all(0.25 <= delay for delay in delays)


def test_a_broken_mirror_counts_failures_warns_and_never_raises(run_dir: Path, mirror_root: str, flaky: Any,
                                                                caplog: pytest.LogCaptureFixture) -> None:  # fmt: skip
    store = with_checkpoints(make_store(run_dir, f"flakymem://{mirror_root}", max_retries=2))
    store.start_mirror()
    assert store.flush(10)  # the start's own sync, before the mirror breaks
    save(store, "last", 14)
    local_before = {path.name: path.read_bytes() for path in (run_dir / "checkpoints").iterdir()}
    flaky.fail_every = 1
    with caplog.at_level(logging.WARNING, logger="atheria_lightning.store"):
        assert not store.flush(10)
        assert not store.flush(10)
    assert store.sync_failures == 2
    assert len([record for record in caplog.records if "failed after 2 retries" in record.message]) == 2
    assert {path.name: path.read_bytes() for path in (run_dir / "checkpoints").iterdir()} == local_before
    status = store.mirror_status()
    assert status is not None and status.behind


def test_an_upload_that_does_not_verify_is_never_listed(run_dir: Path, mirror_root: str, flaky: Any) -> None:
    url = f"flakymem://{mirror_root}"
    store = with_checkpoints(make_store(run_dir, url, max_retries=1))
    store.start_mirror()
    assert store.flush(10)
    save(store, "last", 14)
    flaky.truncate_copies = True
    assert not store.flush(10)
    fs, remote = remote_run_dir(url, "exp")
    assert manifest_at(fs, f"{remote}/checkpoints")["last.ckpt"]["episode"] == 12
    flaky.truncate_copies = False
    assert store.flush(10)
    assert_mirrored(url, run_dir)


def mirrored_then_saved(run_dir: Path, mirror_root: str) -> tuple[RunStore, Any, str]:
    """A store whose checkpoints of episodes 10 and 12 are on a memory mirror, then last.ckpt of 14 saved locally
    (queued, not sent yet); the mirror's filesystem and run folder."""
    url = f"memory://{mirror_root}"
    fs, remote = remote_run_dir(url, "exp")
    store = with_checkpoints(make_store(run_dir, url))
    store.start_mirror()
    assert store.flush(10)
    save(store, "last", 14)
    return store, fs, remote


def test_a_file_changed_after_it_was_queued_is_never_sent_under_its_old_entry(run_dir: Path,
                                                                              mirror_root: str) -> None:  # fmt: skip
    store, fs, remote = mirrored_then_saved(run_dir, mirror_root)
    last = run_dir / "checkpoints" / "last.ckpt"
    listed = last.read_bytes()
    last.write_bytes(b"changed on disk behind the store's back")
    assert not store.flush(10)  # not sent, still queued: the mirror is behind, and says so
    assert manifest_at(fs, f"{remote}/checkpoints")["last.ckpt"]["episode"] == 12
    last.write_bytes(listed)
    assert store.flush(10)
    assert manifest_at(fs, f"{remote}/checkpoints")["last.ckpt"]["episode"] == 14


@pytest.mark.parametrize("kind", ["memory", "folder"])
def test_a_first_start_on_a_new_mirror_waits_for_no_retry(kind: str, run_dir: Path, tmp_path: Path,
                                                          mirror_root: str) -> None:  # fmt: skip
    """A mirror without a manifest is new, not failing: no backoff before the first episode."""
    url = f"memory://{mirror_root}" if kind == "memory" else str(tmp_path / "mirror")
    slept: list[float] = []
    store = with_checkpoints(make_store(run_dir, url, sleep=slept.append))
    store.start_mirror()
    assert store.flush(10)
    assert slept == []
    store.close()


def test_a_checkpoint_replaced_during_a_slow_sync_is_sent_as_it_was_queued(
    run_dir: Path, mirror_root: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A run that saves last.ckpt every episode, to a mirror slower than an episode: the next save lands during
    every sync. The sync sends the state it queued; it is not refused as changed at every sync, never listed."""
    store, fs, remote = mirrored_then_saved(run_dir, mirror_root)
    queued = json.loads((run_dir / "checkpoints" / "MANIFEST.json").read_text())["files"]["last.ckpt"]
    last, real_write = run_dir / "checkpoints" / "last.ckpt", uploader_module.write_manifest

    def the_next_episode_lands_during_the_journal(side: Any, manifest: Any, before_replace: Any = None) -> None:
        if "last.ckpt" in manifest.pending:
            newer = last.with_name("newer.tmp")
            torch.save(checkpoint(seed=15), newer)
            os.replace(newer, last)  # as the store replaces it
        real_write(side, manifest, before_replace)

    monkeypatch.setattr(uploader_module, "write_manifest", the_next_episode_lands_during_the_journal)
    assert store.flush(10)
    listed = manifest_at(fs, f"{remote}/checkpoints")["last.ckpt"]
    assert listed["episode"] == 14 and listed["sha256"] == queued["sha256"]
    assert sha256_of(fs, f"{remote}/checkpoints/last.ckpt") == queued["sha256"]
    store.close()


def test_a_new_machine_with_nothing_local_never_empties_the_mirror(run_dir: Path, tmp_path: Path,
                                                                   mirror_root: str) -> None:  # fmt: skip
    url = f"memory://{mirror_root}"
    store = with_checkpoints(make_store(run_dir, url))
    store.start_mirror()
    assert store.flush(10)
    fs, remote = remote_run_dir(url, "exp")
    before = manifest_at(fs, f"{remote}/checkpoints")
    fresh = tmp_path / "fresh" / "exp"  # a new machine: same experiment, nothing local yet
    point = make_store(fresh, url).start()
    assert point is not None and point.episode == 12 and point.source == "mirror"
    assert manifest_at(fs, f"{remote}/checkpoints") == before
    assert {p.name for p in (fresh / "checkpoints").glob("*.ckpt")} == {"last.ckpt", "best-e000010.ckpt"}


def test_flush_and_close_are_safe_without_a_mirror_or_a_start(tmp_path: Path, mirror_root: str) -> None:
    store = RunStore(tmp_path / "runs" / "exp")
    assert store.flush(0.1) and store.close() is None and store.close() is None
    unstarted = make_store(tmp_path / "runs" / "other", f"memory://{mirror_root}")
    assert not unstarted.flush(0.1)  # never reached: nothing was sent, and it says so at once
    status = unstarted.close()
    assert status is not None and not status.behind  # nothing saved, nothing behind


def test_other_ranks_touch_no_file(run_dir: Path, mirror_root: str) -> None:
    store = RunStore(run_dir)
    trainer = SimpleNamespace(is_global_zero=False, default_root_dir=str(run_dir), loggers=[], datamodule=None,
                              world_size=2, global_step=0,
                              strategy=SimpleNamespace(broadcast=lambda obj, src=0: obj))  # fmt: skip
    mirror = MirrorSync(f"memory://{mirror_root}", every_n_episodes=1).use_store(store)
    mirror.setup(trainer, None, "fit")
    mirror.on_train_batch_end(trainer, None, None, None, 0)
    mirror.on_train_batch_start(trainer, None, None, 0)
    mirror.on_train_end(trainer, None)
    mirror.teardown(trainer, None, "fit")
    assert not [key for key in MemoryFileSystem.store if key.startswith(f"/{mirror_root}/")]
    assert not (run_dir / "checkpoints").exists()


@pytest.mark.parametrize(
    ("kwargs", "setting"),
    [
        ({"every_n_episodes": 0}, "every_n_episodes=0"),
        ({"flush_timeout_s": 0}, "flush_timeout_s=0"),
        ({"max_retries": -1}, "max_retries=-1"),
        ({"backoff_s": -1.0}, "backoff_s=-1.0"),
        ({"max_share": 0.0}, "max_share=0.0"),
        ({"max_share": 1.0}, "max_share=1.0"),
        ({"url": ""}, "mirror_url=''"),
        ({"url": "foo://x"}, "unknown protocol 'foo'"),
    ],
)
def test_bad_settings_raise_config_error(kwargs: dict[str, Any], setting: str) -> None:
    kwargs.setdefault("url", "memory://ok")
    with pytest.raises(ConfigError, match=setting):
        MirrorSync(**kwargs)


@pytest.mark.parametrize(("url", "module", "extra"), [("s3://bucket/runs", "s3fs", "s3"), ("gs://b/r", "gcsfs", "gcs")])
def test_missing_optional_package_names_the_extra(url: str, module: str, extra: str,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    monkeypatch.setitem(sys.modules, module, None)  # importing it now fails, installed or not
    for protocol in ("s3", "s3a", "gs", "gcs"):
        monkeypatch.delitem(_registry, protocol, raising=False)
    with pytest.raises(ConfigError, match=rf'pip install "atheria_lightning\[{extra}\]"'):
        MirrorSync(url)


def test_the_url_can_come_later_from_the_cli(run_dir: Path, mirror_root: str) -> None:
    mirror = MirrorSync(every_n_episodes=5).use_clock(sleep=lambda seconds: None)
    with pytest.raises(ConfigError, match="no url"):
        mirror.use_store(RunStore(run_dir))
    with pytest.raises(ConfigError, match="unknown protocol"):
        mirror.set_url("foo://x")
    mirror.set_url(f"memory://{mirror_root}")
    store = with_checkpoints(RunStore(run_dir))
    mirror.use_store(store)
    store.start_mirror()
    assert store.flush(10)
    assert_mirrored(f"memory://{mirror_root}", run_dir)


def test_an_unreachable_mirror_is_a_config_error_before_training(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the mirror folder should be")
    store = RunStore(tmp_path / "runs" / "exp")
    trainer = Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False,
                      default_root_dir=str(tmp_path / "runs" / "exp"))  # fmt: skip
    mirror = MirrorSync(str(blocker), max_retries=1).use_clock(sleep=lambda seconds: None).use_store(store)
    with pytest.raises(ConfigError, match="not reachable"):
        mirror.setup(trainer, None, "fit")
    with pytest.raises(ConfigError, match="not reachable"):
        store.start()


@pytest.mark.parametrize(
    ("interval", "duration_s", "gap_s", "expected"),
    [
        (10, 2.0, 10.0, 20),  # 20% of the time > max_share: double
        (160, 2.0, 10.0, 160),  # already at the cap (16 x 10)
        (40, 0.1, 10.0, 20),  # 1% < max_share / 4: halve
        (10, 0.1, 10.0, 10),  # never below every_n_episodes
        (40, 0.5, 10.0, 40),  # in between: unchanged
        (40, 5.0, None, 40),  # no gap yet (first request or a flush): unchanged
    ],
)
def test_interval_adapts_to_the_share_of_time_spent_syncing(interval: int, duration_s: float, gap_s: float | None,
                                                            expected: int) -> None:  # fmt: skip
    mirror = MirrorSync("memory://x", every_n_episodes=10, max_share=0.1)
    mirror.interval = interval
    mirror._adapt_interval(duration_s, gap_s)
    assert mirror.interval == expected
    assert 10 <= mirror.interval <= MAX_INTERVAL_FACTOR * 10


def test_state_dict_round_trip_and_clamp() -> None:
    mirror = MirrorSync("memory://x", every_n_episodes=10)
    mirror.load_state_dict({"interval": 40, "failures": 3})
    restored = MirrorSync("memory://x", every_n_episodes=10)
    restored.load_state_dict(mirror.state_dict())
    assert (restored.interval, restored.failures) == (40, 3)
    smaller = MirrorSync("memory://x", every_n_episodes=1)
    smaller.load_state_dict({"interval": 1000, "failures": 0})
    assert smaller.interval == MAX_INTERVAL_FACTOR


def tiny_fit(run: Path, callbacks: list[Callback], episodes: int = 6) -> Trainer:
    trainer = Trainer(max_epochs=-1, logger=False, enable_progress_bar=False, enable_model_summary=False,
                      default_root_dir=str(run), num_sanity_val_steps=0, val_check_interval=3,
                      check_val_every_n_epoch=None, callbacks=callbacks)  # fmt: skip
    model = QCAModule(architecture="MLP", d_state=2, hidden_channels=4, grid_size=8, qca_steps=2)
    trainer.fit(model, datamodule=EpisodeDataModule(total_episodes=episodes, val_every_episodes=3))
    return trainer


def test_a_plain_trainer_mirrors_the_run_folder(tmp_path: Path, mirror_root: str) -> None:
    run = tmp_path / "runs" / "exp"
    url = f"memory://{mirror_root}"
    store = RunStore(run)
    mirror = MirrorSync(url, every_n_episodes=2).use_clock(sleep=lambda seconds: None).use_store(store)
    trainer = tiny_fit(run, [mirror, SmartCheckpoint(every_n_episodes=2, top_k=1).use_store(store)])
    assert_mirrored(url, run)
    assert float(trainer.callback_metrics["vm/mirror_failures"]) == 0.0
    assert "vm/mirror_last_sync_seconds" in trainer.callback_metrics
    store.close()


class FailAtEpisode(Callback):
    def __init__(self, episode: int) -> None:
        self.episode = episode

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:  # fmt: skip
        if int(batch["episode"]) == self.episode:
            raise RuntimeError("the platform stops the session")


def test_an_exception_still_sends_what_was_saved(tmp_path: Path, mirror_root: str) -> None:
    run = tmp_path / "runs" / "exp"
    url = f"memory://{mirror_root}"
    store = RunStore(run)
    mirror = (
        MirrorSync(url, every_n_episodes=100).use_clock(sleep=lambda seconds: None).use_store(store)
    )  # no periodic sync
    with pytest.raises(RuntimeError, match="platform"):
        tiny_fit(run, [FailAtEpisode(4), mirror, SmartCheckpoint(every_n_episodes=2).use_store(store)])
    assert_mirrored(url, run)
    fs, remote = remote_run_dir(url, "exp")
    assert manifest_at(fs, f"{remote}/checkpoints")["last.ckpt"]["episode"] == 4
    store.close()


def _tiny(value: int) -> dict[str, Any]:
    return {"state_dict": {"w": torch.full((4,), float(value))}, "epoch": 0, "global_step": value}


def test_a_take_over_while_a_start_sets_a_damaged_file_aside_stops_uploading_without_a_traceback(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    url = f"memory://takeover-{uuid.uuid4().hex}"
    first = RunStore(str(tmp_path / "a" / "run"), async_write=False)
    first.set_mirror(url, max_retries=0, backoff_s=0)
    first.start()
    first.write_checkpoint(_tiny(1), "last", 1)
    assert first.flush(30)
    first.close(5)
    # The mirror's last.ckpt damaged, its size kept: the next start sets it aside, which writes the manifest.
    fs, root = fsspec.core.url_to_fs(url)
    path = f"{root}/run/checkpoints/last.ckpt"
    data = bytearray(fs.cat(path))
    data[-10] ^= 0xFF
    fs.pipe(path, bytes(data))
    connect = reconcile.connect_mirror

    def then_taken_over(mirror: Any, take_over: bool) -> None:
        connect(mirror, take_over)
        Lease(mirror.fs, mirror.root, "rival").acquire(True, 0)  # a later session takes the mirror over now

    monkeypatch.setattr(reconcile, "connect_mirror", then_taken_over)
    second = RunStore(str(tmp_path / "b" / "run"), async_write=False)
    second.set_mirror(url, max_retries=0, backoff_s=0)
    with caplog.at_level(logging.WARNING):
        assert second.start(take_over=True) is None, "nothing sound to resume from, and no Superseded raised"
    assert second.superseded_by is not None
    assert any("taken over by another session" in record.getMessage() for record in caplog.records)


class _Endless:
    """A mirror file that never ends (grown, or swapped for a stream), counting what was read of it."""

    def __init__(self) -> None:
        self.read_bytes = 0

    def read(self, size: int = -1) -> bytes:
        size = 1 << 20 if size is None or size < 0 else size
        self.read_bytes += size
        return b"\0" * size

    def __enter__(self) -> _Endless:
        return self

    def __exit__(self, *exc: object) -> None:
        return None


def test_a_checkpoint_download_stops_at_its_listed_size(tmp_path: Path) -> None:
    endless = _Endless()
    side = SimpleNamespace(fs=SimpleNamespace(open=lambda path, mode: endless), folder="mirror/checkpoints")
    entry = Entry(episode=1, size=3 << 20, sha256="0" * 64)
    journalled: list[str] = []
    target = tmp_path / "run" / "checkpoints" / "last.ckpt"
    assert download_verified(side, "last.ckpt", entry, str(target), lambda name, _: journalled.append(name)) is False
    assert endless.read_bytes <= entry.size + (4 << 20), "never much more than the listed size onto this disk"
    assert not target.exists() and journalled == [] and list(target.parent.iterdir()) == []
