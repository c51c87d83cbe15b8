"""`atheria status RUN`: a real run stopped early, its mirror, copies in memory:// and S3, a lock, damaged files."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
from conftest import REPO, callbacks_config, demo_args, env_without_warnings, snapshot, wait_for
from fsspec.implementations.memory import MemoryFileSystem

from atheria_lightning import status as status_module
from atheria_lightning.cli import main
from atheria_lightning.lock import HOLDER_NAME, LOCK_NAME, RunLock

EPISODES, STOPPED_AT = 6, 3


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One tiny run through the CLI, stopped after 3 of its 6 episodes, mirrored to a local folder; its root."""
    root = tmp_path_factory.mktemp("status")
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(root)
        args = demo_args(root, "--trainer.max_steps", str(STOPPED_AT), episodes=EPISODES, val_every=2)
        assert main(args) == 0
    return root


def run_of(root: Path) -> Path:
    return root / "runs" / "demo"


def mirror_of(root: Path) -> Path:
    return root / "mirror" / "demo"


def status(capsys: pytest.CaptureFixture, *args: str) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main(["status", *args])
    out, err = capsys.readouterr()
    return code, out, err


def as_json(capsys: pytest.CaptureFixture, run: str | Path, *extra: str) -> dict[str, Any]:
    code, out, err = status(capsys, str(run), "--json", *extra)
    assert code == 0, err
    assert out.count("\n") == 1, out
    return json.loads(out)


def manifest(folder: Path) -> dict[str, Any]:
    return json.loads((folder / "checkpoints" / "MANIFEST.json").read_text())


def best_of(folder: Path) -> tuple[str, dict[str, Any]]:
    """The best checkpoint listed, worked out here from the raw JSON: the lowest metric of the best-* files."""
    bests = {name: entry for name, entry in manifest(folder)["files"].items() if name.startswith("best-")}
    name = min(bests, key=lambda name: (bests[name]["metric"], bests[name]["episode"]))
    return name, bests[name]


def test_a_run_folder_stopped_early_and_its_mirror_and_nothing_is_written(
    trained: Path, capsys: pytest.CaptureFixture
) -> None:
    before = snapshot(trained)
    log = json.loads((run_of(trained) / "exports" / "training_log.json").read_text())
    session = log["sessions"][-1]
    pace = session["training_seconds"] / session["episodes"]
    best_name, best = best_of(run_of(trained))

    code, out, err = status(capsys, str(run_of(trained)), "--follow-mirror")
    assert code == 0, err
    assert f"run:         {run_of(trained)} (the run folder)" in out
    assert "experiment:  demo\n" in out
    assert f"episode:     {STOPPED_AT} of {EPISODES} (50%), newest checkpoint last.ckpt at episode {STOPPED_AT}" in out
    assert "time:        1 session(s), " in out and f", {pace:.3g} s/episode in the last session, about " in out
    assert f"best:        val/loss {best['metric']:.4g} at episode {best['episode']} ({best_name})" in out
    assert f"mirror:      up to date at episode {STOPPED_AT} [{mirror_of(trained)}]" in out
    assert "lock:        free: no trainer holds this folder" in out
    assert "sync:        last " in out and "when the mirror's MANIFEST.json was last written" in out

    # Without --follow-mirror the mirror its config names is named, not read.
    code, out, err = status(capsys, str(run_of(trained)))
    assert code == 0, err
    assert "mirror:      the mirror is not read (named in logs/config.yaml): atheria status --follow-mirror " \
           f"compares with it [{mirror_of(trained)}]" in out  # fmt: skip
    assert "sync:        not checked (the mirror is not read without --follow-mirror)" in out

    code, out, err = status(capsys, str(mirror_of(trained)))
    assert code == 0, err
    assert "(a mirror: a copy the trainer syncs)" in out
    assert f"episode:     {STOPPED_AT} of {EPISODES} (50%)" in out
    assert f"({best_name})" in out
    # The run stopped at 3 of 6: the mirror holds all its log lists, but a later session may exist.
    assert f"mirror:      unknown from here: it holds all its training_log.json lists (episode {STOPPED_AT})" in out
    assert "lock:        not mirrored" in out

    for run in (run_of(trained), mirror_of(trained)):
        as_json(capsys, run)
        status(capsys, f"file://{run}")
    assert snapshot(trained) == before, "status must never write anything"


def test_json_has_the_documented_keys_episode_best_lock_and_mirror(
    trained: Path, capsys: pytest.CaptureFixture
) -> None:
    documented = re.findall(r"^``(\w+)``(?:, ``(\w+)``)?", status_module.__doc__, re.MULTILINE)
    keys = {key for pair in documented for key in pair if key}
    best_name, best = best_of(run_of(trained))
    local, remote = manifest(run_of(trained)), manifest(mirror_of(trained))

    run = as_json(capsys, run_of(trained), "--follow-mirror")
    assert set(run) == keys
    assert (run["where"], run["experiment"], run["episode"], run["total_episodes"]) == ("run folder", "demo", 3, 6)
    assert run["best"] == {
        "monitor": "val/loss",
        "value": best["metric"],
        "episode": best["episode"],
        "file": best_name,
    }
    last = local["files"]["last.ckpt"]
    assert run["last_checkpoint"] == {"file": "last.ckpt", "episode": 3, "at": last["saved_at"], "source": "manifest"}
    assert run["last_sync"] == {"at": remote["updated"], "source": "mirror manifest"}
    assert run["mirror"]["state"] == "up to date" and run["mirror"]["episode"] == 3
    assert run["lock"] == {"state": "free", "host": None, "pid": None, "since": None, "run_id": None,
                           "detail": "free: no trainer holds this folder"}  # fmt: skip
    assert run["manifest"]["state"] == run["log"]["state"] == "ok"
    assert 0 < run["hours_left"] and run["sessions"] == 1
    named = as_json(capsys, run_of(trained))
    assert (named["mirror"]["state"], named["mirror"]["url"]) == ("not read", str(mirror_of(trained)))
    assert named["last_sync"] is None

    mirror = as_json(capsys, mirror_of(trained))
    assert set(mirror) == keys
    assert (mirror["where"], mirror["episode"], mirror["best"]) == ("mirror", 3, run["best"])
    assert mirror["mirror"]["state"] == "unknown" and mirror["lock"]["state"] == "unknown"


def test_the_mirror_synced_to_a_laptop(trained: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    # Drive for desktop's copy of a Colab run's mirror: its config says mirror_url auto (Drive, on Colab only).
    laptop = tmp_path / "GoogleDrive" / "Atheria" / "demo"
    shutil.copytree(mirror_of(trained), laptop)
    config = laptop / "logs" / "config.yaml"
    config.write_text(re.sub(r"(?m)^mirror_url: .*$", "mirror_url: auto", config.read_text()))
    seen = as_json(capsys, laptop)
    assert (seen["where"], seen["episode"], seen["mirror"]["state"]) == ("copy", STOPPED_AT, "unknown")
    assert seen["mirror"]["detail"].startswith("unknown from here: it holds all its training_log.json lists")
    assert seen["last_sync"] == {"at": manifest(mirror_of(trained))["updated"], "source": "mirror manifest"}
    assert seen["lock"]["state"] == "unknown"

    # Its own manifest lacking a checkpoint its log lists: a sync that did not finish.
    listed = manifest(laptop)
    del listed["files"]["last.ckpt"]
    (laptop / "checkpoints" / "MANIFEST.json").write_text(json.dumps(listed))
    behind = as_json(capsys, laptop)["mirror"]
    assert behind["state"] == "behind" and "(lacks last.ckpt)" in behind["detail"]


def test_a_lock_held_by_a_trainer_on_this_host(trained: Path, capsys: pytest.CaptureFixture) -> None:
    with RunLock(run_of(trained)) as lock:
        held = as_json(capsys, run_of(trained))
        _, out, _ = status(capsys, str(run_of(trained)))
    assert held["lock"]["state"] == "held"
    assert (held["lock"]["pid"], held["lock"]["host"], held["lock"]["run_id"]) == (
        os.getpid(), socket.gethostname(), lock.run_id)  # fmt: skip
    assert f"lock:        held by run {lock.run_id} (pid {os.getpid()} on {socket.gethostname()}), since " in out
    assert as_json(capsys, run_of(trained))["lock"]["state"] == "free"


def test_a_killed_holder_leaves_a_stale_record_and_another_host_cannot_be_checked(
    trained: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    copy = tmp_path / "demo"
    shutil.copytree(run_of(trained), copy)
    holder = subprocess.Popen(
        [sys.executable, "-c", f"from atheria_lightning.lock import RunLock; RunLock({str(copy)!r}).acquire(); "
                               "print('held', flush=True); import time; time.sleep(120)"],
        stdout=subprocess.PIPE, text=True, cwd=REPO, env=env_without_warnings(),
    )  # fmt: skip
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "held\n"
        alive = as_json(capsys, copy)["lock"]
        assert (alive["state"], alive["pid"]) == ("held", holder.pid)
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(30)
    assert (copy / HOLDER_NAME).exists(), "a killed holder leaves its record"
    stale = as_json(capsys, copy)["lock"]
    assert (stale["state"], stale["pid"]) == ("stale", holder.pid)
    assert "no longer running" in stale["detail"]

    record = json.loads((copy / HOLDER_NAME).read_text())
    # The dead holder's pid taken by a process started after the record (pids are reused): still not a holder.
    reused = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (copy / HOLDER_NAME).write_text(json.dumps({**record, "pid": reused.pid, "started": time.time() - 3600}))
        assert as_json(capsys, copy)["lock"]["state"] == "stale"
        (copy / HOLDER_NAME).write_text(json.dumps({**record, "pid": reused.pid, "started": time.time()}))
        assert as_json(capsys, copy)["lock"]["state"] == "held"
    finally:
        reused.kill()
        reused.wait(30)
    (copy / HOLDER_NAME).write_text(json.dumps({**record, "host": "colab-vm-1"}))
    _, out, _ = status(capsys, str(copy))
    assert f"lock:        recorded by run {record['run_id']} (pid {holder.pid} on colab-vm-1): its process cannot be " \
           "checked from here" in out  # fmt: skip

    (copy / HOLDER_NAME).unlink()
    assert (copy / LOCK_NAME).exists()
    assert as_json(capsys, copy)["lock"]["state"] == "unknown"


def test_watch_refreshes_until_ctrl_c(
    trained: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    pauses: list[float] = []
    lock = RunLock(run_of(trained))

    def fake_sleep(seconds: float) -> None:
        pauses.append(seconds)
        if len(pauses) == 1:
            lock.acquire()  # a trainer starts between two refreshes
        else:
            raise KeyboardInterrupt  # Ctrl+C

    monkeypatch.setattr(status_module, "sleep", fake_sleep)
    try:
        code, out, err = status(capsys, str(run_of(trained)), "--watch", "5")
        assert code == 0, err
        assert pauses == [5.0, 5.0]
        first, second = out.split("\n\n")
        assert "lock:        free" in first and "lock:        held by" in second

        pauses.clear()
        lock.release()
        code, out, _ = status(capsys, str(run_of(trained)), "--watch", "--json")
        assert code == 0 and pauses == [status_module.WATCH_DEFAULT_S] * 2
        states = [json.loads(line)["lock"]["state"] for line in out.splitlines()]
        assert states == ["free", "held"]
    finally:
        lock.release()
    code, out, err = status(capsys, str(run_of(trained)), "--watch", "0")
    assert (code, out) == (2, "") and err.startswith("atheria: error: --watch=0 must be") and err.count("\n") == 1


def test_damaged_manifest_and_log_are_lines_not_tracebacks(
    trained: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    copy = tmp_path / "demo"
    shutil.copytree(run_of(trained), copy)
    best_name, best = best_of(copy)
    path = copy / "checkpoints" / "MANIFEST.json"
    path.write_bytes(path.read_bytes()[:100])  # truncated, as by a kill mid-copy
    code, out, err = status(capsys, str(copy))
    assert code == 0, err
    assert "manifest:    checkpoints/MANIFEST.json is damaged (not JSON" in out
    assert f"episode:     {STOPPED_AT} of {EPISODES}" in out, "the log still says how far the run got"
    assert f"({best_name})" in out, "and which checkpoints it kept"
    assert as_json(capsys, copy)["manifest"]["state"] == "damaged"

    log = copy / "exports" / "training_log.json"
    log.write_bytes(b"\x00\x9f garbage")
    code, out, err = status(capsys, str(copy))
    assert code == 0, err
    assert "log:         exports/training_log.json cannot be read" in out
    assert "time:        not recorded" in out and "best:        none yet" in out

    # Valid JSON of the wrong shapes, and a string that would drive the terminal.
    log.write_text(json.dumps({"episodes": [], "experiment": "\x1b[2Jdemo", "total_episodes": "six", "sessions": 5,
                               "time": [1], "checkpoints": {"last.ckpt": 1}, "episodes_done": -4,
                               "written_at": 7}))  # fmt: skip
    path.write_text(json.dumps({"version": 1, "files": {"last.ckpt": {"episode": "x"}}}))
    code, out, err = status(capsys, str(copy))
    assert code == 0, err
    assert "experiment:  ?[2Jdemo" in out and "\x1b" not in out
    assert "episode:     none yet" in out

    # Times no date can be made of: the checkpoint's own file time instead, said so.
    entry = {"episode": 3, "size": 1, "sha256": "0" * 64, "saved_at": 1e300}
    path.write_text(json.dumps({"version": 1, "updated": float("inf"), "files": {"last.ckpt": entry}}))
    code, out, err = status(capsys, str(copy))
    assert code == 0, err
    assert "(the file's modification time: no time recorded)" in out
    seen = as_json(capsys, copy)
    assert seen["last_checkpoint"]["at"] == (copy / "checkpoints" / "last.ckpt").stat().st_mtime


def test_not_a_run_a_missing_path_and_a_bad_option_are_one_line_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    (tmp_path / "empty").mkdir()
    for args, message in [
        ([str(tmp_path / "empty")], "is not a run folder: it has no checkpoints/MANIFEST.json"),
        ([str(tmp_path / "nowhere")], "does not exist"),
        (["nosuchprotocol://x/y"], "cannot be opened"),
        ([str(tmp_path), "--jsn"], "--jsn is not a setting of atheria status: did you mean --json?"),
        ([], "RUN is required by atheria status"),
    ]:
        code, out, err = status(capsys, *args)
        assert (code, out) == (2, ""), (args, out, err)
        assert err.startswith("atheria: error: ") and message in err and err.count("\n") == 1, err
    assert os.listdir(tmp_path) == ["empty"]


# A laptop that checks a Drive mirror need not have torch: status reads manifests, logs and listings only.
WITHOUT_TORCH = """
import sys
sys.modules["torch"] = sys.modules["lightning"] = None  # any import of them fails
from atheria_lightning.cli.main import console_main
sys.argv = ["atheria", "status", *sys.argv[1:]]
sys.exit(console_main())
"""


def test_status_answers_where_torch_cannot_be_imported(trained: Path) -> None:
    run = run_of(trained)
    for extra in ([], ["--json"]):
        done = subprocess.run([sys.executable, "-c", WITHOUT_TORCH, str(run), *extra], capture_output=True,
                              text=True, cwd=REPO, env=env_without_warnings(), timeout=120)  # fmt: skip
        assert done.returncode == 0, done.stderr[-2000:]
        assert done.stderr == ""
        assert "episode" in done.stdout and "of" in done.stdout


def test_a_reader_that_goes_away_ends_status_quietly(trained: Path) -> None:
    # As `atheria status RUN | head -1`, where head has what it wanted before status writes: the pipe's reading
    # end is closed before status starts, so every write meets a closed pipe.
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        done = subprocess.run([sys.executable, "-m", "atheria_lightning.cli", "status", str(run_of(trained))],
                              stdout=write_end, stderr=subprocess.PIPE, text=True, cwd=REPO,
                              env=env_without_warnings(), timeout=120)  # fmt: skip
    finally:
        os.close(write_end)
    assert (done.returncode, done.stderr) == (0, "")


def test_a_mirror_in_memory(trained: Path, capsys: pytest.CaptureFixture) -> None:
    fs, root = MemoryFileSystem(), f"/status-{uuid.uuid4().hex[:8]}"
    fs.put(str(mirror_of(trained)), f"{root}/demo", recursive=True)
    try:
        seen = as_json(capsys, f"memory://{root}/demo")
        assert (seen["where"], seen["episode"], seen["total_episodes"]) == ("mirror", STOPPED_AT, EPISODES)
        assert seen["best"]["file"] == best_of(mirror_of(trained))[0]
        assert seen["lock"]["state"] == "unknown" and "not mirrored" in seen["lock"]["detail"]
        assert seen["last_sync"] == {"at": manifest(mirror_of(trained))["updated"], "source": "mirror manifest"}
        stored = {key: bytes(fs.cat_file(key)) for key in fs.find(root)}
        status(capsys, f"memory://{root}/demo")
        assert {key: bytes(fs.cat_file(key)) for key in fs.find(root)} == stored
    finally:
        fs.rm(root, recursive=True)


def test_a_mirror_on_s3(
    trained: Path, s3_server: str, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    import s3fs

    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server)  # how a user points boto at R2 or MinIO, too
    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_server})
    fs.put(str(mirror_of(trained)), "atheria-runs/mirror/demo", recursive=True)
    seen = as_json(capsys, "s3://atheria-runs/mirror/demo")
    assert (seen["where"], seen["episode"], seen["best"]["file"]) == (
        "mirror",
        STOPPED_AT,
        best_of(trained / "mirror" / "demo")[0],
    )
    code, _, err = status(capsys, "s3://atheria-runs/mirror/nothing")
    assert code == 2 and "does not exist" in err


@pytest.mark.slow
def test_a_live_trainer_then_killed_held_behind_then_stale(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    # A checkpoint every episode, a sync every 4: the mirror trails the run folder most of the time.
    extra = callbacks_config(tmp_path, every=1, sync=4)
    command = [sys.executable, "-m", "atheria_lightning.cli",
               *demo_args(tmp_path, "--config", extra, episodes=400, val_every=2)]  # fmt: skip
    run, mirror = tmp_path / "runs" / "demo", tmp_path / "mirror" / "demo"

    def newest(folder: Path) -> int:
        try:
            return max(entry["episode"] for entry in manifest(folder)["files"].values())
        except (OSError, ValueError):
            return -1

    def trails() -> bool:
        # With the mirror's copy of logs/config.yaml, which names the run's total: a sync sends it after the
        # checkpoints, so a kill right after the first sync's checkpoints leaves a mirror without it ("of ?").
        return (mirror / "logs" / "config.yaml").is_file() and 0 < newest(mirror) < newest(run)

    trainer = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=REPO,
                               env=env_without_warnings())  # fmt: skip
    try:
        assert wait_for(trails, 240), "the mirror never trailed the run folder"
        trainer.send_signal(signal.SIGSTOP)  # frozen: its files hold still while status reads them
        time.sleep(0.2)
        ours, theirs = newest(run), newest(mirror)
        live = as_json(capsys, run, "--follow-mirror")
        assert (live["lock"]["state"], live["lock"]["pid"]) == ("held", trainer.pid)
        assert (live["episode"], live["mirror"]["state"], live["mirror"]["episode"]) == (ours, "behind", theirs)
        assert live["log"]["state"] == "missing"
        # No log yet in a first session: the pace comes from the checkpoints' save times, never above their average.
        saved = sorted((entry["episode"], entry["saved_at"]) for entry in manifest(run)["files"].values())
        assert saved[-1][0] > saved[0][0], "best checkpoints of earlier validations beside last.ckpt"
        average = (saved[-1][1] - saved[0][1]) / (saved[-1][0] - saved[0][0])
        assert 0 < live["recent_seconds_per_episode"] <= average
        assert live["hours_left"] == pytest.approx((400 - ours) * live["recent_seconds_per_episode"] / 3600)
    finally:
        trainer.send_signal(signal.SIGKILL)
        trainer.wait(30)
    dead = as_json(capsys, run, "--follow-mirror")
    assert (dead["lock"]["state"], dead["mirror"]["state"]) == ("stale", "behind")
    code, out, _ = status(capsys, str(mirror))
    assert code == 0 and f"episode:     {theirs} of 400" in out
    assert "log:         exports/training_log.json is missing (it is written when a session ends)" in out
