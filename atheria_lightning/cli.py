"""The ``atheria`` command: fit, validate (AtheriaCLI), curriculum, export and report; errors as one line."""

from __future__ import annotations

import logging
import sys
import warnings

from atheria_lightning.app import AtheriaCLI, run_reporting_errors

__all__ = ["AtheriaCLI", "main"]


def quiet_lightning() -> None:
    """Lightning's start-up chatter off the console: the command prints what matters in its own lines.

    Its INFO lines ("Seed set to 42", "GPU available: False", a tip to install another logger, "Restoring states
    from …", which our "resuming from episode k of N" says better) go; its warnings stay. A deprecation inside
    Lightning that the user cannot act on is filtered by its message.
    """
    for name in ("lightning.fabric.utilities.seed", "lightning.pytorch.utilities.rank_zero",
                 "lightning.fabric.utilities.rank_zero"):  # fmt: skip
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated")


def main(args: list[str] | None = None) -> int:
    """``atheria <command> …`` from a notebook cell or the console script; returns the exit code.

    Bad settings print one line and return 2, before any training (``run_reporting_errors`` lists the codes).
    """
    quiet_lightning()
    argv = sys.argv[1:] if args is None else list(args)
    if argv[:1] == ["curriculum"]:
        from atheria_lightning.curriculum import main as curriculum_main  # Lightning's CLI machinery, only here

        return curriculum_main(argv[1:])
    if argv[:1] == ["export"]:
        from atheria_lightning.export import main as export_main

        return export_main(argv[1:])
    if argv[:1] == ["report"]:
        from atheria_lightning.report import main as report_main

        return report_main(argv[1:])
    return run_reporting_errors(lambda: AtheriaCLI(args=args).exit_code)


if __name__ == "__main__":  # python -m atheria_lightning.cli; the console script is atheria_lightning.console
    sys.exit(main())
