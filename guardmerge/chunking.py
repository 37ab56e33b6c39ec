"""Token windows with character spans.

A text is tokenised once (fast tokenizer, with offsets). Its token ids are cut into windows of
at most ``window_tokens`` (``max_length - 2``: room for the special tokens) that overlap by
``overlap`` tokens, so a phrase cut by one window boundary is whole in the next window.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Window", "plan_windows"]


@dataclass(frozen=True)
class Window:
    """One window of one text: tokens ``token_start:token_end``, characters ``char_start:char_end``."""

    text_index: int
    index: int
    token_start: int
    token_end: int
    char_start: int
    char_end: int

    @property
    def span(self) -> tuple[int, int]:
        return (self.char_start, self.char_end)

    def to_dict(self) -> dict[str, int]:
        return {"index": self.index, "token_start": self.token_start, "token_end": self.token_end,
                "char_start": self.char_start, "char_end": self.char_end}


def plan_windows(n_tokens: int, window_tokens: int, overlap: int) -> list[tuple[int, int]]:
    """Token ranges ``[(start, end), ...]`` covering ``0..n_tokens``.

    Every window has at most ``window_tokens`` tokens; consecutive windows share ``overlap``
    tokens; the last window ends exactly at ``n_tokens``. An empty text gets one empty window.
    """
    if window_tokens < 1:
        raise ValueError(f"window_tokens must be >= 1, got {window_tokens}")
    if not 0 <= overlap < window_tokens:
        raise ValueError(f"overlap must be in [0, {window_tokens - 1}], got {overlap}")
    if n_tokens <= window_tokens:
        return [(0, n_tokens)]
    step = window_tokens - overlap
    ranges = []
    start = 0
    while True:
        end = min(start + window_tokens, n_tokens)
        ranges.append((start, end))
        if end == n_tokens:
            return ranges
        start += step
