"""The clock a callback reads, replaceable by tests: a seam, not a setting (a preset cannot name a function)."""

from __future__ import annotations

from collections.abc import Callable

from typing_extensions import Self

__all__ = ["UsesClock"]


class UsesClock:
    """A callback that reads ``self.clock`` (monotonic seconds; ``time.monotonic`` unless a test gives another).

    Example::

        guard = TimeLimitGuard(max_hours=1.0).use_clock(EpisodeClock().clock)
    """

    clock: Callable[[], float]

    def use_clock(self, clock: Callable[[], float]) -> Self:
        """Read ``clock`` from now on; returns the callback, so that it chains."""
        self.clock = clock
        self._clock_changed()
        return self

    def _clock_changed(self) -> None:
        """Re-read whatever was measured with the previous clock."""
