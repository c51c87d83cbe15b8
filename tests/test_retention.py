"""The one retention rule, as every part of the store applies it."""

from __future__ import annotations

import math

from atheria_lightning.store.manifest import Entry
from atheria_lightning.store.retention import best, beyond_top_k, enters_top_k, ranked


def _entry(episode: int, metric: float | None) -> Entry:
    return Entry(episode, 1, "0" * 64, metric, "best" if metric is not None or episode else "last")


def test_the_best_file_is_the_lowest_finite_metric_then_the_earlier_episode_and_last_is_never_ranked() -> None:
    files = {
        "last.ckpt": _entry(9, 0.01),
        "best-e000004.ckpt": _entry(4, 0.5),
        "best-e000002.ckpt": _entry(2, 0.5),
        "best-e000006.ckpt": _entry(6, math.nan),
        "best-e000008.ckpt": _entry(8, None),
        "best-e000007.ckpt": _entry(7, 0.2),
    }
    assert [name for name, _ in ranked(files)][:3] == ["best-e000007.ckpt", "best-e000002.ckpt", "best-e000004.ckpt"]
    assert [name for name, _ in best(files)] == ["best-e000007.ckpt", "best-e000002.ckpt", "best-e000004.ckpt"]
    # A NaN or missing metric ranks last, so it is the first a lower top_k drops.
    assert set(beyond_top_k(files, 3)) == {"best-e000006.ckpt", "best-e000008.ckpt"}
    assert beyond_top_k(files, 5) == []


def test_a_save_enters_the_top_k_only_with_a_finite_metric_better_than_the_kth() -> None:
    assert enters_top_k(0.3, [0.1, 0.2], 3)
    assert enters_top_k(0.15, [0.1, 0.2, None], 3), "a file without a metric is the first to be pushed out"
    assert not enters_top_k(0.3, [0.1, 0.2, 0.25], 3)
    assert not enters_top_k(0.25, [0.1, 0.2, 0.25], 3), "a tie keeps the earlier file"
    assert not enters_top_k(math.inf, [], 3) and not enters_top_k(math.nan, [], 3)
