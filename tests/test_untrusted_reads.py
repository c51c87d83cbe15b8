"""`atheria status` and `atheria report` on a run folder from someone else: they read only what they are pointed at
(a mirror its config names is named, not visited), each file bounded and regular, and a bad one is one line."""

from __future__ import annotations

import copy
import json
import os
import resource
import subprocess
import sys
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

import pytest
from conftest import REPO, LocalServer, env_without_warnings
from fsspec.implementations.local import LocalFileSystem

from atheria_lightning.cli import main
from atheria_lightning.status.read import mtime
from atheria_lightning.untrusted import info_of

EPISODES = 10
#: The memory a command may take in test (b): /dev/zero read whole took 23 GB, a bounded read a few hundred MB.
MEMORY_LIMIT = 2 << 30


def training_log(run_dir: str) -> dict[str, Any]:
    """A training_log.json as TrainingLog writes it, shortened: ten episodes, two sessions, two checkpoints."""
    return {
        "format_version": 1, "experiment": "demo", "run_dir": run_dir, "phase": None,
        "written_at": "2026-12-05T10:00:00+00:00", "episodes_done": EPISODES, "total_episodes": 20,
        "config": {"model": {"architecture": "UNET", "lr": 1e-4}, "data": {"total_episodes": 20},
                   "trainer": {"precision": "32-true", "callbacks": ["TrainingLog", "SmartCheckpoint"]}},
        "time": {"sessions": 2, "total_training_hours": 0.01, "episodes_per_second": 0.3},
        "sessions": [{"session": 1, "first_episode": 0, "last_episode": 4, "episodes": 5, "training_seconds": 16.0},
                     {"session": 2, "first_episode": 5, "last_episode": 9, "episodes": 5, "training_seconds": 17.5}],
        "monitor": "val/loss",
        "best": {"val_loss": 1.5, "val_loss_episode": 10, "train_loss": 1.0, "train_loss_episode": 9,
                 "last_episode": 9, "last_train_loss": 1.0, "last_train_survival": 0.2},
        "checkpoints": [{"file": "best-e000010.ckpt", "kind": "best", "episode": 10, "metric": 1.5, "size": 1000},
                        {"file": "last.ckpt", "kind": "last", "episode": 10, "metric": None, "size": 1000}],
        "saved_episodes": [5, 10], "exported_model": None,
        "episodes": [{"episode": episode, "loss": 2.0 - episode / 10, "survival": 0.2, "symmetry": None,
                      "complexity": 1.0, "noise_level": 0.0} for episode in range(EPISODES)],
        "validations": [{"episode": 10, "loss": 1.5, "combined": 2.5, "survival": 0.2, "symmetry": 0.1,
                         "complexity": 1.0}],
    }  # fmt: skip


def make_run(folder: Path, mirror_url: str, run_dir: str = "/content/atheria_runs/demo") -> Path:
    """A run folder as a trainer leaves it (no checkpoint files: status never opens one), recorded at ``run_dir``,
    whose config names ``mirror_url`` as its mirror, and MirrorSync's url and storage_options too."""
    entry = {"episode": 10, "size": 1000, "sha256": "0" * 64, "kind": "last", "saved_at": 1_764_928_800.0}
    files = {"last.ckpt": entry, "best-e000010.ckpt": {**entry, "kind": "best", "metric": 1.5}}
    manifest = {"version": 1, "updated": 1_764_928_800.0, "files": files}
    for sub in ("checkpoints", "exports", "logs"):
        (folder / sub).mkdir(parents=True)
    (folder / "checkpoints" / "MANIFEST.json").write_text(json.dumps(manifest))
    (folder / "exports" / "training_log.json").write_text(json.dumps(training_log(run_dir), indent=1))
    (folder / "logs" / "config.yaml").write_text(f"""experiment_name: demo
run_root: /content/atheria_runs
mirror_url: {mirror_url}
trainer:
  callbacks:
    - class_path: atheria_lightning.callbacks.MirrorSync
      init_args:
        url: {mirror_url}
        storage_options: {{headers: {{X-Sent-By: the-copy}}}}
""")
    return folder


def run(capsys: pytest.CaptureFixture, *args: str) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


class Listener(LocalServer):
    """An HTTP server on 127.0.0.1 that answers 404 to everything and keeps each request's method and path."""

    def __init__(self) -> None:
        requests = self.requests = []

        class Handler(BaseHTTPRequestHandler):
            def answer(self) -> None:
                requests.append((self.command, self.path))
                self.send_response(404)
                self.send_header("Content-Length", "0")
                self.end_headers()

            do_GET = do_HEAD = do_POST = do_PUT = do_DELETE = do_OPTIONS = answer

            def log_message(self, *args: Any) -> None:
                pass

        super().__init__(Handler, "http", "evil")


@pytest.fixture
def listener() -> Iterator[Listener]:
    server = Listener()
    yield server
    server.close()


# ----- (a) a mirror named inside the folder is named, not visited -----
def test_a_copy_naming_an_http_mirror_makes_no_request(
    tmp_path: Path, listener: Listener, capsys: pytest.CaptureFixture
) -> None:
    copy_dir = make_run(tmp_path / "Downloads" / "demo", listener.url)
    named = f"{listener.url}/demo"

    code, out, err = run(capsys, "status", str(copy_dir))
    assert listener.requests == [], "status must not contact the mirror a copy names"
    assert code == 0, err
    assert "(a copy: " in out and f"its recorded mirror {named} is not read" in out and "--follow-mirror" in out
    code, out, err = run(capsys, "status", str(copy_dir), "--json")
    assert code == 0, err
    seen = json.loads(out)
    assert seen["where"] == "copy" and named in seen["mirror"]["detail"]
    code, out, err = run(capsys, "report", str(copy_dir))
    assert code == 0, err
    assert (copy_dir / "exports" / "report.md").is_file()
    assert listener.requests == [], "nor report"

    # The same folder as its own trainer's run folder (the path it records is this one): still only named.
    (copy_dir / "exports" / "training_log.json").write_text(json.dumps(training_log(str(copy_dir))))
    seen = json.loads(run(capsys, "status", str(copy_dir), "--json")[1])
    assert seen["where"] == "run folder"
    assert (seen["mirror"]["state"], seen["mirror"]["url"], seen["last_sync"]) == ("not read", named, None)
    code, out, _ = run(capsys, "status", str(copy_dir))
    assert f"mirror:      the mirror is not read (named in logs/config.yaml): atheria status --follow-mirror " \
           f"compares with it [{named}]" in out  # fmt: skip
    assert listener.requests == []

    # Asked for, the mirror is read there, with the storage_options the config gives.
    code, out, err = run(capsys, "status", str(copy_dir), "--follow-mirror")
    assert code == 0, err
    assert listener.requests, "--follow-mirror reads the mirror"
    assert all(path.startswith("/evil/demo/") for _, path in listener.requests), listener.requests


def test_a_mirror_that_is_a_path_is_named_too(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    # A path could be a network mount or a share: only --follow-mirror reads it. Here it is a folder that is ahead.
    mirror = tmp_path / "elsewhere"
    run_folder = make_run(tmp_path / "runs" / "demo", str(mirror))
    (run_folder / "exports" / "training_log.json").write_text(json.dumps(training_log(str(run_folder))))
    (mirror / "demo" / "checkpoints").mkdir(parents=True)
    ahead = json.loads((run_folder / "checkpoints" / "MANIFEST.json").read_text())
    ahead["files"]["last.ckpt"]["episode"] = 15
    (mirror / "demo" / "checkpoints" / "MANIFEST.json").write_text(json.dumps(ahead))

    seen = json.loads(run(capsys, "status", str(run_folder), "--json")[1])
    assert (seen["where"], seen["mirror"]["state"]) == ("run folder", "not read")
    assert seen["mirror"]["url"] == f"{mirror}/demo"
    seen = json.loads(run(capsys, "status", str(run_folder), "--json", "--follow-mirror")[1])
    assert (seen["mirror"]["state"], seen["mirror"]["episode"]) == ("ahead", 15)
    # The mirror itself as RUN is read as any RUN, and known as the mirror from its own config.
    (mirror / "demo" / "logs").mkdir()
    (mirror / "demo" / "logs" / "config.yaml").write_text((run_folder / "logs" / "config.yaml").read_text())
    seen = json.loads(run(capsys, "status", str(mirror / "demo"), "--json")[1])
    assert (seen["where"], seen["episode"]) == ("mirror", 15)


# ----- (b) no file is read without a bound, none that is not a regular file -----
def _limited() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))


def _atheria(*args: str) -> subprocess.CompletedProcess:
    """The command as a user runs it, in a process of its own, under a memory limit and a time limit."""
    return subprocess.run([sys.executable, "-m", "atheria_lightning.cli", *args], capture_output=True, text=True,
                          cwd=REPO, env=env_without_warnings(), preexec_fn=_limited, timeout=180)  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["link to /dev/zero", "FIFO"])
def test_a_log_that_never_ends_is_one_line_in_bounded_memory(tmp_path: Path, kind: str) -> None:
    run_folder = make_run(tmp_path / "demo", "null")
    log = run_folder / "exports" / "training_log.json"
    log.unlink()
    if kind == "FIFO":
        os.mkfifo(log)  # an open would wait for a writer forever
    else:
        log.symlink_to("/dev/zero")
        for name in ("checkpoints/MANIFEST.json", "logs/config.yaml"):
            (run_folder / name).unlink()
            (run_folder / name).symlink_to("/dev/zero")

    report = _atheria("report", str(run_folder))
    assert report.returncode == 2, report.stderr
    lines = report.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"atheria: error: RUN_DIR={str(run_folder)!r}: "), report.stderr
    assert "exports/training_log.json is a " in lines[0], lines[0]

    status = _atheria("status", str(run_folder))
    assert status.returncode == 0 and "Traceback" not in status.stderr, status.stderr
    assert "log:         exports/training_log.json is " in status.stdout
    if kind != "FIFO":
        assert "manifest:    checkpoints/MANIFEST.json is a link" in status.stdout


def test_links_out_of_the_run_folder_are_not_followed(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    run_folder = make_run(tmp_path / "demo", "null")
    outside = tmp_path / "someone_elses.json"
    outside.write_text(json.dumps(training_log(str(run_folder))))
    log = run_folder / "exports" / "training_log.json"
    log.unlink()
    log.symlink_to(outside)
    code, _, err = run(capsys, "report", str(run_folder))
    assert code == 2 and err.count("\n") == 1 and "exports/training_log.json is a link" in err, err
    code, out, err = run(capsys, "status", str(run_folder))
    assert code == 0, err
    assert "log:         exports/training_log.json is a link" in out

    # A linked folder is no way round it.
    log.unlink()
    (run_folder / "exports").rmdir()
    (tmp_path / "exports").mkdir()
    (tmp_path / "exports" / "training_log.json").write_text(outside.read_text())
    (run_folder / "exports").symlink_to(tmp_path / "exports")
    code, _, err = run(capsys, "report", str(run_folder))
    assert code == 2 and "exports/training_log.json is a link, or in a linked folder" in err, err


def test_a_file_time_is_not_looked_up_through_a_linked_folder(tmp_path: Path) -> None:
    # Status falls back on MANIFEST.json's file time when the manifest records none, and report asks whether an
    # export exists: neither may look through a link in the folders on the way (a path the folder chose).
    elsewhere = tmp_path / "elsewhere" / "checkpoints"
    elsewhere.mkdir(parents=True)
    (elsewhere / "MANIFEST.json").write_text("{}")
    os.utime(elsewhere / "MANIFEST.json", (1_234_567_890, 1_234_567_890))
    linked, real = tmp_path / "linked", tmp_path / "elsewhere"
    linked.mkdir()
    (linked / "checkpoints").symlink_to(elsewhere)
    fs = LocalFileSystem()
    with pytest.raises(FileNotFoundError):
        info_of(fs, str(linked), "checkpoints/MANIFEST.json")
    assert mtime(fs, str(linked), "checkpoints/MANIFEST.json") is None
    assert mtime(fs, str(real), "checkpoints/MANIFEST.json") == 1_234_567_890, "a real folder is read as before"


# ----- (c) malformed content: one line naming the file, exit 2 -----
def _wrong(path: str, value: Any) -> Any:
    """A training log with the value at ``path`` (dotted, with list indexes) replaced by ``value``."""
    log = copy.deepcopy(training_log("/content/atheria_runs/demo"))
    *parents, last = [int(part) if part.isdigit() else part for part in path.split(".")]
    target = log
    for part in parents:
        target = target[part]
    target[last] = value
    return json.dumps(log)


MALFORMED = {
    "an episode not a mapping": (_wrong("episodes.6", "notadict"), "episodes[6] must be a mapping"),
    "episodes not a list": (_wrong("episodes", {"0": {}}), "no list of episodes"),
    "NaN for a loss": (_wrong("episodes.3.loss", float("nan")), "episodes[3].loss must be a finite number"),
    "an infinity": (_wrong("sessions.1.training_seconds", float("inf")), "sessions[1].training_seconds must be"),
    "true for a number": (_wrong("time.total_training_hours", True), "time.total_training_hours must be a finite"),
    "text for a size": (_wrong("checkpoints.0.size", "big"), "checkpoints[0].size must be a whole number"),
    "a float for an episode": (_wrong("best.last_episode", 9.5), "best.last_episode must be a whole number"),
    "a session without its seconds": (_wrong("sessions.0", {"session": 1}), "sessions[0] has no 'first_episode'"),
    "a config nested deep": (_wrong("config.model.lr", json.loads("[" * 500 + "]" * 500)), "config.model.lr must be"),
    "nesting 100 000 deep": ('{"episodes": ' + "[" * 100_000 + "]" * 100_000 + "}", "nests deeper than any file"),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_a_malformed_log_is_one_line_for_report_and_never_a_traceback_for_status(
    tmp_path: Path, capsys: pytest.CaptureFixture, case: str
) -> None:
    content, reason = MALFORMED[case]
    run_folder = make_run(tmp_path / "demo", "null")
    (run_folder / "exports" / "training_log.json").write_text(content)
    code, out, err = run(capsys, "report", str(run_folder))
    assert (code, out) == (2, ""), err
    assert err.startswith(f"atheria: error: RUN_DIR={str(run_folder)!r}: exports/training_log.json "), err
    assert err.count("\n") == 1 and reason in err, err
    assert not (run_folder / "exports" / "report.md").exists()

    code, out, err = run(capsys, "status", str(run_folder))
    assert code == 0 and "Traceback" not in err, err
    code, out, err = run(capsys, "status", str(run_folder), "--json")
    assert code == 0 and json.loads(out)["episode"] == EPISODES, "the manifest still says how far the run got"


def test_numbers_no_run_reaches_are_a_status_not_a_traceback(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    run_folder = make_run(tmp_path / "demo", "null")
    manifest = run_folder / "checkpoints" / "MANIFEST.json"
    listed = json.loads(manifest.read_text())
    listed["files"]["last.ckpt"]["episode"] = 10**400  # a float made of it overflows
    manifest.write_text(json.dumps(listed))
    log = training_log(str(run_folder))
    log.update(total_episodes=10**401)
    (run_folder / "exports" / "training_log.json").write_text(json.dumps(log))
    for extra in ([], ["--json"]):
        code, out, err = run(capsys, "status", str(run_folder), *extra)
        assert code == 0 and "Traceback" not in err, err
    seen = json.loads(out)
    assert (seen["manifest"]["state"], seen["episode"], seen["total_episodes"]) == ("damaged", EPISODES, None)

    # 1e308 seconds an episode, times the episodes left: an infinity, which JSON has no word for.
    log.update(total_episodes=20)
    log["sessions"][-1].update(episodes=1, training_seconds=1e308)
    (run_folder / "exports" / "training_log.json").write_text(json.dumps(log))
    code, out, err = run(capsys, "status", str(run_folder), "--json")
    assert code == 0, err
    assert json.loads(out)["hours_left"] is None


def test_a_log_over_the_bound_is_refused_unread(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    run_folder = make_run(tmp_path / "demo", "null")
    log = run_folder / "exports" / "training_log.json"
    os.truncate(log, 300 << 20)  # sparse: 300 MiB that take no disk
    code, _, err = run(capsys, "report", str(run_folder))
    assert code == 2 and err.count("\n") == 1, err
    assert "exports/training_log.json is larger than 256 MiB (300 MiB)" in err
    code, out, err = run(capsys, "status", str(run_folder))
    assert code == 0, err
    assert "log:         exports/training_log.json is larger than 256 MiB (300 MiB)" in out

    for name in ("checkpoints/MANIFEST.json", "logs/config.yaml", ".atheria.lock.json"):
        with open(run_folder / name, "a") as handle:
            handle.truncate(9 << 20)  # over the few MiB of a small file
    seen = json.loads(run(capsys, "status", str(run_folder), "--json")[1])
    assert seen["manifest"]["state"] == "damaged" and "is larger than 8 MiB" in seen["manifest"]["detail"]
    assert seen["lock"]["pid"] is None and seen["log"]["state"] == "damaged"


DRAWN_AS_THEY_ARE = {
    # matplotlib reads "$...$" as math: a bad formula failed the drawing of summary.png.
    "names read as math": {"experiment": r"$\foo$", "monitor": r"$\bar{$"},
    # One value is widened by 0.5 for a histogram's bins: nothing, next to 1e300.
    "a huge loss, the same every episode": {"losses": 1e300},
}


@pytest.mark.parametrize("case", list(DRAWN_AS_THEY_ARE))
def test_names_and_numbers_a_log_may_hold_are_drawn_as_they_are(
    tmp_path: Path, capsys: pytest.CaptureFixture, case: str
) -> None:
    run_folder = make_run(tmp_path / "demo", "null")
    log = training_log(str(run_folder))
    changes = dict(DRAWN_AS_THEY_ARE[case])
    loss = changes.pop("losses", None)
    for row in log["episodes"] if loss is not None else []:
        row["loss"] = loss
    log.update(changes)
    (run_folder / "exports" / "training_log.json").write_text(json.dumps(log))
    code, out, err = run(capsys, "report", str(run_folder))
    assert code == 0, err
    assert (run_folder / "exports" / "summary.png").read_bytes().startswith(b"\x89PNG")
