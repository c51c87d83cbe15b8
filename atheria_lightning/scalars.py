"""Scalars sent to the loggers directly, beside ``LightningModule.log``, where its cost per key matters.

Tag names: TensorBoard draws one section per tag prefix, in alphabetical order, and opens on the first. What a
user looks at comes first (``train/``, then ``val/``); the session machine's state (time left, RAM, GPU, mirror
syncs) shares one prefix that sorts after them, ``vm/``.
"""

from __future__ import annotations

import time
from argparse import Namespace
from collections.abc import Mapping
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_only
from tensorboard.compat.proto.summary_pb2 import Summary
from typing_extensions import Self, override

__all__ = ["BufferedTensorBoardLogger", "as_floats", "logging_step", "send_to_loggers"]


def as_floats(values: list[Any]) -> list[float]:
    """Numbers and one-element tensors as floats, with one device-to-host copy per device for all the tensors.

    The values may sit on different devices: ``callback_metrics`` mixes the module's tensors (on the GPU) with
    numbers sent from the host.
    """
    floats = [0.0] * len(values)
    by_device: dict[torch.device, list[int]] = {}
    for index, value in enumerate(values):
        if isinstance(value, torch.Tensor):
            by_device.setdefault(value.device, []).append(index)
        else:
            floats[index] = float(value)
    for indices in by_device.values():
        stacked = torch.stack([values[index].detach().float().reshape(()) for index in indices])
        for index, number in zip(indices, stacked.cpu().tolist(), strict=True):
            floats[index] = number
    return floats


def send_to_loggers(trainer: pl.Trainer, metrics: dict[str, float | torch.Tensor], cadence: bool = False) -> None:
    """``metrics`` into ``trainer.callback_metrics`` and, on rank 0, to every logger at this episode's step.

    ``LightningModule.log`` costs time per key and call (Lightning moves its running-metric object to the value's
    device on every call), a few percent of a demo episode for its seven ``train/*`` keys (``benchmarks/RESULTS.md``,
    CPU section). As Lightning's ``LearningRateMonitor`` does, these go to ``trainer.loggers`` directly instead, at
    the step Lightning gives the episode's ``train/loss``. With ``cadence`` they reach the loggers only on the
    trainer's ``log_every_n_steps`` steps, as logged values do; without, every call is sent (for values logged
    when they change). ``callback_metrics`` always gets them, so callbacks read them as logged values.
    """
    values = {key: value.detach() if isinstance(value, torch.Tensor) else torch.tensor(float(value))
              for key, value in metrics.items()}  # fmt: skip
    trainer.callback_metrics.update(values)
    if not trainer.is_global_zero or not trainer.loggers or not values:
        return
    step = logging_step(trainer)
    # Lightning's own cadence for logged values: every log_every_n_steps-th batch, and when the run stops.
    if cadence and (step + 1) % max(trainer.log_every_n_steps, 1) and not trainer.should_stop:
        return
    scalars = dict(zip(values, as_floats(list(values.values())), strict=True))
    for logger in trainer.loggers:
        logger.log_metrics(scalars, step=step)


def logging_step(trainer: pl.Trainer) -> int:
    """The step at which Lightning logs this batch's values (``self.log``), which counts every training batch.

    Lightning's own counter, private: ``trainer.global_step`` counts optimizer steps, and a skipped non-finite
    episode makes none. ``tests/test_lightning_private.py`` fails with a clear message if the counter moves, and
    ``pyproject.toml`` bounds ``lightning`` below 2.7.
    """
    return trainer.fit_loop.epoch_loop._batches_that_stepped


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

    def __init__(self, *args: Any, flush_interval_s: float = 5.0, **kwargs: Any) -> None:
        kwargs.setdefault("flush_secs", flush_interval_s)  # passed on to the SummaryWriter's own thread
        super().__init__(*args, **kwargs)
        self.flush_interval_s = flush_interval_s
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
            prefix = f"{self._prefix}{self.LOGGER_JOIN_CHAR}" if self._prefix else ""  # as TensorBoardLogger tags
            values = [Summary.Value(tag=prefix + key, simple_value=value) for key, value in numbers.items()]
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
