"""TrainingReport: a live loss plot while training, then summary.png, training_log.json, report.md and model.ts."""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import threading
import time
from bisect import bisect_left
from collections.abc import Callable
from datetime import datetime, timezone
from typing import Any

import lightning.pytorch as pl
import torch
from fsspec.implementations.local import LocalFileSystem
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.trainer.states import TrainerFn
from typing_extensions import override

from atheria_lightning.data import EpisodeDataModule, episodes_done, total_episodes
from atheria_lightning.errors import require
from atheria_lightning.figures import (
    EPISODE_KEYS,
    VALIDATION_KEYS,
    PlotProcess,
    empty_columns,
    png_bytes,
    summary_figure,
)
from atheria_lightning.files import atomic_write
from atheria_lightning.scalars import as_floats
from atheria_lightning.store import RunStore, UsesRunStore

log = logging.getLogger(__name__)

__all__ = ["TrainingReport", "report_markdown"]

EXPORTS = "exports"
LOG_FORMAT_VERSION = 1
# Bounded waits at the end: the report must never hold a dying session (the quota kills it anyway).
CHECKPOINT_WAIT_S = 120.0
EXCEPTION_WAIT_S = 30.0
#: How long the end of fit waits for a live plot still being drawn in the background.
LIVE_PLOT_WAIT_S = 30.0
FILE_NOTES = {
    "live_loss.png": "loss so far, redrawn every plot_every_n_episodes episodes",
    "summary.png": "loss, survival, checkpoint timeline, loss distribution",
    "training_log.json": "every episode's metrics over all sessions, validations, checkpoints, config, time",
    "report.md": "this report",
    "model.ts": "TorchScript of the best operator: atheria_lightning.export.load()",
}


class TrainingReport(UsesRunStore, Callback):
    """Shows how a run goes while it trains, and leaves plots, a log, a report and the best model when it stops.

    On global rank 0 only. Every ``plot_every_n_episodes`` episodes, and no sooner than ``min_plot_interval_s``
    after the previous redraw, it redraws ``exports/live_loss.png`` (and, in a Jupyter/Colab/Kaggle notebook, the
    same picture in the cell's output, updated in place). A background thread hands a copy of the plotted
    columns to a plot process (:class:`~atheria_lightning.figures.PlotProcess`: numpy and matplotlib, no torch,
    about 80 MB, started at the first redraw, ended at teardown) and writes the file it draws. The training thread
    neither waits for the plot nor shares Python's interpreter lock with matplotlib: a redraw asked for while the
    previous one is still drawing is dropped, and the notebook shows each finished picture at the next episode's
    end. Where the process cannot run, the background thread draws the plot itself (after one warning). When fit
    ends, normally or by an early stop (the time guard sets ``trainer.should_stop``, so fit still ends cleanly),
    and on an exception (best effort), it writes into ``<run_dir>/exports/``:

    ======================  ===============================================================================
    ``live_loss.png``       loss so far (with its moving average and ``val/combined``)
    ``summary.png``         four panels: loss and survival over episodes, checkpoint timeline (episodes
                            saved, files kept: ``last`` and the top-k by ``val/combined``), loss histogram
    ``training_log.json``   every episode's ``train/*`` values over all sessions, every validation, the
                            checkpoints of ``MANIFEST.json``, the config, the time used per session
    ``report.md``           config, phase, progress, best metrics, checkpoints, files, time, episodes/s
    ``model.ts``            TorchScript of the checkpoint the run's store calls best (lowest finite metric
                            among the kept best files, else the newest; never one with non-finite weights),
                            written after pending checkpoint writes finish
    ======================  ===============================================================================

    Every file is written atomically (a reader never sees half a file). The per-episode records live in this
    callback's checkpoint state, so the log covers every episode of a run resumed over several sessions; time per
    session is measured with ``clock`` from the start of training. The checkpoints come from the run's
    :class:`~atheria_lightning.store.RunStore` (``use_store``; without one, a store of ``run_dir`` is read).
    The per-episode values are read once per episode, as one copy of five numbers already computed by the step.

    Args:
        plot_every_n_episodes: Redraw the live loss plot every this many episodes (a redraw takes a fraction of a
            second, in the plot process).
        min_plot_interval_s: Seconds between two redraws at least: each redraw still takes CPU time (about 65 ms
            for the demo's plot, in the plot process, on a core training may want for its data or its writes).
            0 redraws every ``plot_every_n_episodes`` episodes whatever the time.
        run_dir: The run folder; ``trainer.default_root_dir`` by default (the CLI sets it to
            ``<run_root>/<experiment_name>``).
        phase: The curriculum phase this run is, shown in the report and the log.
        export_model: Export the best checkpoint to ``exports/model.ts`` at the end.
        show_inline: Show the plots in the notebook cell: ``None`` = when running in a notebook kernel.
        clock: Seconds, monotonic; injectable so tests control time.

    Raises:
        ConfigError: ``plot_every_n_episodes`` is not a positive integer, or ``min_plot_interval_s`` is negative.

    Example::

        Trainer(callbacks=[TimeLimitGuard(max_hours=11.5), SmartCheckpoint(), TrainingReport(plot_every_n_episodes=50)])
    """

    #: Seconds between two live redraws at least, by default.
    MIN_PLOT_INTERVAL_S = 15.0

    def __init__(
        self,
        plot_every_n_episodes: int = 25,
        min_plot_interval_s: float = MIN_PLOT_INTERVAL_S,
        run_dir: str | None = None,
        phase: str | None = None,
        export_model: bool = True,
        show_inline: bool | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        require(
            isinstance(plot_every_n_episodes, int) and plot_every_n_episodes > 0,
            f"TrainingReport.plot_every_n_episodes={plot_every_n_episodes!r} must be a positive integer",
        )
        require(
            isinstance(min_plot_interval_s, (int, float)) and min_plot_interval_s >= 0,
            f"TrainingReport.min_plot_interval_s={min_plot_interval_s!r} must be a number of seconds >= 0",
        )
        self.plot_every_n_episodes = plot_every_n_episodes
        self.min_plot_interval_s = float(min_plot_interval_s)
        self._last_redraw: float | None = None
        self._plotted_through: float | None = None  # the last episode in the newest live plot asked for
        self.run_dir = run_dir
        self.phase = phase
        self.export_model = export_model
        self.show_inline = show_inline
        self.clock = clock
        # Columns, not one dict per episode; in checkpoints each column is one tensor (see state_dict).
        self.episodes: dict[str, list[float]] = empty_columns(EPISODE_KEYS)
        self.validations: dict[str, list[float]] = empty_columns(VALIDATION_KEYS)
        self.saved_episodes: list[int] = []
        self.sessions: list[dict[str, Any]] = []  # earlier sessions; the running one is in _session
        self._session: dict[str, Any] | None = None
        self._display_handle: Any = None
        self._warned_plot = False
        self._renderer: _BackgroundRenderer | None = None  # made in setup: a thread and a lock do not pickle
        self._plotter: PlotProcess | None = None  # made at the first redraw, ended in teardown

    # ----- hooks -----
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self.store is None:
            self.use_store(RunStore(self.run_dir or trainer.default_root_dir))
        self._display_handle = None  # a new fit (a notebook cell run again) shows its plots in its own cell
        self._last_redraw = self._plotted_through = None
        if self._renderer is None:
            self._renderer = _BackgroundRenderer()

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._finish_live_plot()
        if self._plotter is not None:
            self._plotter.close()
            self._plotter = None

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        start = episodes_done(trainer)  # restored from the checkpoint by now; 0 for a new run
        # Records past the checkpoint belong to a session whose later episodes were lost (or to an earlier fit of
        # this same instance, e.g. a notebook cell run twice): the episodes run again from ``start``.
        self._truncate(start)
        if start > 0 and start not in self.saved_episodes:
            self.saved_episodes.append(start)  # the checkpoint this session resumed from
        self._session = {"session": len(self.sessions) + 1, "first_episode": start, "started": self.clock()}

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if not trainer.is_global_zero:
            return
        episode = episodes_done(trainer) - 1
        # A non-finite episode returns no loss and logs no loss parts: the values there would be the last episode's.
        self._record_episode(trainer, episode, finite=bool(outputs))
        self._show_rendered()
        if (episode + 1) % self.plot_every_n_episodes == 0:
            now = self.clock()
            if self._last_redraw is None or now - self._last_redraw >= self.min_plot_interval_s:
                self._last_redraw = now
                self._guarded(self._redraw_live_plot, trainer, once=True)

    @override
    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.is_global_zero or trainer.sanity_checking or trainer.state.fn != TrainerFn.FITTING:
            return
        values = _read_metrics(trainer.callback_metrics, "val", VALIDATION_KEYS)
        if not all(math.isnan(value) for value in values):
            _append(self.validations, episodes_done(trainer), values)

    @override
    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        episode = episodes_done(trainer)
        if trainer.is_global_zero and (not self.saved_episodes or self.saved_episodes[-1] != episode):
            self.saved_episodes.append(episode)

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # on_fit_end, not on_train_end: it runs after SmartCheckpoint's final save (checkpoint callbacks run last)
        # and after the strategy's teardown has waited for the background writes, yet before the mirror's teardown
        # flush, so the exports reach the mirror too.
        if trainer.is_global_zero:
            self._final_live_plot(trainer)
            self._guarded(self.write_report, trainer, pl_module)

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        # Only after episodes ran in this fit: a fit that failed in setup (e.g. an unreachable mirror) writes nothing.
        if trainer.is_global_zero and self._session is not None and self.episodes["episode"]:
            self._finish_live_plot(EXCEPTION_WAIT_S)
            self._guarded(self.write_report, trainer, pl_module, EXCEPTION_WAIT_S)

    @override
    def state_dict(self) -> dict[str, Any]:
        sessions = self.sessions + ([self._session_summary()] if self._session is not None else [])
        # One tensor per column, not lists of floats: Lightning walks every object of a checkpoint on the training
        # thread (to copy tensors to the CPU) and pickles it, and lists made each save grow with the run (0.9 s
        # more per save after 86 000 episodes); a tensor is one object and one buffer, whatever its length.
        return {
            "version": LOG_FORMAT_VERSION,
            "episodes": _column_tensors(self.episodes),
            "validations": _column_tensors(self.validations),
            "saved_episodes": torch.tensor(self.saved_episodes, dtype=torch.int64),
            "sessions": [dict(session) for session in sessions],
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.episodes = _load_columns(state_dict.get("episodes"), EPISODE_KEYS)
        self.validations = _load_columns(state_dict.get("validations"), VALIDATION_KEYS)
        self.saved_episodes = [int(episode) for episode in _as_list(state_dict.get("saved_episodes", []))]
        self.sessions = [dict(session) for session in state_dict.get("sessions", [])]
        self._session = None

    # ----- recording -----
    def _record_episode(self, trainer: pl.Trainer, episode: int, finite: bool = True) -> None:
        values = _read_metrics(trainer.callback_metrics, "train", EPISODE_KEYS)
        if not finite:
            values = [math.nan] * (len(values) - 1) + values[-1:]  # only the noise level is this episode's
        _append(self.episodes, episode, values)

    def _truncate(self, start: int) -> None:
        """Forget what happened after ``start`` episodes: episodes from ``start`` on, later validations and saves.

        Validations and saves are counted in episodes done (the validation after episode 9 is at 10).
        """
        cut = bisect_left(self.episodes["episode"], start)
        for column in self.episodes.values():
            del column[cut:]
        cut = bisect_left(self.validations["episode"], start + 1)
        for column in self.validations.values():
            del column[cut:]
        self.saved_episodes = [saved for saved in self.saved_episodes if saved <= start]
        self.sessions = [session for session in self.sessions if session["first_episode"] < start]

    def _session_summary(self) -> dict[str, Any]:
        """The running session as it will be stored: episodes and training seconds so far."""
        session = self._session or {}
        first = int(session.get("first_episode", 0))
        last = self.episodes["episode"][-1] if self.episodes["episode"] else first - 1
        seconds = self.clock() - float(session.get("started", self.clock()))
        return {
            "session": int(session.get("session", len(self.sessions) + 1)),
            "first_episode": first,
            "last_episode": int(last),
            "episodes": max(0, int(last) + 1 - first),
            "training_seconds": round(max(0.0, seconds), 3),
        }

    # ----- output -----
    def exports_dir(self, trainer: pl.Trainer) -> str:
        return os.path.join(self.run_dir or trainer.default_root_dir, EXPORTS)

    def _redraw_live_plot(self, trainer: pl.Trainer) -> None:
        """Hand a copy of the plotted columns to the background thread, unless it is still busy with the previous
        plot. That thread has the plot process draw it (see :class:`~atheria_lightning.figures.PlotProcess`)."""
        if self._renderer is None:
            self._renderer = _BackgroundRenderer()
        if self._plotter is None:
            self._plotter = PlotProcess()
        if self._renderer.busy():
            return  # still drawing the previous plot: this redraw is dropped
        total = total_episodes(trainer)
        # The thread draws these copies of the only columns the plot shows.
        episodes = {"episode": list(self.episodes["episode"]), "loss": list(self.episodes["loss"])}
        self._plotted_through = episodes["episode"][-1] if episodes["episode"] else None
        validations = {"episode": list(self.validations["episode"]), "combined": list(self.validations["combined"])}
        path, phase, plotter = os.path.join(self.exports_dir(trainer), "live_loss.png"), self.phase, self._plotter

        def draw() -> bytes:
            png = plotter.loss_png(episodes, validations, total=total, phase=phase)
            _write_file(path, png)
            return png

        self._renderer.submit(draw)

    def _final_live_plot(self, trainer: pl.Trainer) -> None:
        """The live plot of every episode, once more at the end when the last redraw came before the last episode
        (``min_plot_interval_s`` skips redraws, so it may be far behind)."""
        if self._renderer is not None:
            self._renderer.wait(LIVE_PLOT_WAIT_S)
        recorded = self.episodes["episode"]
        if recorded and self._last_redraw is not None and recorded[-1] != self._plotted_through:
            self._guarded(self._redraw_live_plot, trainer, once=True)
        self._finish_live_plot()

    def _show_rendered(self) -> None:
        """On the training thread: show the live plot the background finished (if any), and report its failure."""
        if self._renderer is None:
            return
        png, error = self._renderer.take()
        if error is not None:
            if not self._warned_plot:
                log.warning("TrainingReport: the live plot failed: %s", error)
            self._warned_plot = True
        if png is not None:
            self._guarded(self._show, png, once=True)

    def _finish_live_plot(self, wait_s: float = LIVE_PLOT_WAIT_S) -> None:
        """Wait (bounded) for a live plot still drawing, then show it: the end of fit leaves the file complete."""
        if self._renderer is not None:
            if not self._renderer.wait(wait_s):
                log.warning("TrainingReport: the live plot is still drawing after %.0f s", wait_s)
            self._show_rendered()

    def write_report(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, wait_s: float = CHECKPOINT_WAIT_S
    ) -> str:
        """Write ``training_log.json``, ``summary.png``, ``model.ts`` and ``report.md`` now; returns the folder."""
        exports = self.exports_dir(trainer)
        checkpoints = self._checkpoints(wait_s)
        exported = self._export_best(exports) if self.export_model else None
        training_log = self.training_log(trainer, pl_module, checkpoints, exported)
        _write_file(os.path.join(exports, "training_log.json"), json.dumps(training_log, indent=1).encode())
        summary = png_bytes(summary_figure(training_log))
        _write_file(os.path.join(exports, "summary.png"), summary)
        files = [name for name in FILE_NOTES if name == "report.md" or os.path.isfile(os.path.join(exports, name))]
        text = report_markdown(training_log, files)
        _write_file(os.path.join(exports, "report.md"), text.encode())
        self._show(summary)
        print(f"report: {os.path.join(exports, 'report.md')} (summary.png, training_log.json"
              f"{', model.ts' if exported else ''})", flush=True)  # fmt: skip
        return exports

    def training_log(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        checkpoints: list[dict[str, Any]],
        exported: dict[str, Any] | None,
    ) -> dict[str, Any]:
        """Everything ``training_log.json`` holds, as plain JSON values (NaN becomes null)."""
        sessions = self.sessions + ([self._session_summary()] if self._session is not None else [])
        total_seconds = sum(float(session["training_seconds"]) for session in sessions)
        recorded = len(self.episodes["episode"])
        run_dir = self.run_dir or trainer.default_root_dir
        return _json_safe({
            "format_version": LOG_FORMAT_VERSION,
            "experiment": os.path.basename(os.path.normpath(run_dir)),
            "run_dir": run_dir,
            "phase": self.phase,
            "written_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "episodes_done": episodes_done(trainer),
            "total_episodes": total_episodes(trainer),
            "config": _config(trainer, pl_module),
            "time": {
                "sessions": len(sessions),
                "total_training_hours": total_seconds / 3600.0,
                "episodes_per_second": recorded / total_seconds if total_seconds > 0 else None,
            },
            "sessions": sessions,
            "best": _best(self.episodes, self.validations),
            "checkpoints": checkpoints,
            "saved_episodes": self.saved_episodes,
            "exported_model": exported,
            "episodes": _rows(self.episodes),
            "validations": _rows(self.validations),
        })  # fmt: skip

    def _checkpoints(self, wait_s: float) -> list[dict[str, Any]]:
        """The run's listed checkpoints, once the queued writes are done (or ``wait_s`` passed)."""
        assert self.store is not None
        if not self.store.wait(timeout=wait_s):
            log.warning("checkpoint writes still pending after %.0f s: the report may miss the newest", wait_s)
        return [
            {"file": name, "kind": entry.kind, "episode": entry.episode, "metric": entry.metric, "size": entry.size}
            for name, entry in sorted(self.store.entries().items(), key=lambda item: item[1].episode)
        ]

    def _export_best(self, exports: str) -> dict[str, Any] | None:
        """Export the store's best checkpoint (never one with non-finite weights) to ``model.ts``."""
        from atheria_lightning.export import export_checkpoint, load_metadata  # the export side needs the physics

        assert self.store is not None
        chosen = self.store.best()
        if chosen is None:
            log.warning("no sound checkpoint in %s: model.ts not exported", self.store.checkpoint_dir)
            return None
        output = export_checkpoint(chosen.path, os.path.join(exports, "model.ts"))
        return {
            "file": os.path.basename(output),
            "from_checkpoint": chosen.name,
            "episode": chosen.episode,
            "metric": chosen.metric,
            "method": load_metadata(output)["export_method"],
        }

    def _show(self, png: bytes) -> None:
        """Show ``png`` in the notebook cell, replacing the previous picture (other output in the cell stays)."""
        if self.show_inline is False:
            return
        display = _notebook_display(force=bool(self.show_inline))
        if display is None:
            return
        display_fn, image_cls = display
        if self._display_handle is None:
            self._display_handle = display_fn(image_cls(data=png), display_id=True)
        else:
            self._display_handle.update(image_cls(data=png))

    def _guarded(self, action: Callable[..., Any], *args: Any, once: bool = False) -> None:
        # A plot or a report must never stop (or crash the end of) a day-long training.
        try:
            action(*args)
        except Exception as err:
            if not (once and self._warned_plot):
                log.warning("TrainingReport: %s failed: %s", getattr(action, "__name__", "report"), err)
            self._warned_plot = self._warned_plot or once


def report_markdown(training_log: dict[str, Any], files: list[str]) -> str:
    """``report.md``: progress, time, best metrics, checkpoints, config and files of a ``training_log`` dict."""
    lines = [f"# Atheria training report: {training_log.get('experiment')}", ""]
    if training_log.get("phase"):
        lines += [f"Phase: **{training_log['phase']}**", ""]
    lines += [f"Written {training_log.get('written_at')} in `{training_log.get('run_dir')}`.", ""]
    lines += _progress_section(training_log) + _best_section(training_log) + _checkpoint_section(training_log)
    lines += _config_section(training_log.get("config", {}))
    lines += ["## Files", "", "| file | what |", "|---|---|"]
    lines += [f"| `exports/{name}` | {FILE_NOTES.get(name, '')} |" for name in files]
    lines += ["| `checkpoints/` | last.ckpt, best-eNNNNNN.ckpt (top-k by val/combined), MANIFEST.json |",
              "| `logs/` | TensorBoard events (`tensorboard --logdir logs`), config.yaml |", ""]  # fmt: skip
    return "\n".join(lines)


def _progress_section(training_log: dict[str, Any]) -> list[str]:
    done, total = training_log.get("episodes_done", 0), training_log.get("total_episodes")
    share = f" ({100.0 * done / total:.0f}%)" if total else ""
    time_used = training_log.get("time", {})
    speed = time_used.get("episodes_per_second")
    lines = ["## Progress", "", "| | |", "|---|---|",
             f"| episodes | {done}" + (f" of {total}" if total else "") + f"{share} |",
             f"| sessions | {time_used.get('sessions', 0)} |",
             f"| training time | {time_used.get('total_training_hours', 0.0):.3f} h |",
             f"| episodes per second | {_fmt(speed, '.3f')} (over all sessions) |", "",
             "| session | episodes | first - last | training time | episodes/s |", "|---|---|---|---|---|"]  # fmt: skip
    for session in training_log.get("sessions", []):
        seconds, count = session["training_seconds"], session["episodes"]
        rate = _fmt(count / seconds if seconds else None, ".3f")
        lines.append(f"| {session['session']} | {count} | {session['first_episode']} - {session['last_episode']} "
                     f"| {seconds / 3600.0:.3f} h ({seconds:.1f} s) | {rate} |")  # fmt: skip
    return lines + [""]


def _best_section(training_log: dict[str, Any]) -> list[str]:
    best = training_log.get("best", {})
    lines = ["## Best metrics", "", "| | value | episode |", "|---|---|---|",
             f"| best val/combined (lower is better) | {_fmt(best.get('val_combined'))} "
             f"| {_fmt(best.get('val_combined_episode'), 'd')} |",
             f"| lowest train/loss | {_fmt(best.get('train_loss'))} | {_fmt(best.get('train_loss_episode'), 'd')} |",
             f"| last train/loss | {_fmt(best.get('last_train_loss'))} | {_fmt(best.get('last_episode'), 'd')} |",
             f"| last train/survival | {_fmt(best.get('last_train_survival'))} "
             f"| {_fmt(best.get('last_episode'), 'd')} |"]  # fmt: skip
    exported = training_log.get("exported_model")
    if exported:
        lines.append(f"| exported model `exports/{exported['file']}` | from {exported['from_checkpoint']} "
                     f"(val/combined {_fmt(exported.get('metric'))}, torch.jit.{exported['method']}) "
                     f"| {exported['episode']} |")  # fmt: skip
    return lines + [""]


def _checkpoint_section(training_log: dict[str, Any]) -> list[str]:
    lines = ["## Checkpoints (MANIFEST.json)", "", "| file | kind | episode | val/combined | size |",
             "|---|---|---|---|---|"]  # fmt: skip
    for entry in training_log.get("checkpoints", []):
        lines.append(f"| {entry['file']} | {entry['kind']} | {entry['episode']} | {_fmt(entry.get('metric'))} "
                     f"| {entry['size'] / 1e6:.2f} MB |")  # fmt: skip
    return lines + [""]


def _config_section(config: dict[str, Any]) -> list[str]:
    lines = ["## Config", ""]
    for part in ("model", "data", "trainer"):
        settings = config.get(part) or {}
        lines += [f"### {part}", "", "| key | value |", "|---|---|"]
        lines += [f"| `{key}` | `{value}` |" for key, value in settings.items()] + [""]
    return lines


def _column_tensors(columns: dict[str, list[float]]) -> dict[str, torch.Tensor]:
    """Columns as one tensor each, for checkpoints: int64 episode numbers, float64 values (NaN kept)."""
    return {
        key: torch.tensor(values, dtype=torch.int64 if key == "episode" else torch.float64)
        for key, values in columns.items()
    }


def _as_list(values: Any) -> list[Any]:
    """A checkpoint's column as a list: a tensor (this version) or a list (checkpoints of earlier versions)."""
    return values.tolist() if isinstance(values, torch.Tensor) else list(values)


def _load_columns(state: dict[str, Any] | None, keys: tuple[str, ...]) -> dict[str, list[float]]:
    columns = empty_columns(keys)
    state = state or {}
    length = len(state.get("episode", []))
    for key in columns:
        values = [float(value) for value in _as_list(state.get(key, []))]
        columns[key] = values if len(values) == length else [math.nan] * length
    columns["episode"] = [int(episode) for episode in columns["episode"]]
    return columns


def _append(columns: dict[str, list[float]], episode: int, values: list[float]) -> None:
    columns["episode"].append(int(episode))
    for key, value in zip(list(columns)[1:], values, strict=True):
        columns[key].append(value)


def _read_metrics(metrics: dict[str, Any], prefix: str, keys: tuple[str, ...]) -> list[float]:
    """``metrics[prefix/key]`` as floats (NaN when absent), with one device-to-host copy per device."""
    present = [(index, metrics[f"{prefix}/{key}"]) for index, key in enumerate(keys) if f"{prefix}/{key}" in metrics]
    values = [math.nan] * len(keys)
    for (index, _), value in zip(present, as_floats([value for _, value in present]), strict=True):
        values[index] = value
    return values


def _rows(columns: dict[str, list[float]]) -> list[dict[str, Any]]:
    keys = list(columns)
    return [dict(zip(keys, values, strict=True)) for values in zip(*columns.values(), strict=True)]


def _best(episodes: dict[str, list[float]], validations: dict[str, list[float]]) -> dict[str, Any]:
    best: dict[str, Any] = {}
    val_index = _argmin(validations["combined"])
    if val_index is not None:
        best.update(
            val_combined=validations["combined"][val_index], val_combined_episode=validations["episode"][val_index]
        )
    loss_index = _argmin(episodes["loss"])
    if loss_index is not None:
        best.update(train_loss=episodes["loss"][loss_index], train_loss_episode=episodes["episode"][loss_index])
    if episodes["episode"]:
        best.update(last_episode=episodes["episode"][-1], last_train_loss=episodes["loss"][-1],
                    last_train_survival=episodes["survival"][-1])  # fmt: skip
    return best


def _argmin(values: list[float]) -> int | None:
    finite = [(value, index) for index, value in enumerate(values) if value is not None and math.isfinite(value)]
    return min(finite)[1] if finite else None


def _config(trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Any]:
    datamodule = trainer.datamodule
    data = {key: getattr(datamodule, key) for key in ("total_episodes", "seed", "val_every_episodes", "val_universes")
            } if isinstance(datamodule, EpisodeDataModule) else {}  # fmt: skip
    return {
        "model": dict(pl_module.hparams),
        "data": data,
        "trainer": {
            "accelerator": type(trainer.accelerator).__name__,
            "devices": trainer.num_devices,
            "num_nodes": trainer.num_nodes,
            "precision": trainer.precision,
            "max_steps": trainer.max_steps,
            "gradient_clip_val": trainer.gradient_clip_val,
            "callbacks": [type(callback).__name__ for callback in trainer.callbacks],
        },
    }


def _json_safe(value: Any) -> Any:
    """Plain JSON: NaN and infinities become null (strict parsers reject them), unknown objects their str."""
    if isinstance(value, dict):
        return {str(key): _json_safe(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(item) for item in value]
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if value is None or isinstance(value, bool | int | str):
        return value
    return str(value)


class _BackgroundRenderer:
    """Runs one drawing job at a time in a daemon thread; the caller collects the PNG (or the error) later."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._png: bytes | None = None
        self._error: BaseException | None = None
        self.drawn = 0

    def busy(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def submit(self, job: Callable[[], bytes]) -> None:
        self._thread = threading.Thread(target=self._run, args=(job,), name="TrainingReport-live-plot", daemon=True)
        self._thread.start()

    def _run(self, job: Callable[[], bytes]) -> None:
        try:
            png = job()
        except Exception as err:  # reported on the training thread by take()
            with self._lock:
                self._error = err
            return
        with self._lock:
            self._png, self.drawn = png, self.drawn + 1

    def take(self) -> tuple[bytes | None, BaseException | None]:
        """The newest finished PNG not yet taken, and the error of a failed job; each once."""
        with self._lock:
            png, error, self._png, self._error = self._png, self._error, None, None
        return png, error

    def wait(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for the running job; True when none is running any more."""
        thread = self._thread
        if thread is not None:
            thread.join(timeout)
        return not self.busy()


def _write_file(path: str, data: bytes) -> None:
    """``data`` as the whole of the file ``path``, written atomically (readers see the old file or the new one)."""
    atomic_write(LocalFileSystem(), path, lambda handle: handle.write(data))


def _notebook_display(force: bool = False) -> tuple[Callable[..., Any], type] | None:
    """``(display, Image)`` of IPython when running in a notebook kernel (or ``force`` and IPython importable)."""
    if not force and "IPython" not in sys.modules:
        return None  # a notebook kernel has imported IPython; importing it here cost the training thread 54 ms
    try:
        from IPython import get_ipython
        from IPython.display import Image, display
    except ImportError:
        return None
    shell = get_ipython()
    in_kernel = shell is not None and getattr(shell, "kernel", None) is not None
    return (display, Image) if in_kernel or force else None


def _fmt(value: Any, spec: str = ".4g") -> str:
    return "n/a" if value is None else format(value, spec)
