"""``atheria fit`` killed by SIGKILL at one point of its end-of-session exports, as a lost machine kills it.

Run as a script by tests/test_stale_exports.py: ``python killed_exports_run.py POINT FIT_ARGS...``, where POINT is

- ``training_log.json``: once the final checkpoint is written and listed, before ``training_log.json`` is written;
- ``model.ts``: right after ``exports/model.ts`` is written, before the report;
- ``summary.png``: right after ``exports/summary.png`` is written, before ``report.md``.

The process sends itself SIGKILL there: no handler, no ``finally`` and no flush runs, as on Colab or Kaggle.
"""

from __future__ import annotations

import os
import signal
import sys
from typing import Any

from atheria_lightning import export, report
from atheria_lightning.callbacks import TrainingLog
from atheria_lightning.cli import main

POINTS = ("training_log.json", "model.ts", "summary.png")


def _kill() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def kill_at(point: str) -> None:
    """Patch the function that writes ``point`` to kill this process at that point."""
    if point == "training_log.json":

        def write_log(self: TrainingLog, *args: Any, **kwargs: Any) -> str:
            assert self.store is not None and self.store.wait(), "the final checkpoint is listed before the kill"
            _kill()
            return ""

        TrainingLog.write = write_log  # type: ignore[method-assign]
    elif point == "model.ts":
        export_checkpoint = export.export_checkpoint

        def export_then_kill(*args: Any, **kwargs: Any) -> Any:
            written = export_checkpoint(*args, **kwargs)
            _kill()
            return written

        export.export_checkpoint = export_then_kill
    else:
        write = report._write

        def write_then_kill(fs: Any, path: str, data: bytes, setting: str) -> None:
            write(fs, path, data, setting)
            if path.endswith(f"/{point}"):
                _kill()

        report._write = write_then_kill


if __name__ == "__main__":
    if len(sys.argv) < 2 or sys.argv[1] not in POINTS:
        sys.exit(f"usage: killed_exports_run.py {{{','.join(POINTS)}}} FIT_ARGS...")
    kill_at(sys.argv[1])
    sys.exit(main(sys.argv[2:]))
