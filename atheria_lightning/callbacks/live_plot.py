"""LivePlot: the loss so far as exports/live_loss.png (and in the notebook cell), drawn beside training."""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl
from fsspec.implementations.local import LocalFileSystem
from lightning.pytorch.callbacks import Callback
from typing_extensions import Self, override

from atheria_lightning.callbacks.clock import UsesClock
from atheria_lightning.callbacks.training_log import TrainingLog
from atheria_lightning.data import episodes_done, total_episodes
from atheria_lightning.errors import require
from atheria_lightning.figures import PlotProcess
from atheria_lightning.files import atomic_write

log = logging.getLogger(__name__)

__all__ = ["LIVE_PLOT_FILE", "LivePlot"]

LIVE_PLOT_FILE = "live_loss.png"
#: How long the end of fit (or an exception) waits for a live plot still being drawn in the background.
LIVE_PLOT_WAIT_S = 30.0


class LivePlot(UsesClock, Callback):
    """Redraws the loss so far while training: ``exports/live_loss.png`` and, in a notebook, the cell's picture.

    On global rank 0 only. Every ``plot_every_n_episodes`` episodes, and no sooner than ``min_plot_interval_s``
    after the previous redraw, it draws ``train/loss`` per episode (with its moving average) and ``val/loss``
    as recorded by the run's :class:`~atheria_lightning.callbacks.TrainingLog`: every episode of the run, earlier
    sessions included. In a Jupyter/Colab/Kaggle notebook the same picture appears in the cell's output, updated in
    place. A background thread hands a copy of the plotted columns to a plot process
    (:class:`~atheria_lightning.figures.PlotProcess`: numpy and matplotlib, no torch, started at the first redraw,
    ended at teardown) and writes the file it draws atomically. The training thread neither waits for the plot nor
    shares Python's interpreter lock with matplotlib: a redraw asked for while the previous one is still drawing is
    dropped, and the notebook shows each finished picture at the next episode's end. Where the process cannot run,
    the background thread draws the plot itself (after one warning). When fit ends, the plot is drawn once more if
    the last redraw missed episodes, and the end of fit waits (bounded) for it. A failed plot is a warning, never a
    failed training. It logs no metric.

    The log is handed over explicitly: ``AtheriaCLI`` calls :meth:`use_log` with the run's ``TrainingLog``; a
    script with a plain ``Trainer`` does the same (without it, ``setup`` warns and nothing is drawn). List it after
    that ``TrainingLog``: it draws what the log holds when its own hook runs.

    Args:
        plot_every_n_episodes: Redraw the live loss plot every this many episodes.
        min_plot_interval_s: Seconds between two redraws at least: each redraw still takes CPU time on a core that
            training may want for its data or its writes (benchmarks/HISTORY.md, "Earlier: a quiet machine, after
            the callback fixes of 2026-11-26"). 0 redraws every ``plot_every_n_episodes`` episodes whatever the time.
        show_inline: Show the plot in the notebook cell: ``None`` = when running in a notebook kernel.

    Raises:
        ConfigError: ``plot_every_n_episodes`` is not a positive integer, or ``min_plot_interval_s`` is negative.

    Example::

        training_log = TrainingLog()
        trainer = Trainer(callbacks=[training_log, LivePlot(plot_every_n_episodes=50).use_log(training_log)])
    """

    #: Seconds between two live redraws at least, by default.
    MIN_PLOT_INTERVAL_S = 15.0

    def __init__(
        self,
        plot_every_n_episodes: int = 25,
        min_plot_interval_s: float = MIN_PLOT_INTERVAL_S,
        show_inline: bool | None = None,
    ) -> None:
        require(
            isinstance(plot_every_n_episodes, int) and plot_every_n_episodes > 0,
            f"LivePlot.plot_every_n_episodes={plot_every_n_episodes!r} must be a positive integer",
        )
        require(
            isinstance(min_plot_interval_s, (int, float)) and min_plot_interval_s >= 0,
            f"LivePlot.min_plot_interval_s={min_plot_interval_s!r} must be a number of seconds >= 0",
        )
        self.plot_every_n_episodes = plot_every_n_episodes
        self.min_plot_interval_s = float(min_plot_interval_s)
        self.show_inline = show_inline
        self.clock: Callable[[], float] = time.monotonic
        self.training_log: TrainingLog | None = None
        self._last_redraw: float | None = None
        self._plotted_through: int | None = None  # the last episode in the newest live plot asked for
        self._display_handle: Any = None
        self._warned = False
        self._renderer: _BackgroundRenderer | None = None  # made in setup: a thread and a lock do not pickle
        self._plotter: PlotProcess | None = None  # made at the first redraw, ended in teardown

    def use_log(self, training_log: TrainingLog) -> Self:
        """Draw from ``training_log``: the run's recorder of episodes and validations."""
        self.training_log = training_log
        return self

    # ----- hooks -----
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self.training_log is None and trainer.is_global_zero:
            # A missing plot is not worth a failed training: said once, then nothing is drawn.
            log.warning("LivePlot has no TrainingLog to draw from (atheria fit hands over the run's; in a script call "
                        "live_plot.use_log(training_log)): no live plot")  # fmt: skip
        self._display_handle = None  # a new fit (a notebook cell run again) shows its plots in its own cell
        self._last_redraw = self._plotted_through = None
        if self._renderer is None:
            self._renderer = _BackgroundRenderer()

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._finish()
        if self._plotter is not None:
            self._plotter.close()
            self._plotter = None

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if not trainer.is_global_zero or self.training_log is None:
            return
        self._show_rendered()
        if episodes_done(trainer) % self.plot_every_n_episodes == 0:
            now = self.clock()
            if self._last_redraw is None or now - self._last_redraw >= self.min_plot_interval_s:
                self._last_redraw = now
                self._guarded(self._redraw_live_plot, trainer)

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.is_global_zero and self.training_log is not None:
            self._final_live_plot(trainer)

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        if trainer.is_global_zero:
            self._finish()

    # ----- drawing -----
    def _redraw_live_plot(self, trainer: pl.Trainer) -> None:
        """Hand a copy of the plotted columns to the background thread, unless it is still busy with the previous
        plot. That thread has the plot process draw it (see :class:`~atheria_lightning.figures.PlotProcess`)."""
        assert self.training_log is not None
        if self._renderer is None:
            self._renderer = _BackgroundRenderer()
        if self._plotter is None:
            self._plotter = PlotProcess()
        if self._renderer.busy():
            return  # still drawing the previous plot: this redraw is dropped
        episodes, validations = self.training_log.loss_columns()  # copies, taken on the training thread
        self._plotted_through = self.training_log.last_episode
        path = os.path.join(self.training_log.exports_dir(trainer), LIVE_PLOT_FILE)
        total, phase, plotter = total_episodes(trainer), self.training_log.phase, self._plotter

        def draw() -> bytes:
            png = plotter.loss_png(episodes, validations, total=total, phase=phase)
            atomic_write(LocalFileSystem(), path, lambda handle: handle.write(png))
            return png

        self._renderer.submit(draw)

    def _final_live_plot(self, trainer: pl.Trainer) -> None:
        """The live plot of every episode, once more at the end when the last redraw came before the last episode
        (``min_plot_interval_s`` skips redraws, so it may be far behind)."""
        assert self.training_log is not None
        if self._renderer is not None:
            self._renderer.wait(LIVE_PLOT_WAIT_S)
        last = self.training_log.last_episode
        if last is not None and self._last_redraw is not None and last != self._plotted_through:
            self._guarded(self._redraw_live_plot, trainer)
        self._finish()

    def _show_rendered(self) -> None:
        """On the training thread: show the live plot the background finished (if any), and report its failure."""
        if self._renderer is None:
            return
        png, error = self._renderer.take()
        if error is not None:
            self._warn(f"the live plot failed: {error}")
        if png is not None:
            self._guarded(self._show, png)

    def _finish(self, wait_s: float = LIVE_PLOT_WAIT_S) -> None:
        """Wait (bounded) for a live plot still drawing, then show it: the end of fit leaves the file complete."""
        if self._renderer is not None:
            if not self._renderer.wait(wait_s):
                log.warning("LivePlot: the live plot is still drawing after %.0f s", wait_s)
            self._show_rendered()

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

    def _guarded(self, action: Callable[..., Any], *args: Any) -> None:
        # A plot must never stop a day-long training; one warning is enough when it keeps failing.
        try:
            action(*args)
        except Exception as err:
            self._warn(f"{getattr(action, '__name__', 'the live plot')} failed: {err}")

    def _warn(self, message: str) -> None:
        if not self._warned:
            log.warning("LivePlot: %s", message)
        self._warned = True


class _BackgroundRenderer:
    """Runs one drawing job at a time in a daemon thread; the caller collects the PNG (or the error) later."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._png: bytes | None = None
        self._error: BaseException | None = None

    def busy(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def submit(self, job: Callable[[], bytes]) -> None:
        self._thread = threading.Thread(target=self._run, args=(job,), name="LivePlot", daemon=True)
        self._thread.start()

    def _run(self, job: Callable[[], bytes]) -> None:
        try:
            png = job()
        except Exception as err:  # reported on the training thread by take()
            with self._lock:
                self._error = err
            return
        with self._lock:
            self._png = png

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


def _notebook_display(force: bool = False) -> tuple[Callable[..., Any], type] | None:
    """``(display, Image)`` of IPython when running in a notebook kernel (or ``force`` and IPython importable)."""
    if not force and "IPython" not in sys.modules:
        # A notebook kernel has imported IPython already; a script would pay for the import on the training thread
        # (benchmarks/HISTORY.md, "Earlier: plot process, checkpoint serialization, one TensorBoard event").
        return None
    try:
        from IPython import get_ipython
        from IPython.display import Image, display
    except ImportError:
        return None
    shell = get_ipython()
    in_kernel = shell is not None and getattr(shell, "kernel", None) is not None
    return (display, Image) if in_kernel or force else None
