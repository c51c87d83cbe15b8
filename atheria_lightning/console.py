"""The ``atheria`` console script: SIGTERM and Ctrl+C end it cleanly from its first line, before the heavy imports."""

from __future__ import annotations

import sys

from atheria_lightning.interrupts import StopRequested, signals_stop_the_command, stopped_line

__all__ = ["console_main"]


def console_main() -> None:
    """``atheria ...``: exit codes as :func:`atheria_lightning.app.run_reporting_errors` documents them."""
    try:
        with signals_stop_the_command():
            from atheria_lightning.cli import main  # torch and Lightning take seconds to import

            code = main()
    except StopRequested as stop:
        print(stopped_line(stop), file=sys.stderr)
        code = 0
    sys.exit(code)


if __name__ == "__main__":
    console_main()
