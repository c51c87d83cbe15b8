"""What the ``atheria`` command says when it ends on an error: one line, and an exit code (README, "Exit codes").

Parse errors are jsonargparse's, which names the key only in its messages, in a few fixed forms read here.
"""

from __future__ import annotations

import argparse
import collections.abc
import enum
import errno
import os
import pickle
import re
import sys
import types
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

import yaml
from lightning.pytorch.cli import LightningArgumentParser
from lightning.pytorch.utilities.exceptions import SIGTERMException

from atheria_lightning.errors import ConfigError, unknown_option_line
from atheria_lightning.interrupts import StopRequested, signals_stop_the_command, stopped_line
from atheria_lightning.module import EpisodeOutOfMemoryError, NonFiniteTrainingError
from atheria_lightning.presets import missing_config_line
from atheria_lightning.store import MirrorInUse

#: Exit codes of the ``atheria`` command (README, "Exit codes").
EXIT_DISK_FULL = 1
EXIT_BAD_SETTINGS = 2
EXIT_CANNOT_TRAIN = 3
EXIT_MIRROR_BEHIND = 4
#: Another session owns the run's mirror: it was refused at the start, or took the mirror over during training.
EXIT_MIRROR_TAKEN = 5


def run_reporting_errors(run: Callable[[], int]) -> int:
    """Run ``run`` and turn the errors a user can act on into one line on stderr and an exit code.

    Exit codes: 0 done or stopped cleanly, 1 out of disk space, 2 bad settings or a refused checkpoint,
    3 training cannot go on (non-finite losses, out of GPU memory), 4 done but the mirror is behind (run the same
    command again to retry), 5 another session owns the mirror (refused at the start, or taken over during
    training). Anything else is a bug and keeps its traceback. SIGTERM or Ctrl+C outside training
    (start-up, final flush) ends with exit 0 and one line: training itself stops through ``StopOnSignal``.
    """
    try:
        with signals_stop_the_command():
            return run()
    except BaseException as err:
        outcome = error_outcome(err)
        if outcome is None:
            raise
        print(outcome[1], file=sys.stderr)
        return outcome[0]


def error_outcome(err: BaseException) -> tuple[int, str] | None:
    """The exit code and the one stderr line of an error a user can act on; None for a bug (it keeps its traceback).

    ``run_reporting_errors`` prints it; the notification of a failed run (``--notify``) quotes it.
    """
    for kinds, outcome in OUTCOMES:
        if isinstance(err, kinds):
            return outcome(err)
    # jsonargparse wraps an error raised while building a callback in its own ValueError: find ours.
    config_error = find_config_error(err) if isinstance(err, Exception) else None
    if config_error is None:
        return None
    code = EXIT_MIRROR_TAKEN if isinstance(config_error, MirrorInUse) else EXIT_BAD_SETTINGS
    return code, f"atheria: error: {config_error}"


def _cannot_train(err: BaseException) -> tuple[int, str]:
    return EXIT_CANNOT_TRAIN, f"atheria: error: {err}"


def _sigterm(err: BaseException) -> tuple[int, str]:
    # Only when SIGTERM arrived outside an episode boundary that StopOnSignal could use (e.g. validation).
    return 0, "atheria: stopped by SIGTERM; run the same command again to continue"


def _parse_error(err: BaseException) -> tuple[int, str]:
    # A parser built without AtheriaCLI's settings (e.g. LightningCLI's own, for ckpt_path hyperparameters).
    return EXIT_BAD_SETTINGS, f"atheria: error: {' '.join(str(err).split())}"


def _refused_checkpoint(err: BaseException) -> tuple[int, str]:
    # torch.load(weights_only=True) refused objects other than tensors and plain values: never retry unsafely.
    refused = f"checkpoint refused, it holds more than tensors and plain values ({err}".splitlines()[0]
    return EXIT_BAD_SETTINGS, f"atheria: error: {refused}); move it aside or set resume to another checkpoint"


def _disk_full(err: BaseException) -> tuple[int, str] | None:
    if not isinstance(err, OSError) or err.errno not in (errno.ENOSPC, errno.EDQUOT):
        return None
    return EXIT_DISK_FULL, (
        f"atheria: error: no space left while writing ({err}); the previous checkpoints are intact and listed "
        "in MANIFEST.json: free some space and run the same command again"
    )


#: The errors a user can act on, by kind, first match wins; a ConfigError anywhere in the chain comes after.
OUTCOMES: tuple[tuple[type[BaseException] | tuple[type[BaseException], ...], Callable[..., Any]], ...] = (
    (StopRequested, lambda err: (0, stopped_line(err))),
    ((NonFiniteTrainingError, EpisodeOutOfMemoryError), _cannot_train),
    (SIGTERMException, _sigterm),
    (argparse.ArgumentError, _parse_error),
    (pickle.UnpicklingError, _refused_checkpoint),
    (OSError, _disk_full),
)


def exit_status(err: BaseException) -> tuple[int, str]:
    """The exit code the command ends with after ``err``, and what it says (a bug: the exception itself)."""
    outcome = error_outcome(err)
    if outcome is not None:
        return outcome[0], outcome[1].removeprefix("atheria: ")
    code = err.code if isinstance(err, SystemExit) and isinstance(err.code, int) else 1
    return code, f"{type(err).__name__}: {err}; the traceback is in the console"


def find_config_error(err: BaseException | None) -> ConfigError | None:
    if err is None:
        return None
    return next((cause for cause in _exception_chain(err) if isinstance(cause, ConfigError)), None)


# ----- parse errors as one line -----
def repeats_append(args: Any, option: str) -> list[str] | None:
    """``--notify a --notify b`` as jsonargparse's ``--notify a --notify+ b``: a repeated list option adds to the
    list instead of replacing it. None when ``args`` repeats no ``option`` (or is not a command line)."""
    if not isinstance(args, list | tuple):
        return None
    argv, seen = [str(arg) for arg in args], 0
    for index, arg in enumerate(argv):
        if arg == option or arg.startswith(f"{option}="):
            if seen:
                argv[index] = f"{option}+{arg[len(option) :]}"
            seen += 1
    return argv if seen > 1 else None


def parse_error_line(err: argparse.ArgumentError, parser: LightningArgumentParser, argv: list[str]) -> str:
    """One line naming the setting, what was given and what is accepted, from a jsonargparse parse error.

    ``parser`` is the one of the command (``atheria fit``): its actions say which keys and types exist.
    jsonargparse keeps the cause of an error in the exception chain (a YAML error, argparse's argument) but
    names the key only in its messages, in a few fixed forms, read here: each reader of :data:`LINE_READERS`
    knows one, the first that recognises the error says it.
    """
    failure = ParseFailure.of(err, parser, argv)
    return next(line for line in (read(failure) for read in LINE_READERS) if line is not None)


@dataclass(frozen=True)
class ParseFailure:
    """A parse error as the readers see it: its chain of causes, the command, its parser's actions, the argv."""

    chain: list[BaseException]
    command: str
    actions: dict[str, argparse.Action]
    argv: list[str]

    @classmethod
    def of(cls, err: BaseException, parser: LightningArgumentParser, argv: list[str]) -> ParseFailure:
        # Without subcommands (run=False, e.g. a curriculum's phases) the parser takes the settings of atheria fit.
        command = parser.prog.replace(" [options]", "") if parser.prog != "atheria" else "atheria fit"
        # argparse's table of options, private but without a public equivalent (tests/test_jsonargparse_private.py).
        options = parser._option_string_actions.items()
        actions = {name[2:]: action for name, action in options if name.startswith("--")}
        return cls(_exception_chain(err), command, actions, argv)

    @property
    def messages(self) -> list[str]:
        return [str(e).strip() for e in self.chain]

    @property
    def innermost(self) -> str:
        return str(self.chain[-1]).strip()

    def key(self) -> tuple[str | None, argparse.ArgumentError | None]:
        """The key that failed, and argparse's error about it when there is one."""
        key = next((m.split('"')[1] for m in self.messages if m.startswith('Parser key "')), None)
        argument = next((e for e in self.chain if isinstance(e, argparse.ArgumentError) and e.argument_name), None)
        if key is None and argument is not None:
            key = argument.argument_name.split("-->")[-1].strip().lstrip("-")
        return key, argument


def _yaml_error_line(failure: ParseFailure) -> str | None:
    yaml_error = next((e for e in failure.chain if isinstance(e, yaml.YAMLError)), None)
    return None if yaml_error is None else _yaml_line(yaml_error, failure.argv)


def _unrecognized_line(failure: ParseFailure) -> str | None:
    unrecognized = next((m for m in failure.messages if m.startswith("unrecognized arguments: ")), None)
    if unrecognized is None:
        return None
    tokens = unrecognized.split(": ", 1)[1].split()
    option = next((token for token in tokens if token.startswith("-")), None)
    if option is None:
        return f"unexpected argument {tokens[0]!r} of {failure.command}: settings are given as --key value"
    return unknown_option_line(option.lstrip("-").split("=")[0], failure.command, failure.actions)


def _unknown_key_line(failure: ParseFailure) -> str | None:
    """A key of a --config file (or a dict of settings) that no parser action takes."""
    unknown = next((found for found in map(_unknown_key, failure.messages) if found is not None), None)
    return None if unknown is None else unknown_option_line(unknown, failure.command, failure.actions)


def _missing_config_line(failure: ParseFailure) -> str | None:
    if failure.key()[0] not in ("config", "c"):
        return None
    missing = next((path for path in _config_paths(failure.argv) if not os.path.isfile(path)), None)
    return None if missing is None else missing_config_line(missing)


def _key_line(failure: ParseFailure) -> str:
    """The key, the value given and what it accepts; or jsonargparse's own words when the key is not named."""
    key, argument = failure.key()
    if key is None:
        return " ".join(failure.innermost.split())
    action = failure.actions.get(key)
    # jsonargparse's type hint of the option, private (tests/test_jsonargparse_private.py); argparse's type else.
    hint = getattr(action, "_typehint", None) or getattr(action, "type", None)
    if argument is not None and "expected one argument" in argument.message:
        return f"--{key} needs a value" + (f": {_accepted(hint)}" if hint is not None else "")
    # jsonargparse's "Got value: …" is the value that failed, wherever it came from; else the command line's.
    innermost = failure.innermost
    given = innermost.rsplit("Got value: ", 1)[1] if "Got value: " in innermost else _given(failure.argv, key)
    if hint is not None and given is not None:
        return f"{key}={given!r} must be {_accepted(hint)}"
    return f"{key}: {' '.join((argument.message if argument is not None else innermost).split())}"


#: The forms of parse error recognised, in order; the last recognises every error.
LINE_READERS: tuple[Callable[[ParseFailure], str | None], ...] = (
    _yaml_error_line,
    _unrecognized_line,
    _unknown_key_line,
    _missing_config_line,
    _key_line,
)


# jsonargparse's messages for a key that no action takes (its _core.check_values).
UNKNOWN_KEY_FORMS = (
    re.compile(r"^Subcommand '[^']+' does not accept option '(?P<key>[^']+)'"),
    re.compile(r"^Group '(?P<group>[^']+)' does not accept option '(?P<key>[^']+)'"),
    re.compile(r"^Option '(?P<key>[^']+)' is not accepted"),
)


def _unknown_key(message: str) -> str | None:
    for form in UNKNOWN_KEY_FORMS:
        match = form.match(message)
        if match is not None:
            group = match.groupdict().get("group")
            return f"{group}.{match['key']}" if group else match["key"]
    return None


def _exception_chain(err: BaseException) -> list[BaseException]:
    chain: list[BaseException] = []
    current: BaseException | None = err
    while current is not None and all(current is not seen for seen in chain):
        chain.append(current)
        current = current.__cause__ or current.__context__
    return chain


def _config_paths(argv: list[str]) -> list[str]:
    paths = []
    for index, arg in enumerate(argv):
        if arg in ("--config", "-c") and index + 1 < len(argv):
            paths.append(argv[index + 1])
        elif arg.startswith("--config="):
            paths.append(arg.split("=", 1)[1])
    return paths


def _given(argv: list[str], key: str) -> str | None:
    """The last value given to ``--key`` on the command line, or None."""
    given = None
    for index, arg in enumerate(argv):
        if arg == f"--{key}" and index + 1 < len(argv):
            given = argv[index + 1]
        elif arg.startswith(f"--{key}="):
            given = arg.split("=", 1)[1]
    return given


def _yaml_line(error: yaml.YAMLError, argv: list[str]) -> str:
    """``--config='x.yaml' is not valid YAML: line 3, column 1: …``, for the first config file that fails."""
    # The error does not say which file it read: the first one that does not load is the one.
    for path in _config_paths(argv):
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError:
            continue
        try:
            yaml.safe_load(text)
        except yaml.YAMLError as file_error:
            return f"--config={path!r} is not valid YAML: {_yaml_problem(file_error)}"
    return f"a setting is not valid YAML: {_yaml_problem(error)}"


def _yaml_problem(error: yaml.YAMLError) -> str:
    if isinstance(error, yaml.MarkedYAMLError) and error.problem_mark is not None:
        mark = error.problem_mark
        context = f" ({error.context})" if error.context else ""
        return f"line {mark.line + 1}, column {mark.column + 1}: {error.problem}{context}"
    return " ".join(str(error).split())


def _accepted(hint: Any) -> str:
    """What a type hint accepts, as a user reads it: ``an integer``, ``one of UNET, MLP``, ``a number or null``."""
    origin, args = get_origin(hint), get_args(hint)
    if hint is type(None):
        return "null"
    if origin in (Union, types.UnionType):
        # Literals of all the members in one list: precision is three Literals, an int and None.
        choices = [str(value) for arg in args if get_origin(arg) is Literal for value in get_args(arg)]
        others = [_accepted(arg) for arg in args if get_origin(arg) is not Literal]
        parts = ([f"one of {', '.join(dict.fromkeys(choices))}"] if choices else []) + others
        return " or ".join(dict.fromkeys(parts))
    if origin is Literal:
        return "one of " + ", ".join(str(arg) for arg in args)
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        return "one of " + ", ".join(member.name for member in hint)
    if origin in (list, tuple, set, collections.abc.Sequence):
        return f"a list of {_accepted(args[0]) if args else 'values'}"
    words = {bool: "true or false", int: "an integer", float: "a number", str: "a string", dict: "a mapping"}
    if hint in words:
        return words[hint]
    return f"a {getattr(hint, '__name__', str(hint).replace('typing.', ''))}"
