"""Verdicts: the outcome of a guard check, as objects that serialise to JSON."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Iterable

__all__ = ["Action", "Finding", "Verdict"]


class Action(str, Enum):
    """What a check decides. Ordered by severity: pass < flag < block."""

    PASS = "pass"
    FLAG = "flag"
    BLOCK = "block"

    @property
    def severity(self) -> int:
        return _SEVERITY[self]

    @staticmethod
    def worst(actions: Iterable["Action"], default: "Action | None" = None) -> "Action":
        best = default if default is not None else Action.PASS
        for a in actions:
            if a.severity > best.severity:
                best = a
        return best

    def __str__(self) -> str:  # "block", not "Action.BLOCK"
        return self.value


_SEVERITY = {Action.PASS: 0, Action.FLAG: 1, Action.BLOCK: 2}


@dataclass(frozen=True)
class Finding:
    """Why a check flagged or blocked.

    ``kind`` is ``"rule"`` (a head's score crossed a threshold), ``"too_long"`` (a text exceeded
    the policy's token budget; ``span`` is the part that was not scored), ``"non_text"`` (media
    parts a text guard cannot read), ``"unreadable"`` (content the guard could not read:
    ``on_error``), ``"unknown_role"`` or ``"error"`` (the guard failed). ``span`` is a character
    range in the message's (original) text; ``form`` says whether the ``"original"`` text, its
    ``"normalized"`` form or its ``"spaced"`` form (removed characters as word breaks; see
    ``guardmerge.normalized_forms``) fired.
    """

    kind: str
    action: Action
    head: str | None = None
    label: str | None = None
    score: float | None = None
    threshold: float | None = None
    rule: str | None = None
    message_index: int | None = None
    role: str | None = None
    span: tuple[int, int] | None = None
    detail: str | None = None
    form: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "action": self.action.value,
            "head": self.head,
            "label": self.label,
            "score": None if self.score is None else round(self.score, 6),
            "threshold": self.threshold,
            "rule": self.rule,
            "message_index": self.message_index,
            "role": self.role,
            "span": list(self.span) if self.span is not None else None,
            "detail": self.detail,
            "form": self.form,
        }

    def describe(self) -> str:
        where = ""
        if self.message_index is not None:
            where = f" message[{self.message_index}]"
            if self.role:
                where += f" ({self.role})"
        span = f" chars {self.span[0]}-{self.span[1]}" if self.span else ""
        if self.form == "normalized":
            span += " (normalized text)"
        elif self.form == "spaced":
            span += " (normalized text, removed characters as spaces)"
        if self.kind == "rule":
            return (f"{self.action.value}: {self.head}:{self.label} = {self.score:.3f} >= "
                    f"{self.threshold}{where}{span}")
        return f"{self.action.value}: {self.kind}{where}{span}: {self.detail}"


@dataclass
class Verdict:
    """The decision of one check: the most severe action of any finding (or the default)."""

    action: Action
    direction: str
    findings: list[Finding] = field(default_factory=list)
    policy: str | None = None
    scores: list[dict[str, dict[str, float]]] | None = None

    @property
    def blocked(self) -> bool:
        return self.action is Action.BLOCK

    @property
    def flagged(self) -> bool:
        return self.action is Action.FLAG

    @property
    def passed(self) -> bool:
        return self.action is Action.PASS

    def summary(self) -> str:
        if not self.findings:
            return f"{self.direction}: {self.action.value}"
        return f"{self.direction}: {self.action.value} ({'; '.join(f.describe() for f in self.findings)})"

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "action": self.action.value,
            "direction": self.direction,
            "policy": self.policy,
            "findings": [f.to_dict() for f in self.findings],
        }
        if self.scores is not None:
            out["scores"] = self.scores
        return out

    def to_json(self, **kwargs: Any) -> str:
        return json.dumps(self.to_dict(), **kwargs)
