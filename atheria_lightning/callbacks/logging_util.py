"""Scalars a callback sends to the loggers itself, outside ``LightningModule.log``."""

from __future__ import annotations

import lightning.pytorch as pl
import torch

__all__ = ["send_to_loggers"]


def send_to_loggers(trainer: pl.Trainer, metrics: dict[str, float]) -> None:
    """``metrics`` to every logger at the step of this episode's ``train/*`` values, and into ``callback_metrics``.

    As Lightning's ``LearningRateMonitor`` does: ``pl_module.log`` costs about a millisecond per key on a CPU, and
    reaches the loggers only at the trainer's ``log_every_n_steps`` cadence, so a value logged when it changes would
    be missed and one logged every episode repeats a stale value. Rank 0 only.
    """
    if not trainer.is_global_zero or not metrics:
        return
    step = trainer.fit_loop.epoch_loop._batches_that_stepped
    for logger in trainer.loggers:
        logger.log_metrics(metrics, step=step)
    for key, value in metrics.items():
        trainer.callback_metrics[key] = torch.tensor(float(value))
