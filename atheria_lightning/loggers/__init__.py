"""The run's loggers: scalars sent to them directly, and the loggers that live across sessions behind one protocol
(:class:`SessionLogger`): TensorBoard's events past the resume point dropped, one W&B run for the whole run."""

from __future__ import annotations

from collections.abc import Sequence

from lightning.pytorch.loggers import Logger

from atheria_lightning.loggers import tensorboard, wandb
from atheria_lightning.loggers.base import RunLoggers, SessionLogger
from atheria_lightning.loggers.scalars import as_floats, logging_step, send_to_loggers
from atheria_lightning.loggers.tensorboard import BufferedTensorBoardLogger
from atheria_lightning.loggers.wandb import ID_FILE, WandbRun, WandbRunId, check_logger_packages

__all__ = [
    "ATTACH",
    "ID_FILE",
    "BufferedTensorBoardLogger",
    "RunLoggers",
    "SessionLogger",
    "WandbRun",
    "WandbRunId",
    "as_floats",
    "attach_loggers",
    "check_logger_packages",
    "logging_step",
    "send_to_loggers",
]

#: Each kind's ``attach(loggers, run_dir, notify_urls)``: its session loggers among the trainer's loggers, and the
#: callbacks that keep their state in checkpoints. In this order the summary lists them.
ATTACH = (tensorboard.attach, wandb.attach)


def attach_loggers(loggers: Sequence[Logger], run_dir: str, notify_urls: Sequence[str] = ()) -> RunLoggers:
    """The session loggers of the trainer's ``loggers`` in the run folder ``run_dir``; ``notify_urls`` are kept out
    of what a logger records (they hold services' tokens)."""
    found = RunLoggers(notify_urls=tuple(notify_urls))
    for attach in ATTACH:
        sessions, callbacks = attach(loggers, run_dir, notify_urls)
        found.sessions = [*found.sessions, *sessions]
        found.callbacks += callbacks
    return found
