"""The one protocol between a run's session and a logger whose run lives across sessions."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any, Protocol

from lightning.pytorch.callbacks import Callback

from atheria_lightning.redact import argv_redacted

__all__ = ["RunLoggers", "SessionLogger"]


class SessionLogger(Protocol):
    """What a session asks of a logger that continues one run across sessions (TensorBoard's events, a W&B run).

    A new one is one file in :mod:`atheria_lightning.loggers`: a class with these methods and an ``attach``
    function that finds its loggers among the trainer's (:data:`atheria_lightning.loggers.ATTACH`).
    """

    def resume(self, header: Mapping[str, Any] | None, start: bool = True) -> object:
        """Before training: continue from the resumed checkpoint's metadata ``header`` (None: a new run).
        ``start`` is True on rank 0, which alone writes logs."""

    def finish(self, failed: bool = False) -> None:
        """After training, before the final flush mirrors the run folder: complete the logger's files."""

    def lines(self) -> list[str]:
        """The end-of-run summary's lines: where to see the logs."""


@dataclass
class RunLoggers:
    """The trainer's loggers that live across sessions, and the callbacks that keep their state in checkpoints."""

    sessions: Sequence[SessionLogger] = ()
    callbacks: list[Callback] = field(default_factory=list)
    #: The notification URLs a logger must not record (they hold services' tokens).
    notify_urls: Sequence[str] = ()

    def command_line_redacted(self) -> AbstractContextManager[None]:
        """While a logger may start its run inside Lightning (``validate`` starts W&B itself, with no resume):
        ``sys.argv`` without the notification URLs, which W&B records in the run's metadata."""
        return argv_redacted(self.notify_urls)

    def resume(self, header: Mapping[str, Any] | None, start: bool = True) -> None:
        for each in self.sessions:
            each.resume(header, start)

    def finish(self, failed: bool = False) -> None:
        for each in self.sessions:
            each.finish(failed)

    def lines(self) -> list[str]:
        return [line for each in self.sessions for line in each.lines()]
