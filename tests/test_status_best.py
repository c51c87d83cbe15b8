"""`atheria status`'s best checkpoint: the store's retention rule, from the manifest or, without one, from the log."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest

from atheria_lightning.status import run_status
from atheria_lightning.store.manifest import Entry, Manifest, kind_of

Kept = list[tuple[str, int, float | None]]
Writer = Callable[[Path, Kept], Path]

#: (file, episode, metric): last.ckpt has the lowest metric but is never "the best"; two best files share the
#: lowest metric of the others (the earlier episode wins); one has none.
KEPT = [
    ("last.ckpt", 9, 0.01),
    ("best-e000002.ckpt", 2, 0.5),
    ("best-e000004.ckpt", 4, 0.25),
    ("best-e000006.ckpt", 6, 0.25),
    ("best-e000008.ckpt", 8, None),
]


def log_only(folder: Path, kept: Kept) -> Path:
    """A run folder holding only the training log that lists ``kept``, as TrainingLog writes its checkpoints."""
    checkpoints = [
        {"file": name, "kind": kind_of(name), "episode": episode, "metric": metric, "size": 100}
        for name, episode, metric in kept
    ]
    (folder / "exports").mkdir(parents=True)
    log = {"episodes": [], "episodes_done": 9, "monitor": "val/loss", "checkpoints": checkpoints}
    (folder / "exports" / "training_log.json").write_text(json.dumps(log))
    return folder


def manifest_only(folder: Path, kept: Kept) -> Path:
    """A run folder holding only a manifest that lists ``kept``."""
    files = {name: Entry(episode, 100, "0" * 64, metric, kind_of(name), 1.7e9) for name, episode, metric in kept}
    (folder / "checkpoints").mkdir(parents=True)
    (folder / "checkpoints" / "MANIFEST.json").write_bytes(Manifest(files=files, updated=1.7e9).to_json())
    return folder


@pytest.mark.parametrize("write", [log_only, manifest_only])
def test_the_best_file_of_the_lowest_finite_metric_the_earlier_at_a_tie(write: Writer, tmp_path: Path) -> None:
    best = run_status(str(write(tmp_path / "demo", KEPT)), now=1.7e9)["best"]
    assert best is not None
    assert (best["file"], best["episode"], best["value"]) == ("best-e000004.ckpt", 4, 0.25)


@pytest.mark.parametrize("write", [log_only, manifest_only])
def test_no_best_without_a_best_file_with_a_metric(write: Writer, tmp_path: Path) -> None:
    kept = [("last.ckpt", 9, 0.01), ("best-e000008.ckpt", 8, None)]
    assert run_status(str(write(tmp_path / "demo", kept)), now=1.7e9)["best"] is None
