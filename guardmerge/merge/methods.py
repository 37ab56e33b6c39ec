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

The work is done on flat blocks of ``CHUNK`` elements (1 MiB of float32), so the chain of
element-wise steps runs in cache; only the TIES trim needs the whole tensor (its top-k mask).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

from .sparsify import CHUNK, _check_density, dare_, dare_generator, topk_mask

__all__ = ["METHODS", "Method", "merge_tensor", "merge_task_vectors", "elect_and_mean", "merge_block",
           "linear_block", "magnitude_masks"]


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


def elect_and_mean(deltas: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    """TIES sign election + disjoint weighted mean of (sparsified) task vectors (new tensor).

    ``s = sign(sum w_i t_i)`` with 0 counted as +; entries whose sign equals ``s`` are kept;
    result ``sum(w_i m_i t_i) / sum(w_i m_i)``, 0 where nothing is kept. Zero entries never
    count (their sign is 0). Uses ``w t m = s * w * relu(s t)``: exact, and fewer passes.
    """
    total = deltas[0] * float(weights[0])
    for d, w in zip(deltas[1:], weights[1:]):
        total.add_(d, alpha=float(w))
    sign = total.ge_(0).mul_(2).sub_(1)  # in place: `total` becomes the elected sign (+1 / -1)
    acc = torch.zeros_like(sign)
    div = torch.zeros_like(sign)
    for d, w in zip(deltas, weights):
        aligned = d * sign
        div.add_(aligned.gt(0), alpha=float(w))
        acc.add_(aligned.clamp_min_(0), alpha=float(w))
    return acc.mul_(sign).div_(div.clamp_min_(torch.finfo(div.dtype).tiny))


def _check(method: str, n: int, weights: Sequence[float], densities: Sequence[float]) -> Method:
    if method not in METHODS:
        raise ValueError(f"unknown merge method {method!r} (known: {', '.join(METHODS)})")
    if n == 0 or len(weights) != n or len(densities) != n:
        raise ValueError("need one weight and one density per source (and at least one source)")
    for p in densities:
        _check_density(p)
    return METHODS[method]


def merge_task_vectors(method: str, base: torch.Tensor, deltas: Sequence[torch.Tensor],
                       weights: Sequence[float], densities: Sequence[float], *, lam: float = 1.0,
                       seed: int = 0, name: str = "") -> torch.Tensor:
    """``B + lambda * merge(d_i)`` for precomputed task vectors (float32 result, inputs untouched).

    DARE draws from ``dare_generator(seed, name, i)`` for source ``i``, block by block.
    """
    m = _check(method, len(deltas), weights, densities)
    if m.uses_base is False:
        raise ValueError("linear merges sources, not task vectors")
    return _merge_flat(m, base, deltas, weights, densities, lam, seed, name, are_deltas=True)


def merge_tensor(method: str, base: torch.Tensor | None, sources: Sequence[torch.Tensor],
                 weights: Sequence[float], densities: Sequence[float], *, lam: float = 1.0,
                 seed: int = 0, name: str = "") -> torch.Tensor:
    """Merge one tensor (float32 maths and result). ``base`` may be None only for ``linear``."""
    m = _check(method, len(sources), weights, densities)
    if method == "linear":
        return linear_block(sources, weights)
    if base is None:
        raise ValueError(f"{method} needs a base tensor")
    return _merge_flat(m, base, sources, weights, densities, lam, seed, name, are_deltas=False)


def merge_block(m: Method, base: torch.Tensor, deltas: list[torch.Tensor], weights: Sequence[float],
                densities: Sequence[float], lam: float, generators: Sequence[Any],
                masks: Sequence[torch.Tensor | None]) -> torch.Tensor:
    """One flat block: sparsify the (float32, owned) task-vector blocks in place, combine, add base.

    ``base`` is the float32 base block; the result is a new float32 block. This is the single
    kernel behind every task-vector method, whether the tensor is in memory or streamed.
    """
    for i, d in enumerate(deltas):
        mask = masks[i] if masks else None
        if mask is not None:
            d.mul_(mask)
        elif m.sparsify == "dare":
            dare_(d, densities[i], generators[i])
    if m.sign_election:
        merged = elect_and_mean(deltas, weights)
    else:
        merged = deltas[0].mul_(float(weights[0]))
        for d, w in zip(deltas[1:], weights[1:]):
            merged.add_(d, alpha=float(w))
    return merged.mul_(lam).add_(base)


def linear_block(sources: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    """``sum w_i X_i / sum w_i`` on float32 blocks (new tensor)."""
    total = float(sum(weights))
    if total == 0:
        raise ValueError("linear merge: weights sum to 0")
    out = sources[0].float() * float(weights[0])
    for x, w in zip(sources[1:], weights[1:]):
        out.add_(x.float(), alpha=float(w))
    return out.div_(total)


def magnitude_masks(m: Method, n: int, densities: Sequence[float],
                    magnitudes: Callable[[int], torch.Tensor]) -> list[torch.Tensor | None]:
    """TIES: per source, the flat mask of its top-k task-vector magnitudes (None at density 1)."""
    if m.sparsify != "magnitude":
        return [None] * len(densities)
    out: list[torch.Tensor | None] = []
    for i, p in enumerate(densities):
        out.append(topk_mask(magnitudes(i), max(1, int(p * n))) if p < 1.0 else None)
    return out


def _merge_flat(m: Method, base: torch.Tensor, inputs: Sequence[torch.Tensor],
                weights: Sequence[float], densities: Sequence[float], lam: float, seed: int,
                name: str, *, are_deltas: bool) -> torch.Tensor:
    shape = base.shape
    for x in inputs:
        if x.shape != shape:
            raise ValueError(f"tensor {name!r}: shape {tuple(x.shape)} != base {tuple(shape)}")
    b = base.reshape(-1)
    xs = [x.reshape(-1) for x in inputs]
    n = b.numel()
    # .abs() (not .abs_()): for float32 task vectors .float() is the caller's own tensor
    masks = magnitude_masks(m, n, densities, lambda i: (
        xs[i].float().abs() if are_deltas else (xs[i].float() - b.float()).abs_()))
    gens = [dare_generator(seed, name, i) for i in range(len(xs))] if m.sparsify == "dare" else []
    out = torch.empty(n, dtype=torch.float32)
    for start in range(0, n, CHUNK):
        stop = min(start + CHUNK, n)
        bb = b[start:stop].float()
        # fresh float32 blocks: the caller's tensors are never modified
        deltas = [x[start:stop].to(torch.float32, copy=True) if are_deltas
                  else x[start:stop].float() - bb for x in xs]
        block_masks = [None if mk is None else mk[start:stop] for mk in masks]
        out[start:stop] = merge_block(m, bb, deltas, weights, densities, lam, gens, block_masks)
    return out.view(shape)
