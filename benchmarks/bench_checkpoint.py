"""What one checkpoint save costs as a run grows long: JSON lines, one per history length and format.

A 24-hour run records tens of thousands of episodes, and ``TrainingLog`` keeps every one of them in the
checkpoint so that a resumed run keeps its whole history. This measures, on the demo preset with every callback (as
``atheria fit --config configs/demo.yaml`` runs it), a save of ``last.ckpt`` after a history of N episodes:

- ``train_thread_ms``: what the training loop waits for in a real save (``RunStore.save(trainer, "last", episode)``:
  Lightning gathers the state, the run store serializes it with ``torch.save`` into memory, tensors on the CPU,
  then queues the write);
- ``writer_ms``: the wait in ``RunStore.wait()`` right after that, for the store's background write (the file,
  fsync, sha256, ``MANIFEST.json``); the writer thread starts as soon as the write is queued, so this is what is
  left of it then, at most the whole write;
- ``file_mb``: the size of ``<run>/checkpoints/last.ckpt``.

``history: tensors`` is this version (one tensor per column); ``history: lists`` stores the same history as lists
of floats, as versions before 2026-11-26 did, measured in the same run for comparison.

Usage, from the repository root::

    PYTHONPATH=. .venv/bin/python benchmarks/bench_checkpoint.py --episodes 0,1000,10000,100000
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning_utilities.core.apply_func import apply_to_collection

from atheria_lightning.callbacks import TrainingLog
from atheria_lightning.cli import AtheriaCLI
from atheria_lightning.store import RunStore

REPO = Path(__file__).resolve().parents[1]


class SaveProbe(Callback):
    """At the first batch end: for each history length and format, time ``repeats`` saves of ``last.ckpt`` through
    the run's ``store`` (as ``SmartCheckpoint`` saves it), then stop."""

    def __init__(self, lengths: list[int], repeats: int, store: RunStore) -> None:
        self.lengths = lengths
        self.repeats = repeats
        self.store = store
        self.rows: list[dict[str, Any]] = []

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, *args: Any) -> None:
        report = next(c for c in trainer.callbacks if isinstance(c, TrainingLog))
        store = self.store
        last = os.path.join(store.checkpoint_dir, "last.ckpt")
        as_tensors = report.state_dict
        for length in self.lengths:
            fill(report, length)
            for history in ("tensors", "lists"):
                report.state_dict = as_tensors if history == "tensors" else as_lists(as_tensors)  # type: ignore[method-assign]
                train, writer, size = [], [], 0
                for _ in range(self.repeats):
                    start = time.perf_counter()
                    store.save(trainer, "last", episode=length)
                    queued = time.perf_counter()
                    store.wait()
                    train.append(queued - start)
                    writer.append(time.perf_counter() - queued)
                    store.raise_write_error()
                    size = os.path.getsize(last)
                self.rows.append({"episodes": length, "history": history,
                                  "train_thread_ms": round(statistics.median(train) * 1e3, 2),
                                  "writer_ms": round(statistics.median(writer) * 1e3, 2),
                                  "file_mb": round(size / 2**20, 3)})  # fmt: skip
        report.state_dict = as_tensors  # type: ignore[method-assign]
        trainer.should_stop = True


def fill(report: TrainingLog, episodes: int) -> None:
    """A history of ``episodes`` episodes, a validation and a save every 10, in place of the real one."""
    report.episodes = {
        "episode": list(range(episodes)),
        **{key: [0.1 + 1e-6 * i for i in range(episodes)] for key in list(report.episodes)[1:]},
    }
    validated = list(range(0, episodes, 10))
    report.validations = {
        "episode": validated,
        **{key: [0.2 + 1e-6 * i for i in validated] for key in list(report.validations)[1:]},
    }
    report.saved_episodes = list(validated)


def as_lists(state_dict: Any) -> Any:
    return lambda: apply_to_collection(state_dict(), torch.Tensor, torch.Tensor.tolist)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--episodes", default="0,1000,10000,100000", help="history lengths, comma-separated")
    parser.add_argument("--repeats", type=int, default=5, help="saves per length and format (median)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    lengths = [int(value) for value in args.episodes.split(",")]
    with tempfile.TemporaryDirectory() as folder, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cli = AtheriaCLI(
            args=["--config", str(REPO / "configs" / "demo.yaml"), "--run_root", f"{folder}/runs",
                  "--mirror_url", f"{folder}/mirror", "--resume", "never", "--data.total_episodes", "5"],
            run=False,
        )  # fmt: skip
        assert cli.store is not None
        probe = SaveProbe(lengths, args.repeats, cli.store)
        cli.trainer.callbacks.append(probe)
        with open(os.devnull, "w") as sink, contextlib.redirect_stdout(sink):
            cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    device = f"{platform.processor() or platform.machine()} ({os.cpu_count()} cores), torch {torch.__version__}"
    for row in probe.rows:
        print(json.dumps({"device": device, "config": "demo", **row}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
