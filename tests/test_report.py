"""TrainingLog, LivePlot, `atheria report`, export_best: every episode across sessions, plots, report, model."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import threading
import time
import types
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest import REPO, FakeEpisodeClock, demo_args, plain_state, run_dir
from fsspec.implementations.memory import MemoryFileSystem
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import Callback
from lightning_utilities.core.apply_func import apply_to_collection

from atheria_lightning import export, report
from atheria_lightning.callbacks import LivePlot, SmartCheckpoint, TimeLimitGuard, TrainingLog
from atheria_lightning.callbacks.training_log import STATE_KEY, _append
from atheria_lightning.cli import main
from atheria_lightning.data import EpisodeDataModule
from atheria_lightning.errors import ConfigError
from atheria_lightning.figures import MAX_PLOTTED_POINTS, loss_figure, summary_figure
from atheria_lightning.module import QCAModule
from atheria_lightning.store import RunStore

# A second --config replaces the demo's whole callback list, so the checkpoint callback is listed again.
REPORT_CALLBACKS = """trainer:
  callbacks:
    - class_path: atheria_lightning.callbacks.TimeLimitGuard
      init_args: {max_hours: 0.25}
    - class_path: atheria_lightning.callbacks.SmartCheckpoint
      init_args: {top_k: 2, every_n_episodes: 2}
    - class_path: atheria_lightning.callbacks.training_log.TrainingLog
      init_args: {phase: Fase1_Vacuum_Stability}
    - class_path: atheria_lightning.callbacks.live_plot.LivePlot
      init_args: {plot_every_n_episodes: 3}
"""


def _read_log(exports: Path) -> dict[str, Any]:
    return json.loads((exports / "training_log.json").read_text())


@pytest.mark.slow
def test_the_log_covers_every_episode_across_a_resume_and_the_report_is_complete(tmp_path: Path) -> None:
    config = tmp_path / "report.yaml"
    config.write_text(REPORT_CALLBACKS)

    def fit(*extra: str) -> int:
        return main(demo_args(tmp_path, "--config", str(config), *extra, episodes=6, val_every=2, mirror=False))

    assert fit("--trainer.max_steps", "3") == 0  # session 1 ends after 3 of 6 episodes
    exports = run_dir(tmp_path) / "exports"
    first = _read_log(exports)
    assert [row["episode"] for row in first["episodes"]] == [0, 1, 2]
    assert fit() == 0  # session 2 resumes from last.ckpt and finishes

    log = _read_log(exports)
    assert [row["episode"] for row in log["episodes"]] == list(range(6))
    assert log["episodes"][:3] == first["episodes"], "session 1's records come back from the checkpoint"
    assert all(isinstance(row[key], float) for row in log["episodes"] for key in ("loss", "survival", "noise_level"))
    assert [v["episode"] for v in log["validations"]] == [2, 4, 6]
    assert [(s["session"], s["first_episode"], s["episodes"]) for s in log["sessions"]] == [(1, 0, 3), (2, 3, 3)]
    assert log["time"]["sessions"] == 2 and log["time"]["episodes_per_second"] > 0
    assert log["config"]["model"]["hidden_channels"] == 4 and log["config"]["data"]["total_episodes"] == 6
    assert {entry["kind"] for entry in log["checkpoints"]} == {"last", "best"}

    assert (exports / "summary.png").read_bytes().startswith(b"\x89PNG")
    assert (exports / "live_loss.png").read_bytes().startswith(b"\x89PNG")
    assert len(summary_figure(log).axes) == 4  # the builder that drew summary.png, from the same log

    best = log["best"]
    text = (exports / "report.md").read_text()
    assert log["monitor"] == "val/loss" and "Checkpoints are ranked by `val/loss`" in text
    assert f"| {best['val_loss']:.4g} | {best['val_loss_episode']} |" in text
    assert f"| {best['val_combined']:.4g} | {best['val_combined_episode']} |" in text
    assert "Phase: **Fase1_Vacuum_Stability**" in text and "episodes per second" in text

    exported = log["exported_model"]
    best_file = min((e for e in log["checkpoints"] if e["kind"] == "best"), key=lambda entry: entry["metric"])
    assert exported["from_checkpoint"] == best_file["file"] and exported["method"] == "script"
    # The best file is the one with the lowest val/loss the run validated, and the report says why it was chosen.
    assert best_file["metric"] == min(v["loss"] for v in log["validations"] if v["episode"] in {2, 4, 6})
    assert f"The exported model is {best_file['file']} (episode {best_file['episode']}): the lowest val/loss" in text
    metadata = export.load_metadata(exports / "model.ts")
    assert (metadata["architecture"], metadata["hidden_channels"]) == ("UNET", 4)


class JumpClock(Callback):
    """Moves a fake clock past the time budget after ``at_episode`` episodes, as a long session would."""

    def __init__(self, at_episode: int) -> None:
        self.now = 0.0
        self.at_episode = at_episode

    def clock(self) -> float:
        return self.now

    def on_train_batch_end(self, trainer: Trainer, *args: Any) -> None:
        if trainer.global_step == self.at_episode:
            self.now = 10_000.0  # past 90% of a 1 h budget


class FakeNotebook:
    """Stands in for IPython inside a notebook kernel and records what is displayed."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.shown: list[int] = []
        self.updates: list[int] = []
        ipython = types.ModuleType("IPython")
        ipython.get_ipython = lambda: types.SimpleNamespace(kernel=object())
        ipython.version_info = (9, 0, 0)  # matplotlib reads it when it makes the process's first canvas
        display = types.ModuleType("IPython.display")
        display.Image = lambda data: len(data)
        display.display = self.display
        monkeypatch.setitem(sys.modules, "IPython", ipython)
        monkeypatch.setitem(sys.modules, "IPython.display", display)

    def display(self, image: int, display_id: bool = False) -> Any:
        assert display_id, "the picture must be updated in place, not appended"
        self.shown.append(image)
        return types.SimpleNamespace(update=self.updates.append)


@pytest.mark.slow
def test_an_emergency_stop_writes_the_log_and_its_checkpoint_holds_every_episode(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    notebook = FakeNotebook(monkeypatch)
    jump = JumpClock(at_episode=3)
    guard = TimeLimitGuard(max_hours=1.0).use_clock(jump.clock)
    store = RunStore(tmp_path)
    training_log = TrainingLog().use_clock(jump.clock).use_store(store)
    live_plot = LivePlot(plot_every_n_episodes=1, min_plot_interval_s=0).use_clock(jump.clock).use_log(training_log)
    # The guard comes before the log: it only stops the run; SmartCheckpoint, a checkpoint callback and so run last,
    # saves the episode after every callback recorded it.
    trainer = Trainer(max_epochs=-1, logger=False, default_root_dir=str(tmp_path), val_check_interval=2,
                      check_val_every_n_epoch=None, enable_progress_bar=False, enable_model_summary=False,
                      num_sanity_val_steps=0, plugins=[store.checkpoint_io],
                      callbacks=[jump, guard, training_log, live_plot,
                                 SmartCheckpoint(every_n_episodes=100).use_store(store)])  # fmt: skip
    model = QCAModule(architecture="MLP", d_state=2, hidden_channels=4, grid_size=8, qca_steps=2)
    trainer.fit(model, datamodule=EpisodeDataModule(total_episodes=20, val_every_episodes=2))
    assert guard.stopped_early

    log = _read_log(tmp_path / "exports")
    assert [row["episode"] for row in log["episodes"]] == [0, 1, 2] and log["episodes_done"] == 3
    assert log["sessions"][0]["training_seconds"] == 10_000.0, "time per session, by the log's clock"
    assert log["exported_model"] is None and not (tmp_path / "exports" / "model.ts").exists(), "no export in fit"
    # Live plots are drawn in the background: those asked for while one draws are dropped, so 1 to 4 of them
    # (episodes 1, 2, 3 and the final redraw) are shown, all in one place.
    assert len(notebook.shown) == 1 and len(notebook.updates) <= 3, "the live plots, in one place"
    assert (tmp_path / "exports" / "live_loss.png").read_bytes().startswith(b"\x89PNG")

    checkpoint = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    # The key TrainingReport wrote before the split: its checkpoints resume into TrainingLog.
    assert training_log.state_key == STATE_KEY == "TrainingReport"
    state = checkpoint["callbacks"]["TrainingReport"]
    assert state["episodes"]["episode"].tolist() == [0, 1, 2], "the episode the guard stopped at is in its checkpoint"
    twin = TrainingLog()
    twin.load_state_dict(state)
    assert plain_state(twin.state_dict()) == plain_state(state)

    # After training, as atheria fit does it: the store's best checkpoint to model.ts, then summary.png and report.md.
    exported = export.export_best(store, tmp_path / "exports")
    store.close()
    # The validations after episodes 2 and 3 (the stop) made best checkpoints: the lower val/loss is exported.
    bests = {name: entry.metric for name, entry in store.entries().items() if entry.kind == "best"}
    assert exported is not None and exported["from_checkpoint"] == min(bests, key=bests.__getitem__)
    assert export.load_metadata(tmp_path / "exports" / "model.ts")["architecture"] == "MLP"
    written = report.write_report(str(tmp_path), exported_model=exported)
    assert written == str(tmp_path / "exports" / "report.md")
    assert _read_log(tmp_path / "exports")["exported_model"] == exported, "recorded in the log for later redraws"
    text = (tmp_path / "exports" / "report.md").read_text()
    assert f"| exported model `exports/model.ts` | from {exported['from_checkpoint']}" in text
    assert "| `exports/model.ts` |" in text
    assert (tmp_path / "exports" / "summary.png").read_bytes().startswith(b"\x89PNG")


def test_export_best_of_a_run_without_checkpoints_is_none_and_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level("WARNING", logger="atheria_lightning.export"):
        assert export.export_best(RunStore(tmp_path), tmp_path / "exports") is None
    assert "no sound checkpoint" in caplog.text and not (tmp_path / "exports" / "model.ts").exists()


def _minimal_log() -> dict[str, Any]:
    """A training_log.json as TrainingLog writes it, shortened: two episodes, one validation, one checkpoint."""
    return {
        "format_version": 1, "experiment": "demo", "run_dir": "/content/atheria_runs/demo", "phase": None,
        "written_at": "2026-12-05T10:00:00+00:00", "episodes_done": 2, "total_episodes": 4,
        "config": {"model": {"architecture": "UNET"}, "data": {"total_episodes": 4}, "trainer": {}},
        "time": {"sessions": 1, "total_training_hours": 0.001, "episodes_per_second": 0.5},
        "sessions": [{"session": 1, "first_episode": 0, "last_episode": 1, "episodes": 2, "training_seconds": 4.0}],
        "best": {"val_combined": 2.5, "val_combined_episode": 2, "train_loss": 1.0, "train_loss_episode": 1,
                 "last_episode": 1, "last_train_loss": 1.0, "last_train_survival": 0.2},
        "checkpoints": [{"file": "last.ckpt", "kind": "last", "episode": 2, "metric": 2.5, "size": 1_000_000}],
        "saved_episodes": [2], "exported_model": None,
        "episodes": [{"episode": 0, "loss": 2.0, "survival": 0.2, "symmetry": 0.1, "complexity": 1.0,
                      "noise_level": 0.0},
                     {"episode": 1, "loss": 1.0, "survival": 0.2, "symmetry": None, "complexity": 1.0,
                      "noise_level": 0.0}],
        "validations": [{"episode": 2, "combined": 2.5, "survival": 0.2, "symmetry": 0.1, "complexity": 1.0}],
    }  # fmt: skip


def test_atheria_report_redraws_summary_and_report_from_the_log_alone(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    mirror = tmp_path / "mirror" / "demo"  # a mirror copy: no checkpoints, no model, only the exports
    (mirror / "exports").mkdir(parents=True)
    (mirror / "exports" / "training_log.json").write_text(json.dumps(_minimal_log(), indent=1))
    assert report.main([str(mirror)]) == 0
    assert capsys.readouterr().out.strip() == f"report: {mirror / 'exports' / 'report.md'} (summary.png beside it)"
    text = (mirror / "exports" / "report.md").read_text()
    assert "# Atheria training report: demo" in text
    # A log written before the monitor was recorded: its checkpoints were ranked by val/combined.
    assert "| best val/combined (the original's score; lower is better) | 2.5 | 2 |" in text
    assert "Checkpoints are ranked by `val/combined`" in text
    assert "| episodes | 2 of 4 (50%) |" in text and "| last.ckpt | last | 2 | 2.5 | 1.00 MB |" in text
    assert "| `exports/summary.png` |" in text and "| `exports/training_log.json` |" in text
    assert "live_loss.png" not in text and "model.ts" not in text, "only the files there are listed"
    assert (mirror / "exports" / "summary.png").read_bytes().startswith(b"\x89PNG")

    elsewhere = tmp_path / "elsewhere"
    assert report.main([str(mirror), "--output", str(elsewhere)]) == 0
    assert (elsewhere / "report.md").read_text() == text, "the same report, in another folder"
    assert (elsewhere / "summary.png").is_file()


def test_write_report_reads_and_writes_any_fsspec_folder() -> None:
    fs = MemoryFileSystem()
    fs.pipe("/atheria-report-test/demo/exports/training_log.json", json.dumps(_minimal_log()).encode())
    try:
        written = report.write_report("memory://atheria-report-test/demo")
        assert written == "memory:///atheria-report-test/demo/exports/report.md"
        assert fs.cat_file("/atheria-report-test/demo/exports/summary.png").startswith(b"\x89PNG")
    finally:
        fs.rm("/atheria-report-test", recursive=True)


@pytest.mark.parametrize(
    ("content", "reason"),
    [(None, "has no exports/training_log.json"), ("{not json", "cannot be read"), ("[1, 2]", "is not a training log")],
)
def test_atheria_report_without_a_readable_log_is_a_one_line_error(
    tmp_path: Path, capsys: pytest.CaptureFixture, content: str | None, reason: str
) -> None:
    run = tmp_path / "demo"
    if content is not None:
        (run / "exports").mkdir(parents=True)
        (run / "exports" / "training_log.json").write_text(content)
    assert report.main([str(run)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"atheria: error: RUN_DIR={str(run)!r}") and reason in err[0]
    assert not (run / "exports" / "report.md").exists()


@pytest.mark.slow
def test_the_callbacks_import_neither_the_module_nor_the_export() -> None:
    # Exporting the model is the CLI's job after training: a callback talks to the module through Lightning only.
    code = "import sys, atheria_lightning.callbacks; print(sorted(m for m in sys.modules if m.startswith("
    code += "('atheria_lightning.module', 'atheria_lightning.export', 'atheria_lightning.physics'))))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True)
    assert result.stdout.strip() == "[]"


def test_outside_a_notebook_showing_a_plot_does_not_import_ipython(monkeypatch: pytest.MonkeyPatch) -> None:
    # A notebook kernel has imported IPython already; a script would pay for the import on the training thread.
    for name in [name for name in sys.modules if name == "IPython" or name.startswith("IPython.")]:
        monkeypatch.delitem(sys.modules, name)
    LivePlot(show_inline=None)._show(b"\x89PNG")
    assert "IPython" not in sys.modules


def test_the_checkpointed_history_costs_the_same_to_save_after_10_or_10000_episodes() -> None:
    # Lightning walks every object of a checkpoint on the training thread before a save, and pickles each one: a
    # history kept as lists of floats made each save of a long run slower.
    def objects_in_state(episodes: int) -> int:
        training_log = TrainingLog()
        for episode in range(episodes):
            _append(training_log.episodes, episode, [0.5] * 5)
            if episode % 10 == 0:
                _append(training_log.validations, episode, [0.5] * 5)
                training_log.saved_episodes.append(episode)
        visited = []
        apply_to_collection(training_log.state_dict(), (int, float, str, torch.Tensor), visited.append)
        return len(visited)

    assert objects_in_state(10_000) == objects_in_state(10)


def test_a_checkpoint_of_an_earlier_version_with_lists_still_resumes_its_history() -> None:
    training_log = TrainingLog()
    training_log.load_state_dict({
        "episodes": {"episode": [0, 1], **{key: [1.0, math.nan] for key in ("loss", "survival", "symmetry",
                                                                          "complexity", "noise_level")}},
        "validations": {"episode": [2], **{key: [2.0] for key in ("combined", "survival", "symmetry", "complexity")}},
        "saved_episodes": [2],
        "sessions": [],
    })  # fmt: skip
    state = plain_state(training_log.state_dict())
    assert state["episodes"]["episode"] == [0, 1] and state["episodes"]["loss"][0] == 1.0
    assert math.isnan(state["episodes"]["loss"][1]) and state["validations"]["combined"] == [2.0]
    assert state["saved_episodes"] == [2]


def test_a_resume_from_an_older_checkpoint_forgets_the_episodes_after_it() -> None:
    training_log = TrainingLog()
    training_log.load_state_dict({
        "episodes": {"episode": [0, 1, 2, 3], **{key: [1.0] * 4 for key in ("loss", "survival", "symmetry",
                                                                           "complexity", "noise_level")}},
        "validations": {"episode": [2, 4], **{key: [1.0] * 2 for key in ("combined", "survival", "symmetry",
                                                                        "complexity")}},
        "saved_episodes": [2, 4],
        "sessions": [{"session": 1, "first_episode": 0, "last_episode": 3, "episodes": 4, "training_seconds": 9.0}],
    })  # fmt: skip
    training_log.truncate(2)
    state = plain_state(training_log.state_dict())
    assert state["episodes"]["episode"] == [0, 1] and state["validations"]["episode"] == [2]
    assert state["saved_episodes"] == [2] and len(state["sessions"]) == 1


def test_summary_of_a_run_without_episodes_still_has_four_panels() -> None:
    assert len(summary_figure({"episodes": [], "validations": [], "checkpoints": []}).axes) == 4


def test_a_long_run_plots_a_bounded_number_of_points_and_keeps_its_spikes() -> None:
    # Drawn point by point, a redraw of 100 000 episodes held the training thread's lock for long.
    episodes = 100_000
    loss = [1.0 + 0.1 * (index % 7) for index in range(episodes)]
    loss[54_321] = 50.0  # one bad episode must stay visible
    figure = loss_figure({"episode": list(range(episodes)), "loss": loss}, {"episode": [], "loss": []})
    (axes,) = figure.axes
    band = axes.collections[0].get_paths()[0].vertices
    assert len(band) <= 3 * MAX_PLOTTED_POINTS and band[:, 1].max() == 50.0 and band[:, 1].min() == 1.0
    (average,) = axes.lines
    assert len(average.get_xdata()) <= MAX_PLOTTED_POINTS
    assert 1.25 < float(np.median(average.get_ydata())) < 1.35  # the mean of 1.0 ... 1.6


def test_bad_settings_are_one_line_config_errors() -> None:
    with pytest.raises(ConfigError, match="LivePlot.plot_every_n_episodes=0 must be a positive integer"):
        LivePlot(plot_every_n_episodes=0)
    with pytest.raises(ConfigError, match=r"LivePlot.min_plot_interval_s=-1 must be a number of seconds >= 0"):
        LivePlot(min_plot_interval_s=-1)
    with pytest.raises(ConfigError, match=r"TrainingLog.phase='' must be a one-line name"):
        TrainingLog(phase="")


def test_a_live_plot_without_a_training_log_warns_once_and_draws_nothing(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    trainer = Trainer(max_epochs=-1, logger=False, default_root_dir=str(tmp_path), limit_val_batches=0,
                      enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                      callbacks=[LivePlot(plot_every_n_episodes=1, min_plot_interval_s=0)])  # fmt: skip
    model = QCAModule(architecture="MLP", d_state=2, hidden_channels=4, grid_size=8, qca_steps=2)
    with caplog.at_level("WARNING", logger="atheria_lightning.callbacks.live_plot"):
        trainer.fit(model, datamodule=EpisodeDataModule(total_episodes=2))
    assert trainer.state.finished and caplog.text.count("LivePlot has no TrainingLog to draw from") == 1
    assert not (tmp_path / "exports").exists()


def test_live_redraws_are_at_least_min_plot_interval_s_apart(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Each episode takes 4 s of the fake clock; a redraw is due every episode but allowed every 10 s only.
    clock = FakeEpisodeClock(4.0)
    training_log = TrainingLog().use_clock(clock)
    live_plot = LivePlot(plot_every_n_episodes=1, min_plot_interval_s=10, show_inline=False).use_clock(clock)
    live_plot.use_log(training_log)
    redrawn_at: list[float] = []
    monkeypatch.setattr(live_plot, "_redraw_live_plot", lambda trainer: redrawn_at.append(clock.now))
    trainer = Trainer(max_epochs=-1, logger=False, default_root_dir=str(tmp_path), limit_val_batches=0,
                      enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                      callbacks=[clock, training_log, live_plot])  # fmt: skip
    model = QCAModule(architecture="MLP", d_state=2, hidden_channels=4, grid_size=8, qca_steps=2)
    trainer.fit(model, datamodule=EpisodeDataModule(total_episodes=8))
    assert redrawn_at == [4.0, 16.0, 28.0, 32.0]  # episodes 1, 4 and 7 of 8, then all 8 once more at the end


def test_a_non_finite_episode_is_logged_as_null_not_as_the_previous_loss(tmp_path: Path) -> None:
    from test_callbacks import NaNLoss

    trainer = Trainer(max_epochs=-1, logger=False, default_root_dir=str(tmp_path), enable_progress_bar=False,
                      enable_model_summary=False, limit_val_batches=0,
                      callbacks=[NaNLoss({1}), TrainingLog()])  # fmt: skip
    model = QCAModule(architecture="MLP", d_state=2, hidden_channels=4, grid_size=8, qca_steps=2)
    trainer.fit(model, datamodule=EpisodeDataModule(total_episodes=3))
    rows = _read_log(tmp_path / "exports")["episodes"]
    assert [row["episode"] for row in rows] == [0, 1, 2]
    assert rows[1]["loss"] is None and rows[1]["survival"] is None and rows[1]["noise_level"] == 0.0
    assert isinstance(rows[0]["loss"], float) and isinstance(rows[2]["loss"], float)
    assert sorted(path.name for path in (tmp_path / "exports").iterdir()) == ["training_log.json"], "the log only"


def test_the_training_thread_does_not_wait_for_the_live_plot(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A live plot that takes long to draw holds up neither the episodes nor (beyond its own drawing) the end; it is
    drawn by the plot process, which shares no interpreter lock with training."""
    from atheria_lightning.figures import PlotProcess

    release, drawing_threads, drawn_by = threading.Event(), [], []
    draw = PlotProcess.loss_png

    def slow_loss_png(plotter: PlotProcess, *args: Any, **kwargs: Any) -> bytes:
        drawing_threads.append(threading.current_thread())
        release.wait(timeout=20.0)  # until the training thread has run on
        png = draw(plotter, *args, **kwargs)
        drawn_by.append(plotter.drawn_by)
        return png

    class ReleaseAfter(Callback):
        def on_train_batch_end(self, trainer: Trainer, *args: Any) -> None:
            if trainer.global_step == 5:
                release.set()  # reached while the first plot is still drawing: training did not wait for it

    monkeypatch.setattr(PlotProcess, "loss_png", slow_loss_png)
    training_log = TrainingLog()
    live_plot = LivePlot(plot_every_n_episodes=1, show_inline=False).use_log(training_log)
    trainer = Trainer(max_epochs=-1, logger=False, default_root_dir=str(tmp_path), limit_val_batches=0,
                      enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                      num_sanity_val_steps=0, callbacks=[training_log, live_plot, ReleaseAfter()])  # fmt: skip
    model = QCAModule(architecture="MLP", d_state=2, hidden_channels=4, grid_size=8, qca_steps=2)
    started = time.monotonic()
    trainer.fit(model, datamodule=EpisodeDataModule(total_episodes=8))
    assert release.is_set() and time.monotonic() - started < 20.0, "the episodes ran on while the plot was drawing"
    assert drawing_threads and threading.main_thread() not in drawing_threads, "handed off the training thread"
    assert drawn_by and os.getpid() not in drawn_by, "drawn in the plot process"
    assert len(drawing_threads) < 8, "redraws asked for while one was drawing are dropped"
    assert live_plot._plotter is None, "the plot process ends with fit"
    assert (tmp_path / "exports" / "live_loss.png").read_bytes().startswith(b"\x89PNG"), "finished by the end of fit"
