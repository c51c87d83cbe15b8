"""Callbacks that make a long training survive its platform: time guard, checkpoints, mirror, monitoring."""

from atheria_lightning.callbacks.checkpoint import SmartCheckpoint
from atheria_lightning.callbacks.live_plot import LivePlot
from atheria_lightning.callbacks.mirror import MirrorSync
from atheria_lightning.callbacks.notify import Notify
from atheria_lightning.callbacks.progress import EpisodeProgressBar
from atheria_lightning.callbacks.resources import ResourceMonitor
from atheria_lightning.callbacks.signals import StopOnSignal
from atheria_lightning.callbacks.summary import RunSummary
from atheria_lightning.callbacks.time_guard import TimeLimitGuard
from atheria_lightning.callbacks.training_log import TrainingLog

__all__ = [
    "EpisodeProgressBar",
    "LivePlot",
    "MirrorSync",
    "Notify",
    "ResourceMonitor",
    "RunSummary",
    "SmartCheckpoint",
    "StopOnSignal",
    "TimeLimitGuard",
    "TrainingLog",
]
