"""AtheriaCLI (LightningCLI) and the ``atheria`` console script: fit and validate from YAML presets."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.loggers import TensorBoardLogger
from typing_extensions import override

from atheria_lightning.callbacks import EpisodeProgressBar, RunSummary
from atheria_lightning.data import EpisodeDataModule
from atheria_lightning.errors import ConfigError, require
from atheria_lightning.module import NonFiniteTrainingError, QCAModule
from atheria_lightning.platform import default_run_root

RESUME_MODES = ("auto", "never")


def run_dir_of(run_root: str, experiment_name: str) -> str:
    """``<run_root>/<experiment_name>``, after checking the name cannot escape the root."""
    require(
        bool(experiment_name) and "/" not in experiment_name and "\\" not in experiment_name
        and experiment_name not in (".", "..") and ".." not in experiment_name,
        f"experiment_name={experiment_name!r} must be a plain folder name (no '/', '\\\\' or '..')",
    )  # fmt: skip
    return os.path.join(run_root, experiment_name)


class AtheriaCLI(LightningCLI):
    """LightningCLI for :class:`QCAModule` and :class:`EpisodeDataModule`, plus the run settings.

    Run settings (top level of a preset): ``experiment_name``, ``run_root`` (fast local folder, platform default
    when null), ``mirror_url`` (persistent copy), ``resume`` (``auto``, ``never`` or a checkpoint path).

    Example (in a notebook cell)::

        AtheriaCLI(args=["fit", "--config", "configs/demo.yaml", "--trainer.max_steps", "5"])
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("model_class", QCAModule)
        kwargs.setdefault("datamodule_class", EpisodeDataModule)
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        defaults = {"gradient_clip_val": 1.0, "max_epochs": 1, "log_every_n_steps": 1, "num_sanity_val_steps": 0}
        kwargs["trainer_defaults"] = {**defaults, **kwargs.get("trainer_defaults", {})}
        super().__init__(*args, **kwargs)

    @staticmethod
    @override
    def subcommands() -> dict[str, set[str]]:
        return {"fit": {"model", "train_dataloaders", "val_dataloaders", "datamodule"},
                "validate": {"model", "dataloaders", "datamodule"}}  # fmt: skip

    @override
    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument("--experiment_name", type=str, default="atheria", help="Run folder name under run_root.")
        parser.add_argument("--run_root", type=str | None, default=None,
                            help="Fast local folder for runs; null = the platform default (./runs locally).")
        parser.add_argument("--mirror_url", type=str | None, default=None,
                            help="Persistent copy of the run folder: a folder or any fsspec URL.")
        parser.add_argument("--resume", type=str, default="auto",
                            help="auto (newest checkpoint of this experiment), never, or a checkpoint path.")
        # One validation (and best-checkpoint decision) every data.val_every_episodes episodes.
        parser.link_arguments("data.val_every_episodes", "trainer.val_check_interval")
        parser.set_defaults({"trainer.check_val_every_n_epoch": None})  # fmt: skip

    @property
    def run_settings(self) -> dict[str, Any]:
        return self.config[self.subcommand] if self.subcommand else self.config

    @property
    def run_dir(self) -> str:
        settings = self.run_settings
        return run_dir_of(settings["run_root"] or default_run_root(), settings["experiment_name"])

    @override
    def before_instantiate_classes(self) -> None:
        resume = self.run_settings["resume"]
        require(
            resume in RESUME_MODES or Path(resume).is_file(),
            f"resume={resume!r} must be one of {', '.join(RESUME_MODES)} or an existing checkpoint file",
        )
        _ = self.run_dir  # validates experiment_name before anything is built

    @override
    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        trainer_config = self._get(self.config_init, "trainer", default={})
        if trainer_config.get("logger") in (None, True):
            kwargs["logger"] = TensorBoardLogger(save_dir=self.run_dir, name="logs", version="", default_hp_metric=False)
        kwargs.setdefault("default_root_dir", self.run_dir)
        progress_bar = trainer_config.get("enable_progress_bar") in (None, True)
        kwargs["callbacks"] = list(trainer_config.get("callbacks") or []) + self.default_callbacks(progress_bar)
        return super().instantiate_trainer(**kwargs)

    def default_callbacks(self, progress_bar: bool = True) -> list[Any]:
        """Callbacks every run gets: episode progress bar, checkpoints into the run folder, the summary."""
        datamodule = self._get(self.config_init, "data")
        checkpoint = ModelCheckpoint(
            dirpath=os.path.join(self.run_dir, "checkpoints"),
            filename="best-{step:06d}",
            monitor="val/combined",
            mode="min",
            save_top_k=5,
            save_last=True,
            every_n_train_steps=datamodule.val_every_episodes,
        )
        callbacks = [checkpoint, RunSummary(self.run_dir)]
        return [EpisodeProgressBar(), *callbacks] if progress_bar else callbacks

    def resolve_checkpoint(self, ckpt_path: str | None) -> str | None:
        """An explicit ``ckpt_path`` wins; else ``resume``: a path, ``never``, or ``auto`` (the run's last.ckpt)."""
        if ckpt_path:
            return ckpt_path
        resume = self.run_settings["resume"]
        if resume == "never":
            return None
        if resume != "auto":
            return resume
        last = Path(self.run_dir, "checkpoints", "last.ckpt")
        return str(last) if last.is_file() else None

    def fit(self, model: QCAModule, datamodule: EpisodeDataModule, ckpt_path: str | None = None, **kwargs: Any) -> None:
        """``trainer.fit`` from the resolved checkpoint, loaded with ``weights_only=True`` (untrusted input)."""
        ckpt_path = self.resolve_checkpoint(ckpt_path)
        if ckpt_path:
            print(f"resuming from {ckpt_path}", flush=True)
        kwargs["weights_only"] = True
        self.trainer.fit(model, datamodule=datamodule, ckpt_path=ckpt_path, **kwargs)

    def validate(self, model: QCAModule, datamodule: EpisodeDataModule, ckpt_path: str | None = None, **kwargs: Any) -> Any:
        ckpt_path = self.resolve_checkpoint(ckpt_path)
        kwargs["weights_only"] = True
        return self.trainer.validate(model, datamodule=datamodule, ckpt_path=ckpt_path, **kwargs)


def main(args: list[str] | None = None) -> int:
    """The ``atheria`` console script. Bad settings print one line and exit 2, before any training."""
    try:
        AtheriaCLI(args=args)
    except ConfigError as err:
        print(f"atheria: error: {err}", file=sys.stderr)
        return 2
    except NonFiniteTrainingError as err:
        print(f"atheria: error: {err}", file=sys.stderr)
        return 3
    return 0


def console_main() -> None:
    sys.exit(main())


if __name__ == "__main__":
    console_main()
