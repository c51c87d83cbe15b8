"""Detect Colab, Kaggle or a local machine, and choose the default run and mirror folders for each."""

from __future__ import annotations

import os
import sys
from enum import Enum


class Platform(str, Enum):
    COLAB = "colab"
    KAGGLE = "kaggle"
    LOCAL = "local"


def detect_platform() -> Platform:
    """Colab sets ``COLAB_RELEASE_TAG`` (and imports ``google.colab``); Kaggle sets ``KAGGLE_KERNEL_RUN_TYPE``."""
    if "google.colab" in sys.modules or os.environ.get("COLAB_RELEASE_TAG"):
        return Platform.COLAB
    if os.environ.get("KAGGLE_KERNEL_RUN_TYPE"):
        return Platform.KAGGLE
    return Platform.LOCAL


#: The fast local folder where a run writes first (Colab's /content is a local SSD; Kaggle keeps /kaggle/working).
DEFAULT_RUN_ROOTS = {Platform.COLAB: "/content/atheria_runs", Platform.KAGGLE: "/kaggle/working/atheria_runs",
                     Platform.LOCAL: "./runs"}  # fmt: skip
#: Where Colab mounts the user's Drive (``google.colab.drive.mount("/content/drive")``).
COLAB_DRIVE_ROOT = "/content/drive/MyDrive"
#: The persistent mirror: Drive on Colab; none elsewhere (Kaggle's /kaggle/working already persists its output).
DEFAULT_MIRRORS = {Platform.COLAB: "/content/drive/MyDrive/Atheria", Platform.KAGGLE: None, Platform.LOCAL: None}


#: Where Kaggle attaches a notebook's inputs, read-only: datasets, and notebook outputs such as a previous version's
#: ``/kaggle/working``.
KAGGLE_INPUT_ROOT = "/kaggle/input"
#: Another folder to search for a previous version's run instead (a test, a copy of an input), on any platform.
KAGGLE_INPUT_ENV = "ATHERIA_KAGGLE_INPUT"


def kaggle_input_root(platform: Platform | None = None) -> str | None:
    """Where to look for a previous version's run folder: ``$ATHERIA_KAGGLE_INPUT`` when set, ``/kaggle/input`` on
    Kaggle, else nowhere (None)."""
    override = os.environ.get(KAGGLE_INPUT_ENV)
    if override:
        return override
    return KAGGLE_INPUT_ROOT if (platform or detect_platform()) is Platform.KAGGLE else None


def default_run_root(platform: Platform | None = None) -> str:
    return DEFAULT_RUN_ROOTS[platform or detect_platform()]


def default_mirror_url(platform: Platform | None = None) -> str | None:
    return DEFAULT_MIRRORS[platform or detect_platform()]
