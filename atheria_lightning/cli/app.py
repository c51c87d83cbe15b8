"""AtheriaCLI (LightningCLI): the parser of ``atheria fit`` and ``atheria validate``, and the trainer it wires
(callbacks, loggers, the run store); the session itself is :mod:`atheria_lightning.cli.session`."""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Any

from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import ModelCheckpoint, ProgressBar
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback
from typing_extensions import override

from atheria_lightning.callbacks import (
    EpisodeProgressBar,
    LivePlot,
    MirrorSync,
    Notify,
    RunSummary,
    SmartCheckpoint,
    StopOnSignal,
    TimeLimitGuard,
    TrainingLog,
)
from atheria_lightning.cli import preflight
from atheria_lightning.cli.messages import parse_error_line, repeats_append
from atheria_lightning.cli.session import Session, resume_point
from atheria_lightning.data import EpisodeDataModule
from atheria_lightning.errors import ConfigError, require
from atheria_lightning.loggers import BufferedTensorBoardLogger, RunLoggers, attach_loggers
from atheria_lightning.module import QCAModule
from atheria_lightning.notifier import Notifier
from atheria_lightning.platform import default_run_root, kaggle_input_root
from atheria_lightning.presets import PresetAction
from atheria_lightning.redact import notify_urls, without_notify_urls
from atheria_lightning.store import Checkpoint, RunStore, UsesRunStore

__all__ = ["AtheriaCLI", "SaveConfigWithoutSecrets"]

log = logging.getLogger(__name__)


class AtheriaCLI(LightningCLI):
    """LightningCLI for :class:`QCAModule` and :class:`EpisodeDataModule`, plus the run settings.

    Run settings (top level of a preset): ``experiment_name``, ``run_root`` (fast local folder, platform default
    when null), ``mirror_url`` (persistent copy: ``auto`` = the platform default, null = none, or a folder/URL),
    ``resume`` (``auto``, ``never`` or a checkpoint path), ``max_hours`` (this session's time budget, overriding
    the preset's ``TimeLimitGuard.max_hours``), ``notify`` (apprise URLs that hear how the run ends, see
    :class:`~atheria_lightning.callbacks.Notify`).

    Every run gets, unless its config lists its own: :class:`SmartCheckpoint` in ``<run>/checkpoints``,
    :class:`MirrorSync` when a mirror is set, the episode progress bar and the end-of-run summary. One
    :class:`~atheria_lightning.store.RunStore` owns the run folder: it reconciles it (and the mirror) before
    training, chooses the checkpoint to resume from, and is handed to every callback that acts on the run's files.
    After training its final flush says whether the mirror is up to date; ``exit_code`` is then 4 if it is not.

    Example (in a notebook cell)::

        AtheriaCLI(args=["fit", "--preset", "demo", "--trainer.max_steps", "5"])
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        # Set first: LightningCLI runs the whole command inside __init__.
        self.store: RunStore | None = None
        self.training_log: TrainingLog | None = None
        self.notifier: Notifier | None = None  # --notify: the command's sender, handed to the Notify callback
        self.loggers = RunLoggers()  # the trainer's loggers that live across sessions
        self.exit_code = 0
        kwargs.setdefault("model_class", QCAModule)
        kwargs.setdefault("datamodule_class", EpisodeDataModule)
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        kwargs.setdefault("save_config_callback", SaveConfigWithoutSecrets)
        # max_epochs -1: the episode stream ends the run (it stops the trainer after the last episode).
        defaults = {"gradient_clip_val": 1.0, "max_epochs": -1, "log_every_n_steps": 1, "num_sanity_val_steps": 0}
        kwargs["trainer_defaults"] = {**defaults, **kwargs.get("trainer_defaults", {})}
        self.command_parsers: list[LightningArgumentParser] = []
        super().__init__(*args, **kwargs)

    @staticmethod
    @override
    def subcommands() -> dict[str, set[str]]:
        # weights_only is not a choice: checkpoints are untrusted input, always loaded with weights_only=True.
        return {"fit": {"model", "train_dataloaders", "val_dataloaders", "datamodule", "weights_only"},
                "validate": {"model", "dataloaders", "datamodule", "weights_only"}}  # fmt: skip

    @override
    def init_parser(self, **kwargs: Any) -> LightningArgumentParser:
        # A parse error raises instead of printing the usage: parse_arguments turns it into one line.
        kwargs.setdefault("exit_on_error", False)
        # Without this, argparse takes --trainer.max_epoch for --trainer.max_epochs: a typo would be obeyed.
        kwargs.setdefault("allow_abbrev", False)
        kwargs.setdefault("prog", "atheria")
        return super().init_parser(**kwargs)

    @override
    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        try:
            argv = repeats_append(sys.argv[1:] if args is None else args, "--notify")
            if argv is None:
                super().parse_arguments(parser, args)
            else:
                self.config = parser.parse_args(argv)
        except argparse.ArgumentError as err:
            argv = [str(arg) for arg in (sys.argv[1:] if args is None else args)] if not isinstance(args, dict) else []
            command = next((arg for arg in argv if arg in self.subcommands()), None)
            parsers = {each.prog.replace(" [options]", ""): each for each in self.command_parsers}
            raise ConfigError(parse_error_line(err, parsers.get(f"atheria {command}", parser), argv)) from None

    @override
    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        # Each command's parser, which says which keys and types a parse error of that command is about.
        self.command_parsers.append(parser)
        # Beside LightningCLI's --config, in each command's parser: a packaged preset by name, applied where it stands
        # among the config files and flags (later wins). Not on `atheria` itself, where a preset would be ignored.
        parser.add_argument("--preset", action=PresetAction)
        parser.add_argument("--experiment_name", type=str, default="atheria", help="Run folder name under run_root.")
        parser.add_argument(
            "--run_root",
            type=str | None,
            default=None,
            help="Fast local folder for runs; null = the platform default (./runs locally).",
        )
        parser.add_argument(
            "--mirror_url",
            type=str | None,
            default="auto",
            help="Persistent copy of the run folder: a folder or fsspec URL; auto = the platform "
            "default (Drive on Colab, none elsewhere); null = no mirror.",
        )
        parser.add_argument(
            "--resume",
            type=str,
            default="auto",
            help="auto (newest verified checkpoint, local or mirror), never, or a checkpoint path.",
        )
        parser.add_argument(
            "--take_over",
            type=bool,
            default=False,
            help="Take the run's mirror over from another session that still holds its lease (a closed tab, a VM "
            "that is gone); that session stops uploading at its next sync.",
        )
        parser.add_argument(
            "--max_hours",
            type=float | None,
            default=None,
            help="This session's budget in hours for TimeLimitGuard (stop with a checkpoint at its "
            "emergency_fraction), overriding the preset's; null = the preset's.",
        )
        parser.add_argument(
            "--notify",
            type=list[str] | str | None,
            default=None,
            help="Where to notify (finished, stopped, failed, mirror behind, memory >= 90%): an apprise URL such "
            "as ntfy://TOPIC or tgram://BOT_TOKEN/CHAT_ID; repeat it, or give a list, for several (notify extra).",
        )
        # One validation (and best-checkpoint decision) every data.val_every_episodes episodes.
        parser.link_arguments("data.val_every_episodes", "trainer.val_check_interval")
        # The operator's initial weights follow data.seed too, so one seed reproduces the whole run.
        parser.link_arguments("data.seed", "seed_everything")
        parser.set_defaults({"trainer.check_val_every_n_epoch": None})

    @property
    def run_settings(self) -> dict[str, Any]:
        return self.config[self.subcommand] if self.subcommand else self.config

    @property
    def run_dir(self) -> str:
        settings = self.run_settings
        return preflight.run_dir_of(settings["run_root"] or default_run_root(), settings["experiment_name"])

    @property
    def mirror_url(self) -> str | None:
        return preflight.mirror_url(self.run_settings["mirror_url"])

    @override
    def before_instantiate_classes(self) -> None:
        preflight.check_run_settings(self.run_settings)
        notify = self.run_settings.get("notify")
        urls = [notify] if isinstance(notify, str) else list(notify or [])
        # apprise parses each URL now: a bad one is refused before anything is built.
        self.notifier = Notifier(urls, self.run_settings["experiment_name"]) if urls else None
        preflight.check_before_build(self.run_settings, self.run_dir)

    @override
    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        trainer_config = self._of_command(self.config_init).get("trainer", {})
        if trainer_config.get("logger") in (None, True):
            kwargs["logger"] = BufferedTensorBoardLogger(
                save_dir=self.run_dir, name="logs", version="", default_hp_metric=False
            )
        kwargs.setdefault("default_root_dir", self.run_dir)
        kwargs["callbacks"] = callbacks = self._callbacks(trainer_config)
        loggers = kwargs.get("logger", trainer_config.get("logger"))
        loggers = list(loggers) if isinstance(loggers, (list, tuple)) else [] if loggers in (None, False) else [loggers]
        self.loggers = attach_loggers(loggers, self.run_dir, notify_urls(self.config))
        callbacks += self.loggers.callbacks  # they keep the loggers' state (a W&B run's id) in the checkpoints
        if self.notifier is not None:  # last: it reports what the stopping callbacks and the checkpoints did
            stoppers = [cb for cb in callbacks if isinstance(cb, TimeLimitGuard | StopOnSignal | MirrorSync)]
            callbacks.append(Notify(self.notifier, stoppers))
        self.store = self._run_store(callbacks)
        if isinstance(kwargs.get("logger"), BufferedTensorBoardLogger):
            # TensorBoard's HPARAMS tab: the settings of each run beside the metric its checkpoints are ranked by.
            kwargs["logger"].show_in_hparams(self.store.monitor, "train/loss")
        plugins = trainer_config.get("plugins") or []
        kwargs["plugins"] = [*(plugins if isinstance(plugins, list) else [plugins]), self.store.checkpoint_io]
        return super().instantiate_trainer(**kwargs)

    def _of_command(self, config: Any) -> Any:
        """The part of ``config`` that is the command's (``fit``), or all of it without subcommands."""
        return config[self.subcommand] if self.subcommand else config

    def _callbacks(self, trainer_config: Any) -> list[Any]:
        """The config's callbacks, the run's log first, then those every run needs; this session's time budget."""
        configured = self.configured_callbacks(list(trainer_config.get("callbacks") or []))
        progress_bar = trainer_config.get("enable_progress_bar") in (None, True)
        # The run's log first (the config's; a new one when only a LivePlot is listed): a plot draws what it holds.
        self.training_log = next((cb for cb in configured if isinstance(cb, TrainingLog)), None)
        if self.training_log is None and any(isinstance(cb, LivePlot) for cb in configured):
            self.training_log = TrainingLog()
        if self.training_log is not None:
            configured = [self.training_log, *(cb for cb in configured if cb is not self.training_log)]
        callbacks = configured + self.default_callbacks(configured, progress_bar)
        self._apply_session_budget(callbacks)
        return callbacks

    def _run_store(self, callbacks: list[Any]) -> RunStore:
        """One store owns the run folder; the callbacks that act on its files get it, and Lightning's saves reach it."""
        store = RunStore(self.run_dir)
        input_root = kaggle_input_root()
        if input_root is not None:  # a new Kaggle version starts empty; the previous one's output is an input
            store.look_in_previous_versions(input_root, label="kaggle input")
        for callback in callbacks:
            if isinstance(callback, UsesRunStore):
                callback.use_store(store)
            if isinstance(callback, LivePlot) and self.training_log is not None:
                callback.use_log(self.training_log)
            if isinstance(callback, RunSummary):
                callback.show_loggers(self.loggers.lines)
        return store

    def _apply_session_budget(self, callbacks: list[Any]) -> None:
        """``--max_hours``: this session's budget for the config's ``TimeLimitGuard`` (a new one when it has none)."""
        hours = self.run_settings.get("max_hours")
        if hours is None:
            return
        guards = [callback for callback in callbacks if isinstance(callback, TimeLimitGuard)]
        for guard in guards:
            guard.set_budget(hours)
        if not guards:
            callbacks.insert(0, TimeLimitGuard(max_hours=hours))

    def configured_callbacks(self, configured: list[Any]) -> list[Any]:
        """The config's callbacks, with ``mirror_url`` given to a MirrorSync that names no url of its own."""
        kept = []
        for callback in configured:
            require(
                not isinstance(callback, ModelCheckpoint),
                f"trainer.callbacks lists Lightning's {type(callback).__name__}: the run's checkpoints/ belongs to its "
                "run store; use atheria_lightning.callbacks.SmartCheckpoint (top_k, every_n_episodes, monitor)",
            )
            if isinstance(callback, MirrorSync) and callback.url is None:
                if self.mirror_url is None:
                    # e.g. a Colab preset run locally: mirror_url "auto" means no mirror off Colab.
                    log.warning("no mirror_url on this platform: MirrorSync is off, checkpoints stay local")
                    continue
                callback.set_url(self.mirror_url)
            kept.append(callback)
        return kept

    def default_callbacks(self, configured: list[Any], progress_bar: bool = True) -> list[Any]:
        """The callbacks every run needs that its config did not list."""
        have = {type(callback) for callback in configured}
        callbacks: list[Any] = [] if RunSummary in have else [RunSummary(self.run_dir)]
        if SmartCheckpoint not in have:
            callbacks.append(SmartCheckpoint())
        if StopOnSignal not in have:
            callbacks.append(StopOnSignal())
        if self.mirror_url and MirrorSync not in have:
            callbacks.append(MirrorSync(self.mirror_url))
        if progress_bar and not any(issubclass(kind, ProgressBar) for kind in have):
            callbacks.insert(0, EpisodeProgressBar())
        return callbacks

    def resolve_checkpoint(self, ckpt_path: str | None, with_mirror: bool = True) -> Checkpoint | None:
        """Reconcile the run folder (and its mirror) through the store, then choose what to resume from
        (:func:`~atheria_lightning.cli.session.resume_point`)."""
        assert self.store is not None
        return resume_point(self.store, self.run_settings, ckpt_path, with_mirror, self.trainer.is_global_zero)

    def session(self) -> Session:
        """This session of the run, with what was built for it."""
        assert self.store is not None
        return Session(self.trainer, self.store, self.run_dir, self.resolve_checkpoint, self.loggers,
                       self.training_log, self.notifier)  # fmt: skip

    def fit(self, model: QCAModule, datamodule: EpisodeDataModule, ckpt_path: str | None = None, **kwargs: Any) -> None:
        """``trainer.fit`` from the resolved checkpoint, loaded with ``weights_only=True`` (untrusted input)."""
        self.exit_code = self.session().fit(model, datamodule, ckpt_path, **kwargs)

    def validate(
        self, model: QCAModule, datamodule: EpisodeDataModule, ckpt_path: str | None = None, **kwargs: Any
    ) -> Any:
        return self.session().validate(model, datamodule, ckpt_path, **kwargs)


class SaveConfigWithoutSecrets(SaveConfigCallback):
    """Lightning's ``<run>/logs/config.yaml``, without the ``notify`` URLs: they hold services' tokens, and the run
    folder is mirrored (a shared Drive folder, a bucket). The saved config says ``notify: null`` (and a Notifier in
    ``trainer.callbacks`` has no ``urls``); the command line or the preset that gave them keeps them."""

    def __init__(self, parser: LightningArgumentParser, config: Any, *args: Any, **kwargs: Any) -> None:
        if notify_urls(config) or config.get("take_over"):
            config = without_notify_urls(config)
            config["take_over"] = False  # this session's decision, never a later one's
        super().__init__(parser, config, *args, **kwargs)
