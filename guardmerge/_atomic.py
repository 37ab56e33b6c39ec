"""Nothing is written half: folders are built in a temporary sibling and renamed into place."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from .exceptions import ConfigError

__all__ = ["atomic_directory", "check_output"]


def check_output(output: str | os.PathLike[str], *, overwrite: bool) -> Path:
    """The absolute output path; a ``ConfigError`` if it exists and ``overwrite`` is False."""
    path = Path(output).expanduser().resolve()
    if path.exists() and not overwrite:
        raise ConfigError(f"{path}: already exists (pass overwrite=True / --overwrite to replace it)")
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{path}: exists and is not a folder")
    return path


@contextlib.contextmanager
def atomic_directory(output: str | os.PathLike[str], *, overwrite: bool = False) -> Iterator[Path]:
    """``with atomic_directory(out) as tmp: <write into tmp>``: on success ``tmp`` replaces
    ``out`` in one rename (an existing ``out`` is moved aside first and deleted after); on any
    error, or an interrupt, ``tmp`` is deleted and ``out`` is left as it was."""
    path = check_output(output, overwrite=overwrite)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    trash: Path | None = None
    try:
        yield tmp
        if path.exists():
            trash = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-", dir=path.parent))
            os.replace(path, trash / path.name)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if trash is not None and (trash / path.name).exists() and not path.exists():
            os.replace(trash / path.name, path)  # interrupted between the renames: put it back
        raise
    finally:
        if trash is not None:
            shutil.rmtree(trash, ignore_errors=True)
