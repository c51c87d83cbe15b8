"""Callbacks that make a long training survive its platform: time guard, checkpoints, mirror, monitoring."""

from atheria_lightning.callbacks.progress import EpisodeProgressBar
from atheria_lightning.callbacks.summary import RunSummary

__all__ = ["EpisodeProgressBar", "RunSummary"]
