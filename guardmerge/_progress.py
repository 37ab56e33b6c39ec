"""Progress bars: tqdm (installed with transformers), configured the same way everywhere.

On stderr; redrawn in place on a terminal and silent when stderr is not one (logs, CI, pipes),
so long work never floods a log file. ``enabled=False`` silences a bar on a terminal too.
"""

from __future__ import annotations

import sys
from typing import IO, Any

from tqdm.auto import tqdm

__all__ = ["progress", "format_seconds"]


def progress(total: int, desc: str, *, enabled: bool = True, unit: str = "it",
             file: IO[str] | None = None, **kwargs: Any) -> tqdm:
    """A tqdm bar; ``disable=None`` is tqdm's "only on a terminal"."""
    return tqdm(total=total, desc=desc, unit=unit, file=file or sys.stderr,
                disable=None if enabled else True, dynamic_ncols=True, leave=True,
                mininterval=0.5, **kwargs)


def format_seconds(seconds: float | None) -> str:
    """``h:mm:ss`` / ``mm:ss`` like tqdm's own clock (``?`` when unknown)."""
    if seconds is None:
        return "?"
    return tqdm.format_interval(max(0.0, seconds))
