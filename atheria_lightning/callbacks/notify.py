"""Notify: when a run's notifications go out during training (finished, stopped early, memory nearly full)."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from typing_extensions import override

from atheria_lightning.callbacks.resources import memory_percent
from atheria_lightning.callbacks.stopping import StopsEarly
from atheria_lightning.data import episodes_done, total_episodes
from atheria_lightning.notifier import Notifier, progress_text
from atheria_lightning.store import UsesRunStore
from atheria_lightning.store.retention import best

__all__ = ["Notify"]

log = logging.getLogger(__name__)

#: RAM or GPU memory at or above this share (%) sends the resource alert, once per session.
MEMORY_ALERT_PERCENT = 90.0
#: Memory is read after an episode at most this often (seconds): a few host-side counters, not worth more.
MEMORY_CHECK_SECONDS = 30.0


class Notify(UsesRunStore, Callback):
    """Decides when the run's notifications go out; its :class:`~atheria_lightning.notifier.Notifier` sends them
    in the background. ``atheria fit --notify URL`` adds it (and sends the failures and a mirror left behind at the
    end of the command itself); a config does not list it.

    On global rank 0:

    - training ended after the run's last episode: *finished*, with the best monitored value among the run's
      best checkpoints (from its store's manifest);
    - training ended before it: *stopped at episode k of N*, with the reason given by the callback that stopped it
      (one of ``stoppers``: the time guard, a signal), and how to continue;
    - after an episode, at most every ``MEMORY_CHECK_SECONDS``: RAM or GPU memory at or above
      ``MEMORY_ALERT_PERCENT`` sends one alert, once per session (measured as ``ResourceMonitor`` measures, whether
      the run has one or not).

    Args:
        notifier: The command's sender; it names the experiment in every message.
        stoppers: The callbacks that may stop training early, asked why once training has ended.

    Example::

        notifier = Notifier(["ntfy://my-atheria-runs"], "demo")
        guard, signals = TimeLimitGuard(max_hours=11.5), StopOnSignal()
        Trainer(callbacks=[guard, signals, Notify(notifier, stoppers=[guard, signals])])
    """

    def __init__(self, notifier: Notifier, stoppers: Sequence[StopsEarly] = ()) -> None:
        self.notifier = notifier
        self.stoppers = list(stoppers)
        self._next_memory_check = 0.0
        self._memory_alerted = False

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._next_memory_check = time.monotonic()

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self._memory_alerted or not trainer.is_global_zero or time.monotonic() < self._next_memory_check:
            return
        self._next_memory_check = time.monotonic() + MEMORY_CHECK_SECONDS
        try:
            percent = memory_percent(pl_module.device)
        except Exception as err:  # a reading that fails must not stop a day-long training: no more readings
            log.warning("memory is not watched for notifications: reading it failed (%s)", err)
            self._memory_alerted = True
            return
        if max(percent.values()) >= MEMORY_ALERT_PERCENT:
            self._memory_alerted = True
            self.notifier.memory_high(_where(trainer), percent, MEMORY_ALERT_PERCENT)

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # At fit's end, not train's: every on_train_end has run by then (the checkpoint written and listed, the
        # stopping callback's mirror flush), whatever the callbacks' order.
        if not trainer.is_global_zero:
            return
        done, total = episodes_done(trainer), total_episodes(trainer)
        if total is not None and done >= total:
            self.notifier.finished(_where(trainer), self._best())
            return
        reason = next((why for why in (stopper.stopped_because for stopper in self.stoppers) if why), None)
        self.notifier.stopped(_where(trainer), reason)

    def _best(self) -> str | None:
        """``val/loss 0.0123 (episode 580)``: the best of the run's best checkpoints, from the store's manifest."""
        if self.store is None or self.store.monitor is None:
            return None
        try:
            entries = self.store.entries()
        except Exception as err:  # the notification goes without it; the store's own checks report the manifest
            log.warning("the best checkpoint is not named in the notification: %s", err)
            return None
        # The manifest's own ranking, as the store's export chooses (without its verification of the files: a name
        # in a message reads no checkpoint).
        ranked = best(entries)
        if not ranked:
            return None
        entry = ranked[0][1]
        return f"{self.store.monitor} {entry.metric:.4g} (episode {entry.episode})"


def _where(trainer: pl.Trainer) -> str:
    return progress_text(episodes_done(trainer), total_episodes(trainer))
