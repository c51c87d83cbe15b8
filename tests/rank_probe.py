"""A callback for the DDP tests: each rank writes what it ended with (learning rate, a weights checksum) to a file."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.callbacks import Callback


class RankProbe(Callback):
    """Records each rank's learning rate per episode; with ``nan_on_rank``, that rank alone gets a NaN loss at
    episode ``nan_at_episode``."""

    def __init__(self, folder: str, nan_on_rank: int = -1, nan_at_episode: int = -1) -> None:
        self.folder = Path(folder)
        self.nan_on_rank, self.nan_at_episode = nan_on_rank, nan_at_episode
        self.lrs: list[float] = []

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if trainer.global_rank != self.nan_on_rank:
            return
        run_episode = pl_module.run_episode

        def poisoned(seed: int, episode: int, noise: float) -> Any:
            parts, final = run_episode(seed, episode, noise)
            if episode == self.nan_at_episode and pl_module.training:
                parts["loss"] = parts["loss"] * float("nan")
            return parts, final

        pl_module.run_episode = poisoned

    def on_train_batch_end(self, trainer: Any, pl_module: Any, *args: Any) -> None:
        self.lrs.append(trainer.optimizers[0].param_groups[0]["lr"])

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        with torch.no_grad():
            weights = torch.cat([p.detach().double().flatten() for p in pl_module.operator.parameters()])
        record = {"lrs": self.lrs, "skipped": pl_module.nonfinite_skipped,
                  "weights_sum": float(weights.sum()), "weights_abs_sum": float(weights.abs().sum())}  # fmt: skip
        self.folder.mkdir(parents=True, exist_ok=True)
        (self.folder / f"rank{trainer.global_rank}.json").write_text(json.dumps(record))
