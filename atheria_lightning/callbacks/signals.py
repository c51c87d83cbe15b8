"""StopOnSignal: SIGTERM (Kaggle, ``kill``) or a first Ctrl+C / notebook interrupt stops after the episode, saved."""

from __future__ import annotations

import signal
import threading
import time
from types import FrameType
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from typing_extensions import override

from atheria_lightning.callbacks.stopping import announce_stop
from atheria_lightning.errors import require
from atheria_lightning.store import UsesRunStore

__all__ = ["StopOnSignal"]


class StopOnSignal(UsesRunStore, Callback):
    """Turns a stop request into a clean stop: ``last.ckpt`` written, mirror flushed (through the run's store),
    exit code 0.

    - SIGTERM (Kaggle stopping a session, ``kill``, a scheduler): from the start of training this callback's
      handler takes over from Lightning's (which would raise ``SIGTERMException`` between two hooks, too late to
      save), and the run stops after the running episode.
    - SIGINT (Ctrl+C, a notebook's "interrupt"): the first one asks for a stop after the running episode; a
      second one interrupts at once, as usual.

    Under DDP a signal to any rank stops every rank after the same episode (the ranks agree through an all-reduce).
    The CLI adds this callback to every run.

    Args:
        flush_timeout_s: Longest wait for the mirror flush after the checkpoint is written.

    Raises:
        ConfigError: ``flush_timeout_s <= 0``.

    Example::

        Trainer(callbacks=[SmartCheckpoint(), StopOnSignal(flush_timeout_s=30)])
    """

    def __init__(self, flush_timeout_s: float = 60.0) -> None:
        require(flush_timeout_s > 0, f"StopOnSignal.flush_timeout_s={flush_timeout_s} must be > 0")
        self.flush_timeout_s = flush_timeout_s
        self.requested: str | None = None
        self._previous: dict[int, Any] = {}
        self._stopped_at: float | None = None
        self._reason = ""

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # After Lightning registered its own handlers; only the main thread may set handlers (a notebook cell
        # runs there).
        self.requested, self._stopped_at, self._reason = None, None, ""
        if threading.current_thread() is threading.main_thread():
            self._previous = {
                signal.SIGINT: signal.signal(signal.SIGINT, self._on_sigint),
                signal.SIGTERM: signal.signal(signal.SIGTERM, self._on_sigterm),
            }

    @property
    def stopped_because(self) -> str | None:
        """``signal: <reason>`` once a signal has stopped training; None before (:class:`StopsEarly`)."""
        return f"signal: {self._reason}" if self._reason else None

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if threading.current_thread() is threading.main_thread():
            for signum, handler in self._previous.items():
                signal.signal(signum, handler)
        self._previous = {}

    def _on_sigterm(self, signum: int, frame: FrameType | None) -> None:
        self.requested = "SIGTERM received"

    def _on_sigint(self, signum: int, frame: FrameType | None) -> None:
        if self.requested is not None:  # the second interrupt: stop waiting
            signal.signal(signal.SIGINT, self._previous.get(signal.SIGINT) or signal.default_int_handler)
            raise KeyboardInterrupt
        self.requested = "interrupted (SIGINT)"
        print("\ninterrupt received: stopping after this episode with a checkpoint (interrupt again to abort now)",
              flush=True)  # fmt: skip

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        reason = self.requested or ("SIGTERM received" if trainer.received_sigterm else None)
        # A signal to any one rank stops them all, after the same episode (which SmartCheckpoint then saves).
        if self._stopped_at is None and trainer.strategy.reduce_boolean_decision(reason is not None, all=False):
            trainer.should_stop = True
            self._stopped_at = time.monotonic()
            self._reason = reason or "stop requested on another rank"

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._stopped_at is not None:
            announce_stop(trainer, self.store, self._reason, self._stopped_at, self.flush_timeout_s)
            self._stopped_at = None
