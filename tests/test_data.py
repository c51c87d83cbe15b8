"""EpisodeDataModule without a Trainer: which episodes the stream yields, what a resume continues from, what counts as
done, and the seed a resume must keep."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from atheria_lightning.data import VALIDATION_SEED_OFFSET, EpisodeDataModule, episodes_done, total_episodes


def attached(datamodule: EpisodeDataModule) -> SimpleNamespace:
    """A stand-in for the trainer that runs ``datamodule``: the two attributes the datamodule reads or sets."""
    datamodule.trainer = SimpleNamespace(training=True, should_stop=False, datamodule=datamodule)
    return datamodule.trainer


def run(datamodule: EpisodeDataModule, until_episode: int | None = None) -> list[int]:
    """Hand each streamed episode to the datamodule as Lightning does before the step; the episodes that ran."""
    ran = []
    for batch in datamodule.train_dataloader():
        ran.append(datamodule.on_after_batch_transfer(batch, 0)["episode"])
        if batch["episode"] == until_episode:
            break
    return ran


def test_the_stream_yields_each_episode_once_with_the_runs_seed_then_stops_the_trainer() -> None:
    datamodule = EpisodeDataModule(total_episodes=4, seed=7)
    trainer = attached(datamodule)
    assert list(datamodule.train_dataloader()) == [{"episode": k, "seed": 7} for k in range(4)]
    assert trainer.should_stop, "the run ends after its last episode, however many epochs Lightning counts"


def test_a_second_pass_over_the_stream_never_replays_an_episode() -> None:
    datamodule = EpisodeDataModule(total_episodes=5)
    attached(datamodule)
    assert run(datamodule) == [0, 1, 2, 3, 4]
    assert run(datamodule) == []


def test_a_resume_continues_with_the_first_episode_that_did_not_run() -> None:
    first = EpisodeDataModule(total_episodes=10, seed=3)
    attached(first)
    assert run(first, until_episode=4) == [0, 1, 2, 3, 4]
    resumed = EpisodeDataModule(total_episodes=10, seed=3)
    resumed.load_state_dict(first.state_dict())
    attached(resumed)
    assert run(resumed) == [5, 6, 7, 8, 9]


def test_a_stream_built_before_the_checkpoint_is_loaded_starts_where_the_checkpoint_says() -> None:
    # Lightning may ask for the dataloader before it restores the datamodule's state.
    datamodule = EpisodeDataModule(total_episodes=10)
    stream = datamodule.train_dataloader()
    datamodule.load_state_dict({"next_episode": 7, "seed": datamodule.seed})
    assert [batch["episode"] for batch in stream] == [7, 8, 9]


def test_episodes_done_counts_the_running_episode_once_it_ran_and_not_a_failed_one() -> None:
    datamodule = EpisodeDataModule(total_episodes=10)
    trainer = attached(datamodule)
    assert episodes_done(trainer) == 0 and total_episodes(trainer) == 10
    run(datamodule, until_episode=2)
    assert episodes_done(trainer) == 3
    datamodule.abandon_running_episode()  # episode 2 failed before it finished
    assert episodes_done(trainer) == 2
    assert datamodule.state_dict()["next_episode"] == 2, "a checkpoint after the failure reruns episode 2"


def test_without_the_episode_datamodule_the_trainers_step_counts_the_episodes() -> None:
    trainer = SimpleNamespace(datamodule=None, global_step=12)
    assert episodes_done(trainer) == 12 and total_episodes(trainer) is None


def test_resuming_with_another_seed_is_refused_naming_both_seeds() -> None:
    saved = EpisodeDataModule(total_episodes=10, seed=1)
    with pytest.raises(ValueError, match=r"data\.seed=2 differs from the checkpoint's seed 1"):
        EpisodeDataModule(total_episodes=10, seed=2).load_state_dict(saved.state_dict())


def test_validation_scores_the_same_universes_each_time_at_the_episode_training_reached() -> None:
    datamodule = EpisodeDataModule(total_episodes=10, seed=5, val_universes=3)
    attached(datamodule)
    seeds = [5 + VALIDATION_SEED_OFFSET + i for i in range(3)]
    run(datamodule, until_episode=2)
    assert list(datamodule.val_dataloader()) == [{"episode": 2, "seed": seed} for seed in seeds]
    run(datamodule, until_episode=6)
    assert list(datamodule.val_dataloader()) == [{"episode": 6, "seed": seed} for seed in seeds]
    assert len(datamodule.val_dataloader()) == 3
