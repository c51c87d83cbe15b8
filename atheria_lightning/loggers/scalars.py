"""Scalars sent to the loggers directly, beside ``LightningModule.log``, where its cost per key matters.

Tag names: TensorBoard draws one section per tag prefix, in alphabetical order, and opens on the first. What a
user looks at comes first (``train/``, then ``val/``); the session machine's state (time left, RAM, GPU, mirror
syncs) shares one prefix that sorts after them, ``vm/``.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch

__all__ = ["as_floats", "logging_step", "send_to_loggers"]


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
