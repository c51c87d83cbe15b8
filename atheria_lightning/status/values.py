"""Values taken from a run's files: each is untrusted, so one of an unexpected kind or size becomes None (or empty)."""

from __future__ import annotations

import math
from datetime import datetime
from typing import Any

from atheria_lightning.untrusted import MAX_WHOLE

__all__ = ["as_int", "as_list", "as_number", "as_text", "as_time", "callback_args", "iso_seconds", "lookup", "one_line"]

#: Longest text kept from any string of the run's files (they are untrusted, and printed to a terminal).
MAX_TEXT = 200
#: Later time stamps in a run's files are garbage (the year 5000; dates end at 9999).
MAX_TIME = 95_617_584_000.0


def as_int(value: Any) -> int | None:
    # Bounded: a float made of a far larger one overflows.
    return value if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < MAX_WHOLE else None


def as_number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return None
    return float(value)


def as_time(value: Any) -> float | None:
    """A time stamp (Unix seconds) that a date can be made of: positive, before the year 5000."""
    seconds = as_number(value)
    return seconds if seconds is not None and 0 < seconds < MAX_TIME else None


def as_text(value: Any) -> str | None:
    """A string from a run's file, safe to print: one line, no control characters, bounded."""
    if not isinstance(value, str) or not value:
        return None
    return "".join(char if char.isprintable() else "?" for char in value[:MAX_TEXT])


def one_line(err: BaseException) -> str:
    return as_text(" ".join(str(err).split())) or type(err).__name__


def as_list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []


def lookup(data: Any, *keys: str) -> Any:
    """``data[keys[0]][keys[1]]…``, or None where a level is not a mapping."""
    for key in keys:
        if not isinstance(data, dict):
            return None
        data = data.get(key)
    return data


def iso_seconds(value: str | None) -> float | None:
    if value is None:
        return None
    try:
        return as_time(datetime.fromisoformat(value).timestamp())
    except (ValueError, OverflowError, OSError):
        return None


def callback_args(config: dict[str, Any], name: str) -> dict[str, Any]:
    """The ``init_args`` of callback class ``name`` in the session's settings (``logs/config.yaml``), or empty."""
    for callback in as_list(lookup(config, "trainer", "callbacks")):
        if isinstance(callback, dict) and str(callback.get("class_path", "")).rsplit(".", 1)[-1] == name:
            init_args = callback.get("init_args")
            return init_args if isinstance(init_args, dict) else {}
    return {}
