"""The run's figures, drawn from plain data (no torch), and the process that draws the live plot beside training.

``loss_figure`` and ``summary_figure`` take the columns ``TrainingLog`` records (or a ``training_log.json``), so a
notebook or ``atheria report`` can redraw them after the run. :class:`PlotProcess` draws the live loss plot in a
child Python process that imports only numpy and matplotlib: matplotlib holds Python's interpreter lock while it
draws, so a thread of the training process would take that time from training.
"""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import subprocess
import sys
from io import BytesIO
from typing import IO, Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

log = logging.getLogger(__name__)

__all__ = [
    "EPISODE_KEYS",
    "MAX_PLOTTED_POINTS",
    "VALIDATION_KEYS",
    "PlotProcess",
    "empty_columns",
    "loss_figure",
    "png_bytes",
    "summary_figure",
]

#: Per-episode values, read from ``train/<key>`` in ``trainer.callback_metrics``.
EPISODE_KEYS = ("loss", "survival", "symmetry", "complexity", "noise_level")
#: Validation values, read from ``val/<key>``.
VALIDATION_KEYS = ("loss", "combined", "survival", "symmetry", "complexity")
#: A series whose finite values spread less than this, relative to their size, is drawn as the constant it is: an
#: autoscaled axis would magnify float rounding into a curve (survival is held at 0.2 by the renormalisation).
CONSTANT_SPREAD = 1e-6


def loss_figure(
    episodes: dict[str, list[float]], validations: dict[str, list[float]], total: int | None = None,
    phase: str | None = None,
) -> Figure:  # fmt: skip
    """The live plot: ``train/loss`` per episode, its moving average and ``val/loss`` (the same formula), on one axes.

    Fixed margins rather than a layout engine: the plot is redrawn every few seconds, and constrained layout
    measured every label again at each redraw (benchmarks/HISTORY.md, "Earlier: after the logging, progress-bar
    and validation-logging changes")."""
    figure = Figure(figsize=(8, 4))
    figure.subplots_adjust(left=0.09, right=0.98, bottom=0.12, top=0.92)
    axes = figure.add_subplot()
    _plot_loss(axes, episodes, validations)
    done = int(episodes["episode"][-1]) + 1 if episodes["episode"] else 0
    title = f"episode {done}" + (f" of {total}" if total else "") + (f" - {phase}" if phase else "")
    axes.set(title=title, xlabel="episode", ylabel="loss")
    if episodes["episode"]:
        axes.legend(loc="upper right")
    return figure


def summary_figure(training_log: dict[str, Any]) -> Figure:
    """The four panels of ``summary.png``, drawn from a ``training_log.json`` dict."""
    episodes = _columns_of(training_log.get("episodes", []), EPISODE_KEYS)
    validations = _columns_of(training_log.get("validations", []), VALIDATION_KEYS)
    figure = Figure(figsize=(12, 8), layout="constrained")
    loss_axes, survival_axes, timeline_axes, histogram_axes = figure.subplots(2, 2).flat
    _plot_loss(loss_axes, episodes, validations)
    loss_axes.set(title="Loss", xlabel="episode", ylabel="loss")
    constant = _plot_series(survival_axes, episodes["episode"], episodes["survival"], "train/survival", "tab:green")
    title = "Survival (energy kept vs target; lower is better)"
    if constant is not None:
        title = f"Survival: constant at {constant:.4g} over the run (no signal)"
    survival_axes.set(title=title, xlabel="episode", ylabel="survival")
    for axes in (loss_axes, survival_axes):
        _mark_sessions(axes, training_log.get("sessions", []))
        if episodes["episode"]:
            axes.legend(loc="upper right", fontsize=8)
    _plot_timeline(timeline_axes, training_log)
    _plot_histogram(histogram_axes, episodes["loss"])
    title = f"{training_log.get('experiment', 'atheria')}" + (
        f" - {training_log['phase']}" if training_log.get("phase") else ""
    )
    # Names from the log as they are: "$" would start matplotlib's math notation, and a bad one fail the drawing.
    figure.suptitle(f"{title}: {training_log.get('episodes_done', 0)} episodes", parse_math=False)
    return figure


# ----- helpers -----
def empty_columns(keys: tuple[str, ...]) -> dict[str, list[float]]:
    """``{"episode": [], key: [] ...}``: the columns ``TrainingLog`` records, empty."""
    return {"episode": [], **{key: [] for key in keys}}


def _columns_of(rows: list[dict[str, Any]], keys: tuple[str, ...]) -> dict[str, list[float]]:
    columns = empty_columns(keys)
    for row in rows:
        for key in columns:
            value = row.get(key)
            columns[key].append(math.nan if value is None else value)
    return columns


def png_bytes(figure: Figure) -> bytes:
    """``figure`` as PNG bytes, on an Agg canvas of its own (no pyplot: no window, no global state, any thread)."""
    # zlib level 1 instead of 6: a faster encoding of the live plot for a slightly larger file (benchmarks/HISTORY.md,
    # "Earlier: after the logging, progress-bar and validation-logging changes").
    FigureCanvasAgg(figure)
    buffer = BytesIO()
    figure.savefig(buffer, format="png", dpi=100, pil_kwargs={"compress_level": 1})
    return buffer.getvalue()


#: A loss curve of more episodes is drawn as the range and mean of bins (the figure is ~800 pixels wide): drawn
#: point by point, a long run's redraw grew with it (benchmarks/HISTORY.md, "Earlier: after the logging,
#: progress-bar and validation-logging changes").
MAX_PLOTTED_POINTS = 2000


def _moving_average(values: np.ndarray) -> np.ndarray:
    window = max(1, min(50, len(values) // 10))
    kernel = np.ones(window) / window
    return np.convolve(values, kernel, mode="valid") if len(values) >= window else values


def _plot_loss(axes: Any, episodes: dict[str, list[float]], validations: dict[str, list[float]]) -> None:
    """``train/loss`` with its moving average, and ``val/loss`` (the same objective on the validation universes)."""
    _plot_series(axes, episodes["episode"], episodes["loss"], "train/loss", "tab:blue")
    if validations["episode"]:
        axes.plot(validations["episode"], validations["loss"], "o", color="tab:red", ms=4, label="val/loss")


def _plot_series(axes: Any, episodes: list[float], values: list[float], label: str, color: str) -> float | None:
    """Draw a per-episode series with its moving average; returns its value when it is constant (drawn flat)."""
    axes.ticklabel_format(axis="y", useOffset=False)  # absolute values on the axis, never "1e-7 + 2e-1"
    x, y = np.asarray(episodes, dtype=float), np.asarray(values, dtype=float)
    finite = np.isfinite(y)
    if not finite.any():
        axes.text(0.5, 0.5, "no episodes yet", ha="center", va="center", transform=axes.transAxes)
        return None
    x, y = x[finite], y[finite]
    middle = float(np.median(y))
    if float(np.ptp(y)) <= CONSTANT_SPREAD * max(1.0, abs(middle)):
        axes.plot(x, np.full_like(y, middle), color=color, lw=1.5, label=f"{label} (constant {middle:.4g})")
        axes.set_ylim(middle - max(1.0, abs(middle)) * 0.5, middle + max(1.0, abs(middle)) * 0.5)
        return middle
    average = _moving_average(y)
    if len(average) == len(y):  # too few episodes to average: one plain line
        axes.plot(x, y, color=color, lw=1.5, label=label)
        return None
    x_average = x[len(x) - len(average) :]
    if len(x) <= MAX_PLOTTED_POINTS:
        axes.plot(x, y, color=color, alpha=0.35, lw=0.8, label=label)
    else:  # each pixel column holds many episodes: their range as a band, spikes included
        starts = _bin_starts(len(x))
        axes.fill_between(x[starts], np.minimum.reduceat(y, starts), np.maximum.reduceat(y, starts), color=color,
                          alpha=0.35, lw=0, step="post", label=f"{label} (range)")  # fmt: skip
        starts = _bin_starts(len(average))
        counts = np.diff(np.append(starts, len(average)))
        x_average, average = x_average[starts + counts // 2], np.add.reduceat(average, starts) / counts
    axes.plot(x_average, average, color=color, lw=1.8, label=f"{label} (moving average)")
    return None


def _bin_starts(length: int) -> np.ndarray:
    """The first index of each of ``MAX_PLOTTED_POINTS // 2`` consecutive bins of ``length`` items."""
    return np.unique(np.linspace(0, length, MAX_PLOTTED_POINTS // 2, endpoint=False).astype(np.int64))


def _mark_sessions(axes: Any, sessions: list[dict[str, Any]]) -> None:
    for session in sessions[1:]:
        axes.axvline(session["first_episode"], color="gray", ls=":", lw=1)


def _plot_timeline(axes: Any, training_log: dict[str, Any]) -> None:
    """Episodes at which checkpoints were saved, and the files kept now: ``last`` and the top-k (``best``)."""
    rows = {"saved": 0, "last": 1, "top-k": 2}
    saved = training_log.get("saved_episodes", [])
    axes.plot(saved, [rows["saved"]] * len(saved), "|", color="gray", ms=14, label="saved")
    for entry in training_log.get("checkpoints", []):
        row = rows["top-k"] if entry["kind"] == "best" else rows["last"]
        axes.plot(entry["episode"], row, "*" if row == rows["top-k"] else "s", color="tab:orange", ms=10)
        if entry.get("metric") is not None:
            axes.annotate(f"{entry['metric']:.3g}", (entry["episode"], row), textcoords="offset points",
                          xytext=(0, 8), ha="center", fontsize=7)  # fmt: skip
    exported = training_log.get("exported_model")
    if exported:
        axes.plot(exported["episode"], rows["top-k"] + 0.5, "v", color="tab:red", ms=9, label="exported model.ts")
        axes.legend(loc="upper left", fontsize=8)
    axes.set_yticks(list(rows.values()), list(rows))
    axes.set_ylim(-0.7, 3.0)
    axes.set_title(f"Checkpoint timeline (top-k by {training_log.get('monitor') or 'val/combined'})", parse_math=False)
    axes.set_xlabel("episode")
    if training_log.get("total_episodes"):
        axes.set_xlim(-0.5, training_log["total_episodes"] + 0.5)


def _plot_histogram(axes: Any, losses: list[float]) -> None:
    values = np.asarray(losses, dtype=float)
    values = values[np.isfinite(values)]
    axes.set(title="Loss distribution", xlabel="train/loss", ylabel="episodes")
    if not len(values):
        axes.text(0.5, 0.5, "no episodes yet", ha="center", va="center", transform=axes.transAxes)
        return
    low, high = float(values.min()), float(values.max())
    if low == high:
        low, high = low - 0.5, high + 0.5  # one value: widened as numpy does
    edges = np.linspace(low, high, max(5, min(50, len(values) // 5)) + 1)
    if not np.all(np.diff(edges) > 0):  # values so large, or so close, that the bins would have no width: one bar
        edges = np.array([low, high]) + np.array([-0.5, 0.5]) * max(abs(low), abs(high))
    axes.hist(values, bins=edges, color="tab:blue", alpha=0.7)
    axes.axvline(float(np.median(values)), color="black", ls="--", lw=1, label=f"median {np.median(values):.3g}")
    axes.legend(loc="upper right", fontsize=8)


# ----- the live plot's process -----
class PlotProcessError(RuntimeError):
    """The plot process could not be started, or died, or broke the protocol."""


class PlotProcess:
    """Draws live loss plots in a child Python process, so that drawing takes almost no time from training.

    Matplotlib holds Python's interpreter lock while it draws: in a background thread of the training process much
    of a redraw's time was taken from training; in a child process it runs on another core (benchmarks/HISTORY.md,
    "Earlier: plot process, checkpoint serialization, one TensorBoard event"). The child imports numpy and
    matplotlib only (no torch), starts at the first plot, runs at a lower priority than training, and ends when
    :meth:`close` closes its input, or when the training process dies (it reads the end of its input).

    Each call sends the four columns the plot needs as raw float64 bytes and reads the PNG back; it blocks the
    calling thread (``LivePlot`` calls it from its background thread) without holding the interpreter lock.
    Where the child cannot start or fails, the plot is drawn in the calling thread instead, from then on, after
    one warning: a live plot is never worth a failed training.

    Args:
        command: The child's command line; by default this Python running :func:`serve`.
    """

    def __init__(self, command: list[str] | None = None) -> None:
        self.command = command or default_command()
        self.drawn_by: int | None = None  # the process id that drew the last plot (tests, diagnostics)
        self.failed = False
        self._child: subprocess.Popen | None = None

    def loss_png(
        self, episodes: dict[str, list[float]], validations: dict[str, list[float]], total: int | None = None,
        phase: str | None = None,
    ) -> bytes:  # fmt: skip
        """:func:`loss_figure` of these columns (``episode`` and ``loss``, for training and validation) as PNG."""
        if not self.failed:
            try:
                return self._draw_in_child(episodes, validations, total, phase)
            except (OSError, ValueError, KeyError, PlotProcessError) as err:
                self.failed = True
                self.close(timeout=1.0)
                log.warning("the live-plot process failed (%s): drawing the live plot in a thread from now on", err)
        self.drawn_by = os.getpid()
        return png_bytes(loss_figure(episodes, validations, total=total, phase=phase))

    def close(self, timeout: float = 5.0) -> None:
        """End the child: close its input, wait up to ``timeout`` seconds, then kill it."""
        child, self._child = self._child, None
        if child is None:
            return
        for stream in (child.stdin, child.stdout):
            try:
                stream.close()
            except OSError:
                pass
        try:
            child.wait(timeout)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()

    def _draw_in_child(
        self, episodes: dict[str, list[float]], validations: dict[str, list[float]], total: int | None,
        phase: str | None,
    ) -> bytes:  # fmt: skip
        child = self._child
        if child is None or child.poll() is not None:
            child = self._child = subprocess.Popen(
                self.command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=_child_environment()
            )
        columns = [episodes["episode"], episodes["loss"], validations["episode"], validations["loss"]]
        arrays = [np.asarray(column, dtype=np.float64) for column in columns]
        header = {"total": total, "phase": phase, "sizes": [len(array) for array in arrays]}
        child.stdin.write(json.dumps(header).encode() + b"\n" + b"".join(array.tobytes() for array in arrays))
        child.stdin.flush()
        reply = json.loads(child.stdout.readline() or b"null")
        if not isinstance(reply, dict):
            raise PlotProcessError(f"the plot process ended (exit code {child.poll()})")
        if "error" in reply:
            raise PlotProcessError(reply["error"])
        png = _read_exactly(child.stdout, int(reply["size"]))
        self.drawn_by = int(reply["pid"])
        return png


def default_command() -> list[str]:
    """This Python, importing this package from where it is, running :func:`serve`."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return [sys.executable, "-c", f"import sys; sys.path.insert(0, {root!r}); import atheria_lightning.figures as f; "
            "f.serve()"]  # fmt: skip


def serve() -> None:
    """The plot process: answers each request of :class:`PlotProcess` with a PNG, until its input ends."""
    replies = os.fdopen(os.dup(sys.stdout.fileno()), "wb")  # the protocol keeps the real stdout;
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())  # anything printed goes to stderr
    requests = sys.stdin.buffer
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is for the training process; this one ends with its input
    if hasattr(os, "nice"):
        try:
            os.nice(5)  # training first
        except OSError:
            pass
    while line := requests.readline():
        header = json.loads(line)
        arrays = [np.frombuffer(_read_exactly(requests, 8 * size), dtype=np.float64) for size in header["sizes"]]
        try:
            episodes = {"episode": arrays[0].tolist(), "loss": arrays[1].tolist()}
            validations = {"episode": arrays[2].tolist(), "loss": arrays[3].tolist()}
            png = png_bytes(loss_figure(episodes, validations, total=header["total"], phase=header["phase"]))
        except Exception as err:  # reported to the training process, which draws the plot itself
            replies.write(json.dumps({"error": f"{type(err).__name__}: {err}"}).encode() + b"\n")
        else:
            replies.write(json.dumps({"size": len(png), "pid": os.getpid()}).encode() + b"\n" + png)
        replies.flush()


def _read_exactly(stream: IO[bytes], size: int) -> bytes:
    data = stream.read(size)
    if data is None or len(data) != size:
        raise PlotProcessError(f"the plot process's stream ended after {len(data or b'')} of {size} bytes")
    return data


def _child_environment() -> dict[str, str]:
    # One thread for numpy's BLAS (nothing to compute in parallel), and no pyplot backend to look for.
    return {**os.environ, "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
            "MPLBACKEND": "Agg"}  # fmt: skip
