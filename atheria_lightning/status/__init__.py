"""``atheria status RUN``: where a run stands, read from its own files; nothing is written anywhere.

RUN is a run folder (``<run_root>/<experiment_name>``), its mirror (``<mirror_url>/<experiment_name>``: a Drive
folder, or the same folder synced to a laptop), or any fsspec URL of either (``s3://…``, ``gs://…``,
``memory://…``). Only these files are read, each as untrusted input (a missing, damaged or truncated one is a line
saying so): ``checkpoints/MANIFEST.json`` (through the store's own parser), ``exports/training_log.json`` (written
when a session ends), ``logs/config.yaml`` (the session's settings: ``mirror_url``, ``total_episodes``) and the lock
record ``.atheria.lock.json``; never a checkpoint's content. Each is read as :mod:`atheria_lightning.untrusted`
reads: a regular file, no link followed, at most a few MiB (the log: 256 MiB). The mirror that ``logs/config.yaml``
names is only named, never visited: a folder from someone else must not make this machine call an address of their
choosing (a URL, or a path: a network mount, ``\\\\host\\share``). ``--follow-mirror`` compares a run folder
with it (its ``checkpoints/MANIFEST.json`` is read too); giving the mirror itself as RUN reads it as any RUN.

``--json`` prints one object with these keys, always present (``null`` where unknown), one per line with ``--watch``;
times are Unix seconds:

==============================  =================================================================================
``run``                         RUN as given
``where``                       ``"run folder"`` (the trainer's own folder), ``"mirror"`` (its recorded mirror, or any
                                URL), ``"copy"`` (a local folder that is neither: a synced Drive folder, a download)
``experiment``                  the run's name
``phase``                       its curriculum phase, or ``null``
``episode``                     episodes done: the newest of the manifest's newest checkpoint and the log
``total_episodes``              ``data.total_episodes`` of the log (else of ``logs/config.yaml``)
``sessions``                    sessions recorded in the log
``training_hours``              training hours over those sessions
``seconds_per_episode``         in the last recorded session
``recent_seconds_per_episode``  the pace since the log was written (a running or killed session), from the save
                                times of the checkpoints written since: the fastest of their newest consecutive
                                pairs (a pair across a restart holds the downtime); ``null`` with fewer than two
``hours_left``                  ``(total_episodes - episode)`` times the recent pace (else ``seconds_per_episode``),
                                in hours of training
``best``                        ``{"monitor", "value", "episode", "file"}``: the best checkpoint kept, or ``null``
``last_checkpoint``             ``{"file", "episode", "at", "source"}``: the newest checkpoint; ``source`` is
                                ``"manifest"`` (its recorded save time) or ``"file time"`` (the file's mtime)
``last_sync``                   ``{"at", "source"}``: when the mirror's manifest was last written
                                (``"mirror manifest"``), or its file's mtime (``"file time"``); ``null`` without a
                                mirror
``mirror``                      ``{"state", "url", "episode", "detail"}``; ``state`` is ``"up to date"``, ``"behind"``,
                                ``"ahead"``, ``"none"`` (no mirror), ``"not read"`` (named, without
                                ``--follow-mirror``) or ``"unknown"``; ``episode`` is the mirror's newest
``lock``                        ``{"state", "host", "pid", "since", "run_id", "detail"}``; ``state`` is ``"held"``
                                (a live trainer on this host), ``"free"``, ``"stale"`` (a killed trainer's record) or
                                ``"unknown"`` (another host, or a mirror: the lock is not mirrored)
``manifest``, ``log``           ``{"state", "detail"}``; ``state`` is ``"ok"``, ``"missing"`` or ``"damaged"``;
                                ``log`` adds ``written_at`` (the log's own ISO time stamp)
``checked_at``                  when this status was taken
==============================  =================================================================================

Exit codes: 0 printed (a damaged file is a line of the status, not an error), 2 RUN missing or not a run.

The package: this command; :mod:`.read`, the files, bounded; :mod:`.gather`, :func:`run_status` (where the run
stands, from what was read); :mod:`.mirror`, the mirror the run names and the run against it; :mod:`.render`, the
lines and the JSON; :mod:`.values`, each value of the files made safe to use and print.
"""

from __future__ import annotations

import math
import os
import sys
import time
from collections.abc import Callable
from typing import Any

from atheria_lightning.errors import ConfigError, OneLineArgumentParser
from atheria_lightning.status.gather import run_status
from atheria_lightning.status.render import status_json, status_lines

__all__ = ["main", "run_status", "status_lines"]

#: ``--watch`` without a number: seconds between two refreshes.
WATCH_DEFAULT_S = 30.0

#: The pause between two refreshes of ``--watch``: a seam for tests (a fake that counts, or ends the loop with
#: KeyboardInterrupt as Ctrl+C would), not an option.
sleep: Callable[[float], Any] = time.sleep


def main(argv: list[str] | None = None) -> int:
    """``atheria status RUN [--json] [--watch [SECONDS]] [--follow-mirror]``; see the module's docstring."""
    parser = OneLineArgumentParser(
        prog="atheria status",
        description="Where a run stands, from its files only (MANIFEST.json, training_log.json, logs/config.yaml, "
        "the lock record): episode, time, best checkpoint, mirror, lock. Reads a run folder or its mirror; writes "
        "nothing.",
    )
    parser.add_argument("run", metavar="RUN", help="A run folder, its mirror copy, or an fsspec URL (s3://…).")
    parser.add_argument("--json", action="store_true", help="One JSON object (keys: see the module's docstring).")
    parser.add_argument(
        "--watch",
        nargs="?",
        type=float,
        const=WATCH_DEFAULT_S,
        default=None,
        metavar="SECONDS",
        help=f"Refresh every SECONDS (default {WATCH_DEFAULT_S:g}) until Ctrl+C.",
    )
    parser.add_argument(
        "--follow-mirror",
        action="store_true",
        help="Compare a run folder with the mirror its logs/config.yaml names, reading it there (a URL, a path). "
        "Without it the mirror is only named: a folder from elsewhere must not decide what this machine contacts.",
    )
    try:
        args = parser.parse_args(argv)
        if args.watch is not None and not (math.isfinite(args.watch) and args.watch > 0):
            raise ConfigError(f"--watch={args.watch:g} must be a positive number of seconds")
        refreshes = 0
        while True:
            status = run_status(args.run, follow_mirror=args.follow_mirror)
            if args.json:
                print(status_json(status), flush=True)
            else:
                if args.watch is not None and refreshes and sys.stdout.isatty():
                    print("\033[H\033[2J", end="")  # clear the screen: the new status replaces the old one
                elif refreshes:
                    print()
                print("\n".join(status_lines(status)), flush=True)
            if args.watch is None:
                return 0
            refreshes += 1
            sleep(args.watch)
    except ConfigError as err:
        print(f"atheria: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # the way to end --watch
        return 0
    except BrokenPipeError:  # the reader went away (`atheria status RUN | head -4`): it has what it wanted
        # Python flushes stdout again at exit, which would fail once more: point it at nothing
        # (https://docs.python.org/3/library/signal.html#note-on-sigpipe).
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
