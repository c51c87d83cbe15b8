"""The plot process: draws the live plot beside training, exactly as in-process, and never outlives or fails it."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from atheria_lightning.figures import PlotProcess, loss_figure, png_bytes

REPO = Path(__file__).resolve().parents[1]
EPISODES = {"episode": list(range(120)), "loss": [1.0 / (1 + episode) for episode in range(120)]}
VALIDATIONS = {"episode": [10, 20, 30], "loss": [0.5, 0.25, float("nan")]}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    status = Path(f"/proc/{pid}/stat")
    return not (status.exists() and status.read_text().split(")")[-1].split()[0] == "Z")  # a zombie is gone


def test_the_figures_module_imports_neither_torch_nor_lightning() -> None:
    # The plot process imports this module: torch would cost it seconds and hundreds of MB.
    code = "import sys, atheria_lightning.figures; print(sorted({'torch', 'lightning'} & set(sys.modules)))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True)
    assert result.stdout.strip() == "[]"


def test_the_plot_process_draws_the_same_png_as_drawing_here() -> None:
    plotter = PlotProcess()
    try:
        png = plotter.loss_png(EPISODES, VALIDATIONS, total=200, phase="Fase1")
        child = plotter.drawn_by
        again = plotter.loss_png(EPISODES, VALIDATIONS, total=200, phase="Fase1")
    finally:
        plotter.close()
    assert child is not None and child != os.getpid(), "drawn in another process"
    assert plotter.drawn_by == child, "one process for every plot of a fit"
    expected = png_bytes(loss_figure(EPISODES, VALIDATIONS, total=200, phase="Fase1"))
    assert png == again == expected, "the columns, total and phase reach the process unchanged"
    assert not plotter.failed


def test_close_ends_the_plot_process() -> None:
    plotter = PlotProcess()
    plotter.loss_png(EPISODES, VALIDATIONS)
    child = plotter.drawn_by
    plotter.close()
    assert child is not None and not _alive(child)


def test_a_plot_process_that_cannot_start_leaves_the_plot_to_this_process(caplog: pytest.LogCaptureFixture) -> None:
    plotter = PlotProcess(command=[sys.executable, "-c", "import sys; sys.exit(3)"])
    with caplog.at_level(logging.WARNING, logger="atheria_lightning.figures"):
        first = plotter.loss_png(EPISODES, VALIDATIONS, total=200)
        second = plotter.loss_png(EPISODES, VALIDATIONS, total=200)
    assert first.startswith(b"\x89PNG") and first == second
    assert plotter.failed and plotter.drawn_by == os.getpid()
    warnings = [record.getMessage() for record in caplog.records]
    assert len(warnings) == 1 and "the live-plot process failed" in warnings[0], "one warning, not one per plot"


@pytest.mark.slow
def test_a_killed_plot_process_is_started_again_at_the_next_plot() -> None:
    plotter = PlotProcess()
    try:
        plotter.loss_png(EPISODES, VALIDATIONS)
        first = plotter.drawn_by
        assert first is not None
        os.kill(first, signal.SIGKILL)
        plotter._child.wait(10)
        png = plotter.loss_png(EPISODES, VALIDATIONS)
    finally:
        plotter.close()
    assert png.startswith(b"\x89PNG") and plotter.drawn_by not in (first, os.getpid()) and not plotter.failed


@pytest.mark.slow
def test_the_plot_process_ends_when_the_training_process_is_killed(tmp_path: Path) -> None:
    # A platform kills the training without warning: no plot process may stay behind holding memory.
    script = textwrap.dedent("""
        import os, sys, time
        from atheria_lightning.figures import PlotProcess
        plotter = PlotProcess()
        plotter.loss_png({"episode": [0, 1], "loss": [1.0, 0.5]}, {"episode": [], "loss": []})
        print(plotter.drawn_by, flush=True)
        time.sleep(60)
    """)
    training = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, cwd=REPO)
    try:
        child = int(training.stdout.readline())
        assert _alive(child)
    finally:
        training.kill()
        training.wait()
    deadline = time.monotonic() + 10.0
    while _alive(child) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(child), "the plot process ended with the training process"
