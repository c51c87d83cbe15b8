"""The real notebook, executed headless top to bottom in its CI mode, twice: it trains, exports and then continues."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import pytest

nbclient = pytest.importorskip("nbclient")
nbformat = pytest.importorskip("nbformat")
pytest.importorskip("ipykernel")

from conftest import REPO  # noqa: E402

pytestmark = pytest.mark.slow  # trains in subprocesses or over several sessions: out of the quick loop

NOTEBOOK = REPO / "notebooks" / "Atheria_Progressive_Training.ipynb"
CELL_TIMEOUT_S = 300
EXPORTS = ("live_loss.png", "summary.png", "report.md", "training_log.json", "model.ts", "psi_rollout.png")


def _execute(env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> tuple[Any, str]:
    """Run every cell of the notebook file in a fresh kernel; returns the executed notebook and all its text output.

    The kernel inherits this process's environment, and jupyter_client starts the ``python3`` kernel with
    ``sys.executable``: the Python running the tests, so it imports this checkout's ``atheria_lightning``.
    """
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(
        notebook,
        timeout=CELL_TIMEOUT_S,
        kernel_name="python3",
        resources={"metadata": {"path": str(NOTEBOOK.parent)}},  # Jupyter starts in the notebook's folder
    )
    client.execute()
    return notebook, _text_of(notebook)


def _text_of(notebook: Any) -> str:
    parts = []
    for cell in notebook.cells:
        for output in cell.get("outputs", []):
            parts.append(output.get("text", ""))
            parts.append(output.get("data", {}).get("text/plain", ""))
    return "\n".join(parts)


def _images_in(cell: Any) -> int:
    return sum("image/png" in output.get("data", {}) for output in cell.get("outputs", []))


def test_notebook_is_committed_clean() -> None:
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(notebook)
    code_cells = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert all(not cell.outputs and cell.execution_count is None for cell in code_cells), "clear the outputs"
    assert "ATHERIA_NOTEBOOK_CI" in code_cells[0].source, "the first code cell reads the CI switch"


def test_notebook_runs_top_to_bottom_then_continues(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    run_root = tmp_path / "runs"
    env = {"ATHERIA_NOTEBOOK_CI": "1", "ATHERIA_NOTEBOOK_RUN_ROOT": str(run_root), "OMP_NUM_THREADS": "1"}

    started = time.monotonic()
    notebook, text = _execute({**env, "ATHERIA_NOTEBOOK_EPISODES": "6"}, monkeypatch)
    first_run_s = time.monotonic() - started
    exports = run_root / "demo" / "exports"
    for name in EXPORTS:
        assert (exports / name).is_file() and (exports / name).stat().st_size > 0, name
    assert f"python: {sys.prefix}" in text, "the kernel is the Python running the tests"
    train_cell = next(cell for cell in notebook.cells if "exit_code = main(ARGS)" in cell.source)
    assert _images_in(train_cell) >= 1, "the live loss plot and the summary are shown in the training cell"
    assert "curriculum skipped" in text
    assert (tmp_path / "runs_mirror" / "demo" / "checkpoints" / "MANIFEST.json").is_file(), "mirrored"
    first_log = json.loads((exports / "training_log.json").read_text())
    assert [row["episode"] for row in first_log["episodes"]] == list(range(6))

    # "Run all" again, with more episodes: the same run continues from its checkpoint.
    _, text = _execute({**env, "ATHERIA_NOTEBOOK_EPISODES": "8"}, monkeypatch)
    assert "resuming from episode 6 of 8" in text
    log = json.loads((exports / "training_log.json").read_text())
    assert [row["episode"] for row in log["episodes"]] == list(range(8))
    assert log["time"]["sessions"] == 2
    assert "atheria fit ended with exit code" not in text
    print(f"first notebook run: {first_run_s:.1f} s")
