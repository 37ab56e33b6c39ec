"""Merge methods, as configurations of one generalised task-arithmetic routine.

Per tensor, with base ``B``, sources ``X_i``, task vectors ``d_i = X_i - B``, weights ``w_i``,
densities ``p_i`` and a global ``lambda`` (DESIGN.md, "Merge semantics"):

- ``linear`` (Model Soup, Wortsman et al. 2022, https://arxiv.org/abs/2203.05482):
  ``sum w_i X_i / sum w_i``.
- ``task_arithmetic`` (Ilharco et al. 2023, https://arxiv.org/abs/2212.04089):
  ``B + lambda * sum w_i d_i``.
- ``ties`` (https://arxiv.org/abs/2306.01708): trim each ``d_i`` to its top-k magnitudes, elect
  the sign ``s = sign(sum w_i t_i)`` (0 counts as +), keep entries whose sign equals ``s``, and
  take the disjoint mean ``B + lambda * sum(w_i m_i t_i) / sum(w_i m_i)`` (0/0 -> 0).
- ``dare_ties`` (https://arxiv.org/abs/2311.03099): DARE drop-and-rescale instead of the trim,
  then the same election and disjoint mean.
- ``dare_linear``: DARE, then ``B + lambda * sum w_i t_i``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from .sparsify import dare, magnitude_trim

__all__ = ["METHODS", "Method", "merge_tensor", "merge_deltas", "elect_and_mean"]


@dataclass(frozen=True)
class Method:
    name: str
    sparsify: str | None       # None | "magnitude" | "dare"
    sign_election: bool
    uses_base: bool
    paper: str


METHODS: dict[str, Method] = {
    "linear": Method("linear", None, False, False, "https://arxiv.org/abs/2203.05482"),
    "task_arithmetic": Method("task_arithmetic", None, False, True, "https://arxiv.org/abs/2212.04089"),
    "ties": Method("ties", "magnitude", True, True, "https://arxiv.org/abs/2306.01708"),
    "dare_ties": Method("dare_ties", "dare", True, True, "https://arxiv.org/abs/2311.03099"),
    "dare_linear": Method("dare_linear", "dare", False, True, "https://arxiv.org/abs/2311.03099"),
}


def elect_and_mean(deltas: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """TIES sign election + disjoint weighted mean over the first dimension of ``deltas``."""
    shape = (-1,) + (1,) * (deltas.dim() - 1)
    w = weights.to(deltas.dtype).view(shape)
    weighted = deltas * w
    sign = torch.where(weighted.sum(dim=0) >= 0, 1.0, -1.0).to(deltas.dtype)
    mask = (deltas.sign() == sign).to(deltas.dtype)
    total = (weighted * mask).sum(dim=0)
    divisor = (w * mask).sum(dim=0)
    return torch.where(divisor != 0, total / torch.where(divisor != 0, divisor, 1.0),
                       torch.zeros((), dtype=deltas.dtype))


def merge_deltas(method: str, deltas: Sequence[torch.Tensor], weights: Sequence[float],
                 densities: Sequence[float], generator: torch.Generator | None = None) -> torch.Tensor:
    """The merged task vector (before ``lambda``) for a task-vector method."""
    m = METHODS[method]
    if m.sparsify == "magnitude":
        deltas = [magnitude_trim(d, p) for d, p in zip(deltas, densities)]
    elif m.sparsify == "dare":
        if generator is None:
            raise ValueError(f"{method} needs a torch.Generator")
        deltas = [dare(d, p, generator) for d, p in zip(deltas, densities)]
    w = torch.tensor(list(weights), dtype=torch.float32)
    if m.sign_election:
        return elect_and_mean(torch.stack(list(deltas)), w)
    out = torch.zeros_like(deltas[0])
    for d, wi in zip(deltas, weights):
        out.add_(d, alpha=float(wi))
    return out


def merge_tensor(method: str, base: torch.Tensor | None, sources: Sequence[torch.Tensor],
                 weights: Sequence[float], densities: Sequence[float], *, lam: float = 1.0,
                 generator: torch.Generator | None = None) -> torch.Tensor:
    """Merge one tensor (float32 maths). ``base`` may be None only for ``linear``."""
    if method not in METHODS:
        raise ValueError(f"unknown merge method {method!r} (known: {', '.join(METHODS)})")
    if len(sources) != len(weights) or len(sources) != len(densities):
        raise ValueError("sources, weights and densities must have the same length")
    if method == "linear":
        total = float(sum(weights))
        if total == 0:
            raise ValueError("linear merge: weights sum to 0")
        out = torch.zeros_like(sources[0], dtype=torch.float32)
        for x, wi in zip(sources, weights):
            out.add_(x.float(), alpha=float(wi) / total)
        return out
    if base is None:
        raise ValueError(f"{method} needs a base tensor")
    b = base.float()
    deltas = [x.float() - b for x in sources]
    merged = merge_deltas(method, deltas, weights, densities, generator)
    return b + lam * merged
