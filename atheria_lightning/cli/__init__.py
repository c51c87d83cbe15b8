"""The ``atheria`` command: :func:`main` (``atheria_lightning.cli.main([...])`` from a notebook cell) and
:class:`AtheriaCLI`, the LightningCLI of ``atheria fit`` and ``atheria validate``.

The console script imports this package before it sets up SIGTERM and Ctrl+C, so :class:`AtheriaCLI` (torch,
Lightning) is imported when first named, not here.
"""

from __future__ import annotations

from typing import Any

from atheria_lightning.cli.main import COMMANDS, console_main, main

__all__ = ["COMMANDS", "AtheriaCLI", "console_main", "main"]


def __getattr__(name: str) -> Any:
    if name == "AtheriaCLI":
        from atheria_lightning.cli.app import AtheriaCLI

        return AtheriaCLI
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
