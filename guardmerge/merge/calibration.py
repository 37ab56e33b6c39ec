"""Calibration texts: unlabelled text that data-aware merging (RegMean), head re-fit and
distillation run through the models.

Files: JSONL (``{"text": ..., "head": ...}``, ``head`` optional; other fields such as ``label``
are ignored), CSV / TSV with a ``text`` column (and optionally ``head``), or plain text with one
text per line (any other suffix). Several files at once. Bad rows are errors naming the file and
line, all reported together, like ``eval``'s data.

``limit`` keeps at most that many texts, chosen by a hash of each text (a spread sample that does
not depend on the order of the files, so a file sorted by head does not give one head only).
The set's ``sha256`` covers the selected texts and their heads in order: caches of statistics
and teacher outputs are keyed by it.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

from ..exceptions import DataError
from .evaluation import read_rows

__all__ = ["CalibrationSet", "load_calibration"]


@dataclass(frozen=True)
class CalibrationSet:
    """Unlabelled texts; ``heads[i]`` names the head text ``i`` belongs to (or is None)."""

    texts: tuple[str, ...]
    heads: tuple[str | None, ...]
    files: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if len(self.texts) != len(self.heads):
            raise ValueError("one head (or None) per text")

    @property
    def size(self) -> int:
        return len(self.texts)

    @property
    def sha256(self) -> str:
        digest = hashlib.sha256()
        for text, head in zip(self.texts, self.heads):
            digest.update(_field(head or "") + _field(text))
        return digest.hexdigest()

    def for_head(self, names: Sequence[str], limit: int | None = None) -> list[str]:
        """The texts a source owning heads ``names`` sees: those naming one of its heads first,
        then those naming none (every source sees unassigned text), each group in the set's
        hash order; at most ``limit`` of them."""
        wanted = set(names)
        own = [t for t, h in zip(self.texts, self.heads) if h in wanted]
        shared = [t for t, h in zip(self.texts, self.heads) if h is None]
        out = own + shared
        return out[:limit] if limit is not None else out

    def sample(self, limit: int | None) -> list[str]:
        """At most ``limit`` texts (the first in the set's hash order)."""
        return list(self.texts[:limit] if limit is not None else self.texts)

    def describe(self) -> dict[str, object]:
        """What a manifest records: size, hash and where the texts came from."""
        return {"texts": self.size, "sha256": self.sha256, "files": list(self.files),
                "with_head": sum(h is not None for h in self.heads)}


def _field(text: str) -> bytes:
    """A length-prefixed field: hashes over several texts cannot be forged by moving bytes
    from one text to the next."""
    raw = text.encode("utf-8", "surrogatepass")
    return len(raw).to_bytes(8, "little") + raw


def _order_key(text: str) -> bytes:
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).digest()


def load_calibration(paths: Sequence[str | os.PathLike[str]] | str | os.PathLike[str], *,
                     limit: int | None = None,
                     heads: Sequence[str] | None = None) -> CalibrationSet:
    """Read calibration texts; ``heads``: the head names a text may name (others are errors).

    Duplicate texts are kept once. Texts are put in the order of their sha256 (a
    deterministic, order-free spread), then cut to ``limit``. Relative paths are taken from
    the current folder, as a recipe's model paths are.
    """
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    if limit is not None and limit < 1:
        raise DataError(f"calibration limit must be >= 1, got {limit}")
    known = set(heads) if heads is not None else None
    problems: list[str] = []
    rows: dict[str, str | None] = {}
    files = []
    for p in paths:
        path = Path(p)
        files.append(str(path))
        if not path.is_file():
            problems.append(f"{path}: no such file")
            continue
        try:
            for line, row in read_rows(path, plain=True):
                where = f"{path}:{line}"
                if isinstance(row, Exception):
                    problems.append(f"{where}: not valid JSON ({row})")
                    continue
                if isinstance(row, str):
                    row = {"text": row}
                if not isinstance(row, Mapping):
                    problems.append(f"{where}: expected an object with a 'text' field")
                    continue
                text = row.get("text")
                if not isinstance(text, str) or not text.strip():
                    problems.append(f"{where}: missing or empty text")
                    continue
                head = row.get("head")
                if head in ("", None):
                    head = None
                elif known is not None and head not in known:
                    problems.append(f"{where}: unknown head {head!r} (the recipe's heads: "
                                    f"{', '.join(sorted(known))})")
                    continue
                if text in rows and rows[text] != head:
                    rows[text] = None  # named by two heads: every source sees it
                else:
                    rows.setdefault(text, None if head is None else str(head))
        except (OSError, UnicodeDecodeError) as exc:
            problems.append(f"{path}: cannot read: {exc}")
    if problems:
        raise DataError(problems)
    if not rows:
        raise DataError(f"no calibration texts in {', '.join(files)}")
    ordered = sorted(rows, key=_order_key)
    if limit is not None:
        ordered = ordered[:limit]
    return CalibrationSet(texts=tuple(ordered), heads=tuple(rows[t] for t in ordered),
                          files=tuple(files))
