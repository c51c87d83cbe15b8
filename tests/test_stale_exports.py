"""Exports belong to the final state: EXPORTS.json records it, and a finished run remakes exports that are stale."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import REPO, demo_args, env_without_warnings, run_dir

from atheria_lightning import export
from atheria_lightning.cli import main
from atheria_lightning.exports_record import RECORD_FILE, read_record, stale_reason, write_record
from atheria_lightning.store import RunStore

RUNNER = str(Path(__file__).resolve().parent / "killed_exports_run.py")


def _store_with(tmp_path: Path, *episodes: int) -> RunStore:
    """A store whose last.ckpt was written at each of ``episodes`` in turn (no trainer: plain checkpoint dicts)."""
    store = RunStore(tmp_path, async_write=False)
    for episode in episodes:
        store.write_checkpoint({"state_dict": {}, "episode": episode}, "last", episode)
    return store


def _exports(tmp_path: Path) -> Path:
    exports = tmp_path / "exports"
    exports.mkdir(exist_ok=True)
    for name, data in {"summary.png": b"\x89PNG old", "report.md": b"# report\n", "training_log.json": b"{}"}.items():
        (exports / name).write_bytes(data)
    return exports


def test_a_record_describes_the_exports_until_the_newest_checkpoint_or_a_file_changes(tmp_path: Path) -> None:
    store = _store_with(tmp_path, 3)
    exports = _exports(tmp_path)
    assert stale_reason(store, str(tmp_path)) == "no readable exports/EXPORTS.json says what they were made from"
    write_record(store, str(exports), exported=None)
    record = read_record(str(exports))
    assert record is not None and record["newest_checkpoint"]["episode"] == 3
    assert record["newest_checkpoint"]["sha256"] == store.entries()["last.ckpt"].sha256
    assert set(record["files"]) == {"summary.png", "report.md", "training_log.json"}
    assert stale_reason(store, str(tmp_path)) is None

    (exports / "report.md").write_bytes(b"# an older report\n")
    assert stale_reason(store, str(tmp_path)) == "report.md: missing, or not as recorded"
    write_record(store, str(exports), exported=None)
    (exports / "summary.png").unlink()
    assert stale_reason(store, str(tmp_path)) == "summary.png: missing, or not as recorded"
    write_record(store, str(exports), exported=None)

    store.write_checkpoint({"state_dict": {}, "episode": 6}, "last", 6)
    assert stale_reason(store, str(tmp_path)) == (
        "they were made at episode 3, the run's newest checkpoint is last.ckpt of episode 6"
    )


def test_a_record_names_the_checkpoint_of_the_model_and_notices_when_it_is_no_longer_listed(tmp_path: Path) -> None:
    store = _store_with(tmp_path, 3)
    exports = _exports(tmp_path)
    (exports / "model.ts").write_bytes(b"model")
    write_record(store, str(exports), exported={"file": "model.ts", "from_checkpoint": "last.ckpt", "episode": 3})
    record = read_record(str(exports))
    assert record is not None and record["exported_model"] == record["newest_checkpoint"]
    assert "model.ts" in record["files"] and stale_reason(store, str(tmp_path)) is None
    record["exported_model"] = {**record["exported_model"], "file": "best-e000003.ckpt"}
    (exports / RECORD_FILE).write_text(json.dumps(record))
    assert stale_reason(store, str(tmp_path)) == "the checkpoint model.ts was made from is no longer listed as it was"


#: Records a start may find (one from a shared mirror is untrusted), each from the run's own record.
FORGED = {
    "not json": lambda record: "{not json",
    "not an object": lambda record: "[1, 2]",
    "no files": lambda record: json.dumps({"format_version": 1}),
    "another version": lambda record: json.dumps({**record, "format_version": 2}),
    "a newest checkpoint of its own": lambda record: json.dumps({**record, "newest_checkpoint": {"episode": "3\nx"}}),
    "a model that is a list": lambda record: json.dumps({**record, "exported_model": [1]}),
    "a file of its own": lambda record: json.dumps({**record, "files": {**record["files"], "../../x\nforged": {}}}),
}


@pytest.mark.parametrize("forgery", FORGED.values(), ids=FORGED.keys())
def test_an_unreadable_or_forged_record_is_stale_and_only_compared(tmp_path: Path, forgery: Callable) -> None:
    store = _store_with(tmp_path, 3)
    exports = _exports(tmp_path)
    write_record(store, str(exports), exported=None)
    (exports / RECORD_FILE).write_text(forgery(json.loads((exports / RECORD_FILE).read_text())))
    reason = stale_reason(store, str(tmp_path))
    assert reason is not None and "\n" not in reason and "forged" not in reason, reason


@pytest.mark.slow
@pytest.mark.parametrize(
    ("point", "new_machine"),
    [("model.ts", False), ("summary.png", True), ("training_log.json", False)],
    ids=["after model.ts", "after summary.png, rerun on a new machine", "before training_log.json"],
)
def test_a_finished_session_killed_while_exporting_gets_its_exports_remade_and_mirrored_by_the_rerun(
    point: str, new_machine: bool, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    # Session 1 finishes a run of 3 episodes: its report (and the mirror's copy) says 3 of 3.
    assert main(demo_args(tmp_path, episodes=3, val_every=3)) == 0
    shutil.rmtree(run_dir(tmp_path))  # a new machine: session 2 starts from the mirror
    # Session 2 trains it on to 6 episodes and is killed at `point` of its exports, its final checkpoint written.
    command = [sys.executable, "-u", RUNNER, point, *demo_args(tmp_path, episodes=6, val_every=3)]
    killed = subprocess.run(command, capture_output=True, text=True, cwd=REPO, env=env_without_warnings(), timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stdout[-3000:] + killed.stderr[-3000:]
    assert "resuming from episode 3 of 6 (50%) [mirror:" in killed.stdout
    assert "exports made again" not in killed.stdout, "a run that is not finished makes its exports at the end"
    exports, mirror = run_dir(tmp_path) / "exports", tmp_path / "mirror" / "demo" / "exports"
    assert "| episodes | 3 of 3 (100%) |" in (exports / "report.md").read_text(), "the stale report the kill left"
    if new_machine:
        # The rerun starts from the mirror, where the final flush before the exports sent checkpoint 6: the stale
        # exports it downloads are replaced, and the final flush must still notice them (size + mtime) and send them.
        shutil.rmtree(run_dir(tmp_path))
    capsys.readouterr()

    assert main(demo_args(tmp_path, episodes=6, val_every=3)) == 0
    out = capsys.readouterr().out
    assert "exports made again from the final checkpoint: " in out, out
    assert out.index("exports made again") < out.index("run finished: episode 6 of 6 (100%), nothing to do")
    assert ("mirror: restored" in out) == new_machine
    log = json.loads((exports / "training_log.json").read_text())
    assert log["episodes_done"] == 6 and [row["episode"] for row in log["episodes"]] == list(range(6))
    assert [validation["episode"] for validation in log["validations"]] == [3, 6]
    assert [(session["first_episode"], session["episodes"]) for session in log["sessions"]] == [(0, 3), (3, 3)]
    best = RunStore(run_dir(tmp_path)).best()
    assert best is not None and log["exported_model"]["from_checkpoint"] == best.name
    metadata = export.load_metadata(exports / "model.ts")
    assert (metadata["source_checkpoint"], metadata["episode"]) == (best.name, best.episode)
    assert "| episodes | 6 of 6 (100%) |" in (exports / "report.md").read_text()
    assert stale_reason(RunStore(run_dir(tmp_path)), str(run_dir(tmp_path))) is None
    for name in ("model.ts", "summary.png", "report.md", "training_log.json", RECORD_FILE):
        assert (mirror / name).read_bytes() == (exports / name).read_bytes(), f"the mirror has the new {name}"


@pytest.mark.slow
def test_a_log_the_last_session_never_wrote_comes_back_from_its_final_checkpoint_as_it_would_have_been(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    # 4 episodes, validated at 3: no save at episode 4 comes before the final one, and Lightning takes the state of
    # a checkpoint before the save is recorded in it, so the final checkpoint's copy of the log lacks that save.
    assert main(demo_args(tmp_path, episodes=4, val_every=3, mirror=False)) == 0
    exports = run_dir(tmp_path) / "exports"
    written = json.loads((exports / "training_log.json").read_text())
    (exports / "training_log.json").unlink()  # as if the session was killed after its final checkpoint
    capsys.readouterr()
    assert main(demo_args(tmp_path, episodes=4, val_every=3, mirror=False)) == 0
    out = capsys.readouterr().out
    assert "exports made again from the final checkpoint: training_log.json: missing, or not as recorded" in out
    again = json.loads((exports / "training_log.json").read_text())
    # Only what the checkpoint cannot know differs: when the file was written, and the seconds after the final save.
    for log in (written, again):
        del log["written_at"], log["time"]["total_training_hours"], log["time"]["episodes_per_second"]
        for session in log["sessions"]:
            del session["training_seconds"]
        log["checkpoints"].sort(key=lambda entry: entry["file"])  # at one episode, in the order the manifest has
    assert written["saved_episodes"] == [3, 4]
    assert again == written
