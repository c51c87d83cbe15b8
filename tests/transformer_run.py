"""Lightning's demo LightningTransformer, with dropout and a shuffled DataLoader, trained with the survival layer as
GUIDE.md §7 wires it: a module whose batches and dropout masks come from the global random-number generators.

Run as a script by tests/test_exact_resume.py (so that it can be killed):
``python transformer_run.py RUN MIRROR STEPS [PACE]``, ``PACE`` seconds of sleep after each step (default 0).
"""

from __future__ import annotations

import sys
import time
from typing import Any

import torch
from lightning.pytorch import Callback, Trainer, seed_everything
from lightning.pytorch.demos import LightningTransformer, Transformer
from torch.utils.data import DataLoader, TensorDataset

from atheria_lightning.callbacks import MirrorSync, SmartCheckpoint, TimeLimitGuard
from atheria_lightning.store import RunStore

VOCAB, BLOCK, BATCH = 16, 8, 8
TRAIN_SEQUENCES, VAL_SEQUENCES = 64, 16
#: Steps per epoch: SmartCheckpoint saves every this many, so every last.ckpt is taken at an epoch boundary.
STEPS_PER_EPOCH = TRAIN_SEQUENCES // BATCH


def tokens(sequences: int, seed: int) -> TensorDataset:
    """Random token blocks and their next-token targets, drawn from a generator of their own: the data are the
    same in every process, whatever the global random-number state."""
    data = torch.randint(VOCAB, (sequences * BLOCK + 1,), generator=torch.Generator().manual_seed(seed))
    inputs = data[:-1].view(sequences, BLOCK)
    return TensorDataset(inputs, data[1:].view(sequences, BLOCK))


class UserTransformer(LightningTransformer):
    """Lightning's demo shrunk to run in seconds on a CPU, on local random tokens (no WikiText2 download); its
    training step is Lightning's, its validation logs ``val_loss``, the metric SmartCheckpoint ranks by."""

    def __init__(self) -> None:
        super().__init__(vocab_size=VOCAB)
        self.model = Transformer(vocab_size=VOCAB, ninp=16, nhead=2, nhid=32, nlayers=1, dropout=0.2)

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        inputs, target = batch
        loss = torch.nn.functional.nll_loss(self(inputs, target), target.view(-1))
        self.log("val_loss", loss)
        return loss

    def prepare_data(self) -> None:
        pass  # the demo's prepare_data downloads WikiText2: these tokens are made locally

    def train_dataloader(self) -> DataLoader:
        return DataLoader(tokens(TRAIN_SEQUENCES, seed=1), batch_size=BATCH, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(tokens(VAL_SEQUENCES, seed=2), batch_size=BATCH)


class Pace(Callback):
    """A line per step, so a test can tell how far a killed run got, and a sleep, so that it is still running when
    the test kills it (sleeping draws no random numbers)."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def on_train_batch_end(self, trainer: Trainer, *args: Any) -> None:
        print(f"step {trainer.global_step}", flush=True)
        time.sleep(self.seconds)


def fit(run_dir: str, mirror_url: str, steps: int, pace: float = 0.0) -> None:
    """Train to ``steps`` steps, resuming from the run folder's newest sound checkpoint when it has one."""
    seed_everything(7, verbose=False)
    model = UserTransformer()
    store = RunStore(run_dir)
    survival = [
        TimeLimitGuard(max_hours=11.5).use_store(store),
        SmartCheckpoint(top_k=2, every_n_episodes=STEPS_PER_EPOCH, monitor="val_loss").use_store(store),
        MirrorSync(mirror_url, every_n_episodes=STEPS_PER_EPOCH).use_store(store),
    ]
    trainer = Trainer(default_root_dir=run_dir, max_steps=steps, logger=False, enable_progress_bar=False,
                      enable_model_summary=False, plugins=[store.checkpoint_io],
                      callbacks=[Pace(pace), *survival])  # fmt: skip
    resume = store.start()
    print(f"resumed from step {resume.episode}" if resume else "no checkpoint: a new run", flush=True)
    trainer.fit(model, ckpt_path=resume.path if resume else None)
    store.close()


if __name__ == "__main__":
    fit(sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4]) if len(sys.argv) > 4 else 0.0)
