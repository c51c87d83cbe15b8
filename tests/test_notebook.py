"""The real notebook, executed headless top to bottom in its CI mode: twice locally in the checkout (it trains,
exports and then continues), and once on the Kaggle path outside any clone, as Kaggle runs it (with the package
installed and --preset; it continues a previous version's run from a read-only input, logging to W&B offline)."""

from __future__ import annotations

import importlib.util
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import pytest

nbclient = pytest.importorskip("nbclient")
nbformat = pytest.importorskip("nbformat")
pytest.importorskip("ipykernel")

from conftest import REPO, Sink, make_read_only, snapshot  # noqa: E402

pytestmark = pytest.mark.slow  # trains in subprocesses or over several sessions: out of the quick loop

NOTEBOOK = REPO / "notebooks" / "Atheria_Progressive_Training.ipynb"
CELL_TIMEOUT_S = 300
EXPORTS = ("live_loss.png", "summary.png", "report.md", "training_log.json", "model.ts", "psi_rollout.png")


def _execute(env: dict[str, str], monkeypatch: pytest.MonkeyPatch, folder: Path = NOTEBOOK.parent) -> tuple[Any, str]:
    """Run every cell of the notebook file in a fresh kernel; returns the executed notebook and all its text output.

    The kernel inherits this process's environment, and jupyter_client starts the ``python3`` kernel with
    ``sys.executable``: the Python running the tests, so it imports this checkout's ``atheria_lightning``. It starts
    in ``folder``, as Jupyter starts in the notebook's folder: ``notebooks/`` of the checkout unless said otherwise.
    """
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(
        notebook, timeout=CELL_TIMEOUT_S, kernel_name="python3", resources={"metadata": {"path": str(folder)}}
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


def test_notebook_runs_top_to_bottom_then_continues(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, sink: Sink
) -> None:
    run_root = tmp_path / "runs"
    env = {"ATHERIA_NOTEBOOK_CI": "1", "ATHERIA_NOTEBOOK_RUN_ROOT": str(run_root), "OMP_NUM_THREADS": "1"}

    notify = importlib.util.find_spec("apprise") is not None  # the notify extra: NOTIFY reaches a local service
    started = time.monotonic()
    notify_env = {"ATHERIA_NOTEBOOK_NOTIFY": sink.url} if notify else {}
    notebook, text = _execute({**env, "ATHERIA_NOTEBOOK_EPISODES": "6", **notify_env}, monkeypatch)
    first_run_s = time.monotonic() - started
    exports = run_root / "demo" / "exports"
    for name in EXPORTS:
        assert (exports / name).is_file() and (exports / name).stat().st_size > 0, name
    assert f"python: {sys.prefix}" in text, "the kernel is the Python running the tests"
    train_cell = next(cell for cell in notebook.cells if "exit_code = main(ARGS)" in cell.source)
    assert _images_in(train_cell) >= 1, "the live loss plot and the summary are shown in the training cell"
    assert "curriculum skipped" in text
    if notify:  # the session's end reached the service, and the printed command hides the URL
        assert [message["title"] for message in sink.received] == ["atheria demo: finished"]
        assert "--notify <url>" in text and sink.url not in text
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


def _ci_settings(env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """The notebook's settings in CI mode: its first code cell, run here with ``env``."""
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    settings: dict[str, Any] = {}
    exec(next(cell for cell in notebook.cells if cell.cell_type == "code").source, settings)
    return settings


def test_notebook_on_kaggle_continues_the_previous_versions_output(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from atheria_lightning.cli import main

    # The previous version: the notebook's own CI settings trained 4 episodes, its /kaggle/working now an input.
    previous = _ci_settings({"ATHERIA_NOTEBOOK_CI": "1", "ATHERIA_NOTEBOOK_EPISODES": "4"}, monkeypatch)
    experiment = "demo"  # the demo preset's experiment_name, which the notebook uses in CI mode
    previous_root = tmp_path / "previous_working" / "atheria_runs"
    args = ["fit", "--preset", previous["PRESET"], "--run_root", str(previous_root), "--mirror_url", "null",
            "--data.total_episodes", "4", "--trainer.enable_progress_bar", "false", *previous["OVERRIDES"]]  # fmt: skip
    assert main(args) == 0
    input_root = tmp_path / "input"
    attached = input_root / "atheria-notebook" / "atheria_runs" / experiment
    shutil.copytree(previous_root / experiment, attached)
    make_read_only(input_root)
    before = snapshot(input_root)

    # Kaggle runs the notebook alone in /kaggle/working, not in a clone: it uses the package importable in the kernel
    # (here this checkout's) and its presets by name.
    working = tmp_path / "working"
    working.mkdir()
    run_root = working / "atheria_runs"
    env = {"ATHERIA_NOTEBOOK_CI": "1", "ATHERIA_NOTEBOOK_RUN_ROOT": str(run_root), "ATHERIA_NOTEBOOK_EPISODES": "6",
           "OMP_NUM_THREADS": "1", "KAGGLE_KERNEL_RUN_TYPE": "Interactive",
           "ATHERIA_KAGGLE_INPUT": str(input_root)}  # fmt: skip
    # Kaggle without internet, on the W&B path: no API key, so the run is recorded offline in the run folder.
    wandb = importlib.util.find_spec("wandb") is not None
    if wandb:
        env["ATHERIA_NOTEBOOK_WANDB"] = "1"
        for var in ("WANDB_API_KEY", "WANDB_MODE"):
            monkeypatch.delenv(var, raising=False)
        for var in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
            env[var] = str(tmp_path / "wandb-home" / var.lower())
    notebook, text = _execute(env, monkeypatch, folder=working)

    assert f"platform: kaggle; working folder: {working}\n" in text, "no clone found: no change of folder"
    last = attached / "checkpoints" / "last.ckpt"
    assert f"resuming from episode 4 of 6 (67%) [kaggle input: {last}, copied to: " in text
    tensorboard_cell = next(cell for cell in notebook.cells if "load_ext" in cell.source)
    outputs = tensorboard_cell.get("outputs", [])
    assert [output.get("output_type") for output in outputs] == ["stream"], "no %tensorboard panel on Kaggle"
    if wandb:  # the notebook and the run's summary name the logger in use, W&B, and how to upload it
        assert "Weights & Biases: the training cell prints the run id" in outputs[0]["text"]
        assert "W&B: offline (no API key)" in text and "W&B: run " in text
        assert f"W&B (offline): wandb sync {run_root / experiment / 'logs' / 'wandb'}" in text
        assert "TensorBoard: tensorboard --logdir" not in text
        assert list((run_root / experiment / "logs" / "wandb").glob("offline-run-*")), "W&B's files in the run"
    else:
        assert "TensorBoard does not render on Kaggle" in outputs[0]["text"]
        assert f"{run_root / experiment / 'logs'}" in outputs[0]["text"]
    assert snapshot(input_root) == before, "the input is never written"
    log = json.loads((run_root / experiment / "exports" / "training_log.json").read_text())
    assert [row["episode"] for row in log["episodes"]] == list(range(6)), "the previous version's history came along"
    assert "atheria fit ended with exit code" not in text
