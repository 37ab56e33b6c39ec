"""Calibration texts: unlabelled text that data-aware merging (RegMean), head re-fit and
distillation run through the models.

Files: JSONL (``{"text": ..., "head": ...}``, ``head`` optional), CSV / TSV with a ``text``
column (and optionally ``head``), or plain text with one text per line (any other suffix).
Several files at once. Bad rows are errors naming the file and line, all reported together,
like ``eval``'s data. A ``label`` field is ignored, except where the caller asks for labels
(``labels=``: distillation's optional supervised term): then a row's ``label`` (one name, or a
list for a multi-label head, as in ``eval``) is checked against its head and kept.

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
from ..labels import Head
from .evaluation import Example, check_examples, parse_label, read_rows

__all__ = ["CalibrationSet", "load_calibration"]


@dataclass(frozen=True)
class CalibrationSet:
    """Texts; ``heads[i]`` names the head text ``i`` belongs to (or is None); ``labels``
    (only where the caller asked for them): per text, head name -> its label (a tuple of
    names for a multi-label head), empty for an unlabelled text."""

    texts: tuple[str, ...]
    heads: tuple[str | None, ...]
    files: tuple[str, ...] = ()
    labels: tuple[Mapping[str, str | tuple[str, ...]], ...] = ()

    def __post_init__(self) -> None:
        if len(self.texts) != len(self.heads):
            raise ValueError("one head (or None) per text")
        if self.labels and len(self.labels) != len(self.texts):
            raise ValueError("one label mapping (maybe empty) per text")

    @property
    def labelled(self) -> int:
        """How many texts carry at least one label."""
        return sum(bool(lab) for lab in self.labels)

    @property
    def labels_sha256(self) -> str:
        """A hash of the labels in text order (texts and heads are in ``sha256``)."""
        digest = hashlib.sha256()
        for text, lab in zip(self.texts, self.labels):
            digest.update(_field(text) + len(lab).to_bytes(8, "little"))
            for head in sorted(lab):
                value = lab[head]
                names = value if isinstance(value, tuple) else (value,)
                digest.update(_field(head) + len(names).to_bytes(8, "little") +
                              b"".join(_field(n) for n in names))
        return digest.hexdigest()

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
        out: dict[str, object] = {"texts": self.size, "sha256": self.sha256,
                                  "files": list(self.files),
                                  "with_head": sum(h is not None for h in self.heads)}
        if self.labels:
            out.update(labelled=self.labelled, labels_sha256=self.labels_sha256)
        return out


def _field(text: str) -> bytes:
    """A length-prefixed field: hashes over several texts cannot be forged by moving bytes
    from one text to the next."""
    raw = text.encode("utf-8", "surrogatepass")
    return len(raw).to_bytes(8, "little") + raw


def _order_key(text: str) -> bytes:
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).digest()


def load_calibration(paths: Sequence[str | os.PathLike[str]] | str | os.PathLike[str], *,
                     limit: int | None = None,
                     heads: Sequence[str] | None = None,
                     labels: Sequence[Head] | None = None) -> CalibrationSet:
    """Read calibration texts; ``heads``: the head names a text may name (others are errors).
    ``labels``: keep each row's ``label`` too, checked against these heads (a label needs its
    row's head; a name the head does not have, or a list for a single-label head, is an error);
    the same text labelled twice for one head must agree (a multi-label head's lists are
    merged, as ``eval`` does).

    Duplicate texts are kept once. Texts are put in the order of their sha256 (a
    deterministic, order-free spread), then cut to ``limit``. Relative paths are taken from
    the current folder, as a recipe's model paths are.
    """
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    if limit is not None and limit < 1:
        raise DataError(f"calibration limit must be >= 1, got {limit}")
    if labels is not None:
        heads = [h.name for h in labels] if heads is None else heads
    known = set(heads) if heads is not None else None
    by_name = {h.name: h for h in labels or ()}
    problems: list[str] = []
    rows: dict[str, str | None] = {}
    # text -> head -> (its label, the row that gave it)
    found: dict[str, dict[str, tuple[str | tuple[str, ...], str]]] = {}
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
                elif not isinstance(head, str):
                    problems.append(f"{where}: head must be a head's name, got {head!r}")
                    continue
                elif known is not None and head not in known:
                    problems.append(f"{where}: unknown head {head!r} (the recipe's heads: "
                                    f"{', '.join(sorted(known))})")
                    continue
                if labels is not None and row.get("label") not in (None, ""):
                    bad = _label(row["label"], head, by_name, path, line,
                                 found.setdefault(text, {}))
                    if bad:
                        problems.append(bad)
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
    kept = (tuple({h: lab for h, (lab, _) in found.get(t, {}).items()} for t in ordered)
            if labels is not None else ())
    return CalibrationSet(texts=tuple(ordered), heads=tuple(rows[t] for t in ordered),
                          files=tuple(files), labels=kept)


def _label(value: object, head: str | None, by_name: Mapping[str, Head], path: Path, line: int,
           seen: dict[str, tuple[str | tuple[str, ...], str]]) -> str | None:
    """Check one row's label and record it in ``seen`` (head -> (label, where)); returns the
    problem, if any. A multi-label head's label is always a tuple (one name counts as a list of
    one), and a text's lists for it are merged."""
    where = f"{path}:{line}"
    if head is None:
        return f"{where}: a label needs the row's head (which head is {value!r} a label of?)"
    label = parse_label(value)
    if label is None:
        return f"{where}: label: a list must hold label names"
    bad = check_examples([Example(text="-", head=head, label=label, source=str(path),
                                  line=line)], list(by_name.values()))
    if bad:
        return bad[0]
    before = seen.get(head)
    if by_name[head].multi_label:
        names = set(label if isinstance(label, tuple) else (label,))
        if before is not None:
            names |= set(before[0])
        seen[head] = (tuple(sorted(names)), before[1] if before else where)
    elif before is None:
        seen[head] = (label, where)
    elif before[0] != label:
        return (f"{where}: label {label!r} for head {head!r}, but {before[1]} labels the same "
                f"text {before[0]!r}")
    return None
