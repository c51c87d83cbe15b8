"""A run's notification URLs hold services' secrets (a bot token, a password, a webhook): the files a run writes,
mirrored to a shared Drive folder or a bucket, and W&B's record of the command line, sent to its servers, do without
them."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from jsonargparse import Namespace

__all__ = ["REDACTED", "argv_redacted", "notify_urls", "redacted_argv", "without_notify_urls"]

#: What a record of the command line says in place of a value that may hold a notification URL.
REDACTED = "<redacted>"
#: The options whose value may hold a notification URL: ``--notify`` (``+`` adds to its list), and ``--config``.
_SECRET_OPTIONS = ("--notify", "--notify+", "-c", "--config")


def notify_urls(config: Any) -> list[str]:
    """Every notification URL of a parsed config: its ``notify`` setting (one URL or a list), and the ``urls`` of
    each :class:`~atheria_lightning.notifier.Notifier` it builds (a ``Notify`` callback in ``trainer.callbacks``)."""
    found: list[str] = []
    for node in _nodes(config):
        values = [_get(node, "notify"), _get(_get(node, "init_args"), "urls") if _is_notifier(node) else None]
        for value in values:  # a user's own callback may have a `notify` of another kind (a flag): not a URL
            urls = [value] if isinstance(value, str) else value if isinstance(value, list | tuple) else []
            found += [url for url in urls if isinstance(url, str)]
    return found


def without_notify_urls(config: Namespace) -> Namespace:
    """A copy of ``config`` whose ``notify`` is null and whose Notifiers have no URLs, to be saved in the run."""
    config = config.clone()
    for node in _nodes(config):
        if isinstance(node, Namespace) and "notify" in vars(node):
            node.notify = None
        if _is_notifier(node) and _get(node, "init_args") is not None:
            node["init_args"]["urls"] = []
    return config


def redacted_argv(argv: Sequence[str], urls: Sequence[str] = ()) -> list[str]:
    """``argv`` without what may hold a notification URL: each ``--notify`` or ``--notify+`` value, spelled
    ``--notify URL`` or ``--notify=URL``; a ``--config`` (``-c``) given as YAML text rather than a file's path, which
    may set ``notify`` in any spelling; and each of ``urls`` wherever it stands (inside another option's value)."""
    redacted: list[str] = []
    pending: str | None = None  # an option whose value is the next argument
    for arg in map(str, argv):
        if pending is not None:
            redacted.append(REDACTED if _may_hold_secret(pending, arg) else _without(arg, urls))
            pending = None
            continue
        option, equals, value = arg.partition("=")
        if option not in _SECRET_OPTIONS and arg.startswith("-c") and not arg.startswith("--"):
            option, equals, value = "-c", "=", arg[2:].removeprefix("=")  # argparse reads -cVALUE as -c VALUE
        if option not in _SECRET_OPTIONS:
            redacted.append(_without(arg, urls))
        elif equals:
            redacted.append(f"{option}={REDACTED}" if _may_hold_secret(option, value) else arg)
        else:
            redacted.append(arg)
            pending = option
    return redacted


@contextmanager
def argv_redacted(urls: Sequence[str] = ()) -> Iterator[None]:
    """``sys.argv`` as :func:`redacted_argv` makes it, then the user's again (the same list).

    W&B records the process's command line as its run starts, in the run's metadata: the ``.wandb`` file, mirrored
    with the run, and W&B's servers once synced. Its one setting that stops it (``x_disable_meta``, internal) drops
    the rest of the metadata too (host, GPU, Python).
    """
    argv = sys.argv
    sys.argv = redacted_argv(argv, urls)
    try:
        yield
    finally:
        sys.argv = argv


def _may_hold_secret(option: str, value: str) -> bool:
    return option in ("--notify", "--notify+") or not os.path.isfile(value)


def _without(arg: str, urls: Sequence[str]) -> str:
    for url in sorted(set(urls), key=len, reverse=True):  # a URL that holds a shorter one goes whole
        if url:
            arg = arg.replace(url, REDACTED)
    return arg


def _nodes(node: Any) -> Iterator[Any]:
    """``node`` and every Namespace, dict and list inside it, parents first."""
    if isinstance(node, Namespace | dict | list | tuple):
        yield node
        for _, value in _items(node):
            yield from _nodes(value)


def _items(node: Any) -> list[tuple[Any, Any]]:
    if isinstance(node, Namespace):
        return list(vars(node).items())  # direct children: Namespace.items() flattens nested keys
    if isinstance(node, dict):
        return list(node.items())
    return list(enumerate(node)) if isinstance(node, list | tuple) else []


def _get(node: Any, key: str) -> Any:
    return vars(node).get(key) if isinstance(node, Namespace) else node.get(key) if isinstance(node, dict) else None


def _is_notifier(node: Any) -> bool:
    class_path = _get(node, "class_path")
    return isinstance(class_path, str) and class_path.rsplit(".", 1)[-1] == "Notifier"
