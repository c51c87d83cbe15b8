"""MirrorSync: what reaches the mirror, in what order, on a flaky filesystem, and with a real CPU Trainer."""

from __future__ import annotations

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
from fsspec.implementations.local import LocalFileSystem
from fsspec.implementations.memory import MemoryFileSystem
from fsspec.registry import _registry  # the writable mapping behind fsspec.registry
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import Callback

from atheria_lightning.callbacks.mirror import MAX_INTERVAL_FACTOR, MirrorSync, remote_run_dir
from atheria_lightning.data import EpisodeDataModule
from atheria_lightning.errors import ConfigError
from atheria_lightning.manifest import (
    MANIFEST_NAME,
    ManifestEntry,
    atomic_write,
    read_manifest,
    sha256_of,
    verify,
    write_manifest,
)
from atheria_lightning.module import QCAModule

LOCAL = LocalFileSystem()


def entry_for(fs: Any, path: str, episode: int, metric: float | None, kind: str) -> ManifestEntry:
    """The manifest entry of a complete file, measured by reading it (the package measures files as it writes them)."""
    return ManifestEntry(episode=episode, size=int(fs.size(path)), sha256=sha256_of(fs, path), metric=metric, kind=kind)


class FlakyMemoryFileSystem(MemoryFileSystem):
    """The shared in-memory store behind ``flakymem://``, failing every ``fail_every``-th file opened for writing.

    Only opens for writing count, so an upload (one open of its temporary file, then a move) fails at most once per
    attempt and each retry makes progress. Copies and removals are recorded in ``events`` to check their order.
    """

    protocol = ("flakymem",)
    fail_every = 0  # 0: never fail; 1: every write fails; 2: every second write fails
    writes = 0
    truncate_copies = False  # a move that loses data: the upload then fails verification
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
        if self.truncate_copies:
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


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    """A local run folder ``runs/exp`` with two listed checkpoints, a stray unlisted one, logs and an export."""
    run = tmp_path / "runs" / "exp"
    write_checkpoints(run, {"last.ckpt": b"last" * 300, "best-000010.ckpt": b"best" * 200})
    (run / "checkpoints" / "stray.ckpt").write_bytes(b"not in the manifest")
    (run / "logs" / "version_0").mkdir(parents=True)
    (run / "logs" / "version_0" / "events.out.tfevents.1").write_bytes(b"event-1")
    (run / "logs" / "metrics.jsonl").write_text('{"episode": 1}\n')
    (run / "exports").mkdir()
    (run / "exports" / "report.md").write_text("# report\n")
    return run


def write_checkpoints(run: Path, files: dict[str, bytes], keep: tuple[str, ...] = ()) -> None:
    """Write ``files`` into ``run/checkpoints`` and a manifest listing them (plus the entries named in ``keep``)."""
    folder = run / "checkpoints"
    folder.mkdir(parents=True, exist_ok=True)
    manifest = read_manifest(LOCAL, str(folder))
    manifest.files = {name: entry for name, entry in manifest.files.items() if name in keep}
    for episode, (name, data) in enumerate(files.items()):
        (folder / name).write_bytes(data)
        manifest.files[name] = entry_for(LOCAL, str(folder / name), episode=episode, metric=None, kind="best")
    write_manifest(LOCAL, str(folder), manifest)


def make_mirror(url: str, run: Path, **kwargs: Any) -> MirrorSync:
    kwargs.setdefault("sleep", lambda seconds: None)
    return MirrorSync(url, run_dir=str(run), **kwargs)


def assert_mirrored(url: str, run: Path) -> None:
    """The mirror's manifest lists exactly the local entries, its files verify, and nothing else is there."""
    fs, remote = remote_run_dir(url, run.name)
    local = read_manifest(LOCAL, str(run / "checkpoints"))
    mirrored = read_manifest(fs, f"{remote}/checkpoints")
    assert mirrored.files == local.files
    for name, entry in mirrored.files.items():
        assert verify(fs, f"{remote}/checkpoints/{name}", entry), name
    names = {os.path.basename(path) for path in fs.ls(f"{remote}/checkpoints", detail=False)}
    assert names == {*local.files, MANIFEST_NAME}


@pytest.mark.parametrize("kind", ["memory", "folder"])
def test_sync_uploads_listed_checkpoints_logs_and_exports(kind: str, run_dir: Path, tmp_path: Path,
                                                          mirror_root: str) -> None:  # fmt: skip
    url = f"memory://{mirror_root}" if kind == "memory" else str(tmp_path / "drive" / "atheria")
    mirror = make_mirror(url, run_dir)
    assert mirror.sync_once()
    assert_mirrored(url, run_dir)  # stray.ckpt is not listed, so it stays local
    fs, remote = remote_run_dir(url, "exp")
    assert fs.cat_file(f"{remote}/logs/version_0/events.out.tfevents.1") == b"event-1"
    assert fs.cat_file(f"{remote}/logs/metrics.jsonl") == b'{"episode": 1}\n'
    assert fs.cat_file(f"{remote}/exports/report.md") == b"# report\n"
    assert not [path for path in fs.find(remote) if ".tmp-" in path]
    assert mirror.failures == 0 and mirror.last_sync_seconds is not None


def test_second_sync_uploads_only_what_changed(run_dir: Path, mirror_root: str, flaky: Any) -> None:
    mirror = make_mirror(f"flakymem://{mirror_root}", run_dir)
    assert mirror.sync_once()
    writes = flaky.writes
    assert mirror.sync_once()
    assert flaky.writes == writes  # nothing changed: no upload, not even the manifest
    with open(run_dir / "logs" / "metrics.jsonl", "a") as handle:
        handle.write('{"episode": 2}\n')
    assert mirror.sync_once()
    assert flaky.writes == writes + 1
    fs, remote = remote_run_dir(f"memory://{mirror_root}", "exp")
    assert fs.cat_file(f"{remote}/logs/metrics.jsonl").count(b"episode") == 2


def test_retention_deletes_only_after_the_new_manifest(run_dir: Path, mirror_root: str, flaky: Any) -> None:
    url = f"flakymem://{mirror_root}"
    mirror = make_mirror(url, run_dir)
    assert mirror.sync_once()
    # Retention: a new best replaces best-000010, whose entry and file leave the local folder.
    write_checkpoints(run_dir, {"best-000020.ckpt": b"newer" * 100}, keep=("last.ckpt",))
    (run_dir / "checkpoints" / "best-000010.ckpt").unlink()
    flaky.events.clear()
    assert mirror.sync_once()
    assert_mirrored(url, run_dir)
    order = [f"{kind}:{os.path.basename(path)}" for kind, path in flaky.events]
    assert order.index(f"copy:{MANIFEST_NAME}") < order.index("rm:best-000010.ckpt")
    assert order.index("copy:best-000020.ckpt") < order.index(f"copy:{MANIFEST_NAME}")


def test_flaky_filesystem_ends_complete_with_retries(run_dir: Path, mirror_root: str, flaky: Any) -> None:
    flaky.fail_every = 2
    delays: list[float] = []
    url = f"flakymem://{mirror_root}"
    mirror = make_mirror(url, run_dir, max_retries=10, backoff_s=0.5, sleep=delays.append)
    assert mirror.sync_once()
    assert_mirrored(url, run_dir)
    assert mirror.failures == 0
    assert delays and all(0.25 <= delay for delay in delays)
    assert delays[1] > delays[0] * 2 * 0.5 / 1.5  # exponential, within the jitter


def test_broken_mirror_counts_failures_warns_and_never_raises(run_dir: Path, mirror_root: str, flaky: Any,
                                                               caplog: pytest.LogCaptureFixture) -> None:  # fmt: skip
    mirror = make_mirror(f"flakymem://{mirror_root}", run_dir, max_retries=2)
    mirror.connect()
    local_before = {path.name: path.read_bytes() for path in (run_dir / "checkpoints").iterdir()}
    flaky.fail_every = 1
    with caplog.at_level(logging.WARNING, logger="atheria_lightning.callbacks.mirror"):
        assert not mirror.sync_once()
        assert not mirror.flush(timeout_s=10)  # the same through the background thread
    assert mirror.failures == 2
    assert len([record for record in caplog.records if "failed after 2 retries" in record.message]) == 2
    assert {path.name: path.read_bytes() for path in (run_dir / "checkpoints").iterdir()} == local_before


def test_upload_that_does_not_verify_is_never_listed(run_dir: Path, mirror_root: str, flaky: Any) -> None:
    url = f"flakymem://{mirror_root}"
    mirror = make_mirror(url, run_dir, max_retries=1)
    mirror.connect()
    flaky.truncate_copies = True
    assert not mirror.sync_once()
    assert mirror.failures == 1
    fs, remote = remote_run_dir(url, "exp")
    assert not fs.exists(f"{remote}/checkpoints/{MANIFEST_NAME}")
    flaky.truncate_copies = False
    assert mirror.sync_once()
    assert_mirrored(url, run_dir)


def test_file_replaced_after_the_manifest_is_not_uploaded_under_the_stale_entry(run_dir: Path,
                                                                                 mirror_root: str) -> None:  # fmt: skip
    url = f"memory://{mirror_root}"
    fs, remote = remote_run_dir(url, "exp")
    mirror = make_mirror(url, run_dir)
    last = run_dir / "checkpoints" / "last.ckpt"
    listed = read_manifest(LOCAL, str(run_dir / "checkpoints")).files["last.ckpt"]
    last.write_bytes(b"a newer last checkpoint, not yet in the manifest")
    assert mirror.sync_once()  # not a failure: retried at the next sync
    assert "last.ckpt" not in read_manifest(fs, f"{remote}/checkpoints").files
    assert not fs.exists(f"{remote}/checkpoints/last.ckpt")

    last.write_bytes(b"last" * 300)  # back to the listed content: uploaded
    assert mirror.sync_once()
    assert read_manifest(fs, f"{remote}/checkpoints").files["last.ckpt"] == listed

    # A newer last.ckpt is listed, then replaced again before the sync: the mirror keeps its older verified copy.
    write_checkpoints(run_dir, {"last.ckpt": b"newer last"}, keep=("best-000010.ckpt",))
    last.write_bytes(b"newest last, not yet listed")
    for _ in range(2):
        assert mirror.sync_once()
        assert read_manifest(fs, f"{remote}/checkpoints").files["last.ckpt"] == listed
        assert verify(fs, f"{remote}/checkpoints/last.ckpt", listed)


def test_empty_local_manifest_never_empties_the_mirror(run_dir: Path, mirror_root: str) -> None:
    url = f"memory://{mirror_root}"
    assert make_mirror(url, run_dir).sync_once()
    fresh = run_dir.parent.parent / "fresh" / "exp"  # a new machine: same experiment, nothing local yet
    fresh.mkdir(parents=True)
    assert make_mirror(url, fresh).sync_once()
    assert_mirrored(url, run_dir)
    write_checkpoints(fresh, {"episode-7.ckpt": b"listed"})
    (fresh / "checkpoints" / "episode-7.ckpt").write_bytes(b"replaced before the sync")
    assert make_mirror(url, fresh).sync_once()  # nothing of the new set verifies: the mirror stays as it was
    assert_mirrored(url, run_dir)


def test_flush_and_close_are_safe_without_setup(run_dir: Path, mirror_root: str) -> None:
    mirror = MirrorSync(f"memory://{mirror_root}")
    assert mirror.flush(timeout_s=0.1)
    mirror.close()
    mirror.close()
    connected = make_mirror(f"memory://{mirror_root}", run_dir)
    connected.connect()
    assert connected.flush(timeout_s=10)  # starts a worker for this one sync
    assert_mirrored(f"memory://{mirror_root}", run_dir)


def test_other_ranks_do_nothing(run_dir: Path, mirror_root: str) -> None:
    trainer = SimpleNamespace(is_global_zero=False, default_root_dir=str(run_dir),
                              strategy=SimpleNamespace(broadcast=lambda obj, src=0: obj))  # fmt: skip
    mirror = MirrorSync(f"memory://{mirror_root}", every_n_episodes=1)
    mirror.setup(trainer, None, "fit")
    mirror.on_train_batch_end(trainer, None, None, None, 0)
    assert mirror.flush() and mirror._worker is None
    mirror.teardown(trainer, None, "fit")
    assert not [key for key in MemoryFileSystem.store if key.startswith(f"/{mirror_root}/")]


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


def test_url_set_later_by_the_cli(run_dir: Path, mirror_root: str) -> None:
    mirror = MirrorSync(every_n_episodes=5, run_dir=str(run_dir), sleep=lambda seconds: None)
    assert mirror.flush()  # nothing to mirror yet
    with pytest.raises(ConfigError, match="no url"):
        mirror.sync_once()
    with pytest.raises(ConfigError, match="unknown protocol"):
        mirror.set_url("foo://x")
    mirror.set_url(f"memory://{mirror_root}")
    assert mirror.sync_once()
    assert_mirrored(f"memory://{mirror_root}", run_dir)


def test_unreachable_mirror_raises_at_setup(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the mirror folder should be")
    trainer = Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False,
                      default_root_dir=str(tmp_path / "runs" / "exp"))  # fmt: skip
    mirror = MirrorSync(str(blocker), max_retries=1, sleep=lambda seconds: None)
    with pytest.raises(ConfigError, match="not reachable"):
        mirror.setup(trainer, None, "fit")
    assert mirror._worker is None


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
    mirror.interval, mirror.failures = 40, 3
    restored = MirrorSync("memory://x", every_n_episodes=10)
    restored.load_state_dict(mirror.state_dict())
    assert (restored.interval, restored.failures) == (40, 3)
    smaller = MirrorSync("memory://x", every_n_episodes=1)
    smaller.load_state_dict({"interval": 1000, "failures": 0})
    assert smaller.interval == MAX_INTERVAL_FACTOR


class FakeCheckpointWriter(Callback):
    """Every episode: a fake checkpoint and the manifest (written last), the newest two kept, a metrics line."""

    def __init__(self, run: Path) -> None:
        self.folder = run / "checkpoints"
        self.logs = run / "logs"

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:  # fmt: skip
        episode = int(batch["episode"])
        name = f"episode-{episode:03d}.ckpt"
        path = self.folder / name
        atomic_write(LOCAL, str(path), lambda handle: handle.write(os.urandom(512 + episode)))
        manifest = read_manifest(LOCAL, str(self.folder))
        manifest.files[name] = entry_for(LOCAL, str(path), episode=episode, metric=None, kind="last")
        dropped = [item[0] for item in manifest.newest_first()[2:]]
        for old in dropped:
            del manifest.files[old]
        write_manifest(LOCAL, str(self.folder), manifest)
        for old in dropped:
            (self.folder / old).unlink()
        self.logs.mkdir(parents=True, exist_ok=True)
        with open(self.logs / "metrics.jsonl", "a") as handle:
            handle.write(f'{{"episode": {episode}}}\n')


def test_fit_mirrors_the_run_folder(tmp_path: Path, mirror_root: str) -> None:
    run = tmp_path / "runs" / "exp"
    url = f"memory://{mirror_root}"
    mirror = MirrorSync(url, every_n_episodes=2, sleep=lambda seconds: None)
    trainer = Trainer(max_epochs=1, logger=False, enable_progress_bar=False, enable_checkpointing=False,
                      enable_model_summary=False, default_root_dir=str(run),
                      callbacks=[FakeCheckpointWriter(run), mirror])  # fmt: skip
    model = QCAModule(architecture="MLP", d_state=2, hidden_channels=4, grid_size=8, qca_steps=2)
    trainer.fit(model, datamodule=EpisodeDataModule(total_episodes=6, val_every_episodes=3))

    assert len(read_manifest(LOCAL, str(run / "checkpoints")).files) == 2
    assert_mirrored(url, run)
    fs, remote = remote_run_dir(url, "exp")
    assert fs.cat_file(f"{remote}/logs/metrics.jsonl") == (run / "logs" / "metrics.jsonl").read_bytes()
    assert float(trainer.callback_metrics["mirror/failures"]) == 0.0
    assert "mirror/last_sync_seconds" in trainer.callback_metrics
    assert mirror._worker is None  # teardown stopped the thread


class FailAtEpisode(Callback):
    def __init__(self, episode: int) -> None:
        self.episode = episode

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:  # fmt: skip
        if int(batch["episode"]) == self.episode:
            raise RuntimeError("the platform stops the session")


def test_exception_flushes_then_stops_the_thread(tmp_path: Path, mirror_root: str) -> None:
    run = tmp_path / "runs" / "exp"
    url = f"memory://{mirror_root}"
    mirror = MirrorSync(url, every_n_episodes=100, sleep=lambda seconds: None)  # no periodic sync before the crash
    trainer = Trainer(max_epochs=1, logger=False, enable_progress_bar=False, enable_checkpointing=False,
                      enable_model_summary=False, default_root_dir=str(run),
                      callbacks=[FakeCheckpointWriter(run), FailAtEpisode(2), mirror])  # fmt: skip
    model = QCAModule(architecture="MLP", d_state=2, hidden_channels=4, grid_size=8, qca_steps=2)
    with pytest.raises(RuntimeError, match="platform"):
        trainer.fit(model, datamodule=EpisodeDataModule(total_episodes=6, val_every_episodes=3))
    assert_mirrored(url, run)
    assert mirror._worker is None
