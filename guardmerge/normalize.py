"""What the guard sees: text normalisation before scoring, with spans mapped back.

``normalized_forms(text)`` returns the forms a guard model should also score, because an LLM
reads text the way a person reads it on screen, not byte by byte (``normalize_text(text)`` is
the first of them, or the text itself when nothing changes):

1. Unicode tag characters (U+E0020..U+E007E) are *decoded* to the ASCII they encode (some
   LLMs read them; the guard must see what the LLM sees); the other tag-block code points
   (U+E0001, U+E007F, unassigned) are removed.
2. Invisible and format characters are removed: the whole Default_Ignorable_Code_Point set of
   Unicode (DerivedCoreProperties.txt: zero-width spaces, joiners, bidi controls, the soft
   hyphen and the BOM; variation selectors; the combining grapheme joiner; the Hangul and
   other fillers; the reserved U+2065, U+FFF0..U+FFF8 and tag-block code points), and the
   rest of category Cf (interlinear annotation controls and the like).
3. NFKC (fullwidth ``ｘ``, mathematical ``𝐱``, ligatures and the like become plain letters).
4. Combining marks used as decoration: in a word where a combining mark (category Mn or Me)
   stays on an ASCII letter or digit after NFKC (no precomposed letter exists: ``x⃞``,
   ``x̸``, zalgo), every combining mark on an ASCII base letter of that word is dropped.
   Ordinary accented letters (``café``, written precomposed or decomposed) are left alone.
5. Lookalike letters: in mixed-script words (Latin mixed with Cyrillic or Greek, say:
   ``хуzzу``), each character is folded to its Unicode TR39 confusables prototype (data from
   the ``disarm`` package; UTS #39 writing systems, so Japanese mixing Han and Kana is one
   script, not a mix). In every word, a Latin-script letter without a canonical decomposition
   (so not an ordinary accented letter) is folded to ASCII when its TR39 prototype is ASCII
   (small capitals ``ʏ``, ``ᴢ``, hooked ``ƴ``, ``ʐ``, also ``ø`` and ``ł``) or, where TR39 has
   no entry, when its Unicode name is an ASCII letter "WITH" something (``ɀ``, LATIN SMALL
   LETTER Z WITH SWASH TAIL). Single-script words of other scripts are left alone: Russian,
   Greek or Japanese text keeps its letters.

Removing an invisible character glues what was on either side of it, and BERT's own
normaliser glues the original the same way, while an LLM may read the invisible as a word
break (``hello\\u200bxyzzy``). So when step 1 or 2 removed or decoded anything inside a word,
a second form is returned, ``spaced``, where each removed run and each decoded tag run is
set off by one space; the first form, ``normalized``, glues them (``xy\\u200bzzy``).

Every character of a form knows the range of original characters it came from, so a finding
on a normalised form points at the original text. The guard scores the original and every
form, and keeps the worse verdict. What normalisation cannot do (base64, ciphers,
translation, a whole word written in lookalikes of one other script) is in the README.
"""

from __future__ import annotations

import functools
import re
import unicodedata
from dataclasses import dataclass

__all__ = ["NormalizedText", "normalize_text", "normalized_forms"]

_TAG_FIRST, _TAG_LAST = 0xE0020, 0xE007E        # tag characters for ' ' .. '~'
_TAG_BLOCK = range(0xE0000, 0xE1000)            # the whole block is default-ignorable
# Default_Ignorable_Code_Point code points outside category Cf (DerivedCoreProperties.txt):
# combining grapheme joiner, Hangul fillers, Khmer inherent vowels, Mongolian free variation
# selectors, the reserved U+2065, variation selectors (VS1-VS16, VS17-VS256) and the reserved
# U+FFF0..U+FFF8 (the tag block is _TAG_BLOCK).
_IGNORABLE_RANGES = ((0x034F, 0x034F), (0x115F, 0x1160), (0x17B4, 0x17B5), (0x180B, 0x180F),
                     (0x2065, 0x2065), (0x3164, 0x3164), (0xFE00, 0xFE0F), (0xFFA0, 0xFFA0),
                     (0xFFF0, 0xFFF8), (0xE0100, 0xE01EF))
_WORDS = re.compile(r"\s+|\S+")
_JAMO_VT = range(0x1161, 0x1200)                # conjoining vowels / finals compose under NFKC
_MARKS = ("Mn", "Me")
_LETTER_WITH = re.compile(r"LATIN (SMALL|CAPITAL) LETTER ([A-Z]) WITH .+")
_SMALL_CAPITAL = re.compile(r"LATIN LETTER SMALL CAPITAL ([A-Z])")


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


@functools.lru_cache(maxsize=8192)
def _latin_lookalike(ch: str) -> str | None:
    """The ASCII a Latin lookalike letter stands for (step 5), or None."""
    decomposition = unicodedata.decomposition(ch)
    if ch.isascii() or (decomposition and not decomposition.startswith("<")):
        return None  # ASCII, or an ordinary accented letter (é is e + a combining acute)
    import disarm

    if disarm.detect_scripts(ch) != [disarm.Script.LATIN]:
        return None
    proto = _prototype(ch)
    if proto != ch and proto.isascii() and proto.isprintable():
        return proto
    name = unicodedata.name(ch, "")
    match = _LETTER_WITH.fullmatch(name)
    if match:
        return match.group(2) if match.group(1) == "CAPITAL" else match.group(2).lower()
    match = _SMALL_CAPITAL.fullmatch(name)
    return match.group(1).lower() if match else None


@dataclass(frozen=True)
class NormalizedText:
    """A text and one normalised form of it; ``original_span`` maps spans of ``text`` back.
    ``form``: ``"normalized"`` or ``"spaced"`` (see the module doc)."""

    original: str
    text: str
    starts: tuple[int, ...] = ()   # per character of ``text``: where its source starts ...
    ends: tuple[int, ...] = ()     # ... and ends in ``original`` (empty when unchanged)
    form: str = "normalized"

    @property
    def changed(self) -> bool:
        return self.text != self.original

    def original_span(self, start: int, end: int) -> tuple[int, int]:
        """The range of original characters that characters ``start:end`` of ``text`` came from."""
        if not self.starts:
            return (start, end)
        n = len(self.text)
        if start >= n:
            return (len(self.original), len(self.original))
        if end <= start:
            return (self.starts[start], self.starts[start])
        return (self.starts[start], self.ends[min(end, n) - 1])


def normalize_text(text: str) -> NormalizedText:
    """The normalised form of ``text`` (glued; see the module doc), or ``text`` unchanged."""
    forms = normalized_forms(text)
    return forms[0] if forms else NormalizedText(text, text)


def normalized_forms(text: str) -> tuple[NormalizedText, ...]:
    """Every form of ``text`` the guard scores besides the text itself: none when nothing
    changes, else ``normalized`` and, where removed or decoded characters sat inside a word,
    ``spaced`` (see the module doc). A form equal to the text or to an earlier form is left
    out."""
    if text.isascii():
        return ()
    glued: list[tuple[str, int, int]] = []
    spaced: list[tuple[str, int, int]] = []
    for match in _WORDS.finditer(text):
        word, base = match.group(), match.start()
        if word.isascii():
            ascii_pieces = [(ch, base + i, base + i + 1) for i, ch in enumerate(word)]
            glued += ascii_pieces
            spaced += ascii_pieces
            continue
        for piece, s, e, sep in _word_pieces(word, base):
            if not sep:
                glued.append((piece, s, e))
            spaced.append((" " if sep else piece, s, e))
    forms: list[NormalizedText] = []
    seen = {text}
    for form, pieces in (("normalized", glued), ("spaced", spaced)):
        result = "".join(p for p, _, _ in pieces)
        if result in seen:
            continue
        seen.add(result)
        starts: list[int] = []
        ends: list[int] = []
        for piece, s, e in pieces:
            starts.extend([s] * len(piece))
            ends.extend([e] * len(piece))
        forms.append(NormalizedText(text, result, tuple(starts), tuple(ends), form))
    return tuple(forms)


def _word_pieces(word: str, base: int) -> list[tuple[str, int, int, bool]]:
    """Steps 1-5 for one word: (output, original start, original end, is a separator) per
    source cluster; a separator stands for a removed run or the edge of a decoded tag run."""
    # 1-2: decode tags, drop invisibles; each dropped run and each edge between decoded and
    # plain characters is a separator (not at the word's edges: whitespace or the end is there)
    kept: list[tuple[str, int] | tuple[int, int]] = []   # (char, pos) or separator (start, end)
    last_kind = ""
    for i, ch in enumerate(word):
        cp, pos = ord(ch), base + i
        kind = "tag" if _TAG_FIRST <= cp <= _TAG_LAST else "gone" if _ignorable(ch) else "keep"
        separator = bool(kept) and isinstance(kept[-1][0], int)
        if kind == "gone":
            if separator:
                kept[-1] = (kept[-1][0], pos + 1)  # type: ignore[assignment]
            else:
                kept.append((pos, pos + 1))
            continue
        if last_kind and kind != last_kind and not separator:
            kept.append((pos, pos))
        kept.append((chr(cp - 0xE0000) if kind == "tag" else ch, pos))
        last_kind = kind
    while kept and isinstance(kept[0][0], int):
        kept.pop(0)
    while kept and isinstance(kept[-1][0], int):
        kept.pop()
    # 3: NFKC per cluster (a character with the combining marks and conjoining jamo after it)
    clusters: list[list[tuple[str, int]] | tuple[int, int]] = []
    for entry in kept:
        if isinstance(entry[0], int):
            clusters.append(entry)  # type: ignore[arg-type]
            continue
        ch, pos = entry  # type: ignore[misc]
        joins = unicodedata.combining(ch) or unicodedata.category(ch).startswith("M") \
            or ord(ch) in _JAMO_VT
        if clusters and joins and isinstance(clusters[-1], list):
            clusters[-1].append((ch, pos))
        else:
            clusters.append([(ch, pos)])
    normed: list[tuple[str, list[tuple[str, int]]] | tuple[int, int]] = []
    decorated = False
    for cluster in clusters:
        if isinstance(cluster, tuple):
            normed.append(cluster)
            continue
        raw = "".join(ch for ch, _ in cluster)
        norm = unicodedata.normalize("NFKC", raw)
        if norm != raw:
            norm = "".join(c for c in norm if not _ignorable(c))
        if _ascii_based(norm) and any(unicodedata.category(c) in _MARKS for c in norm):
            decorated = True  # a mark no precomposed letter takes: decoration, not spelling
        normed.append((norm, cluster))
    # 4: in a decorated word, drop the marks on ASCII letters
    pieces: list[tuple[str, int, int, bool]] = []
    for entry in normed:
        if isinstance(entry[0], int):
            pieces.append(("", entry[0], entry[1], True))  # type: ignore[misc]
            continue
        norm, cluster = entry  # type: ignore[misc]
        if decorated and _ascii_based(norm):
            norm = unicodedata.normalize("NFC", "".join(
                c for c in unicodedata.normalize("NFD", norm)
                if unicodedata.category(c) not in _MARKS))
        if norm == "".join(ch for ch, _ in cluster):
            pieces.extend((ch, pos, pos + 1, False) for ch, pos in cluster)
        elif norm:
            pieces.append((norm, cluster[0][1], cluster[-1][1] + 1, False))
    # 5: lookalike letters
    letters = "".join(p for p, _, _, _ in pieces)
    if not letters.isascii() and _mixed_script(letters):
        pieces = [("".join(_prototype(c) for c in p), s, e, sep) for p, s, e, sep in pieces]
    return [("".join(c if c.isascii() else (_latin_lookalike(c) or c) for c in p), s, e, sep)
            for p, s, e, sep in pieces]


def _ascii_based(cluster: str) -> bool:
    """Whether a cluster is an ASCII letter or digit (with marks, or precomposed with them)."""
    base = unicodedata.normalize("NFD", cluster[:1])[:1]
    return base.isascii() and base.isalnum()
