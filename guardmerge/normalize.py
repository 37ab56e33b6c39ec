"""What the guard sees: text normalisation before scoring, with spans mapped back.

``normalize_text(text)`` returns the form a guard model should also score, because an LLM
reads text the way a person reads it on screen, not byte by byte:

1. Unicode tag characters (U+E0020..U+E007E) are *decoded* to the ASCII they encode (some
   LLMs read them; the guard must see what the LLM sees); the other tag-block code points
   (U+E0001, U+E007F, unassigned) are removed.
2. Invisible and format characters are removed: the Default_Ignorable_Code_Point set of
   Unicode (category Cf such as zero-width spaces, joiners, bidi controls, the soft hyphen and
   the BOM; variation selectors; the combining grapheme joiner; the Hangul and other fillers).
3. NFKC (fullwidth ``ｘ``, mathematical ``𝐱``, ligatures and the like become plain letters).
4. In mixed-script words (Latin mixed with Cyrillic or Greek, say: ``хуzzу``), each character
   is folded to its Unicode TR39 confusables prototype (data from the ``disarm`` package;
   UTS #39 writing systems, so Japanese mixing Han and Kana is one script, not a mix).
   Single-script words are left alone: Russian, Greek or Japanese text keeps its letters.

Every character of the result knows the range of original characters it came from, so a
finding on the normalised text points at the original text. The guard scores both forms when
they differ and keeps the worse verdict. What normalisation cannot do (base64, ciphers,
translation, a whole word written in lookalikes of one other script) is in the README.
"""

from __future__ import annotations

import functools
import re
import unicodedata
from dataclasses import dataclass

__all__ = ["NormalizedText", "normalize_text"]

_TAG_FIRST, _TAG_LAST = 0xE0020, 0xE007E        # tag characters for ' ' .. '~'
_TAG_BLOCK = range(0xE0000, 0xE1000)            # the whole block is default-ignorable
# Default_Ignorable_Code_Point code points outside category Cf (DerivedCoreProperties.txt):
# combining grapheme joiner, Hangul fillers, Khmer inherent vowels, Mongolian free variation
# selectors, variation selectors (VS1-VS16, VS17-VS256) and the reserved U+FFF0..U+FFF8.
_IGNORABLE_RANGES = ((0x034F, 0x034F), (0x115F, 0x1160), (0x17B4, 0x17B5), (0x180B, 0x180F),
                     (0x3164, 0x3164), (0xFE00, 0xFE0F), (0xFFA0, 0xFFA0), (0xFFF0, 0xFFF8),
                     (0xE0100, 0xE01EF))
_WORDS = re.compile(r"\s+|\S+")
_JAMO_VT = range(0x1161, 0x1200)                # conjoining vowels / finals compose under NFKC


@functools.lru_cache(maxsize=4096)
def _ignorable(ch: str) -> bool:
    cp = ord(ch)
    if cp in _TAG_BLOCK or unicodedata.category(ch) == "Cf":
        return True
    return any(lo <= cp <= hi for lo, hi in _IGNORABLE_RANGES)


@functools.lru_cache(maxsize=8192)
def _prototype(ch: str) -> str:
    import disarm  # lazy: ``import guardmerge`` stays light

    return disarm.normalize_confusables(ch)


def _mixed_script(word: str) -> bool:
    import disarm

    return disarm.is_mixed_script(word)


@dataclass(frozen=True)
class NormalizedText:
    """A text and its normalised form; ``original_span`` maps spans of ``text`` back."""

    original: str
    text: str
    starts: tuple[int, ...] = ()   # per character of ``text``: where its source starts ...
    ends: tuple[int, ...] = ()     # ... and ends in ``original`` (empty when unchanged)

    @property
    def changed(self) -> bool:
        return self.text != self.original

    def original_span(self, start: int, end: int) -> tuple[int, int]:
        """The range of original characters that characters ``start:end`` of ``text`` came from."""
        if not self.changed:
            return (start, end)
        n = len(self.text)
        if start >= n:
            return (len(self.original), len(self.original))
        if end <= start:
            return (self.starts[start], self.starts[start])
        return (self.starts[start], self.ends[min(end, n) - 1])


def normalize_text(text: str) -> NormalizedText:
    """The form of ``text`` the guard scores besides the text itself (see the module doc)."""
    if text.isascii():
        return NormalizedText(text, text)
    out: list[str] = []
    starts: list[int] = []
    ends: list[int] = []
    for match in _WORDS.finditer(text):
        word, base = match.group(), match.start()
        if word.isascii():
            out.append(word)
            starts.extend(range(base, base + len(word)))
            ends.extend(range(base + 1, base + len(word) + 1))
            continue
        pieces = _word_pieces(word, base)
        if not word[0].isspace():
            folded = "".join(p for p, _, _ in pieces)
            if not folded.isascii() and _mixed_script(folded):
                pieces = [("".join(_prototype(c) for c in p), s, e) for p, s, e in pieces]
        for piece, s, e in pieces:
            out.append(piece)
            starts.extend([s] * len(piece))
            ends.extend([e] * len(piece))
    result = "".join(out)
    if result == text:
        return NormalizedText(text, text)
    return NormalizedText(text, result, tuple(starts), tuple(ends))


def _word_pieces(word: str, base: int) -> list[tuple[str, int, int]]:
    """Steps 1-3 for one word: (output, original start, original end) per source cluster."""
    kept: list[tuple[str, int]] = []
    for i, ch in enumerate(word):
        cp = ord(ch)
        if _TAG_FIRST <= cp <= _TAG_LAST:
            kept.append((chr(cp - 0xE0000), base + i))
        elif not _ignorable(ch):
            kept.append((ch, base + i))
    # NFKC per cluster: a character with the combining marks (and conjoining jamo) after it
    clusters: list[list[tuple[str, int]]] = []
    for ch, pos in kept:
        joins = unicodedata.combining(ch) or unicodedata.category(ch).startswith("M") \
            or ord(ch) in _JAMO_VT
        if clusters and joins:
            clusters[-1].append((ch, pos))
        else:
            clusters.append([(ch, pos)])
    pieces: list[tuple[str, int, int]] = []
    for cluster in clusters:
        raw = "".join(ch for ch, _ in cluster)
        norm = unicodedata.normalize("NFKC", raw)
        if norm == raw:
            pieces.extend((ch, pos, pos + 1) for ch, pos in cluster)
            continue
        norm = "".join(c for c in norm if not _ignorable(c))
        if norm:
            pieces.append((norm, cluster[0][1], cluster[-1][1] + 1))
    return pieces
