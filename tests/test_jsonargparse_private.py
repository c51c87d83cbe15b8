"""The private pieces of jsonargparse (and of argparse under it) that the one-line parse errors read: when a release
moves one, this fails and says which piece and where it is used. No public way gives an option's type hint or the
table of a parser's options."""

from __future__ import annotations

import jsonargparse

MOVED = "jsonargparse {version} changed {piece}, which {user} reads: update it"
USER = "atheria_lightning.cli.messages.parse_error_line (what a setting accepts)"


def test_a_parser_keeps_its_options_and_their_type_hints_where_the_parse_errors_read_them() -> None:
    parser = jsonargparse.ArgumentParser(exit_on_error=False)
    parser.add_argument("--max_hours", type=float | None, default=None)
    actions = getattr(parser, "_option_string_actions", None)
    assert isinstance(actions, dict) and "--max_hours" in actions, MOVED.format(
        version=jsonargparse.__version__, piece="argparse's ArgumentParser._option_string_actions", user=USER
    )
    assert getattr(actions["--max_hours"], "_typehint", None) == float | None, MOVED.format(
        version=jsonargparse.__version__, piece="ActionTypeHint._typehint (an option's type hint)", user=USER
    )
