"""How much the sources' task vectors will interfere, measured before anything is merged
(``guardmerge merge RECIPE --dry-run``).

Per source, over the shared encoder (output layers, head modules and integer buffers excluded):
the norm of its task vector ``d_i = X_i - B``, that norm relative to the base's (how far
fine-tuning moved the encoder), and its share per layer. Per pair: the cosine between task vectors and the sign-conflict
rate (of the entries both changed, the fraction they changed in opposite directions: TIES' sign
election throws one side of every conflict away). Tensors are read one at a time.

Warnings (rules of thumb, each stated with the figure that triggered it), only where a figure is
clearly outside what unrelated fine-tunes give (independent changes have cosine ~0 and conflict
on ~50% of shared entries):
- one task vector at least twice another's norm: a plain merge is dominated by it (the recipe's
  ``weight``s can balance them);
- task vectors that point apart (cosine <= -0.1) or conflict in sign on >= 55% of shared entries.

Notes (not warnings): ``others/own = |sum_{j != i} d_j| / |d_i|``, how large the other sources'
combined change to the encoder is next to a source's own. At 1 or more, a head reads features
that moved at least as much for other tasks as for its own, and plain-merge heads usually
degrade: on the demo's three MiniLM fine-tunes it is 1.4-1.6 for every head, and every plain
merge lost 0.25-0.5 macro-F1 on two of them. ``head_mode: refit`` (or distillation) is the
remedy. With two sources of equal size it is 1 for both: merging full fine-tunes moves every
head's features.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any

from .plan import MergePlan

__all__ = ["MergeabilityReport", "mergeability"]

DOMINANCE_RATIO = 2.0     # one task-vector norm this many times another's
OPPOSED = -0.1            # cosine at or below this: the sources pull the encoder apart
CONFLICT_RATE = 0.55      # sign conflicts on this share of jointly changed entries (random: 50%)
INTERFERENCE = 1.0        # others' combined change at least a source's own: a note
_LAYER = re.compile(r"\.layers?\.(\d+)\.")


def _group(name: str) -> str:
    m = _LAYER.search(name)
    if m:
        return f"layer {int(m.group(1)):02d}"
    for part in ("embeddings", "pooler"):
        if part in name:
            return part
    return "other"


@dataclass
class MergeabilityReport:
    models: list[str]
    heads: list[list[str]]
    norms: list[float]
    drift: list[float]                       # ||d_i|| / ||B||
    layer_share: list[dict[str, float]]      # share of ||d_i||^2 per layer group
    cosine: list[list[float]]
    sign_conflict: list[list[float]]
    interference: list[float]                # ||sum_{j != i} d_j|| / ||d_i||
    tensors: int = 0
    warnings: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    calibration: dict[str, Any] | None = None   # the recipe's calibration texts, read and checked

    def to_dict(self) -> dict[str, Any]:
        return {"models": self.models, "heads": self.heads, "norms": self.norms,
                "drift": self.drift, "layer_share": self.layer_share, "cosine": self.cosine,
                "sign_conflict": self.sign_conflict, "interference": self.interference,
                "tensors": self.tensors, "notes": self.notes, "calibration": self.calibration,
                "warnings": self.warnings}

    def render(self) -> str:
        names = [", ".join(h) for h in self.heads]
        width = max(len(n) for n in names)
        lines = [f"mergeability of {len(self.models)} sources over {self.tensors} encoder tensors "
                 "(task vectors d_i = source - base; nothing written)", "",
                 f"{'source':<{width}}  {'|d_i|':>9}  {'|d_i|/|B|':>9}  {'others/own':>10}  "
                 "largest layer shares"]
        for n, norm, drift, inter, share in zip(names, self.norms, self.drift,
                                                self.interference, self.layer_share):
            top = sorted(share.items(), key=lambda kv: -kv[1])[:3]
            lines.append(f"{n:<{width}}  {norm:>9.3f}  {drift:>9.4f}  {inter:>10.2f}  " +
                         ", ".join(f"{g} {s:.0%}" for g, s in top))
        groups = sorted({g for share in self.layer_share for g in share})
        lines += ["", "share of each task vector's squared norm per layer:",
                  f"{'layer':<12}" + "".join(f"{n[:14]:>16}" for n in names)]
        for g in groups:
            lines.append(f"{g:<12}" + "".join(f"{share.get(g, 0.0):>16.1%}"
                                              for share in self.layer_share))
        if len(self.models) > 1:
            lines += ["", "pairs: cosine between task vectors / sign-conflict rate on entries "
                          "both changed:"]
            for i in range(len(names)):
                for j in range(i + 1, len(names)):
                    lines.append(f"  {names[i]} x {names[j]}: cosine {self.cosine[i][j]:+.3f}, "
                                 f"sign conflicts {self.sign_conflict[i][j]:.1%}")
        lines.append("")
        if self.calibration is not None:
            lines.append(f"calibration: {self.calibration['texts']} texts "
                         f"({self.calibration['with_head']} naming a head), sha256 "
                         f"{self.calibration['sha256'][:16]}")
        lines += [f"note: {n}" for n in self.notes]
        lines += [f"warning: {w}" for w in self.warnings] or ["no warnings"]
        return "\n".join(lines)


def mergeability(recipe: Any) -> MergeabilityReport:
    """Measure the recipe's sources (a recipe, a dict or a YAML file); nothing is written."""
    plan = recipe if isinstance(recipe, MergePlan) else MergePlan(recipe)
    try:
        report = _measure(plan)
        if plan.recipe.calibration is not None:  # read it now, so a bad file fails the dry run
            from .fitting import calibration_for

            report.calibration = calibration_for(plan).describe()
        return report
    finally:
        if plan is not recipe:
            plan.close()


def _measure(plan: MergePlan) -> MergeabilityReport:
    n = len(plan.sources)
    sq = [dict[str, float]() for _ in range(n)]
    dot = [[0.0] * n for _ in range(n)]
    conflicts = [[0] * n for _ in range(n)]
    shared = [[0] * n for _ in range(n)]
    base_sq = 0.0
    tensors = 0
    for name in plan.names:
        if name in plan.head_tensors or name in plan.module_tensors or \
                not plan.specs[name].dtype.is_floating_point:
            continue
        tensors += 1
        b = plan.base_tensor(name).reshape(-1)
        base_sq += float(b.double().pow(2).sum())
        deltas = [plan.source_tensor(i, name).float().reshape(-1) - b for i in range(n)]
        group = _group(name)
        for i, d in enumerate(deltas):
            sq[i][group] = sq[i].get(group, 0.0) + float(d.double().pow(2).sum())
        for i in range(n):
            for j in range(i + 1, n):
                prod = deltas[i] * deltas[j]
                dot[i][j] += float(prod.double().sum())
                conflicts[i][j] += int((prod < 0).sum())
                shared[i][j] += int(((deltas[i] != 0) & (deltas[j] != 0)).sum())
    norms = [math.sqrt(sum(s.values())) for s in sq]
    base_norm = math.sqrt(base_sq) or 1.0
    cosine = [[1.0 if i == j else 0.0 for j in range(n)] for i in range(n)]
    rate = [[0.0] * n for _ in range(n)]
    for i in range(n):
        for j in range(i + 1, n):
            c = dot[i][j] / (norms[i] * norms[j]) if norms[i] and norms[j] else 0.0
            cosine[i][j] = cosine[j][i] = c
            r = conflicts[i][j] / shared[i][j] if shared[i][j] else 0.0
            rate[i][j] = rate[j][i] = r
    heads = [[h.name for h in s.heads] for s in plan.sources]
    interference = []
    for i in range(n):  # |sum_{j != i} d_j|^2 from the norms and the pairwise dot products
        others = [j for j in range(n) if j != i]
        total = sum(norms[j] ** 2 for j in others) + 2 * sum(
            dot[min(j, k)][max(j, k)] for a, j in enumerate(others) for k in others[a + 1:])
        interference.append(math.sqrt(max(0.0, total)) / norms[i] if norms[i] else 0.0)
    report = MergeabilityReport(
        models=[s.spec.model for s in plan.sources], heads=heads, norms=norms,
        drift=[x / base_norm for x in norms],
        layer_share=[{g: v / (nrm * nrm) if nrm else 0.0 for g, v in sorted(s.items())}
                     for s, nrm in zip(sq, norms)],
        cosine=cosine, sign_conflict=rate, interference=interference, tensors=tensors)
    report.warnings, report.notes = _warnings(report), _notes(report)
    return report


def _warnings(r: MergeabilityReport) -> list[str]:
    out = []
    names = [", ".join(h) for h in r.heads]
    n = len(names)
    if n > 1 and min(r.norms) > 0:
        big, small = max(range(n), key=r.norms.__getitem__), min(range(n), key=r.norms.__getitem__)
        ratio = r.norms[big] / r.norms[small]
        if ratio >= DOMINANCE_RATIO:
            out.append(f"{names[big]}'s task vector is {ratio:.1f}x {names[small]}'s: a plain merge "
                       f"is dominated by it; weights proportional to 1/|d_i| balance them "
                       f"({', '.join(f'{nm}: {max(r.norms) / x:.2f}' for nm, x in zip(names, r.norms))})")
    for i in range(n):
        for j in range(i + 1, n):
            if r.cosine[i][j] <= OPPOSED:
                out.append(f"{names[i]} and {names[j]} pull the encoder apart (cosine "
                           f"{r.cosine[i][j]:+.3f}): merging cancels part of both")
            if r.sign_conflict[i][j] >= CONFLICT_RATE:
                out.append(f"{names[i]} and {names[j]} changed {r.sign_conflict[i][j]:.0%} of "
                           "their shared entries in opposite directions: sign election drops one "
                           "side of each")
    return out


def _notes(r: MergeabilityReport) -> list[str]:
    names = [", ".join(h) for h in r.heads]
    moved = [f"{nm} ({x:.2f})" for nm, x in zip(names, r.interference) if x >= INTERFERENCE]
    if not moved or len(names) < 2:
        return []
    return [f"others/own >= {INTERFERENCE:g} for {', '.join(moved)}: those heads will read "
            "features that moved at least as much for the other tasks as for their own, and "
            "plain-merge heads usually lose accuracy at this level: consider head_mode: refit "
            "(or distil the merged bundle)"]
