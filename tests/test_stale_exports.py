"""Exports belong to the final state: EXPORTS.json records it, and a finished run remakes exports that are stale."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest

from atheria_lightning.exports_record import RECORD_FILE, read_record, stale_reason, write_record
from atheria_lightning.store import RunStore


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
