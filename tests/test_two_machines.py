"""One run, many machines: the mirror's lease lets one trainer own it at a time, a take-over supersedes the other
trainer, the mirror never goes backwards, and a start that loses a race with another session reads again."""

from __future__ import annotations

import hashlib
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import (
    CONFIGS,
    REPO,
    TINY,
    callbacks_config,
    env_without_warnings,
    snapshot,
    wait_for,
)

from atheria_lightning.cli import main
from atheria_lightning.store import RunStore
from atheria_lightning.store.lease import LEASE_FOLDER, STALE_AFTER_S, Lease, lease_name
from atheria_lightning.store.mirror import Mirror
from atheria_lightning.store.uploader import Uploader

EXPERIMENT = "demo"


def fit_args(tmp_path: Path, root: str, mirror: str, *extra: str, episodes: int = 4000) -> list[str]:
    """The demo preset, shrunk, with a checkpoint every episode and a sync every 2, in ``<tmp>/<root>``."""
    return ["fit", "--config", str(CONFIGS / "demo.yaml"), "--config", callbacks_config(tmp_path, every=1, sync=2),
            "--run_root", str(tmp_path / root), "--mirror_url", mirror, "--data.total_episodes", str(episodes),
            "--data.val_every_episodes", "2", *TINY, *extra]  # fmt: skip


def manifest_of(folder: Path) -> dict[str, Any]:
    return json.loads((folder / "checkpoints" / "MANIFEST.json").read_text())


class SharedMirror:
    """The shared mirror, a local folder or a bucket on moto's S3 server, as the tests read it."""

    def __init__(self, tmp_path: Path, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch, kind: str):
        self.fs: Any = None
        if kind == "folder":
            self.url, self.run = str(tmp_path / "mirror"), str(tmp_path / "mirror" / EXPERIMENT)
            return
        endpoint = request.getfixturevalue("s3_server_process")
        monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)  # how boto finds a non-AWS S3; the trainers inherit it
        import s3fs

        self.fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": endpoint})
        self.url, self.run = "s3://atheria-runs/mirror", f"atheria-runs/mirror/{EXPERIMENT}"

    def manifest(self) -> dict[str, Any] | None:
        try:
            if self.fs is None:
                return manifest_of(Path(self.run))
            self.fs.invalidate_cache()  # s3fs caches listings, and opening a file consults them
            return json.loads(self.fs.cat_file(f"{self.run}/checkpoints/MANIFEST.json"))
        except (OSError, ValueError):  # not there yet, or replaced while it was read
            return None

    def last(self) -> int:
        return ((self.manifest() or {}).get("files", {}).get("last.ckpt") or {}).get("episode", -1)

    def leases(self) -> list[str]:
        if self.fs is None:
            return sorted(os.listdir(Path(self.run) / LEASE_FOLDER))
        self.fs.invalidate_cache()
        return sorted(path.rsplit("/", 1)[-1] for path in self.fs.ls(f"{self.run}/{LEASE_FOLDER}"))


class MirrorWatch:
    """Reads the mirror's manifest every few milliseconds: every ``last.ckpt`` episode and generation it listed."""

    def __init__(self, mirror: SharedMirror) -> None:
        self.mirror, self.seen = mirror, []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()

    def _watch(self) -> None:
        while not self._stop.is_set():
            data = self.mirror.manifest()
            last = (data or {}).get("files", {}).get("last.ckpt")
            entry = None if last is None else (data.get("generation", 0), last["episode"])  # type: ignore[union-attr]
            if entry is not None and (not self.seen or self.seen[-1] != entry):
                self.seen.append(entry)
            time.sleep(0.005)

    def stop(self) -> list[tuple[int, int]]:
        self._stop.set()
        self._thread.join(5)
        return self.seen


@pytest.fixture
def s3_server_process(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """moto's S3 server in a process of its own: two trainers and this test talk to it over HTTP, and nothing in
    the pytest process (its other tests' objects, its garbage collector) shares its buckets."""
    pytest.importorskip("moto.server")
    s3fs = pytest.importorskip("s3fs")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    endpoint = f"http://127.0.0.1:{port}"
    for key, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                       "AWS_DEFAULT_REGION": "us-east-1"}.items():  # fmt: skip
        monkeypatch.setenv(key, value)
    try:
        s3fs.S3FileSystem.clear_instance_cache()
        fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": endpoint})
        assert wait_for(lambda: _made_bucket(fs), 60), "moto's server did not start"
        yield endpoint
    finally:
        s3fs.S3FileSystem.clear_instance_cache()
        server.kill()
        server.wait(30)


def _made_bucket(fs: Any) -> bool:
    try:
        fs.mkdir("atheria-runs")
        return True
    except Exception:  # not listening yet
        return False


@pytest.fixture(params=["folder", "s3"])
def shared(tmp_path: Path, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> SharedMirror:
    return SharedMirror(tmp_path, request, monkeypatch, request.param)


@pytest.fixture
def trainer_a(tmp_path: Path, shared: SharedMirror) -> Iterator[tuple[subprocess.Popen, Path]]:
    """Trainer A on machine A (``<tmp>/a``), mirroring to the shared mirror; its output goes to a file."""
    log_path = tmp_path / "a.log"
    command = [sys.executable, "-u", "-m", "atheria_lightning.cli", *fit_args(tmp_path, "a", shared.url)]
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=REPO, env=env_without_warnings())
    try:
        if not wait_for(lambda: shared.last() >= 4, 240):
            said = [line for line in log_path.read_text().splitlines() if not line.startswith("[episode")]
            raise AssertionError("A's checkpoints never reached the mirror: " + "\n".join(said[-40:]))
        yield process, log_path
    finally:
        process.kill()
        process.wait(30)


@pytest.mark.slow
def test_a_second_machine_is_refused_while_the_first_trains(
    tmp_path: Path, shared: SharedMirror, trainer_a: tuple[subprocess.Popen, Path], capsys: pytest.CaptureFixture
) -> None:
    process, _ = trainer_a
    assert main(fit_args(tmp_path, "b", shared.url)) == 5
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert f"is in use by another session (host {os.uname().nodename} pid {process.pid}, started" in err[0]
    assert "--take_over" in err[0]
    assert not (tmp_path / "b" / EXPERIMENT / "checkpoints").exists(), "nothing trained on machine B"
    assert process.poll() is None, "A trains on"
    # B took nothing: the mirror is still A's, the first and only lease.
    assert (shared.manifest() or {})["generation"] == 1
    assert shared.leases() == [lease_name(1)]


@pytest.mark.slow
def test_take_over_supersedes_the_first_trainer_and_the_mirror_never_goes_backwards(
    tmp_path: Path, shared: SharedMirror, trainer_a: tuple[subprocess.Popen, Path], capsys: pytest.CaptureFixture
) -> None:
    process, log_path = trainer_a
    watch = MirrorWatch(shared)
    # Machine B takes the run over and trains until 200 steps past what the mirror had when it was looked at: A
    # trains on while B starts, and must not reach that episode first on a loaded machine.
    steps = str(shared.last() + 200)
    code = main(fit_args(tmp_path, "b", shared.url, "--take_over", "true", "--trainer.max_steps", steps))
    out = capsys.readouterr().out
    assert code == 0, out[-3000:]
    assert f"mirror: taken over from another session (host {os.uname().nodename} pid {process.pid}" in out
    assert process.wait(120) == 5, "A ends superseded, with its own exit code"
    a_out = log_path.read_text()
    assert "the mirror was taken over by another session" in a_out
    assert "mirror taken over by another session" in a_out, a_out[-2000:]
    b_final = manifest_of(tmp_path / "b" / EXPERIMENT)["files"]["last.ckpt"]
    assert b_final["episode"] == int(steps)
    # A's writes are checked against the lease just before each lands: from B's lease on, only B's episodes reach
    # the mirror, except one write of A's already past its check (no store offers a conditional write), which B's
    # next sync undoes (test_a_late_write_of_the_session_taken_over_from_is_undone_at_the_next_sync).
    seen = watch.stop()
    b_episodes = [episode for generation, episode in seen if generation == 2]
    assert b_episodes == sorted(b_episodes), f"the mirror's last.ckpt went backwards: {seen}"
    first_b = [generation for generation, _ in seen].index(2)
    late = [entry for entry in seen[first_b:] if entry[0] != 2]
    assert len(late) <= 1 and seen[-1][0] == 2, seen
    final = shared.manifest() or {}
    assert final["files"]["last.ckpt"]["sha256"] == b_final["sha256"] and final["generation"] == 2
    a_final = manifest_of(tmp_path / "a" / EXPERIMENT)["files"]["last.ckpt"]
    assert a_final["sha256"] != b_final["sha256"], "A's own later state never replaced B's"

    # A fresh machine resumes from B's newest episode, the newest any trainer put on the mirror.
    assert main(fit_args(tmp_path, "c", shared.url, "--trainer.max_steps", steps)) == 0
    out = capsys.readouterr().out
    assert re.search(rf"resuming from episode {b_final['episode']} of 4000 \(\d+%\) \[mirror", out), out[-2000:]


def forge_lease(mirror_run: Path, generation: int, **fields: Any) -> None:
    holder = {"version": 1, "generation": generation, "session": "x" * 32, "host": "another-vm", "boot": "b",
              "pid": 4242, "started": time.time() - 3600, "heartbeat": time.time(), "released": False}  # fmt: skip
    holder.update(fields)
    (mirror_run / LEASE_FOLDER).mkdir(parents=True, exist_ok=True)
    (mirror_run / LEASE_FOLDER / lease_name(generation)).write_text(json.dumps(holder))


def files_of(root: Path) -> dict[str, Any]:
    """:func:`snapshot` of the files alone (the start's write probe touches the folder's mtime, nothing else)."""
    return {path: seen for path, seen in snapshot(root).items() if seen[4] is not None}


def small_args(tmp_path: Path, root: str, *extra: str) -> list[str]:
    return ["fit", "--config", str(CONFIGS / "demo.yaml"), "--run_root", str(tmp_path / root),
            "--mirror_url", str(tmp_path / "mirror"), "--data.total_episodes", "4", "--data.val_every_episodes", "2",
            *TINY, *extra]  # fmt: skip


def test_a_live_lease_of_another_machine_refuses_the_start_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    mirror_run = tmp_path / "mirror" / EXPERIMENT
    forge_lease(mirror_run, 3, heartbeat=time.time() - 20)
    before = files_of(tmp_path / "mirror")
    assert main(small_args(tmp_path, "b")) == 5
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [err[0]] and err[0].startswith("atheria: error: mirror_url=")
    assert re.search(
        r"in use by another session \(host another-vm pid 4242, started 6\d min ago, last heartbeat "
        r"\d+ s ago\)",
        err[0],
    ), err[0]
    assert files_of(tmp_path / "mirror") == before, "a refused start leaves every file on the mirror as it was"
    assert not (tmp_path / "b" / EXPERIMENT / "checkpoints").exists()


@pytest.mark.parametrize(
    ("heartbeat_s", "released", "said"),
    [
        (-STALE_AFTER_S - 60, False, r"last heartbeat [67] min ago"),
        (-20.0, True, None),
        (86400.0, False, r"last heartbeat in the future"),  # forged, or a badly wrong clock: it proves nothing
    ],
    ids=["stale", "released", "future"],
)
def test_a_stale_or_released_lease_is_taken_without_take_over(
    tmp_path: Path, capsys: pytest.CaptureFixture, heartbeat_s: float, released: bool, said: str | None
) -> None:
    mirror_run = tmp_path / "mirror" / EXPERIMENT
    forge_lease(mirror_run, 3, heartbeat=time.time() + heartbeat_s, released=released)
    assert main(small_args(tmp_path, "b")) == 0
    out = capsys.readouterr().out
    if said is None:
        assert "taken over" not in out
    else:
        assert "mirror: taken over from another session (host another-vm pid 4242" in out and re.search(said, out)
    assert manifest_of(mirror_run)["generation"] == 4
    mine = json.loads((mirror_run / LEASE_FOLDER / lease_name(4)).read_text())
    assert mine["released"] is True and mine["pid"] == os.getpid(), "a session that ends gives its lease back"


def test_take_over_takes_a_live_lease_and_a_second_start_needs_none(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    mirror_run = tmp_path / "mirror" / EXPERIMENT
    forge_lease(mirror_run, 7)
    assert main(small_args(tmp_path, "b", "--take_over", "true")) == 0
    assert "taken over from another session (host another-vm pid 4242" in capsys.readouterr().out
    assert main(small_args(tmp_path, "c", "--data.total_episodes", "6")) == 0  # B released its lease
    out = capsys.readouterr().out
    assert "taken over" not in out and "resuming from episode 4 of 6" in out
    assert manifest_of(mirror_run)["generation"] == 9
    saved = (tmp_path / "c" / EXPERIMENT / "logs" / "config.yaml").read_text()
    assert "take_over: false" in saved, "a take-over is this session's decision, never a later one's"


@pytest.mark.parametrize(
    "forged",
    [b"{not json", b"x" * 100_000, json.dumps({"version": 1, "generation": 99}).encode()],
    ids=["not-json", "huge", "wrong-generation"],
)
def test_a_forged_lease_file_holds_nothing_but_its_generation_counts(
    tmp_path: Path, capsys: pytest.CaptureFixture, forged: bytes
) -> None:
    mirror_run = tmp_path / "mirror" / EXPERIMENT
    (mirror_run / LEASE_FOLDER).mkdir(parents=True)
    (mirror_run / LEASE_FOLDER / lease_name(5)).write_bytes(forged)
    (mirror_run / LEASE_FOLDER / "g../../../escape.json").parent.mkdir(parents=True, exist_ok=True)
    assert main(small_args(tmp_path, "b")) == 0
    assert "taken over" not in capsys.readouterr().out
    assert manifest_of(mirror_run)["generation"] == 6
    assert not (tmp_path / "escape.json").exists()


def test_a_forged_last_generation_is_one_line_not_a_loop(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    forge_lease(tmp_path / "mirror" / EXPERIMENT, 999_999_999, released=True)
    assert main(small_args(tmp_path, "b")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "its lease numbers are used up" in err[0] and "move lease/ aside" in err[0], err


def test_a_file_where_the_lease_folder_should_be_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    mirror_run = tmp_path / "mirror" / EXPERIMENT
    mirror_run.mkdir(parents=True)
    (mirror_run / LEASE_FOLDER).write_text("not a folder")
    tries, real_acquire = [], Lease.acquire
    monkeypatch.setattr(Lease, "acquire", lambda self, *args: tries.append(1) or real_acquire(self, *args))
    assert main(small_args(tmp_path, "b", "--data.total_episodes", "2")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "the lease of this session cannot be written" in err[0], err
    assert len(tries) == 1, "no retry changes a file in the way: refused at once, not after the backoff"


# ----- a start that loses a race with another session's retention -----
def _mirrored_run(tmp_path: Path) -> Path:
    """A finished 6-episode run mirrored to ``<tmp>/mirror``: last.ckpt and best files there."""
    assert main(["fit", "--config", str(CONFIGS / "demo.yaml"), "--run_root", str(tmp_path / "a"), "--mirror_url",
                 str(tmp_path / "mirror"), "--data.total_episodes", "6", "--data.val_every_episodes", "2",
                 *TINY]) == 0  # fmt: skip
    return tmp_path / "mirror" / EXPERIMENT


def test_a_file_that_vanishes_during_the_start_means_read_again_not_unreachable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    mirror_run = _mirrored_run(tmp_path)
    capsys.readouterr()
    listed = manifest_of(mirror_run)["files"]
    oldest_best = min((name for name in listed if name.startswith("best-")), key=lambda name: listed[name]["episode"])
    real_open = Mirror.open

    def open_then_lose_a_race(self: Mirror) -> Any:
        remote = real_open(self)
        if (mirror_run / "checkpoints" / oldest_best).exists():  # another session's retention, right after the read
            data = manifest_of(mirror_run)
            del data["files"][oldest_best]
            (mirror_run / "checkpoints" / "MANIFEST.json").write_text(json.dumps(data))
            (mirror_run / "checkpoints" / oldest_best).unlink()
        return remote

    monkeypatch.setattr(Mirror, "open", open_then_lose_a_race)
    store = RunStore(tmp_path / "b" / EXPERIMENT)
    store.set_mirror(str(tmp_path / "mirror"))
    point = store.start()
    assert point is not None and point.source == "mirror" and point.episode == 6
    assert oldest_best not in store.entries() and set(store.entries()) == set(listed) - {oldest_best}
    store.close()


# ----- a kill during an upload keeps the ranking -----
class Killed(BaseException):
    """Stands in for SIGKILL inside the uploader thread: nothing after it runs, nothing catches it."""


def test_a_kill_during_an_upload_keeps_the_new_best_files_ranked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    mirror_run = _mirrored_run(tmp_path)  # the mirror at episode 6
    # Machine A went on to episode 10 without reaching the mirror, with two new best files.
    offline = RunStore(tmp_path / "a" / EXPERIMENT)
    offline.keep_best(5, "val/loss")
    offline.start()
    state = torch.load(tmp_path / "a" / EXPERIMENT / "checkpoints" / "last.ckpt", weights_only=True)
    for episode, metric in ((8, -5.0), (10, -6.0)):
        offline.write_checkpoint(dict(state), "best", episode, metric)
        offline.write_checkpoint(dict(state), "last", episode, metric)
    offline.close()
    # Its next start sends what the mirror lacks (the best files first, then last.ckpt) and is killed right after
    # the mirror's last.ckpt was replaced, before the manifest lists any of them.
    real_upload, killed = Uploader._upload_checkpoint, threading.Event()

    def killed_after_last(self: Uploader, name: str, entry: Any, source: Any) -> bool:
        sent = real_upload(self, name, entry, source)
        if name == "last.ckpt":
            killed.set()
            raise Killed
        return sent

    monkeypatch.setattr(Uploader, "_upload_checkpoint", killed_after_last)
    monkeypatch.setattr(threading, "excepthook", lambda args: None)  # the "killed" thread dies quietly
    store = RunStore(tmp_path / "a" / EXPERIMENT)
    store.set_mirror(str(tmp_path / "mirror"))
    store.start()
    assert killed.wait(30)
    time.sleep(0.2)
    monkeypatch.undo()
    assert manifest_of(mirror_run)["files"]["last.ckpt"]["episode"] == 6, "killed before the listing"

    # A new machine resumes from the mirror alone: the verified new best files are listed, none set aside.
    fresh = RunStore(tmp_path / "c" / EXPERIMENT)
    fresh.set_mirror(str(tmp_path / "mirror"))
    point = fresh.start()  # the killed session's lease is this very process's: free
    assert point is not None and point.episode == 10
    names = set(fresh.entries())
    assert {"best-e000008.ckpt", "best-e000010.ckpt"} <= names, names
    best = fresh.best()
    assert best is not None and best.name == "best-e000010.ckpt"
    assert not (mirror_run / "checkpoints" / "unlisted").exists()
    fresh.close()


def test_a_start_that_meets_the_last_upload_of_the_session_it_took_over_from_reads_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    mirror_run = _mirrored_run(tmp_path)  # last.ckpt of episode 6 on the mirror
    machine_a = str(tmp_path / "a" / EXPERIMENT)
    checked, go, uploaded = threading.Event(), threading.Event(), threading.Event()
    real_upload, real_open = Uploader._upload_checkpoint, Mirror.open

    def held_upload(self: Uploader, name: str, entry: Any, source: Any) -> bool:
        if self.run_dir != machine_a or name != "last.ckpt":
            return real_upload(self, name, entry, source)
        real_check = self.lease.check

        def checked_then_held() -> None:
            real_check()  # A's last check before its file replaces the mirror's passes: B has no lease yet
            checked.set()
            go.wait(30)  # the move into place lands when B has taken the lease and read the manifest

        self.lease.check = checked_then_held  # type: ignore[method-assign]
        try:
            return real_upload(self, name, entry, source)
        finally:
            del self.lease.check
            uploaded.set()

    def open_then_race(self: Mirror) -> Any:
        remote = real_open(self)
        if self.run_dir != machine_a and not go.is_set():
            go.set()
            assert uploaded.wait(30)
        return remote

    monkeypatch.setattr(Uploader, "_upload_checkpoint", held_upload)
    monkeypatch.setattr(Mirror, "open", open_then_race)
    a = RunStore(machine_a)
    a.set_mirror(str(tmp_path / "mirror"))
    a.start()
    state = torch.load(Path(machine_a) / "checkpoints" / "last.ckpt", weights_only=True)
    a.write_checkpoint(dict(state), "last", 8, -1.0)
    a.wait()
    a.request_sync()
    assert wait_for(lambda: "last.ckpt" in manifest_of(mirror_run).get("pending", {}), 30), "A journals its upload"
    assert checked.wait(30)

    b = RunStore(tmp_path / "b" / EXPERIMENT)
    b.set_mirror(str(tmp_path / "mirror"))
    point = b.start(take_over=True)
    # The file that changed under B's read is A's newer upload, not a corrupt one: read again, resumed from it.
    assert point is not None and (point.name, point.episode) == ("last.ckpt", 8)
    assert not (mirror_run / "checkpoints" / "corrupt").exists()
    a.close(10)
    assert a.superseded_by is not None, "A's manifest after its late upload is refused: B holds the lease"
    b.close(10)
    final = manifest_of(mirror_run)
    assert final["files"]["last.ckpt"]["episode"] == 8 and final["generation"] == 3 and not final.get("pending")


def test_a_late_write_of_the_session_taken_over_from_is_undone_at_the_next_sync(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """No object store makes a write conditional on another file: a write of A's under way when B takes the lease
    can land after it, once. B's next sync lists B's files again and sends again what that write replaced."""
    mirror_run = _mirrored_run(tmp_path)  # A's run at episode 6, on the mirror and in <tmp>/a
    a_manifest = manifest_of(mirror_run)
    b = RunStore(tmp_path / "b" / EXPERIMENT)
    b.set_mirror(str(tmp_path / "mirror"))
    assert b.start(take_over=True) is not None
    state = torch.load(tmp_path / "b" / EXPERIMENT / "checkpoints" / "last.ckpt", weights_only=True)
    b.write_checkpoint(dict(state, global_step=8), "last", 8, -1.0)
    b.wait()
    b.request_sync()
    assert wait_for(lambda: manifest_of(mirror_run)["files"]["last.ckpt"]["episode"] == 8, 30)
    b_entry = manifest_of(mirror_run)["files"]["last.ckpt"]
    # A's late upload and manifest (generation 1) land now: another last.ckpt, listed at a later episode.
    late = dict(state, global_step=9, late="from A")
    torch.save(late, mirror_run / "checkpoints" / "last.ckpt")
    data = (mirror_run / "checkpoints" / "last.ckpt").read_bytes()
    a_manifest["files"]["last.ckpt"].update(episode=9, size=len(data), sha256=hashlib.sha256(data).hexdigest())
    (mirror_run / "checkpoints" / "MANIFEST.json").write_text(json.dumps(a_manifest))
    capsys.readouterr()
    b.request_sync()
    assert wait_for(lambda: manifest_of(mirror_run)["generation"] == 2, 30)
    healed = manifest_of(mirror_run)
    assert healed["files"]["last.ckpt"] == b_entry, "B's view stands"
    data = (mirror_run / "checkpoints" / "last.ckpt").read_bytes()
    assert hashlib.sha256(data).hexdigest() == b_entry["sha256"], "the file A's write replaced is B's again"
    assert b.superseded_by is None
    b.close(10)
    fresh = RunStore(tmp_path / "c" / EXPERIMENT)
    fresh.set_mirror(str(tmp_path / "mirror"))
    point = fresh.start()
    assert point is not None and point.episode == 8 and point.source == "mirror"
    fresh.close()


def test_a_refused_start_writes_nothing_on_the_way_out(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    mirror_run = _mirrored_run(tmp_path)  # machine A's run, on the mirror and in <tmp>/a
    # Machine B (another VM) owns the mirror now and is in the middle of a sync: its journal lists an upload.
    forge_lease(mirror_run, 5, heartbeat=time.time())
    manifest = manifest_of(mirror_run)
    manifest["generation"] = 5
    manifest["pending"] = {"last.ckpt": dict(manifest["files"]["last.ckpt"], episode=8, sha256="0" * 64, size=123)}
    (mirror_run / "checkpoints" / "MANIFEST.json").write_text(json.dumps(manifest))
    (mirror_run / "exports" / "training_log.json").write_text('{"from": "machine B, the owner"}')
    before = files_of(mirror_run)
    capsys.readouterr()
    # Machine A again, with its own run folder full, and without --take_over: refused, and nothing is sent.
    assert main(small_args(tmp_path, "a", "--data.total_episodes", "10")) == 5
    assert files_of(mirror_run) == before
