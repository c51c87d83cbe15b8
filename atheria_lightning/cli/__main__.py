"""``python -m atheria_lightning.cli``: the ``atheria`` console script."""

from atheria_lightning.cli.main import console_main

console_main()
