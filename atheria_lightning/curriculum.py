"""``atheria curriculum``: train phases in order, each an ``atheria fit`` run that may start from an earlier one."""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import re
import sys
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import yaml
from fsspec.implementations.local import LocalFileSystem
from jsonargparse import get_loader
from lightning.fabric.utilities.exceptions import MisconfigurationException
from typing_extensions import override

from atheria_lightning.callbacks import TimeLimitGuard
from atheria_lightning.cli.app import AtheriaCLI
from atheria_lightning.cli.messages import find_config_error, run_reporting_errors
from atheria_lightning.errors import ConfigError, OneLineArgumentParser, require
from atheria_lightning.files import atomic_write
from atheria_lightning.platform import default_mirror_url, default_run_root
from atheria_lightning.presets import missing_config_line, preset_file, preset_names
from atheria_lightning.store import Checkpoint, RunStore
from atheria_lightning.transfer import best_checkpoint, transfer_matching_weights, transfer_report

__all__ = [
    "Curriculum",
    "Phase",
    "PhaseCLI",
    "load_curriculum",
    "main",
]

SECTIONS = ("trainer", "model", "data")
CURRICULUM_KEYS = ("experiment_name", "run_root", "mirror_url", "max_hours", *SECTIONS, "phases")
PHASE_KEYS = ("name", "load_from_phase", *SECTIONS)
#: Overrides on the command line that go, unchanged, to every phase's ``atheria fit``.
PASSTHROUGH = tuple(f"--{section}." for section in SECTIONS)
#: A phase (and the curriculum) names a folder: no separators, no "..", nothing a shell or Drive would mangle.
PLAIN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
#: Written in a phase's run folder when the phase has trained all its episodes; a rerun then skips the phase.
PHASE_DONE = "PHASE_DONE.json"
GUARD_CLASS_PATH = "atheria_lightning.callbacks.TimeLimitGuard"
CONTINUE = "run the same command again to continue"


@dataclass(frozen=True)
class Phase:
    """One phase: its folder name, the earlier phase it starts from, and its merged trainer/model/data settings."""

    index: int
    name: str
    load_from_phase: str | None
    sections: dict[str, dict[str, Any]]


@dataclass(frozen=True)
class Curriculum:
    """Phases that share a name, a folder, a mirror and one session time budget.

    Phase ``P`` of curriculum ``C`` is the ordinary run ``<run_root>/C/P`` (checkpoints/, logs/, exports/), mirrored
    to ``<mirror_url>/C/P``: the run folders of ``atheria fit`` one level down.
    """

    name: str
    run_root: str
    mirror_url: str | None
    max_hours: float | None
    phases: tuple[Phase, ...]

    @property
    def folder(self) -> str:
        return os.path.join(self.run_root, self.name)

    def phase_dir(self, phase: Phase) -> str:
        return os.path.join(self.folder, phase.name)

    def phase_config(self, phase: Phase) -> str:
        """The phase as an ``atheria fit`` config (a YAML string, which ``--config`` accepts like a file)."""
        config = {
            "experiment_name": phase.name,
            "run_root": self.folder,
            "mirror_url": None if self.mirror_url is None else f"{self.mirror_url.rstrip('/')}/{self.name}",
            "resume": "auto",  # an interrupted phase continues mid-phase from its own newest verified checkpoint
            **phase.sections,
        }
        return yaml.safe_dump(config, sort_keys=False)


# ----- reading the curriculum -----
def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    """The curriculum options, and the ``--trainer.*``/``--model.*``/``--data.*`` overrides for every phase."""
    parser = OneLineArgumentParser(
        prog="atheria curriculum",
        allow_abbrev=False,
        description="Train the phases of a curriculum in order; run the same command again to continue.",
        epilog="Any --trainer.*, --model.* or --data.* override applies to every phase, after its own settings.",
    )
    parser.add_argument("--config", help="The curriculum YAML (e.g. configs/curriculum.yaml).")
    # The same setting as --config, by name (the packaged file); the later of the two wins, as in atheria fit.
    parser.add_argument(
        "--preset",
        dest="config",
        action=_PresetFile,
        metavar="NAME",
        help=f"A curriculum shipped with atheria, by name: {', '.join(preset_names('curriculum'))}.",
    )
    parser.add_argument("--experiment_name", help="The curriculum's folder name under run_root.")
    parser.add_argument("--run_root", help="Fast local folder for runs; null = the platform default.")
    parser.add_argument("--mirror_url", help="Persistent copy: a folder or fsspec URL, auto, or null.")
    parser.add_argument("--max_hours", help="The session time budget shared by all phases.")
    options, rest = parser.parse_known_args(argv)
    require(options.config is not None, "--config FILE or --preset NAME is required by atheria curriculum; presets: "
            f"{', '.join(preset_names('curriculum'))}; atheria curriculum --help says more")  # fmt: skip
    for token in rest:
        require(
            not token.startswith("--") or token.startswith(PASSTHROUGH),
            f"{token.split('=')[0]} is not an option of atheria curriculum; use --config, --preset, --experiment_name, "
            "--run_root, --mirror_url, --max_hours, or --trainer.*, --model.*, --data.* overrides for every phase",
        )
    return options, rest


class _PresetFile(argparse.Action):
    """``--preset NAME``: the packaged curriculum's path, stored where ``--config`` stores a file's."""

    def __call__(self, parser: Any, namespace: argparse.Namespace, values: Any, option: str | None = None) -> None:
        setattr(namespace, self.dest, preset_file(str(values), "curriculum"))


def load_curriculum(path: str, overrides: dict[str, Any] | None = None) -> Curriculum:
    """Read and check a curriculum YAML; ``overrides`` replace its top-level run settings. Nothing is written."""
    raw = {**_read_yaml(path), **(overrides or {})}
    unknown = sorted(set(raw) - set(CURRICULUM_KEYS))
    require(not unknown, f"curriculum key {unknown[0] if unknown else ''!r} is not one of {', '.join(CURRICULUM_KEYS)}")
    name = _plain_name(raw.get("experiment_name", "curriculum"), "experiment_name")
    max_hours = raw.get("max_hours")
    is_number = isinstance(max_hours, (int, float)) and not isinstance(max_hours, bool)
    require(
        max_hours is None or (is_number and max_hours > 0),
        f"max_hours={max_hours!r} must be a number of hours > 0 (the session budget shared by all phases), or null",
    )
    base = {section: _section(raw, section, "") for section in SECTIONS}
    phases = _phases(raw.get("phases"), base, max_hours)
    mirror = raw.get("mirror_url", "auto")
    return Curriculum(
        name=name,
        run_root=str(raw.get("run_root") or default_run_root()),
        mirror_url=default_mirror_url() if mirror == "auto" else (None if mirror is None else str(mirror)),
        max_hours=None if max_hours is None else float(max_hours),
        phases=phases,
    )


def _read_yaml(path: str) -> dict[str, Any]:
    require(os.path.isfile(path), missing_config_line(path, "curriculum"))
    try:
        with open(path) as handle:
            # jsonargparse's loader, so a curriculum reads exactly like the fit presets (1e-4 is a float there).
            data = get_loader("yaml")(handle.read())
    except Exception as err:  # any YAML syntax error
        raise ConfigError(f"--config={path!r} is not valid YAML: {' '.join(str(err).split())}") from err
    require(isinstance(data, dict), f"--config={path!r} must hold a mapping of curriculum settings and phases")
    return data


def _plain_name(value: Any, setting: str) -> str:
    require(
        isinstance(value, str) and PLAIN_NAME.fullmatch(value) is not None and ".." not in value,
        f"{setting}={value!r} must be a plain folder name (letters, digits, '_', '-', '.'; no '/' or '..')",
    )
    return value


def _section(raw: dict[str, Any], section: str, where: str) -> dict[str, Any]:
    value = raw.get(section)
    value = {} if value is None else value
    require(isinstance(value, dict), f"{where}{section} must be a mapping of settings, got {value!r}")
    return value


def _phases(raw: Any, base: dict[str, dict[str, Any]], max_hours: float | None) -> tuple[Phase, ...]:
    require(
        isinstance(raw, list) and len(raw) > 0,
        f"phases={raw!r} must be a non-empty list of phases (each: name, load_from_phase, model, data, trainer)",
    )
    names = [_phase_name(entry, index) for index, entry in enumerate(raw)]
    phases = []
    for index, entry in enumerate(raw):
        where = f"phases[{index}]."
        require(names.index(names[index]) == index, f"{where}name={names[index]!r} is used twice: names must differ")
        unknown = sorted(set(entry) - set(PHASE_KEYS))
        require(not unknown, f"{where}{unknown[0] if unknown else ''} is not one of {', '.join(PHASE_KEYS)}")
        source = _check_source(entry.get("load_from_phase"), names, index)
        sections = {section: _merge(base[section], _section(entry, section, where)) for section in SECTIONS}
        if max_hours is not None:
            sections["trainer"] = _with_time_budget(sections["trainer"], float(max_hours))
        phases.append(Phase(index=index, name=names[index], load_from_phase=source, sections=sections))
    return tuple(phases)


def _phase_name(entry: Any, index: int) -> str:
    require(isinstance(entry, dict), f"phases[{index}]={entry!r} must be a mapping with at least a name")
    return _plain_name(entry.get("name"), f"phases[{index}].name")


def _check_source(source: Any, names: list[str], index: int) -> str | None:
    """``load_from_phase`` must name a phase that runs before this one."""
    if source is None:
        return None
    setting = f"phases[{index}].load_from_phase={source!r}"
    earlier = ", ".join(names[:index]) or "none: the first phase starts from scratch"
    require(source in names, f"{setting} is not a phase of this curriculum; earlier phases: {earlier}")
    position = names.index(source)
    require(position != index, f"{setting} is this phase itself; earlier phases: {earlier}")
    require(position < index, f"{setting} runs after this phase; earlier phases: {earlier}")
    return source


def _merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """``base`` updated by ``override``, mappings merged key by key; lists (``trainer.callbacks``) are replaced."""
    merged = copy.deepcopy(base)
    for key, value in override.items():
        both_mappings = isinstance(value, dict) and isinstance(merged.get(key), dict)
        merged[key] = _merge(merged[key], value) if both_mappings else copy.deepcopy(value)
    return merged


def _with_time_budget(trainer: dict[str, Any], max_hours: float) -> dict[str, Any]:
    """Every phase's TimeLimitGuard gets the curriculum's ``max_hours`` (one is added where the list has none).

    Passing the whole budget, not what is left of it, is what shares it: the guard counts from the start of the
    process, so in phase k it already sees the time that phases 1..k-1 used in this session.
    """
    trainer = copy.deepcopy(trainer)
    callbacks = list(trainer.get("callbacks") or [])
    guards = [cb for cb in callbacks if isinstance(cb, dict) and _is_guard(cb.get("class_path"))]
    if not guards:
        guards = [{"class_path": GUARD_CLASS_PATH, "init_args": {}}]
        callbacks.append(guards[0])
    for guard in guards:
        guard["init_args"] = {**(guard.get("init_args") or {}), "max_hours": max_hours}
    trainer["callbacks"] = callbacks
    return trainer


def _is_guard(class_path: Any) -> bool:
    return isinstance(class_path, str) and class_path.rsplit(".", 1)[-1] == TimeLimitGuard.__name__


# ----- one phase -----
class PhaseCLI(AtheriaCLI):
    """:class:`AtheriaCLI` for one phase: when the phase starts fresh, its model starts from an earlier phase.

    Args:
        init_from: The name and run folder of the phase to start from; consulted only when the run has no
            checkpoint of its own (locally or on the mirror), so an interrupted phase resumes from itself.
    """

    def __init__(self, *args: Any, init_from: tuple[str, str] | None = None, **kwargs: Any) -> None:
        self.init_from = init_from  # set first: LightningCLI runs the whole command inside __init__
        super().__init__(*args, **kwargs)

    @override
    def resolve_checkpoint(self, ckpt_path: str | None, with_mirror: bool = True) -> Checkpoint | None:
        point = super().resolve_checkpoint(ckpt_path, with_mirror)
        if point is None and self.init_from is not None:
            phase, folder = self.init_from
            source = best_checkpoint(phase, folder)
            require(
                source is not None,
                f"phase {self.run_settings['experiment_name']!r} loads from phase {phase!r}, but {folder} holds no "
                "sound checkpoint that matches its MANIFEST.json",
            )
            assert source is not None
            transfer = transfer_matching_weights(self.model, source.path)
            print(transfer_report(self.run_settings["experiment_name"], source, transfer), flush=True)
        return point


# ----- running the curriculum -----
def main(argv: list[str] | None = None, trainer_defaults: dict[str, Any] | None = None) -> int:
    """``atheria curriculum --config C.yaml [overrides]`` (or ``--preset curriculum``). Bad settings print one line
    and exit 2, before any phase.

    ``trainer_defaults`` (e.g. ``{"callbacks": [live_plot]}``) is passed to every phase's :class:`AtheriaCLI`, so a
    notebook can add its own callbacks.
    """
    logging.getLogger("lightning.fabric.utilities.seed").setLevel(logging.WARNING)  # "Seed set to 42" is noise
    return run_reporting_errors(
        lambda: run_curriculum(sys.argv[1:] if argv is None else list(argv), trainer_defaults or {})
    )


def run_curriculum(argv: list[str], trainer_defaults: dict[str, Any]) -> int:
    """Check every phase, then run them in order until one stops early (time budget) or all are done."""
    options, overrides = parse_args(argv)
    # Only the settings given on the command line, read as YAML values: "--mirror_url null" turns a mirror off.
    run_settings = {key: yaml.safe_load(value) for key, value in vars(options).items()
                    if key != "config" and value is not None}  # fmt: skip
    curriculum = load_curriculum(options.config, run_settings)
    # Every phase is built (and so checked) before the first one trains; each is built once.
    built = [_build_phase(curriculum, phase, overrides, trainer_defaults) for phase in curriculum.phases]
    exit_code = 0
    for phase, cli in zip(curriculum.phases, built, strict=True):
        finished, phase_exit = _run_phase(curriculum, phase, cli)
        exit_code = max(exit_code, phase_exit)  # 4 when a phase's mirror is behind
        if not finished:
            return exit_code
    print(f"curriculum {curriculum.name}: all {len(built)} phases done; runs in {curriculum.folder}", flush=True)
    return exit_code


def _build_phase(
    curriculum: Curriculum, phase: Phase, overrides: list[str], trainer_defaults: dict[str, Any]
) -> PhaseCLI:
    """Build the phase's CLI without running it (nothing is written): a bad setting fails before any phase."""
    init_from = None
    if phase.load_from_phase is not None:
        init_from = (phase.load_from_phase, os.path.join(curriculum.folder, phase.load_from_phase))
    try:
        with _quiet("lightning.pytorch", "atheria_lightning"):
            return _phase_cli(
                ["--config", curriculum.phase_config(phase), *overrides],
                init_from=init_from,
                run=False,
                parser_kwargs={"exit_on_error": False},
                trainer_defaults=copy.copy(trainer_defaults),
            )
    except (argparse.ArgumentError, MisconfigurationException, ValueError) as err:
        problem = find_config_error(err) or err
        raise ConfigError(f"phase {phase.name!r}: {' '.join(str(problem).split())}") from err


def _phase_cli(args: list[str], **kwargs: Any) -> PhaseCLI:
    """Run one phase's CLI in this process (with ``run=False``: only build it)."""
    with warnings.catch_warnings():
        # The arguments are the phase's, built here; LightningCLI's warning that sys.argv is non-empty does not apply.
        warnings.filterwarnings("ignore", message="LightningCLI's args parameter", category=UserWarning)
        return PhaseCLI(args=args, **kwargs)


@contextmanager
def _quiet(*names: str) -> Iterator[None]:
    """Silence the build's messages (accelerator lines, printed once per phase before any trains)."""
    loggers = [logging.getLogger(name) for name in names]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


def _run_phase(curriculum: Curriculum, phase: Phase, cli: PhaseCLI) -> tuple[bool, int]:
    """Train one phase (or skip it when done); whether it has trained all its episodes, and its exit code.

    A done phase is skipped, unless the curriculum has a mirror: then its ``atheria fit`` runs, which finds nothing
    to train but brings the phase's mirror up to date.
    """
    folder = curriculum.phase_dir(phase)
    label = f"curriculum {curriculum.name}: phase {phase.index + 1}/{len(curriculum.phases)} {phase.name}"
    total = cli.datamodule.total_episodes
    done = read_phase_done(folder)
    finished = done is not None and done["episodes"] >= total
    if finished and curriculum.mirror_url is None:
        metric = done.get("best_metric") if done else None
        best = f", best monitored metric {metric:.4f}" if isinstance(metric, (int, float)) else ""
        print(f"{label}: done ({done['episodes'] if done else 0} episodes{best}), skipped", flush=True)
        return True, 0
    guard = next((callback for callback in cli.trainer.callbacks if isinstance(callback, TimeLimitGuard)), None)
    if not finished and guard is not None and guard.budget_spent():
        print(f"{label}: not started, the session's time budget is spent; {CONTINUE}", flush=True)
        return False, 0
    print(f"\n=== {label} ===", flush=True)
    cli.fit(cli.model, cli.datamodule)
    reached = RunStore(folder).newest_episode()
    if reached < total:
        print(f"{label}: stopped at episode {reached} of {total}; {CONTINUE}", flush=True)
        return False, cli.exit_code
    if cli.trainer.is_global_zero and not finished:
        write_phase_done(folder, phase, total)
    return True, cli.exit_code


# ----- the phase-done marker -----
def read_phase_done(folder: str) -> dict[str, Any] | None:
    """The phase's ``PHASE_DONE.json``, or None when it has none (or an unreadable one: the phase then reruns)."""
    try:
        with open(os.path.join(folder, PHASE_DONE)) as handle:
            data = json.load(handle)
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and isinstance(data.get("episodes"), int) else None


def write_phase_done(folder: str, phase: Phase, episodes: int) -> None:
    """Mark the phase done, atomically, with its episodes, best checkpoint and training time over all sessions."""
    best = best_checkpoint(phase.name, folder)
    record = {
        "phase": phase.name,
        "episodes": episodes,
        "best_checkpoint": None if best is None else os.path.basename(best.path),
        "best_metric": None if best is None else best.metric,
        "training_hours": _training_hours(os.path.join(folder, "checkpoints", "last.ckpt")),
        "loaded_from_phase": phase.load_from_phase,
        "finished_at": time.time(),
    }
    data = json.dumps(record, indent=1).encode()
    atomic_write(LocalFileSystem(), os.path.join(folder, PHASE_DONE), lambda handle: handle.write(data))


def _training_hours(last_checkpoint: str) -> float | None:
    """Training time over all sessions, as the TimeLimitGuard kept it in ``last.ckpt`` (None without a guard)."""
    if not os.path.isfile(last_checkpoint):
        return None
    # mmap: only the pickled metadata is read, not the tensors.
    state = torch.load(last_checkpoint, map_location="cpu", weights_only=True, mmap=True)
    seconds = state.get("callbacks", {}).get(TimeLimitGuard.__name__, {}).get("total_training_seconds")
    return None if seconds is None else round(float(seconds) / 3600.0, 4)


if __name__ == "__main__":
    sys.exit(main())
