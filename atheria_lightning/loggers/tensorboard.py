"""TensorBoard across the sessions of a run: one event per logging step, no blocking flush, and on resume the
events past the resumed checkpoint dropped (a resumed session logs those steps again)."""

from __future__ import annotations

import logging
import os
import time
from argparse import Namespace
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from lightning.pytorch.loggers import Logger, TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_only
from tensorboard.compat.proto.summary_pb2 import Summary
from typing_extensions import Self, override

__all__ = ["BufferedTensorBoardLogger", "TensorBoardHistory", "attach"]

log = logging.getLogger(__name__)


class BufferedTensorBoardLogger(TensorBoardLogger):
    """Lightning's ``TensorBoardLogger`` without a blocking flush after every logging step, and with one event per
    logging step.

    Lightning calls ``save()`` after each ``log_metrics``, and the TensorBoard writer's flush then waits for its
    thread to write out what is queued, on the training thread, every episode with ``log_every_n_steps=1``. Here
    ``save`` flushes at most every ``flush_interval_s`` seconds; in between, the writer thread appends each event to
    the file as it takes it from the queue (TensorBoard's local writer), so a killed process loses only what was
    still queued. :meth:`flush` forces one (``MirrorSync`` calls it before each sync, so the mirror gets every event
    logged so far), and the end of training flushes and closes as before.

    ``log_metrics`` writes the numbers of one call as one TensorBoard event holding a value per tag, where
    ``TensorBoardLogger`` writes an event per tag, which costs the training thread about four times as much for the
    eight values of a demo episode (``benchmarks/RESULTS.md``, CPU section). TensorBoard shows the same scalars;
    values of other kinds (dicts) go through ``TensorBoardLogger`` as before.

    Example::

        Trainer(logger=BufferedTensorBoardLogger(save_dir="runs/demo", name="logs", version=""))
    """

    def __init__(self, *args: Any, prefix: str = "", flush_interval_s: float = 5.0, **kwargs: Any) -> None:
        kwargs.setdefault("flush_secs", flush_interval_s)  # passed on to the SummaryWriter's own thread
        super().__init__(*args, prefix=prefix, **kwargs)
        self.flush_interval_s = flush_interval_s
        self.tag_prefix = f"{prefix}{self.LOGGER_JOIN_CHAR}" if prefix else ""  # as TensorBoardLogger tags
        self._hparams_metrics: tuple[str, ...] = ()
        self._flushed_at: float | None = None

    @override
    @rank_zero_only
    def log_metrics(self, metrics: Mapping[str, Any], step: int | None = None) -> None:
        numbers, others = {}, {}
        for key, value in metrics.items():
            if key == "epoch":
                continue  # Lightning adds the epoch to every logged dict: always 0 here, a card of no use
            if isinstance(value, torch.Tensor) and value.numel() == 1:
                value = value.item()
            if isinstance(value, int | float):
                numbers[key] = float(value)
            else:
                others[key] = value
        if numbers:
            values = [Summary.Value(tag=self.tag_prefix + key, simple_value=value) for key, value in numbers.items()]
            self.experiment._get_file_writer().add_summary(Summary(value=values), step)
        if others:
            super().log_metrics(others, step)

    @override
    @rank_zero_only
    def save(self) -> None:
        now = time.monotonic()
        if self._flushed_at is None or now - self._flushed_at >= self.flush_interval_s:
            self._flushed_at = now
            super().save()  # the flush, and hparams.yaml the first time

    def show_in_hparams(self, *metrics: str | None) -> Self:
        """Name the metrics TensorBoard's HPARAMS tab shows beside each run's settings (e.g. the checkpoint monitor),
        so that runs under one ``--logdir`` compare by them; their values are the logged scalars of those tags."""
        self._hparams_metrics = tuple(metric for metric in metrics if metric)
        return self

    @override
    @rank_zero_only
    def log_hyperparams(self, params: Any, metrics: dict[str, Any] | None = None, step: int | None = None) -> None:
        super().log_hyperparams(params, metrics, step)  # hparams.yaml, and Lightning's own hparams when given metrics
        if metrics is not None or not self._hparams_metrics:
            return
        from torch.utils.tensorboard.summary import hparams

        settings = vars(params) if isinstance(params, Namespace) else dict(params)
        # The HPARAMS tab takes numbers, strings and booleans; None, lists and private keys are left out.
        plain = {key: value for key, value in settings.items()
                 if isinstance(value, int | float | str | bool) and not str(key).startswith("_")}  # fmt: skip
        writer = self.experiment._get_file_writer()
        # The metric values are not written here: TensorBoard reads them from the scalars of the same tags.
        for summary in hparams(plain, dict.fromkeys(self._hparams_metrics, 0.0)):
            writer.add_summary(summary, step)

    def purge_from(self, step: int) -> bool:
        """Make TensorBoard drop the events of earlier sessions at ``step`` and later: a resume re-runs them.

        A killed session logged past its last checkpoint (and the mirror may hold those events); the resumed one
        logs the same steps again. ``SummaryWriter(purge_step=…)`` writes a restart marker that TensorBoard's reader
        honours, so each step keeps one value across sessions. Call it before the first event of this session; False
        (nothing done) once the writer exists.
        """
        if self._experiment is not None:
            return False
        self._kwargs["purge_step"] = max(0, int(step))
        return True

    @rank_zero_only
    def flush(self) -> None:
        """Write every event logged so far to disk now."""
        if self._experiment is not None:
            self._flushed_at = time.monotonic()
            self._experiment.flush()


class TensorBoardHistory:
    """A TensorBoard logger of the run, as the session sees it (:class:`~atheria_lightning.loggers.SessionLogger`).

    On resume, a :class:`BufferedTensorBoardLogger` drops the events past the checkpoint (TensorBoard keeps one value
    per step across sessions); the summary gives the command that shows the run.
    """

    def __init__(self, logger: TensorBoardLogger, run_dir: str) -> None:
        self.logger = logger
        self.run_dir = run_dir

    def resume(self, header: Mapping[str, Any] | None, start: bool = True) -> None:
        """TensorBoard keeps one value per step across sessions: events past the resumed checkpoint are dropped."""
        steps = ((header or {}).get("loops") or {}).get("fit_loop", {}).get("epoch_loop.state_dict", {})
        step = steps.get("_batches_that_stepped") if isinstance(steps, dict) else None
        if not isinstance(step, int) or not start or not isinstance(self.logger, BufferedTensorBoardLogger):
            return
        # The checkpoint's own step holds its episode's values (and its validation's): later ones are re-run.
        if not self.logger.purge_from(step + 1):
            log.warning("TensorBoard's writer was open before the resume: events past step %d may show twice", step)

    def finish(self, failed: bool = False) -> None:
        pass  # Lightning's end of training flushes and closes the writer

    def lines(self) -> list[str]:
        run = os.path.abspath(self.run_dir)
        root = os.path.dirname(os.path.normpath(self.run_dir)) or "."
        # The run root when the events are in the run, so that TensorBoard names the run after the experiment.
        inside = os.path.commonpath([os.path.abspath(self.logger.log_dir), run]) == run
        return [f"TensorBoard: tensorboard --logdir {root if inside else self.logger.log_dir}"]


def attach(loggers: Sequence[Logger], run_dir: str, notify_urls: Sequence[str] = ()) -> tuple[list[Any], list[Any]]:
    """Each TensorBoard logger of the trainer as a session logger; no callback."""
    return [TensorBoardHistory(each, run_dir) for each in loggers if isinstance(each, TensorBoardLogger)], []
