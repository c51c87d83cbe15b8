"""Reading the files of a run folder that may come from someone else: a copy, a download, a mirror.

``atheria status`` and ``atheria report`` read a few small files of a folder they are pointed at. Such a folder may
be anyone's, so each file is read as untrusted input: only a regular file, never through a link (its target could
be a device, a file elsewhere on this disk, or a network path), and never more than a bound, however large the
file says it is or grows while read. What it holds is checked in the same spirit: :func:`load_json` survives any
nesting, and :func:`check` holds a parsed value to the shape its reader expects, so that a wrong value is a line
naming it, not a traceback further on.

Each problem raises :class:`UntrustedFileError`, whose message completes "<the file> …"; a missing file raises
``FileNotFoundError``, which readers tell apart (a file not written yet is no error).
"""

from __future__ import annotations

import errno
import json
import math
import os
import stat
from collections.abc import Callable, Iterable
from typing import Any

import yaml
from fsspec import AbstractFileSystem
from fsspec.implementations.local import LocalFileSystem

from atheria_lightning.files import join

__all__ = [
    "ANY",
    "MAX_SMALL_FILE",
    "MAX_WHOLE",
    "MIB",
    "NUMBER",
    "TEXT",
    "WHOLE",
    "UntrustedFileError",
    "check",
    "info_of",
    "list_of",
    "load_json",
    "load_yaml",
    "mapping",
    "optional",
    "read_bounded",
]

MIB = 1 << 20
#: Manifests, configs and lock records are a few KB; this leaves room for any run's and bounds the rest.
MAX_SMALL_FILE = 8 * MIB
#: Whole numbers above this would lose their value as floats (and overflow them far above).
MAX_WHOLE = 2**53
#: Numbers are kept this far from the float limit, so that sums and ranges of them (an average, a plot's axis)
#: stay finite.
MAX_NUMBER = 1e300
#: The longest text (a name, a path, a time stamp) taken: longer than any path, and a title or a table cell is no
#: place for a document.
MAX_TEXT = 4096
#: Nesting of a free-form value (a setting of the run's config): its text is written out, recursively.
MAX_DEPTH = 32
_CHUNK = MIB


class UntrustedFileError(ValueError):
    """A file that is not read (not a regular file, a link, too large, unreadable) or holds what it must not."""


# ----- reading -----
def read_bounded(fs: AbstractFileSystem, root: str, name: str, limit: int) -> bytes:
    """The bytes of ``<root>/<name>``, a regular file of at most ``limit`` bytes.

    ``root`` is the folder the user named (followed wherever it points); ``name`` the file's ``/``-separated path
    below it. On a local disk no link below ``root`` is followed, nor any file opened that is not regular (a FIFO
    would block, a device never end); elsewhere the filesystem's own ``info`` must say it is a file. Never more than
    ``limit + 1`` bytes are read.

    Raises:
        FileNotFoundError: There is no such file.
        UntrustedFileError: Anything else that keeps it from being read whole, or it is larger than ``limit``.
    """
    try:
        if isinstance(fs, LocalFileSystem):
            return _read_local(fs._strip_protocol(root), name.split("/"), limit)
        return _read_remote(fs, join(root, name), limit)
    except (FileNotFoundError, UntrustedFileError):
        raise
    except Exception as err:  # a denied permission, a lost connection: each backend has its own types
        raise UntrustedFileError(f"cannot be read: {_one_line(err)}") from None


def info_of(fs: AbstractFileSystem, root: str, name: str) -> dict[str, Any]:
    """``fs.info`` of ``<root>/<name>``, but on a local disk, as :func:`read_bounded` reads, no link below ``root``
    followed (of the file nor of a folder on the way): its target is a path the folder chose, and merely looking
    one up may mount a share or call a host.

    Raises:
        FileNotFoundError: There is no such file (nor link), or a folder on the way is a link or not a folder.
    """
    path = join(root, name)
    if not isinstance(fs, LocalFileSystem):
        return fs.info(path)
    folder = fs._strip_protocol(root)
    *folders, last = name.split("/")
    for part in folders:
        folder = os.path.join(folder, part)
        if not stat.S_ISDIR(os.lstat(folder).st_mode):
            raise FileNotFoundError(errno.ENOENT, "not a folder (a link is not followed)", folder)
    found = os.lstat(os.path.join(folder, last))
    kinds = {stat.S_ISREG: "file", stat.S_ISDIR: "directory", stat.S_ISLNK: "link"}
    kind = next((name for is_kind, name in kinds.items() if is_kind(found.st_mode)), "other")
    return {"name": path, "type": kind, "size": found.st_size, "mtime": found.st_mtime}


def _read_local(root: str, parts: list[str], limit: int) -> bytes:
    if os.open not in os.supports_dir_fd or not hasattr(os, "O_NOFOLLOW"):
        return _read_local_by_path(root, parts, limit)
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        # Folder by folder from the root, each opened without following a link: nothing below the root can send
        # the read elsewhere, even if the folder changes while it is read.
        for part in parts[:-1]:
            _refuse_unless(stat.S_ISDIR, os.stat(part, dir_fd=fd, follow_symlinks=False), part)
            child = _open_below(part, fd, os.O_RDONLY | os.O_DIRECTORY)
            os.close(fd)
            fd = child
        _refuse_unless(stat.S_ISREG, os.stat(parts[-1], dir_fd=fd, follow_symlinks=False))
        # O_NONBLOCK: should it have become a FIFO since, the open returns at once and fstat refuses it.
        file = _open_below(parts[-1], fd, os.O_RDONLY | os.O_NONBLOCK)
    finally:
        os.close(fd)
    with os.fdopen(file, "rb") as handle:  # buffered: read(n) returns n bytes unless the file ends first
        return _read_handle(handle, os.fstat(file), limit)


def _open_below(name: str, dir_fd: int, flags: int) -> int:
    try:
        return os.open(name, flags | os.O_NOFOLLOW, dir_fd=dir_fd)
    except OSError as err:
        # Replaced by a link since it was looked at: O_NOFOLLOW says ELOOP on Linux and macOS, EMLINK on FreeBSD.
        if err.errno in (errno.ELOOP, errno.EMLINK, errno.ENOTDIR):
            raise UntrustedFileError(_LINK) from None
        raise


def _read_local_by_path(root: str, parts: list[str], limit: int) -> bytes:
    """Where folders cannot be opened (Windows): every part below the root is looked at, not followed, first."""
    path = root
    for part in parts[:-1]:
        path = os.path.join(path, part)
        _refuse_unless(stat.S_ISDIR, os.lstat(path), part)
    path = os.path.join(path, parts[-1])
    found = os.lstat(path)
    _refuse_unless(stat.S_ISREG, found)
    with open(path, "rb") as handle:
        opened = os.fstat(handle.fileno())
        if not os.path.samestat(found, opened):
            raise UntrustedFileError("changed while it was opened: not read")
        return _read_handle(handle, opened, limit)


_LINK = "is a link, or in a linked folder: not followed (a run's files are never links; its target could be anywhere)"


def _refuse_unless(is_kind: Callable[[int], bool], info: os.stat_result, part: str | None = None) -> None:
    """Refuse what fails ``is_kind`` (``stat.S_ISREG``, or ``S_ISDIR`` for the folder ``part``) before it is
    opened: a link, or a device, FIFO or socket, which may block, never end (a link to /dev/zero), or act on being
    opened."""
    if is_kind(info.st_mode):
        return
    if stat.S_ISLNK(info.st_mode):
        raise UntrustedFileError(_LINK)
    found = "a device, FIFO or socket"
    if stat.S_ISDIR(info.st_mode) or stat.S_ISREG(info.st_mode):
        found = "a folder" if stat.S_ISDIR(info.st_mode) else "a file"
    if part is not None:
        raise UntrustedFileError(f"is not read: {_one_line(part)} is {found}, not a folder")
    raise UntrustedFileError(f"is {found}, not a regular file: not read")


def _read_handle(handle: Any, info: os.stat_result, limit: int) -> bytes:
    _refuse_unless(stat.S_ISREG, info)
    _refuse_size(info.st_size, limit)
    # All of it in one read, and one byte more: however the file grows while it is read, the read stays bounded.
    data = handle.read(info.st_size + 1)
    while len(data) <= limit and (more := handle.read(min(_CHUNK, limit + 1 - len(data)))):
        data += more
    _refuse_size(len(data), limit)
    return data


def _read_remote(fs: AbstractFileSystem, path: str, limit: int) -> bytes:
    info = fs.info(path)
    if info.get("type") != "file":
        raise UntrustedFileError(f"is not a file (its filesystem says {_one_line(info.get('type'))!r}): not read")
    size = info.get("size")
    if isinstance(size, int) and not isinstance(size, bool):
        _refuse_size(size, limit)
    with fs.open(path, "rb") as handle:
        data = handle.read(limit + 1)
    _refuse_size(len(data), limit)
    return bytes(data)


def _refuse_size(size: int, limit: int) -> None:
    if size > limit:
        raise UntrustedFileError(f"is larger than {_size(limit)} ({_size(size)}), far more than a run writes: not read")


# ----- parsing -----
def load_json(data: bytes | str) -> Any:
    """``data`` parsed as JSON, however deeply it nests.

    Raises:
        UntrustedFileError: It is not JSON, or nests deeper than this Python can parse.
    """
    try:
        return json.loads(data)
    except RecursionError:
        raise UntrustedFileError("cannot be read: it nests deeper than any file a run writes") from None
    except ValueError as err:  # json's errors, a bad encoding, a whole number of too many digits
        raise UntrustedFileError(f"cannot be read: {_one_line(err)}") from None


def load_yaml(data: bytes | str) -> Any:
    """``data`` parsed as YAML by the safe loader (plain values only), however deeply it nests.

    Raises:
        UntrustedFileError: It is not YAML, or nests deeper than this Python can parse.
    """
    try:
        return yaml.load(data, Loader=_yaml_loader())
    except RecursionError:
        raise UntrustedFileError("cannot be read: it nests deeper than any file a run writes") from None
    except (yaml.YAMLError, ValueError) as err:
        raise UntrustedFileError(f"cannot be read: {_one_line(err)}") from None


def _yaml_loader() -> type:
    """libyaml's safe loader where it bounds nesting itself (from 0.2.5: its composer recurses in C, unchecked, and
    it parses several times faster); else the Python one, whose recursion ends in a RecursionError."""
    try:
        from yaml import CSafeLoader
        from yaml._yaml import get_version

        if get_version() >= (0, 2, 5):
            return CSafeLoader
    except ImportError:  # PyYAML built without libyaml
        pass
    return yaml.SafeLoader


# ----- shapes -----
class Shape:
    """What a value must be, and how to say so: ``check(value, where)`` raises, naming ``where`` and the value."""

    def __init__(self, what: str) -> None:
        self.what = what

    def check(self, value: Any, where: str) -> None:
        raise NotImplementedError

    def refuse(self, value: Any, where: str) -> None:
        # where holds the file's own keys: printed, like any text of it, as one line of printable characters
        raise UntrustedFileError(f"has a wrong value: {_place(where)} must be {self.what}, not {_kind(value)}")


class _Whole(Shape):
    def check(self, value: Any, where: str) -> None:
        if type(value) is not int or not 0 <= value < MAX_WHOLE:
            self.refuse(value, where)


class _Number(Shape):
    def check(self, value: Any, where: str) -> None:
        if type(value) not in (float, int) or not -MAX_NUMBER <= value <= MAX_NUMBER:  # NaN compares false
            self.refuse(value, where)


class _Text(Shape):
    def check(self, value: Any, where: str) -> None:
        if type(value) is not str or len(value) > MAX_TEXT:
            self.refuse(value, where)


class _Any(Shape):
    """Any JSON value, nested at most :data:`MAX_DEPTH` deep (walked without recursion)."""

    def check(self, value: Any, where: str) -> None:
        pending = [(value, 0)]
        while pending:
            item, depth = pending.pop()
            if isinstance(item, dict | list):
                if depth >= MAX_DEPTH:
                    self.refuse(item, where)
                pending.extend((inner, depth + 1) for inner in (item.values() if isinstance(item, dict) else item))


class _Optional(Shape):
    def __init__(self, shape: Shape) -> None:
        super().__init__(f"{shape.what} or null")
        self.shape = shape

    def check(self, value: Any, where: str) -> None:
        if value is not None:
            self.shape.check(value, where)


class _Mapping(Shape):
    def __init__(self, fields: dict[str, Shape], required: Iterable[str], others: Shape | None) -> None:
        super().__init__("a mapping")
        self.fields, self.required, self.others = fields, tuple(required), others

    def check(self, value: Any, where: str) -> None:
        if not isinstance(value, dict):
            self.refuse(value, where)
        for key in self.required:
            if key not in value:
                raise UntrustedFileError(f"has a wrong value: {_place(where)} has no {key!r}")
        for key, item in value.items():
            shape = self.fields.get(key, self.others)
            if shape is not None:
                shape.check(item, f"{where}.{key}" if where else key)


class _List(Shape):
    def __init__(self, shape: Shape, most: int | None) -> None:
        super().__init__("a list" if most is None else f"a list of at most {most} items")
        self.shape, self.most = shape, most

    def check(self, value: Any, where: str) -> None:
        if not isinstance(value, list) or (self.most is not None and len(value) > self.most):
            self.refuse(value, where)
        for index, item in enumerate(value):
            self.shape.check(item, f"{where}[{index}]")


#: A whole number from 0 (a count, an episode), a finite number (not true/false, not NaN), a bounded text, any value.
WHOLE = _Whole("a whole number from 0 below 2**53")
NUMBER = _Number(f"a finite number (at most {MAX_NUMBER:g} either way)")
TEXT = _Text(f"a text of at most {MAX_TEXT} characters")
ANY = _Any(f"a value nested at most {MAX_DEPTH} deep")


def optional(shape: Shape) -> Shape:
    """``shape`` or null."""
    return _Optional(shape)


def mapping(fields: dict[str, Shape], required: Iterable[str] | bool = (), others: Shape | None = None) -> Shape:
    """A JSON object whose listed keys, where present, hold their shapes, and its other keys ``others`` (any value
    without it). ``required``: the keys that must be present, or True for all those listed."""
    return _Mapping(fields, fields if required is True else () if required is False else required, others)


def list_of(shape: Shape, most: int | None = None) -> Shape:
    """A JSON array of ``shape`` items, at most ``most`` of them."""
    return _List(shape, most)


def check(value: Any, shape: Shape) -> None:
    """Raise :class:`UntrustedFileError` unless ``value`` (a whole file's parsed content) has ``shape``."""
    shape.check(value, "")


# ----- words -----
def _kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and not math.isfinite(value):
        return "NaN" if math.isnan(value) else "an infinity"
    if isinstance(value, int | float):
        return f"the number {value:.6g}" if isinstance(value, float) or abs(value) <= MAX_NUMBER else "a huge number"
    if isinstance(value, str):
        return f"a text of {len(value)} characters" if len(value) > 40 else f"the text {_one_line(value)!r}"
    if isinstance(value, list):
        return f"a list of {len(value)} items"
    return "a mapping" if isinstance(value, dict) else type(value).__name__


def _place(where: str) -> str:
    return _one_line(where) if where else "the whole file"


def _size(size: int) -> str:
    return f"{size / MIB:.0f} MiB" if size >= MIB else f"{size} bytes"


def _one_line(value: Any) -> str:
    """``value`` as text fit for a one-line message: bounded, no control characters (it may come from the file)."""
    text = " ".join(str(value).split())[:200]
    return "".join(char if char.isprintable() else "?" for char in text) or type(value).__name__
