"""A user's own LightningModule (Lightning's BoringModel) trained with the survival layer: the lines of GUIDE.md.

Run as a script by tests/test_any_module.py (so that it can be killed): ``python any_module_run.py RUN MIRROR STEPS``.
"""

from __future__ import annotations

import sys
from typing import Any

from lightning.pytorch import Callback, Trainer, seed_everything
from lightning.pytorch.demos.boring_classes import BoringModel

from atheria_lightning.callbacks import MirrorSync, SmartCheckpoint, TimeLimitGuard
from atheria_lightning.store import Checkpoint, RunStore


class UserModel(BoringModel):
    """Logs its validation loss, the metric SmartCheckpoint ranks by here."""

    def validation_step(self, batch: Any, batch_idx: int) -> Any:
        loss = self.step(batch)
        self.log("val_loss", loss)
        return loss


class Progress(Callback):
    """A line per step, so a test can tell how far a killed run got."""

    def on_train_batch_end(self, trainer: Trainer, *args: Any) -> None:
        print(f"step {trainer.global_step}", flush=True)


def fit(
    run_dir: str, mirror_url: str, steps: int, callbacks: list[Callback] | None = None
) -> tuple[RunStore, Checkpoint | None]:
    """Train to ``steps`` steps; the store and the checkpoint the run resumed from."""
    seed_everything(7, verbose=False)
    model = UserModel()
    # The survival layer around any Trainer: one store for the run folder, handed to the callbacks that use it.
    store = RunStore(run_dir)
    survival = [
        TimeLimitGuard(max_hours=11.5).use_store(store),
        SmartCheckpoint(top_k=2, every_n_episodes=5, monitor="val_loss").use_store(store),
        MirrorSync(mirror_url, every_n_episodes=5).use_store(store),
    ]
    trainer = Trainer(default_root_dir=run_dir, max_steps=steps, val_check_interval=10, logger=False,
                      enable_progress_bar=False, enable_model_summary=False, plugins=[store.checkpoint_io],
                      callbacks=[*(callbacks or []), *survival])  # fmt: skip
    resume = store.start()  # reconcile with the mirror; the newest sound checkpoint, if any
    trainer.fit(model, ckpt_path=resume.path if resume else None)
    store.close()  # the final upload
    return store, resume


if __name__ == "__main__":
    fit(sys.argv[1], sys.argv[2], int(sys.argv[3]), [Progress()])
