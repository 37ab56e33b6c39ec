"""Reading the files guardmerge is given: regular files only, from inside the folder they
belong to, size-capped where they are configuration.

A FIFO or a device would hang a reader (or feed it forever), a symlink or an index entry could
point a bundle at any file on the machine, and a 50 MB "policy" costs minutes before the first
check. Every reader of bundles, policies and recipes goes through ``open_regular``.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import TypeVar

from .exceptions import GuardmergeError

__all__ = ["MAX_CONFIG_BYTES", "MAX_JSON_BYTES", "inside", "open_regular", "read_bytes",
           "read_text"]

E = TypeVar("E", bound=GuardmergeError)

#: policies, recipes and bundle manifests
MAX_CONFIG_BYTES = 1 << 20
#: a model's config.json and a sharded model's index
MAX_JSON_BYTES = 16 << 20


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return "not a regular file"


def inside(path: Path, root: Path) -> bool:
    """Whether ``path``, with every symlink resolved, lies inside ``root``."""
    real, base = os.path.realpath(path), os.path.realpath(root)
    return real == base or real.startswith(base.rstrip(os.sep) + os.sep)


def open_regular(path: str | os.PathLike[str], error: type[E], *, root: Path | None = None,
                 limit: int | None = None, what: str = "file") -> int:
    """An open file descriptor for ``path``, which must be a regular file (inside ``root``,
    symlinks resolved, and at most ``limit`` bytes). Opening never blocks: a FIFO is refused
    after ``open(O_NONBLOCK)``, before any read. Raises ``error`` naming the file."""
    p = Path(path)
    if root is not None and not inside(p, root):
        raise error(f"{p}: {what} resolves to {os.path.realpath(p)}, outside {root}; guardmerge "
                    "reads a folder's files only from inside that folder")
    try:
        fd = os.open(p, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
    except FileNotFoundError:
        raise error(f"{p}: missing (no such file)") from None
    except OSError as exc:
        raise error(f"{p}: cannot read: {exc.strerror or exc}") from exc
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise error(f"{p}: {what} is {_kind(st.st_mode)}, expected a regular file")
        if limit is not None and st.st_size > limit:
            raise error(f"{p}: {what} is {st.st_size:,} bytes, over the limit of {limit:,}")
    except BaseException:
        os.close(fd)
        raise
    return fd


def read_bytes(path: str | os.PathLike[str], error: type[E], *, root: Path | None = None,
               limit: int | None = None, what: str = "file") -> bytes:
    fd = open_regular(path, error, root=root, limit=limit, what=what)
    with os.fdopen(fd, "rb") as fh:
        data = fh.read() if limit is None else fh.read(limit + 1)
    if limit is not None and len(data) > limit:  # grew after the check
        raise error(f"{path}: {what} is over the limit of {limit:,} bytes")
    return data


def read_text(path: str | os.PathLike[str], error: type[E], *, root: Path | None = None,
              limit: int | None = None, what: str = "file") -> str:
    """``read_bytes`` decoded as UTF-8; bad bytes are an ``error`` naming the file and offset."""
    data = read_bytes(path, error, root=root, limit=limit, what=what)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise error(f"{path}: {what} is not UTF-8 text (byte 0x{data[exc.start]:02x} at offset "
                    f"{exc.start})") from None
