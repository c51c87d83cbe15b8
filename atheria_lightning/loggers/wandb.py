"""One W&B run across the sessions of a run folder, its id kept in the run's checkpoints and ``logs/``."""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import re
import secrets
import string
from collections.abc import Mapping, Sequence
from typing import Any

from fsspec.implementations.local import LocalFileSystem
from jsonargparse import Namespace
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import Logger, WandbLogger
from typing_extensions import override

from atheria_lightning.errors import ConfigError, require
from atheria_lightning.files import atomic_write
from atheria_lightning.redact import argv_redacted

__all__ = ["ID_FILE", "WandbRun", "WandbRunId", "attach", "check_logger_packages"]

log = logging.getLogger(__name__)

#: Where a run keeps its W&B run id: in ``logs/``, which the mirror keeps and a new machine gets back before resuming.
ID_FILE = "wandb_run.json"
#: W&B's own rule for run ids is looser; an id read from a file or checkpoint (untrusted) must also name a folder.
_SAFE_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")


def check_logger_packages(logger_config: Any) -> None:
    """``trainer.logger`` as parsed, before it is built: a ``WandbLogger`` without the wandb package is one line."""
    configs = logger_config if isinstance(logger_config, list) else [logger_config]
    paths = [str(config.get("class_path")) for config in configs if isinstance(config, (dict, Namespace))]
    wanted = [path for path in paths if path.rsplit(".", 1)[-1] == "WandbLogger"]
    if wanted and importlib.util.find_spec("wandb") is None:
        raise ConfigError(f"trainer.logger={wanted[0]} needs the wandb package: pip install wandb (the "
                          "atheria_lightning[wandb] extra), or leave trainer.logger unset for TensorBoard")  # fmt: skip


def attach(
    loggers: Sequence[Logger], run_dir: str, notify_urls: Sequence[str] = ()
) -> tuple[list[WandbRun], list[WandbRunId]]:
    """A ``WandbLogger`` among the trainer's loggers gets a :class:`WandbRun` (one W&B run across sessions, its files
    in the run folder), also a callback so that checkpoints keep its id; without one, a :class:`WandbRunId` keeps the
    id of the checkpoints for a later session with W&B."""
    wandb_loggers = [each for each in loggers if isinstance(each, WandbLogger)]
    require(len(wandb_loggers) <= 1, f"trainer.logger lists {len(wandb_loggers)} WandbLoggers: W&B records one "
            "run per process, so give one")  # fmt: skip
    if not wandb_loggers:
        return [], [WandbRunId()]
    run = WandbRun(wandb_loggers[0], run_dir, notify_urls)
    return [run], [run]


class WandbRunId(Callback):
    """The W&B run id that a run's checkpoints carry, kept through sessions that log without W&B.

    :func:`attach` adds it when no ``WandbLogger`` is configured: a checkpoint written with W&B then still finds the
    callback its state belongs to (Lightning warns about state no callback takes), and the id goes on into the
    next checkpoints, so a later session with W&B again continues the same W&B run.
    """

    def __init__(self) -> None:
        self.id: str | None = None

    @property
    @override
    def state_key(self) -> str:
        return "WandbRun"  # one key for both classes: the checkpoint's id is the run's, whichever kept it

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"id": self.id}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        value = state_dict.get("id") if isinstance(state_dict, dict) else None
        self.id = value if _is_safe(value) else None  # a checkpoint is untrusted: only an id W&B could have made


class WandbRun(WandbRunId):
    """Keeps a ``WandbLogger`` on one W&B run across the sessions of a run, with W&B's files inside the run folder.

    Before each session trains, :meth:`resume` picks the run's id: the ``id`` (or ``version``) given to the logger;
    else the one saved in the checkpoint being resumed from (the truth: the run continues from that state); else the
    one in ``<run>/logs/wandb_run.json`` (a run whose checkpoints predate W&B, or that lost them); else a new id. The id
    is written to that file and, as this callback's state, into every checkpoint; W&B resumes it (``resume="allow"``,
    WandbLogger's default, unless the config sets another). W&B's files go to ``<run>/logs/wandb/``, mirrored with the
    run's other logs; a ``save_dir`` given in the config is replaced (one warning: outside the run folder they would
    die with the machine). A ``name`` not given is the experiment's. W&B records the command line without the
    notification URLs (:func:`~atheria_lightning.redact.redacted_argv`).

    :func:`attach` adds it beside a configured ``WandbLogger``; the session calls :meth:`resume` before
    ``trainer.fit`` and :meth:`finish` before the final mirror flush
    (:class:`~atheria_lightning.loggers.SessionLogger`).

    Args:
        logger: The run's ``WandbLogger``, before its experiment exists (it creates it lazily, at the start of fit).
        run_dir: The run folder.
        notify_urls: The run's notification URLs (:func:`~atheria_lightning.redact.notify_urls`), kept out of
            W&B's record of the command line wherever they stand in it.
    """

    def __init__(self, logger: WandbLogger, run_dir: str, notify_urls: Sequence[str] = ()) -> None:
        super().__init__()
        self.logger = logger
        self.notify_urls = list(notify_urls)
        self.log_dir = os.path.join(os.path.abspath(run_dir), "logs")
        self.id_file = os.path.join(self.log_dir, ID_FILE)
        self.id: str | None = None
        # The logger keeps wandb.init's arguments until its experiment exists (tests/test_lightning_private.py).
        init = logger._wandb_init
        self.given_id: str | None = init.get("id")
        given_dir = init.get("dir")
        if given_dir not in (None, ".") and os.path.abspath(given_dir) != self.log_dir:
            log.warning("WandbLogger save_dir=%r is not used: W&B's files go to %s/wandb, inside the run folder, so "
                        "that they are mirrored with it", given_dir, self.log_dir)  # fmt: skip
        init["dir"] = self.log_dir
        logger._save_dir = self.log_dir
        if init.get("anonymous") is None:  # Lightning passes None, which recent wandb warns about on every start
            init.pop("anonymous", None)
        if init.get("name") is None:
            init["name"] = logger._name = os.path.basename(os.path.normpath(run_dir))

    def resume(self, header: Mapping[str, Any] | None, start: bool = True) -> str:
        """Pick this session's W&B run id (see the class) from the resumed checkpoint's ``header`` and the id file,
        and give it to the logger. With ``start`` (rank 0): start the W&B run now, so that a missing API key or an
        unreachable server is one line (:class:`ConfigError`) before training, then record the id in the id file."""
        saved = ((header or {}).get("callbacks") or {}).get(self.state_key)
        from_checkpoint = saved.get("id") if isinstance(saved, dict) else None
        found = [(self.given_id, "the config"), (from_checkpoint, "the checkpoint"), (self._read_id_file(), ID_FILE)]
        # An id given in the config is W&B's to check; one read from a checkpoint or the file is untrusted.
        usable = [(value, source) for value, source in found if value is not None
                  and (source == "the config" or _is_safe(value))]  # fmt: skip
        run_id, source = usable[0] if usable else (new_run_id(), "new")
        self.id = run_id
        self.logger._wandb_init["id"] = self.logger._id = run_id
        if start:
            how = "new" if source == "new" else f"id from {source}"
            print(f"W&B: run {run_id} ({how}); its files: {self.log_dir}/wandb", flush=True)
            os.makedirs(self.log_dir, exist_ok=True)  # W&B writes elsewhere when its folder is missing
            self._start()
            data = json.dumps({"id": run_id}).encode()
            atomic_write(LocalFileSystem(), self.id_file, lambda handle: handle.write(data))
        return run_id

    def _start(self) -> None:
        import wandb

        try:
            with argv_redacted(self.notify_urls):  # W&B records the command line as its run starts
                _ = self.logger.experiment
        except wandb.errors.Error as err:
            reason = " ".join(str(err).split()) or type(err).__name__
            raise ConfigError(
                f"trainer.logger WandbLogger cannot start its run ({reason}): set WANDB_API_KEY (on Colab a secret, "
                "on Kaggle an add-on secret), or WANDB_MODE=offline to record it in the run folder and `wandb sync` "
                "it later"
            ) from None

    def _read_id_file(self) -> str | None:
        try:
            with open(self.id_file, encoding="utf-8") as handle:
                value = json.load(handle).get("id")
        except FileNotFoundError:
            return None
        except (OSError, ValueError, AttributeError) as err:
            log.warning("%s is not readable (%s): not used", self.id_file, err)
            return None
        if not _is_safe(value):
            log.warning("%s holds no usable run id (%r): not used", self.id_file, value)
            return None
        return value

    def lines(self) -> list[str]:
        """The summary's line: the run's URL, or offline the command that uploads all its sessions (rank 0)."""
        experiment = self.logger.experiment
        if experiment.offline:
            # Each session is an offline-run-<time>-<id> folder; wandb sync uploads them in order into the one run.
            return [f"W&B (offline): wandb sync {self.log_dir}/wandb/offline-run-*"]
        return [f"W&B: {experiment.url}"] if experiment.url else []

    def finish(self, failed: bool = False) -> None:
        """End this session's W&B run (marked failed with ``failed``), so that its files are complete before the
        final flush mirrors them."""
        import wandb

        wandb.finish(exit_code=1 if failed else 0)

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        pass  # the id was chosen by resume() before fit, from this same checkpoint unless the config gives one


def new_run_id() -> str:
    """Eight base-36 characters, as W&B makes them (its generator is private)."""
    return "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))


def _is_safe(value: Any) -> bool:
    return isinstance(value, str) and _SAFE_ID.fullmatch(value) is not None
