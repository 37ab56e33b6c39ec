"""Guard heads: named slices of one model's logits, each with its own label space."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Any, Iterable, Mapping, Sequence

__all__ = ["Head", "qualified_label", "check_heads", "heads_from_layout", "duplicates",
           "head_name_from_id", "HEAD_NAME", "SINGLE_LABEL", "MULTI_LABEL", "HEAD_KINDS"]

SEPARATOR = ":"
#: what a head name may contain (it becomes part of "head:label" names and of file names)
HEAD_NAME = re.compile(r"^[A-Za-z0-9_.\-]+$")
#: a softmax head: its labels exclude each other, their probabilities sum to 1 (per window)
SINGLE_LABEL = "single_label"
#: a sigmoid head: every label is scored on its own (transformers' multi_label_classification)
MULTI_LABEL = "multi_label"
HEAD_KINDS = (SINGLE_LABEL, MULTI_LABEL)


@dataclass(frozen=True)
class Head:
    """One guard head: ``labels`` occupy logits ``offset .. offset + len(labels)``.

    ``kind``: ``single_label`` (softmax over the head's labels) or ``multi_label`` (a sigmoid
    per label). ``modules``: where the head's own modules' tensors are in a per-head bundle
    (a tensor-name prefix such as ``heads.0.``); None where the head reads the shared
    representation through the model's own (plain) head modules.
    """

    name: str
    labels: tuple[str, ...]
    offset: int = 0
    source: str | None = None
    revision: str | None = None
    sha256: str | None = None
    extra: Mapping[str, Any] = field(default_factory=dict, compare=False, repr=False)
    kind: str = SINGLE_LABEL
    modules: str | None = None

    @property
    def size(self) -> int:
        return len(self.labels)

    @property
    def multi_label(self) -> bool:
        return self.kind == MULTI_LABEL

    @property
    def stop(self) -> int:
        return self.offset + len(self.labels)

    def qualified(self) -> list[str]:
        return [qualified_label(self.name, label) for label in self.labels]

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "labels": list(self.labels), "offset": self.offset,
                               "kind": self.kind}
        source = {"id": self.source, "revision": self.revision, "sha256": self.sha256}
        if any(v is not None for v in source.values()):
            out["source"] = source
        out.update(dict(self.extra))
        return out


def qualified_label(head: str, label: str) -> str:
    """``("hate", "normal") -> "hate:normal"``: the unique name used in ``config.json``."""
    return f"{head}{SEPARATOR}{label}"


def duplicates(names: Iterable[Any]) -> list[Any]:
    """The names that occur more than once, sorted (the one duplicate-label check)."""
    seen: set[Any] = set()
    dupes: set[Any] = set()
    for n in names:
        (dupes if n in seen else seen).add(n)
    return sorted(dupes, key=str)


def head_name_from_id(model_id: str) -> str:
    """The default head name of a model: the last part of its folder or Hub id, with anything
    outside ``HEAD_NAME`` replaced by ``_`` (``org/jb-classifier`` -> ``jb-classifier``)."""
    name = PurePosixPath(str(model_id).replace("\\", "/").rstrip("/")).name or str(model_id)
    name = re.sub(r"[^A-Za-z0-9_.\-]+", "_", name).strip("_")
    return name or "head"


def check_heads(heads: Sequence[Head], num_labels: int | None = None) -> list[str]:
    """Return every problem with a head layout (empty list when it is valid)."""
    problems: list[str] = []
    seen: set[str] = set()
    expected_offset = 0
    for i, head in enumerate(heads):
        where = f"heads[{i}] ({head.name!r})"
        if not head.name or not isinstance(head.name, str):
            problems.append(f"heads[{i}]: head name must be a non-empty string")
        elif SEPARATOR in head.name:
            problems.append(f"{where}: head name must not contain {SEPARATOR!r}")
        if head.name in seen:
            problems.append(f"{where}: duplicate head name")
        seen.add(head.name)
        if not head.labels:
            problems.append(f"{where}: has no labels")
        dupes = duplicates(head.labels)
        if dupes:
            problems.append(f"{where}: duplicate label names {dupes}")
        for lab in head.labels:
            if not isinstance(lab, str) or not lab:
                problems.append(f"{where}: label {lab!r} must be a non-empty string")
        if head.kind not in HEAD_KINDS:
            problems.append(f"{where}: kind {head.kind!r} is not one of {', '.join(HEAD_KINDS)}")
        if head.offset != expected_offset:
            problems.append(
                f"{where}: logit offset is {head.offset}, expected {expected_offset} "
                "(heads must tile the logits in order)"
            )
        expected_offset = head.offset + len(head.labels)
    if num_labels is not None and expected_offset != num_labels:
        problems.append(
            f"heads add up to {expected_offset} labels but the model has num_labels={num_labels}"
        )
    return problems


def heads_from_layout(layout: Iterable[tuple[str, Sequence[str]]], *,
                      multi_label: Iterable[str] = ()) -> tuple[Head, ...]:
    """Build consecutive heads from ``[(name, labels), ...]``; the heads named in
    ``multi_label`` are sigmoid heads."""
    sigmoid = set(multi_label)
    heads: list[Head] = []
    offset = 0
    for name, labels in layout:
        heads.append(Head(name=name, labels=tuple(labels), offset=offset,
                          kind=MULTI_LABEL if name in sigmoid else SINGLE_LABEL))
        offset += len(labels)
    unknown = sigmoid - {h.name for h in heads}
    if unknown:
        raise ValueError(f"multi_label names heads that are not in the layout: {sorted(unknown)}")
    return tuple(heads)
