"""A dependency-free progress bar on stderr (redrawn in place on a terminal, sparse lines elsewhere)."""

from __future__ import annotations

import sys
import time
from typing import IO, Any


def _fmt(seconds: float) -> str:
    seconds = int(max(0, seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"


class Progress:
    """``with Progress(total, "merging") as bar: bar.update(1, note="layer 3")``.

    Disabled when ``enabled`` is False; on a non-terminal stream it prints at most ~10 lines.
    """

    def __init__(self, total: int, desc: str, *, enabled: bool = True, stream: IO[str] | None = None,
                 width: int = 28) -> None:
        self.total = max(0, int(total))
        self.desc = desc
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.width = width
        self.done = 0
        self.note = ""
        self.start = time.monotonic()
        self._tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self._last_decile = -1
        self._eta: float | None = None

    def update(self, n: int = 1, *, note: str = "", eta: float | None = None) -> None:
        """Advance by ``n``; ``eta`` (seconds) replaces the rate-based estimate when the
        remaining steps cost differently from the finished ones."""
        self.done += n
        self.note = note or self.note
        self._eta = eta
        if self.enabled:
            self._draw()

    def _draw(self, final: bool = False) -> None:
        frac = self.done / self.total if self.total else 1.0
        elapsed = time.monotonic() - self.start
        eta = elapsed / self.done * (self.total - self.done) if self.done else 0.0
        if self._eta is not None:
            eta = self._eta
        filled = int(self.width * frac)
        bar = "#" * filled + "-" * (self.width - filled)
        line = (f"{self.desc} [{bar}] {self.done}/{self.total} {_fmt(elapsed)} "
                f"eta {_fmt(eta)} {self.note}")
        if self._tty:
            self.stream.write("\r" + line[:160].ljust(80) + ("\n" if final else ""))
            self.stream.flush()
        else:
            decile = int(frac * 10)
            if decile != self._last_decile or final:
                self._last_decile = decile
                self.stream.write(line + "\n")
                self.stream.flush()

    def close(self) -> None:
        if self.enabled and (self._tty or self.done != self.total):
            self._draw(final=True)

    def __enter__(self) -> "Progress":
        if self.enabled:
            self._draw()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
