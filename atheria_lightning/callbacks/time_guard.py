"""TimeLimitGuard: stop with a fresh checkpoint before the platform's session quota kills the run."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from typing_extensions import override

from atheria_lightning.callbacks.clock import UsesClock
from atheria_lightning.callbacks.stopping import announce_stop, say
from atheria_lightning.data import episodes_done, total_episodes
from atheria_lightning.errors import require
from atheria_lightning.loggers.scalars import send_to_loggers
from atheria_lightning.store import UsesRunStore

log = logging.getLogger(__name__)

__all__ = ["TimeLimitGuard"]

# Until this many episodes are measured, predictions are widened by FIRST_EPISODES_MARGIN: the first
# episodes include warm-up (allocator, cuDNN autotuning) and a single sample says little.
WARMUP_EPISODES = 3
FIRST_EPISODES_MARGIN = 2.0
STEADY_MARGIN = 1.25
# The emergency mirror flush may always take this long, even when the budget is nearly spent.
MIN_FLUSH_SECONDS = 10.0
# Weight of the newest duration in the running average.
EMA_WEIGHT = 0.2


def _check_hours(hours: float, setting: str) -> None:
    require(
        isinstance(hours, int | float) and not isinstance(hours, bool) and math.isfinite(hours) and hours > 0,
        f"{setting}={hours!r} must be a number of hours > 0",
    )


def process_age_seconds() -> float:
    """Seconds since this process started (imports and platform start-up count against the quota too).

    Every guard reads the session's age through this module-level name: the one seam for code that runs many
    sessions in one process (the test suite gives each test a fresh session by replacing it).
    """
    try:
        import psutil

        return max(0.0, time.time() - psutil.Process().create_time())
    except Exception:  # psutil missing or the process table unreadable: count from now
        return 0.0


class TimeLimitGuard(UsesClock, UsesRunStore, Callback):
    """Stops training cleanly, with ``last.ckpt`` written and the mirror flushed, before the session budget ends.

    The budget counts from the start of this process (each Colab or Kaggle session has its own quota). After
    each episode the guard predicts when the *next* episode would end, plus one checkpoint save and one mirror
    flush (running averages of measured durations, widened for the first episodes; the save and sync times come
    from the run's :class:`~atheria_lightning.store.RunStore`). If that passes ``emergency_fraction * max_hours``,
    or that point is already reached, it stops the trainer after this episode, which ``SmartCheckpoint`` then
    saves; at the end of training it waits for the write, flushes the mirror within what is left of the budget,
    and prints ``stopped at episode k of N (p%), run the same command again to continue`` (exit code 0). Under DDP
    rank 0 decides and broadcasts, so all ranks stop at the same episode. The training time of all sessions is kept
    in the checkpoint.

    Args:
        max_hours: The session budget in hours (Colab Free about 12, Kaggle 9-12).
        emergency_fraction: Share of the budget that training may use, in (0, 1); the rest is the safety margin.
        log_every_n_episodes: Send ``vm/elapsed_hours`` and ``vm/remaining_hours`` to the loggers after every this
            many episodes. The stop decision is still taken after every episode; only the logging is thinned.

    Logged keys (every ``log_every_n_episodes`` episodes, straight to ``trainer.loggers`` at the trainer's step,
    as Lightning's ``LearningRateMonitor`` does, because ``pl_module.log`` costs the training thread time per key
    and episode even between logging steps: ``benchmarks/RESULTS.md``, CPU section, "Where the rest goes"):

    ======================  =====================================================
    ``vm/elapsed_hours``    hours since this process started
    ``vm/remaining_hours``  hours left before the emergency stop point
    ======================  =====================================================

    Raises:
        ConfigError: ``max_hours <= 0``, ``emergency_fraction`` outside (0, 1) or ``log_every_n_episodes < 1``.

    Example::

        Trainer(callbacks=[TimeLimitGuard(max_hours=11.5), SmartCheckpoint()])
    """

    def __init__(
        self,
        max_hours: float,
        emergency_fraction: float = 0.9,
        log_every_n_episodes: int = 10,
    ) -> None:
        _check_hours(max_hours, "TimeLimitGuard.max_hours")
        require(
            isinstance(log_every_n_episodes, int) and log_every_n_episodes >= 1,
            f"TimeLimitGuard.log_every_n_episodes={log_every_n_episodes!r} must be a positive integer",
        )
        require(
            0.0 < emergency_fraction < 1.0, f"TimeLimitGuard.emergency_fraction={emergency_fraction} must be in (0, 1)"
        )
        self.max_hours = max_hours
        self.emergency_fraction = emergency_fraction
        self.clock: Callable[[], float] = time.monotonic
        self.log_every_n_episodes = log_every_n_episodes
        # The process's own start-up counts against the quota too.
        self._start = self.clock() - process_age_seconds()
        self.episode_seconds: float | None = None
        self.episodes_measured = 0
        self.previous_sessions_seconds = 0.0
        self.sessions = 1
        self.stopped_early = False
        self.stop_reason = ""
        self._stopped_at: float | None = None
        self._flush_seconds = MIN_FLUSH_SECONDS
        self._train_started: float | None = None
        self._last_batch_end: float | None = None

    @override
    def _clock_changed(self) -> None:
        self._start = self.clock()  # a test's clock starts now; the process's age is the real clock's

    def set_budget(self, max_hours: float) -> None:
        """This session's budget in hours (``atheria fit --max_hours``), in place of the configured one."""
        _check_hours(max_hours, "max_hours")
        self.max_hours = max_hours

    # ----- time accounting -----
    @property
    def budget_seconds(self) -> float:
        return self.max_hours * 3600.0

    @property
    def stop_at_seconds(self) -> float:
        return self.emergency_fraction * self.budget_seconds

    @property
    def stopped_because(self) -> str | None:
        """``time limit: <reason>`` once the guard has stopped training; None before (:class:`StopsEarly`)."""
        return f"time limit: {self.stop_reason or 'stop decided on rank 0'}" if self.stopped_early else None

    def budget_spent(self) -> bool:
        """This process has used its share of the budget already, so the guard would stop at once (a curriculum's
        later phase, in the same session as the earlier ones, then does not start)."""
        return process_age_seconds() >= self.stop_at_seconds

    def elapsed_seconds(self) -> float:
        return self.clock() - self._start

    def elapsed_hours(self) -> float:
        return self.elapsed_seconds() / 3600.0

    def remaining_hours(self) -> float:
        return max(0.0, self.stop_at_seconds - self.elapsed_seconds()) / 3600.0

    def training_seconds_this_session(self) -> float:
        return 0.0 if self._train_started is None else self.clock() - self._train_started

    def total_training_hours(self) -> float:
        """Training time over all sessions of this run, this one included."""
        return (self.previous_sessions_seconds + self.training_seconds_this_session()) / 3600.0

    # ----- hooks -----
    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._train_started = self._last_batch_end = self.clock()

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        now = self.clock()
        # The time between two batch ends includes validation and checkpoint saves, which the next episode pays too.
        self._record_episode(now - (self._last_batch_end if self._last_batch_end is not None else now))
        self._last_batch_end = now
        self._log_time(trainer)
        decision = self._should_stop(trainer) if trainer.is_global_zero and not trainer.should_stop else False
        if trainer.strategy.broadcast(decision, src=0):
            self._stop(trainer)

    def _log_time(self, trainer: pl.Trainer) -> None:
        """``vm/*`` hours to every logger, at the step Lightning gives this episode's ``train/*`` values."""
        if not trainer.is_global_zero or episodes_done(trainer) % self.log_every_n_episodes:
            return
        send_to_loggers(
            trainer, {"vm/elapsed_hours": self.elapsed_hours(), "vm/remaining_hours": self.remaining_hours()}
        )

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._stopped_at is not None:
            announce_stop(trainer, self.store, self.stop_reason, self._stopped_at, self._flush_seconds)
            self._stopped_at = None
        if trainer.is_global_zero:
            say(
                f"time used: {self.training_seconds_this_session() / 3600:.2f} h of training this session, "
                f"{self.total_training_hours():.2f} h over {self.sessions} session(s)"
            )

    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "total_training_seconds": self.previous_sessions_seconds + self.training_seconds_this_session(),
            "sessions": self.sessions,
            "max_hours": self.max_hours,
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.previous_sessions_seconds = float(state_dict.get("total_training_seconds", 0.0))
        self.sessions = int(state_dict.get("sessions", 0)) + 1

    # ----- decision -----
    def _record_episode(self, seconds: float) -> None:
        if seconds <= 0:
            return
        if self.episode_seconds is None:
            self.episode_seconds = seconds
        else:
            self.episode_seconds = (1 - EMA_WEIGHT) * self.episode_seconds + EMA_WEIGHT * seconds
        self.episodes_measured += 1

    def predicted_stop_cost(self, trainer: pl.Trainer) -> float:
        """Seconds that one more episode plus an emergency save and mirror flush are expected to take."""
        margin = FIRST_EPISODES_MARGIN if self.episodes_measured < WARMUP_EPISODES else STEADY_MARGIN
        episode = self.episode_seconds or 0.0
        store = 0.0 if self.store is None else self.store.max_write_seconds + self.store.last_sync_seconds
        return margin * (episode + store)

    def _should_stop(self, trainer: pl.Trainer) -> bool:
        if self._out_of_episodes(trainer):
            return False  # the run ends now anyway, through the normal path
        elapsed = self.elapsed_seconds()
        if elapsed >= self.stop_at_seconds:
            self.stop_reason = f"{self.emergency_fraction:.0%} of the {self.max_hours:g} h budget reached"
            return True
        if elapsed + self.predicted_stop_cost(trainer) > self.stop_at_seconds:
            self.stop_reason = "the next episode would end past the time limit"
            return True
        return False

    @staticmethod
    def _out_of_episodes(trainer: pl.Trainer) -> bool:
        total = total_episodes(trainer)
        return total is not None and episodes_done(trainer) >= total

    def _stop(self, trainer: pl.Trainer) -> None:
        trainer.should_stop = True
        self.stopped_early = True
        self._stopped_at = time.monotonic()
        # The flush may use what is left of the budget (the quota kills the session anyway), at least a few seconds.
        self._flush_seconds = max(MIN_FLUSH_SECONDS, self.budget_seconds - self.elapsed_seconds())
        if self.store is not None:
            self.store.limit_flush(self._stopped_at + self._flush_seconds)
