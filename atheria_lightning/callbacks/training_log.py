"""TrainingLog: every episode's values over all sessions of a run, kept in its checkpoints, as training_log.json."""

from __future__ import annotations

import json
import logging
import math
import os
import time
from bisect import bisect_left
from collections.abc import Callable
from datetime import datetime, timezone
from typing import Any

import lightning.pytorch as pl
import torch
from fsspec.implementations.local import LocalFileSystem
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.trainer.states import TrainerFn
from typing_extensions import override

from atheria_lightning.callbacks.clock import UsesClock
from atheria_lightning.data import EpisodeDataModule, episodes_done
from atheria_lightning.errors import require
from atheria_lightning.figures import EPISODE_KEYS, VALIDATION_KEYS, empty_columns
from atheria_lightning.files import atomic_write
from atheria_lightning.loggers.scalars import as_floats
from atheria_lightning.report import EXPORTS, LOG_FILE, parse_training_log
from atheria_lightning.store import META_KEY, RunStore, UsesRunStore

log = logging.getLogger(__name__)

__all__ = ["LOG_FORMAT_VERSION", "STATE_KEY", "TrainingLog"]

LOG_FORMAT_VERSION = 1
#: The key of this callback's state in a checkpoint: the name of the callback that recorded the same state before
#: it was split into TrainingLog and LivePlot, so that the checkpoints of earlier versions resume into this one.
STATE_KEY = "TrainingReport"
# Bounded waits for the queued checkpoint writes: the log must never hold a dying session (the quota kills it anyway).
CHECKPOINT_WAIT_S = 120.0
EXCEPTION_WAIT_S = 30.0


class TrainingLog(UsesClock, UsesRunStore, Callback):
    """Records every episode and every validation of a run, over all its sessions, and writes them when fit ends.

    On global rank 0 only. After each episode it reads the ``train/*`` values of ``trainer.callback_metrics`` (one
    copy of five numbers the step already computed); after each validation of fit, the ``val/*`` values; at each
    checkpoint save, the episode. These records live in this callback's checkpoint state (under ``state_key``
    ``"TrainingReport"``, the name of the callback that kept them before, so older checkpoints resume into it), so
    the log covers every episode of a run resumed over several sessions. A session that resumes from an older
    checkpoint forgets what was recorded after it: those episodes run again. Time per session is measured with
    ``clock`` from the start of training.

    When fit ends, normally or by an early stop (the time guard sets ``trainer.should_stop``, so fit still ends
    cleanly), and on an exception once episodes ran (best effort), it writes ``<run_dir>/exports/training_log.json``
    atomically, after the queued checkpoint writes finish (bounded wait). A finished run whose last session was killed
    before that gets the file again from its final checkpoint's copy of these records (:meth:`catch_up`):

    ==================  ===========================================================================================
    ``episodes``        one row per episode: ``episode`` and ``train/<key>`` for each key of
                        :data:`~atheria_lightning.figures.EPISODE_KEYS` (``null`` where an episode was not finite)
    ``validations``     one row per validation: ``episode`` (episodes done) and ``val/<key>`` for each key of
                        :data:`~atheria_lightning.figures.VALIDATION_KEYS`
    ``checkpoints``     the checkpoints listed in ``MANIFEST.json``: file, kind, episode, metric, size
    ``saved_episodes``  every episode at which a checkpoint was saved
    ``sessions``        per session: first and last episode, episodes run, training seconds
    ``time``, ``best``  sessions, training hours and episodes per second; the best and last metrics
    ``config``          the model's hyper-parameters, the data settings, the trainer's
    ``exported_model``  ``null`` here; :func:`atheria_lightning.report.write_report` records the export
    ==================  ===========================================================================================

    It logs no metric. :class:`~atheria_lightning.callbacks.LivePlot` draws the loss from it while training
    (:meth:`loss_columns`); ``atheria report RUN`` draws ``summary.png`` and ``report.md`` from the file alone. The
    checkpoints come from the run's :class:`~atheria_lightning.store.RunStore` (``use_store``; without one, a
    store of ``run_dir`` is read).

    Args:
        run_dir: The run folder; ``trainer.default_root_dir`` by default (the CLI sets it to
            ``<run_root>/<experiment_name>``).
        phase: The curriculum phase this run is, recorded in the log (and shown in the plots and the report).

    Raises:
        ConfigError: ``phase`` is given but is not a one-line, non-empty string.

    Example::

        store = RunStore("runs/demo")
        training_log = TrainingLog(phase="Fase1_Vacuum_Stability").use_store(store)
        live_plot = LivePlot().use_log(training_log)
        trainer = Trainer(callbacks=[training_log, live_plot, SmartCheckpoint().use_store(store)],
                          plugins=[store.checkpoint_io])
    """

    def __init__(self, run_dir: str | None = None, phase: str | None = None) -> None:
        require(
            phase is None or (isinstance(phase, str) and phase.strip() != "" and "\n" not in phase),
            f"TrainingLog.phase={phase!r} must be a one-line name (it titles the plots and the report), or null",
        )
        self.run_dir = run_dir
        self.phase = phase
        self.clock: Callable[[], float] = time.monotonic
        # Columns, not one dict per episode; in checkpoints each column is one tensor (see state_dict).
        self.episodes: dict[str, list[float]] = empty_columns(EPISODE_KEYS)
        self.validations: dict[str, list[float]] = empty_columns(VALIDATION_KEYS)
        self.saved_episodes: list[int] = []
        self.sessions: list[dict[str, Any]] = []  # earlier sessions; the running one is in _session
        self._session: dict[str, Any] | None = None

    @property
    @override
    def state_key(self) -> str:
        return STATE_KEY

    # ----- hooks -----
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self.store is None:
            self.use_store(RunStore(self.run_dir or trainer.default_root_dir))

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        start = episodes_done(trainer)  # restored from the checkpoint by now; 0 for a new run
        # Records past the checkpoint belong to a session whose later episodes were lost (or to an earlier fit of
        # this same instance, e.g. a notebook cell run twice): the episodes run again from ``start``.
        self.truncate(start)
        if start > 0 and start not in self.saved_episodes:
            self.saved_episodes.append(start)  # the checkpoint this session resumed from
        self._session = {"session": len(self.sessions) + 1, "first_episode": start, "started": self.clock()}

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if trainer.is_global_zero:
            # A non-finite episode returns no loss and logs no loss parts: the values there are the last episode's.
            self._record_episode(trainer, episodes_done(trainer) - 1, finite=bool(outputs))

    @override
    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.is_global_zero or trainer.sanity_checking or trainer.state.fn != TrainerFn.FITTING:
            return
        values = _read_metrics(trainer.callback_metrics, "val", VALIDATION_KEYS)
        if not all(math.isnan(value) for value in values):
            _append(self.validations, episodes_done(trainer), values)

    @override
    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        episode = episodes_done(trainer)
        if trainer.is_global_zero and (not self.saved_episodes or self.saved_episodes[-1] != episode):
            self.saved_episodes.append(episode)

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # on_fit_end, not on_train_end: it runs after SmartCheckpoint's final save (checkpoint callbacks run last), so
        # the log lists it, and before the mirror's teardown flush, so the log reaches the mirror too.
        if trainer.is_global_zero:
            _guarded(self.write, trainer, pl_module)

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        # Only after episodes ran in this fit: a fit that failed in setup (e.g. an unreachable mirror) writes nothing.
        if trainer.is_global_zero and self._session is not None and self.episodes["episode"]:
            _guarded(self.write, trainer, pl_module, EXCEPTION_WAIT_S)

    @override
    def state_dict(self) -> dict[str, Any]:
        sessions = self.sessions + ([self._session_summary()] if self._session is not None else [])
        # One tensor per column, not lists of floats: Lightning walks every object of a checkpoint on the training
        # thread and pickles it, so lists made each save grow with the run, and a tensor is one object whatever its
        # length (benchmarks/RESULTS.md, "Long runs: one save as the history grows").
        return {
            "version": LOG_FORMAT_VERSION,
            "episodes": _column_tensors(self.episodes),
            "validations": _column_tensors(self.validations),
            "saved_episodes": torch.tensor(self.saved_episodes, dtype=torch.int64),
            "sessions": [dict(session) for session in sessions],
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.episodes = _load_columns(state_dict.get("episodes"), EPISODE_KEYS)
        self.validations = _load_columns(state_dict.get("validations"), VALIDATION_KEYS)
        self.saved_episodes = [int(episode) for episode in _as_list(state_dict.get("saved_episodes", []))]
        self.sessions = [dict(session) for session in state_dict.get("sessions", [])]
        self._session = None

    # ----- what others read -----
    def exports_dir(self, trainer: pl.Trainer) -> str:
        """``<run_dir>/exports``: where the log, the plots, the report and the model go."""
        return os.path.join(self.run_dir or trainer.default_root_dir, EXPORTS)

    @property
    def last_episode(self) -> int | None:
        """The index of the newest recorded episode, or None before the first."""
        return self.episodes["episode"][-1] if self.episodes["episode"] else None

    def loss_columns(self) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
        """Copies of the columns the loss plot shows: ``episode`` and ``loss``, of the episodes and the validations.

        Copies, so that a background thread can draw them while this callback records the next episodes.
        """
        episodes = {"episode": list(self.episodes["episode"]), "loss": list(self.episodes["loss"])}
        validations = {"episode": list(self.validations["episode"]), "loss": list(self.validations["loss"])}
        return episodes, validations

    def truncate(self, start: int) -> None:
        """Forget what happened after ``start`` episodes: episodes from ``start`` on, later validations and saves.

        Validations and saves are counted in episodes done (the validation after episode 9 is at 10).
        """
        cut = bisect_left(self.episodes["episode"], start)
        for column in self.episodes.values():
            del column[cut:]
        cut = bisect_left(self.validations["episode"], start + 1)
        for column in self.validations.values():
            del column[cut:]
        self.saved_episodes = [saved for saved in self.saved_episodes if saved <= start]
        self.sessions = [session for session in self.sessions if session["first_episode"] < start]

    # ----- the file -----
    def write(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        wait_s: float = CHECKPOINT_WAIT_S,
        datamodule: EpisodeDataModule | None = None,
    ) -> str:
        """Write ``exports/training_log.json`` now, listing the checkpoints once their queued writes are done (or
        ``wait_s`` passed); returns its path. ``datamodule``: the run's, when the trainer has none attached."""
        training_log = self.training_log(trainer, pl_module, self._checkpoints(wait_s), datamodule)
        path = os.path.join(self.exports_dir(trainer), LOG_FILE)
        data = json.dumps(training_log, indent=1).encode()
        atomic_write(LocalFileSystem(), path, lambda handle: handle.write(data))
        return path

    def catch_up(
        self, checkpoint: dict[str, Any], trainer: pl.Trainer, pl_module: pl.LightningModule,
        datamodule: EpisodeDataModule,
    ) -> bool:  # fmt: skip
        """Write ``training_log.json`` again from ``checkpoint``'s copy of this log when the file is behind it (missing,
        unreadable, or of another episode count): for a finished run whose last session was killed after its final
        checkpoint, before it wrote the file (or before the mirror got it, for a run folder restored from there).

        The checkpoint holds what the file would have: every episode, validation and save up to its own save, and each
        session's episodes and training seconds as of then. Only the last session's seconds after its final save
        are lost, and ``written_at`` and the trainer's settings are this start's. ``datamodule`` takes the checkpoint's
        state, as on a resume. False, writing nothing, when the file is up to date or the checkpoint holds no log.
        """
        state = (checkpoint.get("callbacks") or {}).get(self.state_key)
        episode = (checkpoint.get(META_KEY) or {}).get("episode")
        if not isinstance(state, dict) or episode is None:
            return False
        try:
            with open(os.path.join(self.exports_dir(trainer), LOG_FILE), "rb") as handle:
                if parse_training_log(handle.read()).get("episodes_done") == episode:
                    return False
        except (OSError, ValueError):
            pass  # missing or unreadable: the checkpoint's copy replaces it
        try:
            self.load_state_dict(state)
            if episode not in self.saved_episodes:  # the checkpoint's own save: Lightning takes the state before it
                self.saved_episodes.append(int(episode))
            datamodule.load_state_dict(checkpoint[type(datamodule).__qualname__])
            self.write(trainer, pl_module, datamodule=datamodule)
        except Exception as err:  # the exports are then drawn from the file as it is
            log.warning("TrainingLog: %s not written again from the final checkpoint: %s", LOG_FILE, err)
            return False
        return True

    def training_log(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        checkpoints: list[dict[str, Any]],
        datamodule: EpisodeDataModule | None = None,
    ) -> dict[str, Any]:
        """Everything ``training_log.json`` holds, as plain JSON values (NaN becomes null)."""
        datamodule = trainer.datamodule if datamodule is None else datamodule
        by_episodes = isinstance(datamodule, EpisodeDataModule)
        sessions = self.sessions + ([self._session_summary()] if self._session is not None else [])
        total_seconds = sum(float(session["training_seconds"]) for session in sessions)
        recorded = len(self.episodes["episode"])
        run_dir = self.run_dir or trainer.default_root_dir
        return _json_safe({
            "format_version": LOG_FORMAT_VERSION,
            "experiment": os.path.basename(os.path.normpath(run_dir)),
            "run_dir": run_dir,
            "phase": self.phase,
            "written_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "episodes_done": datamodule.episodes_done if by_episodes else trainer.global_step,
            "total_episodes": datamodule.total_episodes if by_episodes else None,
            "config": _config(trainer, pl_module, datamodule),
            "time": {
                "sessions": len(sessions),
                "total_training_hours": total_seconds / 3600.0,
                "episodes_per_second": recorded / total_seconds if total_seconds > 0 else None,
            },
            "sessions": sessions,
            "monitor": self.store.monitor if self.store is not None else None,
            "best": _best(self.episodes, self.validations),
            "checkpoints": checkpoints,
            "saved_episodes": self.saved_episodes,
            "exported_model": None,
            "episodes": _rows(self.episodes),
            "validations": _rows(self.validations),
        })  # fmt: skip

    # ----- helpers -----
    def _record_episode(self, trainer: pl.Trainer, episode: int, finite: bool = True) -> None:
        values = _read_metrics(trainer.callback_metrics, "train", EPISODE_KEYS)
        if not finite:
            values = [math.nan] * (len(values) - 1) + values[-1:]  # only the noise level is this episode's
        _append(self.episodes, episode, values)

    def _session_summary(self) -> dict[str, Any]:
        """The running session as it will be stored: episodes and training seconds so far."""
        session = self._session or {}
        first = int(session.get("first_episode", 0))
        last = self.episodes["episode"][-1] if self.episodes["episode"] else first - 1
        seconds = self.clock() - float(session.get("started", self.clock()))
        return {
            "session": int(session.get("session", len(self.sessions) + 1)),
            "first_episode": first,
            "last_episode": int(last),
            "episodes": max(0, int(last) + 1 - first),
            "training_seconds": round(max(0.0, seconds), 3),
        }

    def _checkpoints(self, wait_s: float) -> list[dict[str, Any]]:
        """The run's listed checkpoints, once the queued writes are done (or ``wait_s`` passed)."""
        assert self.store is not None
        if not self.store.wait(timeout=wait_s):
            log.warning("checkpoint writes still pending after %.0f s: the log may miss the newest", wait_s)
        return [
            {"file": name, "kind": entry.kind, "episode": entry.episode, "metric": entry.metric, "size": entry.size}
            for name, entry in sorted(self.store.entries().items(), key=lambda item: item[1].episode)
        ]


def _guarded(action: Callable[..., Any], *args: Any) -> None:
    # The log must never stop (or crash the end of) a day-long training.
    try:
        action(*args)
    except Exception as err:
        log.warning("TrainingLog: writing %s failed: %s", LOG_FILE, err)


def _column_tensors(columns: dict[str, list[float]]) -> dict[str, torch.Tensor]:
    """Columns as one tensor each, for checkpoints: int64 episode numbers, float64 values (NaN kept)."""
    return {
        key: torch.tensor(values, dtype=torch.int64 if key == "episode" else torch.float64)
        for key, values in columns.items()
    }


def _as_list(values: Any) -> list[Any]:
    """A checkpoint's column as a list: a tensor (this version) or a list (checkpoints of earlier versions)."""
    return values.tolist() if isinstance(values, torch.Tensor) else list(values)


def _load_columns(state: dict[str, Any] | None, keys: tuple[str, ...]) -> dict[str, list[float]]:
    columns = empty_columns(keys)
    state = state or {}
    length = len(state.get("episode", []))
    for key in columns:
        values = [float(value) for value in _as_list(state.get(key, []))]
        columns[key] = values if len(values) == length else [math.nan] * length
    columns["episode"] = [int(episode) for episode in columns["episode"]]
    return columns


def _append(columns: dict[str, list[float]], episode: int, values: list[float]) -> None:
    columns["episode"].append(int(episode))
    for key, value in zip(list(columns)[1:], values, strict=True):
        columns[key].append(value)


def _read_metrics(metrics: dict[str, Any], prefix: str, keys: tuple[str, ...]) -> list[float]:
    """``metrics[prefix/key]`` as floats (NaN when absent), with one device-to-host copy per device."""
    present = [(index, metrics[f"{prefix}/{key}"]) for index, key in enumerate(keys) if f"{prefix}/{key}" in metrics]
    values = [math.nan] * len(keys)
    for (index, _), value in zip(present, as_floats([value for _, value in present]), strict=True):
        values[index] = value
    return values


def _rows(columns: dict[str, list[float]]) -> list[dict[str, Any]]:
    keys = list(columns)
    return [dict(zip(keys, values, strict=True)) for values in zip(*columns.values(), strict=True)]


def _best(episodes: dict[str, list[float]], validations: dict[str, list[float]]) -> dict[str, Any]:
    best: dict[str, Any] = {}
    for key in ("loss", "combined"):
        index = _argmin(validations[key])
        if index is not None:
            best.update({f"val_{key}": validations[key][index], f"val_{key}_episode": validations["episode"][index]})
    loss_index = _argmin(episodes["loss"])
    if loss_index is not None:
        best.update(train_loss=episodes["loss"][loss_index], train_loss_episode=episodes["episode"][loss_index])
    if episodes["episode"]:
        best.update(last_episode=episodes["episode"][-1], last_train_loss=episodes["loss"][-1],
                    last_train_survival=episodes["survival"][-1])  # fmt: skip
    return best


def _argmin(values: list[float]) -> int | None:
    finite = [(value, index) for index, value in enumerate(values) if value is not None and math.isfinite(value)]
    return min(finite)[1] if finite else None


def _config(trainer: pl.Trainer, pl_module: pl.LightningModule, datamodule: Any) -> dict[str, Any]:
    data = {key: getattr(datamodule, key) for key in ("total_episodes", "seed", "val_every_episodes", "val_universes")
            } if isinstance(datamodule, EpisodeDataModule) else {}  # fmt: skip
    return {
        "model": dict(pl_module.hparams),
        "data": data,
        "trainer": {
            "accelerator": type(trainer.accelerator).__name__,
            "devices": trainer.num_devices,
            "num_nodes": trainer.num_nodes,
            "precision": trainer.precision,
            "max_steps": trainer.max_steps,
            "gradient_clip_val": trainer.gradient_clip_val,
            "callbacks": [type(callback).__name__ for callback in trainer.callbacks],
        },
    }


def _json_safe(value: Any) -> Any:
    """Plain JSON: NaN and infinities become null (strict parsers reject them), unknown objects their str."""
    if isinstance(value, dict):
        return {str(key): _json_safe(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(item) for item in value]
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if value is None or isinstance(value, bool | int | str):
        return value
    return str(value)
