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


def default_run_root(platform: Platform | None = None) -> str:
    return DEFAULT_RUN_ROOTS[platform or detect_platform()]


def default_mirror_url(platform: Platform | None = None) -> str | None:
    return DEFAULT_MIRRORS[platform or detect_platform()]
