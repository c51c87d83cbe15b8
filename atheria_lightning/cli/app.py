"""AtheriaCLI (LightningCLI): fit and validate one run from YAML presets, with its run store; errors as one line."""

from __future__ import annotations

import argparse
import collections.abc
import contextlib
import enum
import errno
import logging
import math
import os
import pickle
import re
import sys
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

import torch
import yaml
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch import Trainer
from lightning.pytorch.accelerators import AcceleratorRegistry
from lightning.pytorch.callbacks import ModelCheckpoint, ProgressBar
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback
from lightning.pytorch.utilities.exceptions import SIGTERMException
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
from atheria_lightning.data import EpisodeDataModule
from atheria_lightning.errors import ConfigError, require, unknown_option_line
from atheria_lightning.exports_record import make_exports, stale_reason
from atheria_lightning.interrupts import StopRequested, signals_stop_the_command, stopped_line
from atheria_lightning.lock import RunLock
from atheria_lightning.loggers import BufferedTensorBoardLogger, RunLoggers, attach_loggers, check_logger_packages
from atheria_lightning.module import EpisodeOutOfMemoryError, NonFiniteTrainingError, QCAModule
from atheria_lightning.notifier import Notifier, progress_text
from atheria_lightning.platform import (
    COLAB_DRIVE_ROOT,
    Platform,
    default_mirror_url,
    default_run_root,
    detect_platform,
    kaggle_input_root,
)
from atheria_lightning.presets import PresetAction, missing_config_line
from atheria_lightning.redact import notify_urls, without_notify_urls
from atheria_lightning.settings import changed_settings, refuse_fixed_changes
from atheria_lightning.store import META_KEY, Checkpoint, MirrorInUse, MirrorStatus, RunStore, UsesRunStore
from atheria_lightning.store.manifest import LAST, SETTINGS_KEY, UNLISTED

log = logging.getLogger(__name__)

RESUME_MODES = ("auto", "never")
# Rank 0's resume choice, inherited by the DDP processes it launches.
RESUME_ENV = "ATHERIA_RESUME_CHECKPOINT"
#: Exit codes of the ``atheria`` command (README, "Exit codes").
EXIT_DISK_FULL = 1
EXIT_BAD_SETTINGS = 2
EXIT_CANNOT_TRAIN = 3
EXIT_MIRROR_BEHIND = 4
#: Another session owns the run's mirror: it was refused at the start, or took the mirror over during training.
EXIT_MIRROR_TAKEN = 5
#: What every checkpoint was ranked by before the store recorded the monitor in each file.
LEGACY_MONITOR = "val/combined"


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
            subparsers = getattr(self, "_subcommand_parsers", {})
            raise ConfigError(parse_error_line(err, subparsers.get(command, parser), argv)) from None

    @override
    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
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
        return run_dir_of(settings["run_root"] or default_run_root(), settings["experiment_name"])

    @property
    def mirror_url(self) -> str | None:
        url = self.run_settings["mirror_url"]
        if url != "auto":
            return url
        url = default_mirror_url()
        if url is not None and detect_platform() is Platform.COLAB:
            # Unmounted, /content/drive is an ordinary folder of the session's disk: a "mirror" there dies with it.
            require(
                os.path.isdir(COLAB_DRIVE_ROOT),
                f"mirror_url=auto needs Google Drive mounted at {COLAB_DRIVE_ROOT}: run "
                "google.colab.drive.mount('/content/drive') first, or set mirror_url to another folder or null",
            )
        return url

    @override
    def before_instantiate_classes(self) -> None:
        resume = self.run_settings["resume"]
        require(
            resume in RESUME_MODES or Path(resume).is_file(),
            f"resume={resume!r} must be one of {', '.join(RESUME_MODES)} or an existing checkpoint file",
        )
        max_hours = self.run_settings["max_hours"]
        require(max_hours is None or (math.isfinite(max_hours) and max_hours > 0),
                f"max_hours={max_hours!r} must be a number of hours > 0, or null for the preset's")  # fmt: skip
        _ = self.run_dir  # validates experiment_name before anything is built
        notify = self.run_settings.get("notify")
        urls = [notify] if isinstance(notify, str) else list(notify or [])
        # apprise parses each URL now: a bad one is refused before anything is built.
        self.notifier = Notifier(urls, self.run_settings["experiment_name"]) if urls else None
        # What the Trainer, the run store or resolve_checkpoint would refuse later, refused before any of them
        # is built: by then the run folder, its mirror and the logs would exist.
        ckpt_path = self.run_settings.get("ckpt_path")
        require(
            ckpt_path is None or Path(ckpt_path).is_file(),
            f"ckpt_path={ckpt_path!r} is not a checkpoint file: give an existing .ckpt file, or leave ckpt_path "
            "unset to follow resume (auto: the run's newest checkpoint)",
        )
        trainer = self.run_settings.get("trainer") or {}
        check_accelerator_and_devices(trainer.get("accelerator", "auto"), trainer.get("devices", "auto"))
        check_logger_packages(trainer.get("logger"))
        check_run_dir(self.run_settings["run_root"], self.run_dir)

    @override
    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        trainer_config = self._get(self.config_init, "trainer", default={})
        if trainer_config.get("logger") in (None, True):
            kwargs["logger"] = BufferedTensorBoardLogger(
                save_dir=self.run_dir, name="logs", version="", default_hp_metric=False
            )
        kwargs.setdefault("default_root_dir", self.run_dir)
        configured = self.configured_callbacks(list(trainer_config.get("callbacks") or []))
        progress_bar = trainer_config.get("enable_progress_bar") in (None, True)
        # The run's log first (the config's; a new one when only a LivePlot is listed): a plot draws what it holds.
        self.training_log = next((cb for cb in configured if isinstance(cb, TrainingLog)), None)
        if self.training_log is None and any(isinstance(cb, LivePlot) for cb in configured):
            self.training_log = TrainingLog()
        if self.training_log is not None:
            configured = [self.training_log, *(cb for cb in configured if cb is not self.training_log)]
        kwargs["callbacks"] = configured + self.default_callbacks(configured, progress_bar)
        self._apply_session_budget(kwargs["callbacks"])
        loggers = kwargs.get("logger", trainer_config.get("logger"))
        loggers = list(loggers) if isinstance(loggers, (list, tuple)) else [] if loggers in (None, False) else [loggers]
        self.loggers = attach_loggers(loggers, self.run_dir, notify_urls(self.config))
        kwargs["callbacks"] += self.loggers.callbacks  # they keep the loggers' state (a W&B run's id) in checkpoints
        if self.notifier is not None:  # last: it reports what the stopping callbacks and the checkpoints did
            stoppers = [cb for cb in kwargs["callbacks"] if isinstance(cb, TimeLimitGuard | StopOnSignal | MirrorSync)]
            kwargs["callbacks"].append(Notify(self.notifier, stoppers))
        # One store owns the run folder; the callbacks that act on its files get it, and Lightning's saves reach it.
        self.store = RunStore(self.run_dir)
        input_root = kaggle_input_root()
        if input_root is not None:  # a new Kaggle version starts empty; the previous one's output is an input
            self.store.look_in_previous_versions(input_root, label="kaggle input")
        for callback in kwargs["callbacks"]:
            if isinstance(callback, UsesRunStore):
                callback.use_store(self.store)
            if isinstance(callback, LivePlot) and self.training_log is not None:
                callback.use_log(self.training_log)
            if isinstance(callback, RunSummary):
                callback.show_loggers(self.loggers.lines)
        if isinstance(kwargs.get("logger"), BufferedTensorBoardLogger):
            # TensorBoard's HPARAMS tab: the settings of each run beside the metric its checkpoints are ranked by.
            kwargs["logger"].show_in_hparams(self.store.monitor, "train/loss")
        plugins = trainer_config.get("plugins") or []
        kwargs["plugins"] = [*(plugins if isinstance(plugins, list) else [plugins]), self.store.checkpoint_io]
        return super().instantiate_trainer(**kwargs)

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
        """Reconcile the run folder (and its mirror) through the store, then choose what to resume from.

        An explicit ``ckpt_path`` wins; else ``resume``: a path, ``never`` (refused when the run already has
        checkpoints: they would be overwritten), or ``auto`` (the newest sound checkpoint, local or mirrored; on
        Kaggle, when there is none, a previous version's, copied from ``/kaggle/input``).
        Under DDP only rank 0 looks (it may rebuild, quarantine or download files); the processes it launches
        inherit its choice through the environment.
        """
        if RESUME_ENV in os.environ and not self.trainer.is_global_zero:
            chosen = os.environ[RESUME_ENV]
            return Checkpoint(chosen, os.path.basename(chosen), -1, None, "rank 0") if chosen else None
        assert self.store is not None
        resume = ckpt_path or self.run_settings["resume"]
        point = self.store.start(with_mirror=with_mirror, with_previous=with_mirror and resume == "auto",
                                 take_over=bool(self.run_settings.get("take_over")))  # fmt: skip
        if resume == "auto":
            return point
        if resume == "never":
            require(
                point is None,
                f"resume=never, but {self.store.checkpoint_dir} already holds checkpoints up to episode "
                f"{point.episode if point else 0}: a new run there would overwrite them; use resume=auto to continue "
                "it, or another experiment_name for a new run",
            )
            return None
        require(Path(resume).is_file(), f"ckpt_path={resume!r} is not a checkpoint file")
        return Checkpoint(str(resume), os.path.basename(resume), -1, None, "explicit")

    def fit(self, model: QCAModule, datamodule: EpisodeDataModule, ckpt_path: str | None = None, **kwargs: Any) -> None:
        """``trainer.fit`` from the resolved checkpoint, loaded with ``weights_only=True`` (untrusted input)."""
        if self.trainer.is_global_zero:
            with RunLock(self.run_dir):
                self._fit(model, datamodule, ckpt_path, **kwargs)
        else:
            self._fit(model, datamodule, ckpt_path, **kwargs)

    def _fit(self, model: QCAModule, datamodule: EpisodeDataModule, ckpt_path: str | None, **kwargs: Any) -> None:
        assert self.store is not None
        trained, failure = False, None
        try:
            point = self.resolve_checkpoint(ckpt_path)
            os.environ[RESUME_ENV] = point.path if point else ""
            header = _peek_checkpoint(point.path) if point is not None else None
            if header is None or self._check_resume(point, header, model, datamodule):
                kwargs["weights_only"] = True
                # TensorBoard drops the events past the checkpoint; W&B picks the run this session continues.
                self.loggers.resume(header, start=self.trainer.is_global_zero)
                trained = True
                self.trainer.fit(model, datamodule=datamodule, ckpt_path=point.path if point else None, **kwargs)
        except BaseException as err:
            failure = err
            raise
        finally:
            if trained:  # the loggers' files complete before the final flush mirrors them
                self.loggers.finish(failed=failure is not None)
            if trained:  # also after a failed fit (exit 3): the model of the best sound checkpoint, and the report
                self._write_exports()
            # The final flush, finished run or not: a mirror left behind by an earlier session catches up here.
            status = self.store.close() if self.trainer.is_global_zero else None
            if self.notifier is not None and self.trainer.is_global_zero:
                self._notify_end(datamodule, failure, status)
        if status is not None:
            print(status.line(), flush=True)
            if status.superseded_by is not None:
                self.exit_code = EXIT_MIRROR_TAKEN
            elif status.behind:
                self.exit_code = EXIT_MIRROR_BEHIND

    def _notify_end(
        self, datamodule: EpisodeDataModule, failure: BaseException | None, status: MirrorStatus | None
    ) -> None:
        """What only the command knows (the Notify callback sent finished or stopped): a failure with its exit code,
        a mirror left behind; then a bounded wait for the queued notifications."""
        assert self.notifier is not None
        if failure is not None:
            code, line = exit_status(failure)
            where = progress_text(datamodule.episodes_done, datamodule.total_episodes)
            if code:
                self.notifier.failed(code, where, line)
            else:
                self.notifier.ended(line)
        elif status is not None and status.superseded_by is not None:
            self.notifier.mirror_behind(EXIT_MIRROR_TAKEN, status.line())
        elif status is not None and status.behind:
            self.notifier.mirror_behind(EXIT_MIRROR_BEHIND, status.line())
        self.notifier.close()

    def _write_exports(self) -> bool:
        """After fit, on rank 0, for a run with a ``TrainingLog``: the best checkpoint to ``exports/model.ts``, then
        ``summary.png`` and ``report.md`` from ``training_log.json``, then ``EXPORTS.json`` (what they were made
        from: :mod:`~atheria_lightning.exports_record`), before the final flush sends them to the mirror.
        A failure here is one warning: the checkpoints, not the report, are what a run must keep."""
        if self.training_log is None or not self.trainer.is_global_zero:
            return False
        assert self.store is not None
        try:
            report, exported = make_exports(self.store, self.run_dir)
        except Exception as err:  # a report must never turn a finished training into a failure
            log.warning("the report of %s was not written: %s", self.run_dir, err)
            return False
        print(f"report: {report} (summary.png, training_log.json{', model.ts' if exported else ''})", flush=True)
        return True

    def _remake_stale_exports(
        self, point: Checkpoint, header: dict[str, Any], model: QCAModule, datamodule: EpisodeDataModule
    ) -> None:
        """A finished run whose exports are not those of its final checkpoint (its last session was killed while
        making them, or its mirror copy was cut short) gets them again, before the final flush sends them."""
        if self.training_log is None or not self.trainer.is_global_zero:
            return
        assert self.store is not None
        reason = stale_reason(self.store, self.run_dir)
        if reason is not None:
            if point.source != "explicit":  # a log that session never wrote is in its final checkpoint: ``header``
                self.training_log.catch_up(header, self.trainer, model, datamodule)
            if self._write_exports():
                print(f"exports made again from the final checkpoint: {reason}", flush=True)

    def _check_resume(
        self, point: Checkpoint, header: dict[str, Any], model: QCAModule, datamodule: EpisodeDataModule
    ) -> bool:
        """Refuse what cannot change between sessions, report what did; False when the run is already finished.

        ``header`` is the checkpoint's own metadata (weights_only): a manifest on a shared mirror may lie about it.
        """
        assert self.store is not None
        saved, now = _settings_by_key(header, model, datamodule, self.trainer.callbacks, self.store.monitor,
                                      str(self.trainer.precision))  # fmt: skip
        try:
            refuse_fixed_changes(saved, now)
        except ConfigError as err:
            raise ConfigError(f"{err} (the checkpoint: {_whence(point)}{_how_to_set_aside(point)})") from err
        episode = int(header.get(META_KEY, {}).get("episode", 0))
        total = datamodule.total_episodes
        suspicion = self._suspicious(point, episode, datamodule)
        if suspicion is not None:
            print(suspicion, flush=True)
        if episode >= total:
            self._remake_stale_exports(point, header, model, datamodule)
            print(f"run finished: episode {episode} of {total} (100%), nothing to do; "
                  "raise data.total_episodes to train further", flush=True)  # fmt: skip
            return False
        print(f"resuming from episode {episode} of {total} ({100.0 * episode / total:.0f}%) "
              f"[{point.source}: {point.path}]", flush=True)  # fmt: skip
        changes = changed_settings(saved, now)
        if changes:
            print(f"changed since that checkpoint, in effect from now on: {', '.join(changes)}", flush=True)
        return True

    def _suspicious(self, point: Checkpoint, episode: int, datamodule: EpisodeDataModule) -> str | None:
        """One line when the checkpoint to resume is at an episode nothing else of the run accounts for: beyond
        data.total_episodes, or a best file past last.ckpt by more than a save interval and a validation explain (a
        file planted on a shared mirror). It is still used: the run may have lost its other files."""
        assert self.store is not None
        last = self.store.entries().get(LAST)
        every = max((callback.every_n_episodes for callback in self.trainer.callbacks
                     if isinstance(callback, SmartCheckpoint)), default=10)  # fmt: skip
        if episode > datamodule.total_episodes:
            beyond = f"beyond data.total_episodes={datamodule.total_episodes}"
        elif point.name != LAST and last is not None and episode > last.episode + every + datamodule.val_every_episodes:
            beyond = f"{episode - last.episode} episodes past the run's {LAST} (episode {last.episode})"
        else:
            return None
        return (
            f"suspicious: {point.name} is at episode {episode}, {beyond}; it may not come from this run "
            f"({_whence(point)}){_how_to_set_aside(point)}"
        )

    def validate(
        self, model: QCAModule, datamodule: EpisodeDataModule, ckpt_path: str | None = None, **kwargs: Any
    ) -> Any:
        # Under the run's lock: choosing the checkpoint may repair the folder, which a training must not share.
        with RunLock(self.run_dir) if self.trainer.is_global_zero else contextlib.nullcontext():
            point = self.resolve_checkpoint(ckpt_path, with_mirror=False)
            kwargs["weights_only"] = True
            return self.trainer.validate(model, datamodule=datamodule, ckpt_path=point.path if point else None,
                                         **kwargs)  # fmt: skip


def _whence(point: Checkpoint) -> str:
    """Where a checkpoint came from, in words: "from the mirror, now at PATH"."""
    if point.source == "local":
        return f"local, {point.path}"
    if point.source == "explicit":
        return f"given as ckpt_path, {point.path}"
    return f"from the {point.source}, now at {point.path}"


def _how_to_set_aside(point: Checkpoint) -> str:
    if point.source == "explicit":
        return ""
    return (
        f"; to set it aside, move it into {os.path.join(os.path.dirname(point.path), UNLISTED)}/"
        + (" here and on the mirror" if point.source == "mirror" else "")
        + ", then run the same command again"
    )


def _peek_checkpoint(path: str) -> dict[str, Any]:
    """Read a checkpoint's metadata, weights only: anything else in it is refused, never loaded unsafely."""
    try:
        # mmap: reads the small header and the pickled metadata, not the tensors.
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except (RuntimeError, pickle.UnpicklingError, EOFError, ValueError) as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ConfigError(
            f"checkpoint refused: {path} is not a weights-only checkpoint of tensors and plain values ({reason}); "
            "move it aside or set resume to another checkpoint"
        ) from None


def _settings_by_key(
    header: dict[str, Any], model: QCAModule, datamodule: EpisodeDataModule, callbacks: list[Any],
    monitor: str | None, precision: str,
) -> tuple[dict[str, Any], dict[str, Any]]:  # fmt: skip
    """The checkpoint's settings and this session's, keyed as the CLI names them (``model.lr``, ``data.seed``)."""
    saved = {f"model.{key}": value for key, value in (header.get("hyper_parameters") or {}).items()}
    now = {f"model.{key}": value for key, value in model.hparams.items()}
    data = header.get(type(datamodule).__qualname__) or {}
    for key in ("seed", "total_episodes"):
        if key in data:
            saved[f"data.{key}"] = data[key]
        now[f"data.{key}"] = getattr(datamodule, key)
    meta = header.get(META_KEY)
    if isinstance(meta, dict) and monitor is not None:
        # Checkpoints written before the monitor was recorded were all ranked by val/combined, the only one then.
        saved["SmartCheckpoint.monitor"] = meta.get("monitor") or LEGACY_MONITOR
        now["SmartCheckpoint.monitor"] = monitor
    recorded = header.get(SETTINGS_KEY)
    recorded = recorded if isinstance(recorded, dict) else {}  # checkpoints of earlier versions recorded none
    now["trainer.precision"] = precision
    for callback in callbacks:
        if isinstance(callback, (SmartCheckpoint, MirrorSync)):
            now.update(callback.resume_settings())
    saved.update({key: value for key, value in recorded.items() if key in now})
    for guard in (callback for callback in callbacks if isinstance(callback, TimeLimitGuard)):
        hours = ((header.get("callbacks") or {}).get(guard.state_key) or {}).get("max_hours")
        if hours is not None:
            saved["TimeLimitGuard.max_hours"] = hours
        now["TimeLimitGuard.max_hours"] = guard.max_hours
    return saved, now


class SaveConfigWithoutSecrets(SaveConfigCallback):
    """Lightning's ``<run>/logs/config.yaml``, without the ``notify`` URLs: they hold services' tokens, and the run
    folder is mirrored (a shared Drive folder, a bucket). The saved config says ``notify: null`` (and a Notifier in
    ``trainer.callbacks`` has no ``urls``); the command line or the preset that gave them keeps them."""

    def __init__(self, parser: LightningArgumentParser, config: Any, *args: Any, **kwargs: Any) -> None:
        if notify_urls(config) or config.get("take_over"):
            config = without_notify_urls(config)
            config["take_over"] = False  # this session's decision, never a later one's
        super().__init__(parser, config, *args, **kwargs)


def run_reporting_errors(run: Callable[[], int]) -> int:
    """Run ``run`` and turn the errors a user can act on into one line on stderr and an exit code.

    Exit codes: 0 done or stopped cleanly, 1 out of disk space, 2 bad settings or a refused checkpoint,
    3 training cannot go on (non-finite losses, out of GPU memory), 4 done but the mirror is behind (run the same
    command again to retry), 5 another session owns the mirror (refused at the start, or taken over during
    training). Anything else is a bug and keeps its traceback. SIGTERM or Ctrl+C outside training
    (start-up, final flush) ends with exit 0 and one line: training itself stops through ``StopOnSignal``.
    """
    try:
        with signals_stop_the_command():
            return run()
    except BaseException as err:
        outcome = error_outcome(err)
        if outcome is None:
            raise
        print(outcome[1], file=sys.stderr)
        return outcome[0]


def error_outcome(err: BaseException) -> tuple[int, str] | None:
    """The exit code and the one stderr line of an error a user can act on; None for a bug (it keeps its traceback).

    ``run_reporting_errors`` prints it; the notification of a failed run (``--notify``) quotes it.
    """
    if isinstance(err, StopRequested):
        return 0, stopped_line(err)
    if isinstance(err, (NonFiniteTrainingError, EpisodeOutOfMemoryError)):
        return EXIT_CANNOT_TRAIN, f"atheria: error: {err}"
    if isinstance(err, SIGTERMException):
        # Only when SIGTERM arrived outside an episode boundary that StopOnSignal could use (e.g. validation).
        return 0, "atheria: stopped by SIGTERM; run the same command again to continue"
    if isinstance(err, argparse.ArgumentError):
        # A parser built without AtheriaCLI's settings (e.g. LightningCLI's own, for ckpt_path hyperparameters).
        return EXIT_BAD_SETTINGS, f"atheria: error: {' '.join(str(err).split())}"
    if isinstance(err, pickle.UnpicklingError):
        # torch.load(weights_only=True) refused objects other than tensors and plain values: never retry unsafely.
        refused = f"checkpoint refused, it holds more than tensors and plain values ({err}".splitlines()[0]
        return EXIT_BAD_SETTINGS, f"atheria: error: {refused}); move it aside or set resume to another checkpoint"
    if isinstance(err, OSError):
        if err.errno not in (errno.ENOSPC, errno.EDQUOT):
            return None
        return EXIT_DISK_FULL, (
            f"atheria: error: no space left while writing ({err}); the previous checkpoints are intact and listed "
            "in MANIFEST.json: free some space and run the same command again"
        )
    # jsonargparse wraps an error raised while building a callback in its own ValueError: find ours.
    config_error = find_config_error(err) if isinstance(err, Exception) else None
    if config_error is None:
        return None
    code = EXIT_MIRROR_TAKEN if isinstance(config_error, MirrorInUse) else EXIT_BAD_SETTINGS
    return code, f"atheria: error: {config_error}"


def exit_status(err: BaseException) -> tuple[int, str]:
    """The exit code the command ends with after ``err``, and what it says (a bug: the exception itself)."""
    outcome = error_outcome(err)
    if outcome is not None:
        return outcome[0], outcome[1].removeprefix("atheria: ")
    code = err.code if isinstance(err, SystemExit) and isinstance(err.code, int) else 1
    return code, f"{type(err).__name__}: {err}; the traceback is in the console"


def find_config_error(err: BaseException | None) -> ConfigError | None:
    if err is None:
        return None
    return next((cause for cause in _exception_chain(err) if isinstance(cause, ConfigError)), None)


# ----- bad settings found before anything is built -----
def check_accelerator_and_devices(accelerator: Any, devices: Any) -> None:
    """Refuse an accelerator this machine lacks, and devices its accelerator cannot give, naming what it offers."""
    if not isinstance(accelerator, str):
        return  # an Accelerator object (class_path in the config): its own checks apply
    here = sorted(name for name in AcceleratorRegistry.available_accelerators() if _accelerator(name).is_available())
    if "cuda" in here or "mps" in here:
        here.append("gpu")
    here.append("auto")
    name = accelerator.lower()
    if name not in here:
        known = ", ".join(sorted(AcceleratorRegistry.available_accelerators())) + ", gpu, auto"
        kind = "is not available on this machine" if name in known.split(", ") else f"is not one of {known}"
        raise ConfigError(f"trainer.accelerator={accelerator!r} {kind}: accepted here: {', '.join(here)}")
    if name in ("auto", "gpu"):  # Lightning's own choice: a GPU when there is one, else the CPU
        name = next(found for found in ("mps", "cuda", "cpu") if found in here)
    if devices == "auto":
        return
    chosen = _accelerator(name)
    if name == "cpu":
        accepted = "a positive number of processes (e.g. 1) or auto"
    else:
        count = chosen.auto_device_count()
        accepted = f"1 to {count} (this machine has {count}), a list of device indices such as [0], -1 (all), or auto"
    try:
        # The accelerator's own parser, as the Trainer uses it; 0 and [] parse to "no device" (None) for a GPU.
        refused = devices in (0, "0", []) or chosen.parse_devices(devices) is None
    except (MisconfigurationException, TypeError, ValueError):
        refused = True
    require(not refused, f"trainer.devices={devices} is not accepted with the {name} accelerator: accepted: {accepted}")


def _accelerator(name: str) -> Any:
    return AcceleratorRegistry[name]["accelerator"]


def check_run_dir(run_root: str | None, run_dir: str) -> None:
    """The run folder, or the nearest folder above it that exists, must be a writable folder: it is created later."""
    default = os.path.dirname(run_dir)
    setting = f"run_root={run_root!r}" if run_root is not None else f"run_root=null (the platform default {default})"
    path = Path(run_dir).absolute()
    existing = next(folder for folder in (path, *path.parents) if folder.exists())
    if not existing.is_dir():
        what = f"experiment_name={path.name!r}: {path}" if existing == path else f"{setting}: {existing}"
        raise ConfigError(f"{what} is a file, not a folder: give a folder (it is created when missing)")
    require(
        os.access(existing, os.W_OK | os.X_OK),
        f"{setting} cannot be written: {existing} is read-only here; give a writable folder (it is created when "
        "missing), or null for the platform default",
    )


# ----- parse errors as one line -----
def repeats_append(args: Any, option: str) -> list[str] | None:
    """``--notify a --notify b`` as jsonargparse's ``--notify a --notify+ b``: a repeated list option adds to the
    list instead of replacing it. None when ``args`` repeats no ``option`` (or is not a command line)."""
    if not isinstance(args, list | tuple):
        return None
    argv, seen = [str(arg) for arg in args], 0
    for index, arg in enumerate(argv):
        if arg == option or arg.startswith(f"{option}="):
            if seen:
                argv[index] = f"{option}+{arg[len(option) :]}"
            seen += 1
    return argv if seen > 1 else None


def parse_error_line(err: argparse.ArgumentError, parser: LightningArgumentParser, argv: list[str]) -> str:
    """One line naming the setting, what was given and what is accepted, from a jsonargparse parse error.

    ``parser`` is the one of the command (``atheria fit``): its actions say which keys and types exist.
    jsonargparse keeps the cause of an error in the exception chain (a YAML error, argparse's argument) but
    names the key only in its messages, in a few fixed forms, read here.
    """
    chain = _exception_chain(err)
    # Without subcommands (run=False, e.g. a curriculum's phases) the parser takes the settings of atheria fit.
    command = parser.prog.replace(" [options]", "") if parser.prog != "atheria" else "atheria fit"
    actions = {name[2:]: action for name, action in parser._option_string_actions.items() if name.startswith("--")}
    yaml_error = next((e for e in chain if isinstance(e, yaml.YAMLError)), None)
    if yaml_error is not None:
        return _yaml_line(yaml_error, argv)
    innermost = str(chain[-1]).strip()
    messages = [str(e).strip() for e in chain]
    unrecognized = next((m for m in messages if m.startswith("unrecognized arguments: ")), None)
    if unrecognized is not None:
        tokens = unrecognized.split(": ", 1)[1].split()
        option = next((token for token in tokens if token.startswith("-")), None)
        if option is None:
            return f"unexpected argument {tokens[0]!r} of {command}: settings are given as --key value"
        return unknown_option_line(option.lstrip("-").split("=")[0], command, actions)
    unknown = next((found for found in map(_unknown_key, messages) if found is not None), None)
    if unknown is not None:  # a key of a --config file (or a dict of settings) that no parser action takes
        return unknown_option_line(unknown, command, actions)
    key = next((m.split('"')[1] for m in messages if m.startswith('Parser key "')), None)
    argument = next((e for e in chain if isinstance(e, argparse.ArgumentError) and e.argument_name), None)
    if key is None and argument is not None:
        key = argument.argument_name.split("-->")[-1].strip().lstrip("-")
    if key in ("config", "c"):
        missing = next((path for path in _config_paths(argv) if not os.path.isfile(path)), None)
        if missing is not None:
            return missing_config_line(missing)
    if key is None:
        return " ".join(innermost.split())
    action = actions.get(key)
    hint = getattr(action, "_typehint", None) or getattr(action, "type", None)
    if argument is not None and "expected one argument" in argument.message:
        return f"--{key} needs a value" + (f": {_accepted(hint)}" if hint is not None else "")
    # jsonargparse's "Got value: …" is the value that failed, wherever it came from; else the command line's.
    given = innermost.rsplit("Got value: ", 1)[1] if "Got value: " in innermost else _given(argv, key)
    if hint is not None and given is not None:
        return f"{key}={given!r} must be {_accepted(hint)}"
    return f"{key}: {' '.join((argument.message if argument is not None else innermost).split())}"


# jsonargparse's messages for a key that no action takes (its _core.check_values).
UNKNOWN_KEY_FORMS = (
    re.compile(r"^Subcommand '[^']+' does not accept option '(?P<key>[^']+)'"),
    re.compile(r"^Group '(?P<group>[^']+)' does not accept option '(?P<key>[^']+)'"),
    re.compile(r"^Option '(?P<key>[^']+)' is not accepted"),
)


def _unknown_key(message: str) -> str | None:
    for form in UNKNOWN_KEY_FORMS:
        match = form.match(message)
        if match is not None:
            group = match.groupdict().get("group")
            return f"{group}.{match['key']}" if group else match["key"]
    return None


def _exception_chain(err: BaseException) -> list[BaseException]:
    chain: list[BaseException] = []
    current: BaseException | None = err
    while current is not None and all(current is not seen for seen in chain):
        chain.append(current)
        current = current.__cause__ or current.__context__
    return chain


def _config_paths(argv: list[str]) -> list[str]:
    paths = []
    for index, arg in enumerate(argv):
        if arg in ("--config", "-c") and index + 1 < len(argv):
            paths.append(argv[index + 1])
        elif arg.startswith("--config="):
            paths.append(arg.split("=", 1)[1])
    return paths


def _given(argv: list[str], key: str) -> str | None:
    """The last value given to ``--key`` on the command line, or None."""
    given = None
    for index, arg in enumerate(argv):
        if arg == f"--{key}" and index + 1 < len(argv):
            given = argv[index + 1]
        elif arg.startswith(f"--{key}="):
            given = arg.split("=", 1)[1]
    return given


def _yaml_line(error: yaml.YAMLError, argv: list[str]) -> str:
    """``--config='x.yaml' is not valid YAML: line 3, column 1: …``, for the first config file that fails."""
    # The error does not say which file it read: the first one that does not load is the one.
    for path in _config_paths(argv):
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError:
            continue
        try:
            yaml.safe_load(text)
        except yaml.YAMLError as file_error:
            return f"--config={path!r} is not valid YAML: {_yaml_problem(file_error)}"
    return f"a setting is not valid YAML: {_yaml_problem(error)}"


def _yaml_problem(error: yaml.YAMLError) -> str:
    if isinstance(error, yaml.MarkedYAMLError) and error.problem_mark is not None:
        mark = error.problem_mark
        context = f" ({error.context})" if error.context else ""
        return f"line {mark.line + 1}, column {mark.column + 1}: {error.problem}{context}"
    return " ".join(str(error).split())


def _accepted(hint: Any) -> str:
    """What a type hint accepts, as a user reads it: ``an integer``, ``one of UNET, MLP``, ``a number or null``."""
    origin, args = get_origin(hint), get_args(hint)
    if hint is type(None):
        return "null"
    if origin in (Union, types.UnionType):
        # Literals of all the members in one list: precision is three Literals, an int and None.
        choices = [str(value) for arg in args if get_origin(arg) is Literal for value in get_args(arg)]
        others = [_accepted(arg) for arg in args if get_origin(arg) is not Literal]
        parts = ([f"one of {', '.join(dict.fromkeys(choices))}"] if choices else []) + others
        return " or ".join(dict.fromkeys(parts))
    if origin is Literal:
        return "one of " + ", ".join(str(arg) for arg in args)
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        return "one of " + ", ".join(member.name for member in hint)
    if origin in (list, tuple, set, collections.abc.Sequence):
        return f"a list of {_accepted(args[0]) if args else 'values'}"
    words = {bool: "true or false", int: "an integer", float: "a number", str: "a string", dict: "a mapping"}
    if hint in words:
        return words[hint]
    return f"a {getattr(hint, '__name__', str(hint).replace('typing.', ''))}"
