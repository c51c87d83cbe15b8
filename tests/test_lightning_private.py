"""The private pieces of Lightning (and of TensorBoard's writer) this package still reads: when a release moves one,
this fails and says which piece and where it is used (``pyproject.toml`` bounds ``lightning`` below 2.7 for this
reason)."""

from __future__ import annotations

from pathlib import Path

import lightning
import pytest
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.loggers import TensorBoardLogger

from atheria_lightning.data import EpisodeDataModule
from atheria_lightning.loggers import logging_step
from atheria_lightning.module import QCAModule

MOVED = "Lightning {version} changed {piece}, which {user} reads: update it, then the lightning bound in pyproject.toml"


class StepProbe(Callback):
    """Each batch's ``logging_step`` and the number of batches finished before it."""

    def __init__(self) -> None:
        self.seen: list[tuple[int, int]] = []

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, *args: object) -> None:
        self.seen.append((logging_step(trainer), len(self.seen)))


def test_the_logging_step_is_lightnings_count_of_training_batches(tmp_path: Path) -> None:
    piece = "fit_loop.epoch_loop._batches_that_stepped (the step of logged values)"
    probe = StepProbe()
    trainer = Trainer(max_epochs=-1, logger=False, enable_progress_bar=False, enable_checkpointing=False,
                      default_root_dir=str(tmp_path), limit_val_batches=0, callbacks=[probe])  # fmt: skip
    assert hasattr(trainer.fit_loop.epoch_loop, "_batches_that_stepped"), MOVED.format(
        version=lightning.__version__, piece=piece, user="atheria_lightning.loggers.logging_step"
    )
    model = QCAModule(architecture="MLP", d_state=2, hidden_channels=4, grid_size=8, qca_steps=2)
    trainer.fit(model, datamodule=EpisodeDataModule(total_episodes=4, val_every_episodes=100))
    assert [step for step, _ in probe.seen] == [done for _, done in probe.seen], MOVED.format(
        version=lightning.__version__,
        piece=piece + ": it no longer counts each batch once, at its end",
        user="atheria_lightning.loggers.logging_step",
    )
    saved = trainer.fit_loop.state_dict().get("epoch_loop.state_dict", {})
    assert saved.get("_batches_that_stepped") == len(probe.seen), MOVED.format(
        version=lightning.__version__,
        piece="the checkpoint's loops.fit_loop['epoch_loop.state_dict']['_batches_that_stepped']",
        user="atheria_lightning.loggers.tensorboard.TensorBoardHistory.resume (the step to purge from)",
    )


def test_a_module_outside_a_trainer_has_no_trainer_attribute_set() -> None:
    module = QCAModule(architecture="MLP", d_state=2, hidden_channels=4, grid_size=8, qca_steps=2)
    assert getattr(module, "_trainer", "missing") is None, MOVED.format(
        version=lightning.__version__,
        piece="LightningModule._trainer (None until a Trainer attaches)",
        user="QCAModule (to run outside a Trainer)",
    )


def test_the_tensorboard_logger_keeps_its_writer_where_the_buffered_logger_reads_it(
    tmp_path: Path,
) -> None:
    logger = TensorBoardLogger(save_dir=str(tmp_path), name="logs", version="", purge_step=3)
    for piece in ("_experiment", "_kwargs"):
        assert hasattr(logger, piece), MOVED.format(
            version=lightning.__version__,
            piece=f"TensorBoardLogger.{piece}",
            user="atheria_lightning.loggers.BufferedTensorBoardLogger",
        )
    assert logger._kwargs.get("purge_step") == 3, MOVED.format(
        version=lightning.__version__,
        piece="TensorBoardLogger._kwargs (the SummaryWriter's arguments)",
        user="BufferedTensorBoardLogger.purge_from",
    )
    assert callable(getattr(logger.experiment, "_get_file_writer", None)), (
        "tensorboard's SummaryWriter._get_file_writer moved; BufferedTensorBoardLogger.log_metrics reads it"
    )


def test_the_wandb_logger_keeps_wandb_inits_arguments_until_its_experiment_exists(tmp_path: Path) -> None:
    pytest.importorskip("wandb")
    from lightning.pytorch.loggers import WandbLogger

    logger = WandbLogger(id="given", save_dir=str(tmp_path), name="n")
    user = "atheria_lightning.loggers.WandbRun (one W&B run across sessions)"
    init = getattr(logger, "_wandb_init", None)
    assert isinstance(init, dict) and {"id": "given", "dir": str(tmp_path), "name": "n"}.items() <= init.items(), (
        MOVED.format(version=lightning.__version__, piece="WandbLogger._wandb_init (wandb.init's arguments)", user=user)
    )
    for piece, value in (("_id", "given"), ("_save_dir", str(tmp_path)), ("_name", "n"), ("_experiment", None)):
        assert getattr(logger, piece, "missing") == value, MOVED.format(
            version=lightning.__version__, piece=f"WandbLogger.{piece}", user=user
        )
