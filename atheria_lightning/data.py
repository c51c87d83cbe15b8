"""EpisodeDataModule: the stream of episode indices for training and the fixed validation seeds."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import lightning.pytorch as pl
from typing_extensions import override

from atheria_lightning.errors import require

# Validation seeds live far from the training episodes so they never coincide with one.
VALIDATION_SEED_OFFSET = 1_000_000


class EpisodeStream:
    """Yields ``{"episode": k, "seed": seed}`` for the episodes not yet run: plain ints, no device copy, no sync.

    It has no ``len`` on purpose: Lightning then runs it as one open-ended epoch, validates every
    ``val_check_interval`` episodes and, on resume, keeps counting batches from the restored episode. When it runs
    out it calls ``on_exhausted`` (the datamodule stops the trainer), so the run ends after its last episode
    however many epochs Lightning has counted, and a second pass never replays an episode.
    """

    #: A resume in the middle of its one epoch goes on exactly: it starts at the datamodule's restored episode and
    #: draws no random numbers (SmartCheckpoint reads this, and so does not warn at such a resume).
    replays_mid_epoch = True

    def __init__(self, start: Callable[[], int], total: int, seed: int, on_exhausted: Callable[[], None]) -> None:
        self.start = start
        self.total = total
        self.seed = seed
        self.on_exhausted = on_exhausted

    def __iter__(self) -> Iterator[dict[str, int]]:
        for episode in range(self.start(), self.total):
            yield {"episode": episode, "seed": self.seed}
        self.on_exhausted()


class ValidationSet:
    """The fixed validation universes, scored at the noise level of the episode that training has reached."""

    def __init__(self, datamodule: EpisodeDataModule) -> None:
        self.datamodule = datamodule

    def __len__(self) -> int:
        return len(self.datamodule.validation_seeds)

    def __iter__(self) -> Iterator[dict[str, int]]:
        episode = self.datamodule.current_episode
        return ({"episode": episode, "seed": seed} for seed in self.datamodule.validation_seeds)


class EpisodeDataModule(pl.LightningDataModule):
    """Where the episodes come from: episode ``k`` of a run is a pure function of ``(seed, k)``.

    Args:
        total_episodes: Episodes in the whole run, across all sessions.
        seed: Seeds every episode's initial state and noise; the same seed replays the same run.
        val_every_episodes: Validate (and so maybe keep a best checkpoint) every this many episodes.
        val_universes: Fixed validation universes scored each time; their seeds never change during a run.

    The module saves the next episode to run in the checkpoint, so a resumed run continues the same sequence.
    """

    def __init__(
        self, total_episodes: int = 100, seed: int = 42, val_every_episodes: int = 10, val_universes: int = 2
    ) -> None:
        super().__init__()
        require(total_episodes > 0, f"data.total_episodes={total_episodes} must be a positive integer")
        require(val_every_episodes > 0, f"data.val_every_episodes={val_every_episodes} must be a positive integer")
        require(val_universes > 0, f"data.val_universes={val_universes} must be a positive integer")
        self.total_episodes = total_episodes
        self.seed = seed
        self.val_every_episodes = val_every_episodes
        self.val_universes = val_universes
        self.next_episode = 0  # set from the checkpoint on resume
        self._running_episode = -1

    @property
    def validation_seeds(self) -> list[int]:
        """The fixed seeds of the validation universes."""
        return [self.seed + VALIDATION_SEED_OFFSET + i for i in range(self.val_universes)]

    @property
    def episodes_done(self) -> int:
        """Episodes finished over the whole run (all sessions), counting the running one once it ran."""
        return self._first_unrun_episode()

    @property
    def current_episode(self) -> int:
        """The episode running now, or the last one finished (``next_episode - 1``) between episodes."""
        return max(self._running_episode, self.next_episode - 1, 0)

    @override
    def train_dataloader(self) -> EpisodeStream:
        return EpisodeStream(self._first_unrun_episode, self.total_episodes, self.seed, self._stop_trainer)

    def _first_unrun_episode(self) -> int:
        return max(self.next_episode, self._running_episode + 1)

    def _stop_trainer(self) -> None:
        if self.trainer is not None:
            self.trainer.should_stop = True

    @override
    def val_dataloader(self) -> ValidationSet:
        return ValidationSet(self)

    @override
    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        # The batch that reaches the step, not the one the fetcher already prefetched: this is what ran.
        if self.trainer is not None and self.trainer.training:
            self._running_episode = int(batch["episode"])
        return batch

    def abandon_running_episode(self) -> None:
        """The running episode failed before it finished: checkpoints must not count it as done."""
        self._running_episode = max(self.next_episode, self._running_episode) - 1

    @override
    def state_dict(self) -> dict[str, Any]:
        # Checkpoints are written after an episode ends, so the one running has finished by then.
        return {"next_episode": self._first_unrun_episode(), "seed": self.seed, "total_episodes": self.total_episodes}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict.get("seed", self.seed) != self.seed:
            raise ValueError(
                f"data.seed={self.seed} differs from the checkpoint's seed {state_dict['seed']}: "
                "resume with the same seed, or start a new experiment_name"
            )
        self.next_episode = int(state_dict["next_episode"])


def episodes_done(trainer: pl.Trainer) -> int:
    """Episodes finished over the whole run: the episode datamodule's count, else the trainer's global step."""
    datamodule = trainer.datamodule
    return datamodule.episodes_done if isinstance(datamodule, EpisodeDataModule) else trainer.global_step


def total_episodes(trainer: pl.Trainer) -> int | None:
    """The run's episode count when the trainer runs an :class:`EpisodeDataModule`, else None."""
    datamodule = trainer.datamodule
    return datamodule.total_episodes if isinstance(datamodule, EpisodeDataModule) else None
