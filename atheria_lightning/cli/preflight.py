"""Bad settings refused before anything is built (the run folder, its mirror, the logs would exist by then):
the accelerator and devices, the run folder, the mirror URL, resume, max_hours, ckpt_path, the loggers' packages."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.accelerators import AcceleratorRegistry

from atheria_lightning.errors import ConfigError, require
from atheria_lightning.loggers import check_logger_packages
from atheria_lightning.platform import COLAB_DRIVE_ROOT, Platform, default_mirror_url, detect_platform

RESUME_MODES = ("auto", "never")


def run_dir_of(run_root: str, experiment_name: str) -> str:
    """``<run_root>/<experiment_name>``, after checking the name cannot escape the root."""
    check_experiment_name(experiment_name)
    return os.path.join(run_root, experiment_name)


def check_experiment_name(experiment_name: str) -> None:
    require(
        bool(experiment_name) and "/" not in experiment_name and "\\" not in experiment_name
        and experiment_name not in (".", "..") and ".." not in experiment_name,
        f"experiment_name={experiment_name!r} must be a plain folder name (no '/', '\\\\' or '..')",
    )  # fmt: skip


def check_run_settings(settings: Any) -> None:
    """``resume``, ``max_hours`` and ``experiment_name``, the command's own settings."""
    resume = settings["resume"]
    require(
        resume in RESUME_MODES or Path(resume).is_file(),
        f"resume={resume!r} must be one of {', '.join(RESUME_MODES)} or an existing checkpoint file",
    )
    max_hours = settings["max_hours"]
    require(max_hours is None or (math.isfinite(max_hours) and max_hours > 0),
            f"max_hours={max_hours!r} must be a number of hours > 0, or null for the preset's")  # fmt: skip
    check_experiment_name(settings["experiment_name"])  # before anything is built


def check_before_build(settings: Any, run_dir: str) -> None:
    """What the Trainer, the run store or the resume choice would refuse later, refused before any of them is built."""
    ckpt_path = settings.get("ckpt_path")
    require(
        ckpt_path is None or Path(ckpt_path).is_file(),
        f"ckpt_path={ckpt_path!r} is not a checkpoint file: give an existing .ckpt file, or leave ckpt_path "
        "unset to follow resume (auto: the run's newest checkpoint)",
    )
    trainer = settings.get("trainer") or {}
    check_accelerator_and_devices(trainer.get("accelerator", "auto"), trainer.get("devices", "auto"))
    check_logger_packages(trainer.get("logger"))
    check_run_dir(settings["run_root"], run_dir)


def mirror_url(setting: str | None) -> str | None:
    """The mirror of ``mirror_url``: ``auto`` is the platform default (Drive on Colab, which must be mounted)."""
    if setting != "auto":
        return setting
    url = default_mirror_url()
    if url is not None and detect_platform() is Platform.COLAB:
        # Unmounted, /content/drive is an ordinary folder of the session's disk: a "mirror" there dies with it.
        require(
            os.path.isdir(COLAB_DRIVE_ROOT),
            f"mirror_url=auto needs Google Drive mounted at {COLAB_DRIVE_ROOT}: run "
            "google.colab.drive.mount('/content/drive') first, or set mirror_url to another folder or null",
        )
    return url


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
