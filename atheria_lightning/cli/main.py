"""The ``atheria`` command: fit, validate (AtheriaCLI), curriculum, export, report and status; errors as one line.

The console script's module: SIGTERM and Ctrl+C end it cleanly from its first line, so nothing here imports torch
or Lightning before :func:`console_main` has set the signals up (they take seconds to import).
"""

from __future__ import annotations

import importlib
import logging
import sys
import warnings

from atheria_lightning.errors import closest_key
from atheria_lightning.interrupts import StopRequested, signals_stop_the_command, stopped_line

__all__ = ["COMMANDS", "console_main", "main"]

#: Every command, with the line ``atheria --help`` shows for it (fit and validate are LightningCLI's, the others
#: have mains of their own: LightningCLI's help would list only its two).
COMMANDS = {
    "fit": "train a run from a YAML preset; the same command again resumes it",
    "validate": "validate a run's newest checkpoint (or --ckpt_path) on its validation episodes",
    "curriculum": "train the phases of a curriculum in order; the same command again continues",
    "export": "write the operator of a checkpoint as TorchScript, for inference",
    "report": "draw summary.png and report.md of a run (or its mirror copy) from its log",
    "status": "where a run stands (episode, time, best, mirror, lock), from its files or its mirror's",
}

#: The commands with mains of their own, imported only when run (Lightning's CLI machinery, matplotlib).
OWN_MAINS = {
    "curriculum": "atheria_lightning.curriculum",
    "export": "atheria_lightning.export",
    "report": "atheria_lightning.report",
    "status": "atheria_lightning.status",
}


#: Lightning's INFO lines that say nothing a user acts on: an advertisement, and the restore our own line says better
#: ("resuming from episode k of N [where]").
CHATTER = ("💡 Tip", "Restoring states from the checkpoint", "Restored all states from the checkpoint")


def _not_chatter(record: logging.LogRecord) -> bool:
    return not str(record.msg).lstrip().startswith(CHATTER)


def quiet_lightning() -> None:
    """Lightning's chatter off the console: "Seed set to 42", a tip to install another logger and its restore lines
    go; "GPU available: …, used: …" (worth seeing on Colab) and its warnings stay. A deprecation inside Lightning
    that the user cannot act on is filtered by its message."""
    logging.getLogger("lightning.fabric.utilities.seed").setLevel(logging.WARNING)
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        chatty = logging.getLogger(name)
        if _not_chatter not in chatty.filters:
            chatty.addFilter(_not_chatter)
    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated")


def main(args: list[str] | None = None) -> int:
    """``atheria <command> …`` from a notebook cell or the console script; returns the exit code.

    Bad settings print one line and return 2, before any training (``run_reporting_errors`` lists the codes).
    """
    quiet_lightning()
    argv = sys.argv[1:] if args is None else list(args)
    if not argv or argv[0] in ("-h", "--help"):
        # No command is a mistake (exit 2) but not a one-line one: the list of commands is the answer.
        print(commands_help(), file=sys.stdout if argv else sys.stderr, end="")
        return 0 if argv else 2
    if argv[0] not in COMMANDS and not argv[0].startswith("-"):
        nearest = closest_key(argv[0], COMMANDS)
        hint = f"did you mean {nearest}? " if nearest else ""
        print(f"atheria: error: command {argv[0]!r} is not one of {', '.join(COMMANDS)}: {hint}"
              "atheria --help says what each does", file=sys.stderr)  # fmt: skip
        return 2
    if argv[0] in OWN_MAINS:
        return importlib.import_module(OWN_MAINS[argv[0]]).main(argv[1:])
    from atheria_lightning.cli.app import AtheriaCLI  # torch and Lightning: after the signals are set up
    from atheria_lightning.cli.messages import run_reporting_errors

    return run_reporting_errors(lambda: AtheriaCLI(args=args).exit_code)


def commands_help() -> str:
    """``atheria --help``: the commands, one line each; ``atheria COMMAND --help`` has the settings of one."""
    width = max(map(len, COMMANDS)) + 2
    lines = [
        "usage: atheria COMMAND [--config FILE] [--key value ...]",
        "",
        "Atheria QCA training with PyTorch Lightning; runs survive Colab and Kaggle session kills.",
        "",
        "commands:",
        *(f"  {name:<{width}}{summary}" for name, summary in COMMANDS.items()),
        "",
        "atheria COMMAND --help lists the settings of one command; README.md lists the exit codes.",
    ]
    return "\n".join(lines) + "\n"


def console_main() -> None:
    """``atheria ...``: exit codes as :func:`atheria_lightning.cli.messages.run_reporting_errors` documents them."""
    try:
        with signals_stop_the_command():
            code = main()
    except StopRequested as stop:
        print(stopped_line(stop), file=sys.stderr)
        code = 0
    sys.exit(code)
