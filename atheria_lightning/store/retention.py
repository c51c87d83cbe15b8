"""The one retention rule: which checkpoint files stay, whether a save enters the top-k, and which one is best.

A run folder keeps ``last.ckpt`` plus the ``top_k`` best ``best-eNNNNNN.ckpt`` files, ranked by their metric
(lower is better; a missing or non-finite metric ranks last; at an equal metric the earlier episode first). The
local side, the mirror, the checkpoint callback, notify, status and the export all ask here, so the rule holds
the same everywhere and across kills, resumes and a changed ``top_k``: it is decided from the manifest's entries
alone.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

from atheria_lightning.store.manifest import LAST, Entry

__all__ = ["beyond_top_k", "best", "enters_top_k", "ranked", "ranked_metric"]


def ranked_metric(metric: float | None) -> float:
    """A metric as ranked: itself when finite, else last (``inf``)."""
    return metric if metric is not None and math.isfinite(metric) else math.inf


def ranked(files: Mapping[str, Entry]) -> list[tuple[str, Entry]]:
    """The best files of ``files`` (``last.ckpt`` is not one), the best first."""
    bests = [(name, entry) for name, entry in files.items() if name != LAST]
    return sorted(bests, key=lambda item: (ranked_metric(item[1].metric), item[1].episode))


def beyond_top_k(files: Mapping[str, Entry], top_k: int) -> list[str]:
    """The best files that retention drops: those ranked after the ``top_k`` first."""
    return [name for name, _ in ranked(files)[top_k:]]


def enters_top_k(metric: float, kept: Iterable[float | None], top_k: int) -> bool:
    """Whether a save with ``metric`` would stay among the ``top_k`` best, beside the best files' ``kept`` metrics
    (listed and queued). A non-finite metric never enters."""
    if not math.isfinite(metric):
        return False
    metrics = sorted(ranked_metric(value) for value in kept)
    return len(metrics) < top_k or metric < metrics[top_k - 1]


def best(files: Mapping[str, Entry]) -> list[tuple[str, Entry]]:
    """The candidates for "the best checkpoint", the best first: the best files with a finite metric. Whoever
    needs one file (the export, notify, status) takes the first that passes its own check."""
    return [(name, entry) for name, entry in ranked(files) if math.isfinite(ranked_metric(entry.metric))]
