"""The ``atheria`` command: fit, validate (AtheriaCLI), curriculum, export and report; errors as one line."""

from __future__ import annotations

import logging
import sys
import warnings

from atheria_lightning.app import AtheriaCLI, run_reporting_errors
from atheria_lightning.errors import closest_key

__all__ = ["AtheriaCLI", "COMMANDS", "main"]

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
    if argv[0] == "curriculum":
        from atheria_lightning.curriculum import main as curriculum_main  # Lightning's CLI machinery, only here

        return curriculum_main(argv[1:])
    if argv[0] == "export":
        from atheria_lightning.export import main as export_main

        return export_main(argv[1:])
    if argv[0] == "report":
        from atheria_lightning.report import main as report_main

        return report_main(argv[1:])
    if argv[0] == "status":
        from atheria_lightning.status import main as status_main

        return status_main(argv[1:])
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


if __name__ == "__main__":  # python -m atheria_lightning.cli; the console script is atheria_lightning.console
    sys.exit(main())
