"""TimeLimitGuard's stop decision, with a fake clock and a stand-in trainer: it stops after an episode when the next
one, with its checkpoint save and mirror sync, would end past the stop point, and not much sooner."""

from __future__ import annotations

import time
from types import SimpleNamespace

import pytest
from conftest import FakeEpisodeClock

from atheria_lightning.callbacks import TimeLimitGuard
from atheria_lightning.data import EpisodeDataModule

HOUR = 3600.0
# max_hours=1 with emergency_fraction=0.9: training may use the first 3240 s of the session.
STOP_POINT = 0.9 * HOUR


class FakeStore:
    """The run store as the guard sees it: its slowest checkpoint write, its last mirror sync, a flush deadline."""

    def __init__(self, max_write_seconds: float = 0.0, last_sync_seconds: float = 0.0) -> None:
        self.max_write_seconds = max_write_seconds
        self.last_sync_seconds = last_sync_seconds
        self.flush_deadlines: list[float] = []

    def limit_flush(self, deadline: float) -> None:
        self.flush_deadlines.append(deadline)


def fake_trainer(datamodule: EpisodeDataModule | None = None) -> SimpleNamespace:
    """What the guard reads of a single-process trainer, with no logger."""
    return SimpleNamespace(is_global_zero=True, should_stop=False, datamodule=datamodule, global_step=0,
                           loggers=[], callback_metrics={},
                           strategy=SimpleNamespace(broadcast=lambda value, src=0: value))  # fmt: skip


def train_until_stopped(guard: TimeLimitGuard, clock: FakeEpisodeClock, trainer: SimpleNamespace) -> int:
    """Run episodes through the guard's hooks until it stops the trainer; returns the episodes that ran."""
    guard.on_train_start(trainer, None)
    while not trainer.should_stop:
        assert trainer.global_step < 1000, "the guard never stopped"
        clock.on_train_batch_start(trainer, None, None, trainer.global_step)
        trainer.global_step += 1
        guard.on_train_batch_end(trainer, None, None, None, trainer.global_step - 1)
    return trainer.global_step


def test_the_guard_runs_every_episode_that_ends_before_the_stop_point_and_no_more() -> None:
    clock = FakeEpisodeClock(seconds_per_episode=100.0)
    guard = TimeLimitGuard(max_hours=1.0, emergency_fraction=0.9).use_clock(clock)
    trainer = fake_trainer()
    assert train_until_stopped(guard, clock, trainer) == 32, "episode 33 would end at 3300 s, past 3240 s"
    assert guard.stopped_early and guard.stop_reason == "the next episode would end past the time limit"


def test_slow_saves_and_mirror_syncs_make_the_guard_stop_early_enough_to_finish_them() -> None:
    clock = FakeEpisodeClock(seconds_per_episode=100.0)
    guard = TimeLimitGuard(max_hours=1.0, emergency_fraction=0.9).use_clock(clock)
    guard.use_store(FakeStore(max_write_seconds=150.0, last_sync_seconds=50.0))
    train_until_stopped(guard, clock, fake_trainer())
    left = STOP_POINT - guard.elapsed_seconds()
    assert left >= 150.0 + 50.0, "the save and the sync of the last episode end before the stop point"
    assert left < 2 * (100.0 + 150.0 + 50.0), "no further episode with its save and sync was given away"


def test_a_stop_lets_the_mirror_flush_use_what_is_left_of_the_budget() -> None:
    clock = FakeEpisodeClock(seconds_per_episode=100.0)
    store = FakeStore(max_write_seconds=10.0, last_sync_seconds=10.0)
    guard = TimeLimitGuard(max_hours=1.0, emergency_fraction=0.9).use_clock(clock).use_store(store)
    train_until_stopped(guard, clock, fake_trainer())
    (deadline,) = store.flush_deadlines
    left_of_budget = HOUR - guard.elapsed_seconds()
    assert deadline - time.monotonic() == pytest.approx(left_of_budget, abs=5.0)


def test_a_session_already_past_the_stop_point_stops_after_the_first_episode() -> None:
    clock = FakeEpisodeClock(seconds_per_episode=1.0)
    guard = TimeLimitGuard(max_hours=1.0, emergency_fraction=0.9).use_clock(clock)
    clock.now = STOP_POINT  # e.g. a long start-up, or a previous phase of the same session
    assert train_until_stopped(guard, clock, fake_trainer()) == 1
    assert guard.stop_reason == "90% of the 1 h budget reached"


def test_the_first_episodes_are_predicted_more_cautiously_than_later_ones() -> None:
    # The first episodes include warm-up and a single sample says little.
    clock = FakeEpisodeClock(seconds_per_episode=10.0)
    guard = TimeLimitGuard(max_hours=1.0).use_clock(clock)
    trainer = fake_trainer()
    guard.on_train_start(trainer, None)
    costs = []
    for episode in range(5):
        clock.on_train_batch_start(trainer, None, None, episode)
        guard.on_train_batch_end(trainer, None, None, None, episode)
        costs.append(guard.predicted_stop_cost(trainer))
    assert costs[0] > costs[-1] >= 10.0


def test_the_last_episode_of_the_run_ends_it_the_normal_way_even_past_the_stop_point() -> None:
    datamodule = EpisodeDataModule(total_episodes=3)
    datamodule.load_state_dict({"next_episode": 3, "seed": datamodule.seed})  # every episode has run
    clock = FakeEpisodeClock(seconds_per_episode=1.0)
    guard = TimeLimitGuard(max_hours=1.0).use_clock(clock)
    trainer = fake_trainer(datamodule)
    guard.on_train_start(trainer, None)
    clock.now = HOUR
    guard.on_train_batch_end(trainer, None, None, None, 0)
    assert not trainer.should_stop and not guard.stopped_early


def test_the_training_time_of_every_session_is_carried_by_the_checkpoint() -> None:
    clock = FakeEpisodeClock(seconds_per_episode=100.0)
    first = TimeLimitGuard(max_hours=1.0, emergency_fraction=0.9).use_clock(clock)
    train_until_stopped(first, clock, fake_trainer())
    checkpointed = first.state_dict()
    clock.now = 0.0  # a new session
    second = TimeLimitGuard(max_hours=1.0, emergency_fraction=0.9).use_clock(clock)
    second.load_state_dict(checkpointed)
    train_until_stopped(second, clock, fake_trainer())
    assert second.sessions == 2
    assert second.total_training_hours() == pytest.approx(2 * 3200.0 / HOUR)


@pytest.mark.real_process_age
def test_a_guard_counts_the_session_from_the_start_of_its_process() -> None:
    # In a notebook the kernel's age is the session's: imports and earlier cells used the platform's quota too.
    import psutil

    age = time.time() - psutil.Process().create_time()
    guard = TimeLimitGuard(max_hours=1.0)
    assert guard.elapsed_seconds() >= age - 1.0 > 0
