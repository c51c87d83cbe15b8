"""The error raised for bad user settings: the CLI prints it as one line and exits non-zero."""

from __future__ import annotations

import argparse
import difflib
from collections.abc import Iterable
from typing import Any, NoReturn


class ConfigError(ValueError):
    """A setting is out of range; the message names the CLI flag and the accepted values."""


def require(condition: bool, message: str) -> None:
    """Raise :class:`ConfigError` with ``message`` unless ``condition`` holds."""
    if not condition:
        raise ConfigError(message)


def closest_key(key: str, known: Iterable[str]) -> str | None:
    """The valid dotted key nearest to a mistyped one (``trainer.max_epoch`` -> ``trainer.max_epochs``), or None.

    The last part is compared among the keys of the same group first: on whole keys a shared ``model.`` prefix
    alone would make ``model.foo`` "close" to ``model.loss``.
    """
    known = sorted(set(known))
    parent, _, leaf = key.rpartition(".")
    siblings = {k.rpartition(".")[2]: k for k in known if k.rpartition(".")[0] == parent}
    if siblings:
        match = difflib.get_close_matches(leaf, siblings, n=1)
        return siblings[match[0]] if match else None
    match = difflib.get_close_matches(key, known, n=1)
    return match[0] if match else None


def unknown_option_line(option: str, command: str, known: Iterable[str]) -> str:
    """``model.grid_sise is not a setting of atheria fit: did you mean model.grid_size?``"""
    nearest = closest_key(option, known)
    hint = f"did you mean {nearest}?" if nearest else f"{command} --help lists them"
    return f"{option} is not a setting of {command}: {hint}"


class OneLineArgumentParser(argparse.ArgumentParser):
    """argparse that raises :class:`ConfigError` instead of printing its usage: a bad option is one
    ``atheria: error:`` line like any other bad setting, and ``--help`` stays the place for the usage."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        # Without this, argparse takes --out for --output: a typo would be obeyed.
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        # argparse hands its errors over as text only; these three forms name the option, put first here.
        unknown, required, argument = "unrecognized arguments: ", "the following arguments are required: ", "argument "
        if message.startswith(unknown):
            tokens = message[len(unknown) :].split()
            option = next((token.split("=")[0] for token in tokens if token.startswith("-")), None)
            if option is None:
                raise ConfigError(f"unexpected argument {tokens[0]!r} of {self.prog}; {self.prog} --help lists them")
            known = [name for name in self._option_string_actions if name.startswith("--")]
            raise ConfigError(unknown_option_line(option, self.prog, known))
        if message.startswith(required):
            raise ConfigError(f"{message[len(required) :]} is required by {self.prog}; {self.prog} --help says more")
        if message.startswith(argument) and ": " in message:
            name, problem = message[len(argument) :].split(": ", 1)
            raise ConfigError(f"{name}: {problem}; {self.prog} --help says what it accepts")
        raise ConfigError(f"{self.prog}: {message}; {self.prog} --help lists the options")
