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

import threading
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

from .sparsify import CHUNK, _check_density, dare_generator, dare_keep, topk_mask

__all__ = ["METHODS", "Method", "merge_tensor", "merge_task_vectors", "elect_and_mean", "merge_block",
           "block_keeps", "linear_block", "magnitude_masks"]


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
    count (their sign is 0). The inputs are not modified.
    """
    owned = [d.to(torch.float32, copy=True) for d in deltas]
    zero = torch.zeros_like(owned[0])
    return _combine(owned, [1.0] * len(owned), weights, True, 1.0, zero, torch.empty_like(zero))


_SCRATCH = threading.local()


def _scratch(slot: int, n: int) -> torch.Tensor:
    bufs = getattr(_SCRATCH, "bufs", None)
    if bufs is None:
        bufs = _SCRATCH.bufs = {}
    buf = bufs.get(slot)
    if buf is None or buf.numel() < n:
        buf = bufs[slot] = torch.empty(max(n, CHUNK), dtype=torch.float32)
    return buf[:n]


def _combine(deltas: Sequence[torch.Tensor], scales: Sequence[float], weights: Sequence[float],
             sign_election: bool, lam: float, base: torch.Tensor,
             out: torch.Tensor) -> torch.Tensor:
    """``out = base + lam * combine(t_i)`` with ``t_i = scales[i] * deltas[i]``.

    ``deltas`` are owned float32 blocks (already masked) and are overwritten. Only float32
    element-wise ops: bool tensors are several times slower here. For the election it uses
    ``w m t = s * w * relu(s t)`` (exact, since s is +1 or -1) and counts an entry in the
    denominator by ``sign(relu(s t))``, which is 1 where kept and 0 where not (zeros included).
    """
    coef = [float(w) * float(c) for w, c in zip(weights, scales)]
    if not sign_election:
        torch.mul(deltas[0], coef[0], out=out)
        for d, a in zip(deltas[1:], coef[1:]):
            out.add_(d, alpha=a)
        return torch.add(base, out, alpha=lam, out=out)
    # scratch blocks, reused per thread: fresh 1 MiB blocks cost page faults on first touch
    sign, den, tmp = (_scratch(k, out.numel()) for k in range(3))
    torch.mul(deltas[0], coef[0], out=sign)
    for d, a in zip(deltas[1:], coef[1:]):
        sign.add_(d, alpha=a)
    sign.ge_(0).mul_(2).sub_(1)  # the elected sign, +1 / -1 (a zero sum elects +)
    for i, (d, a, w) in enumerate(zip(deltas, coef, weights)):
        d.mul_(sign).clamp_min_(0)  # |t_i| where its sign agrees with the elected one, else 0
        if i == 0:
            torch.mul(d, a, out=out)
            torch.sign(d, out=den).mul_(float(w))
        else:
            out.add_(d, alpha=a)
            den.add_(torch.sign(d, out=tmp), alpha=float(w))
    out.mul_(sign).div_(den.clamp_min_(torch.finfo(den.dtype).tiny))  # 0 / 0 -> 0
    return torch.add(base, out, alpha=lam, out=out)


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
                densities: Sequence[float], lam: float, keeps: Sequence[torch.Tensor | None],
                out: torch.Tensor | None = None) -> torch.Tensor:
    """One flat block: sparsify the (float32, owned) task-vector blocks in place, combine, add base.

    ``base`` is the float32 base block (not modified). ``keeps[i]`` is source i's float32 0/1
    mask for this block (the TIES trim, or DARE's draws from ``dare_keep``) or None to keep
    everything; DARE's ``1 / density`` rescale is folded into the weights. The result goes to
    ``out`` (a new float32 block when None). This is the single kernel behind every
    task-vector method, whether the tensor is in memory or streamed.
    """
    for d, keep in zip(deltas, keeps or [None] * len(deltas)):
        if keep is not None:
            d.mul_(keep)
    scales = [1.0 / p if m.sparsify == "dare" and p < 1.0 else 1.0 for p in densities]
    if out is None:
        out = torch.empty_like(base, dtype=torch.float32)
    return _combine(deltas, scales, weights, m.sign_election, lam, base, out)


def block_keeps(m: Method, densities: Sequence[float], generators: Sequence[Any],
                masks: Sequence[torch.Tensor | None], start: int, count: int,
                buffers: Sequence[torch.Tensor] | None = None) -> list[torch.Tensor | None]:
    """Per source, the float32 keep mask of elements ``start:start+count`` (None: keep all).

    TIES: a slice of the tensor's top-k mask. DARE: the next ``count`` draws of the source's
    generator (blocks must be asked for in order).
    """
    keeps: list[torch.Tensor | None] = []
    for i, p in enumerate(densities):
        mask = masks[i] if masks else None
        buf = buffers[i] if buffers is not None else None
        if mask is not None:
            keeps.append(mask[start:start + count].view(torch.uint8).float())
        elif m.sparsify == "dare" and p < 1.0:
            keeps.append(dare_keep(generators[i], count, p, buf))
        else:
            keeps.append(None)
    return keeps


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
        keeps = block_keeps(m, densities, gens, masks, start, stop - start)
        merge_block(m, bb, deltas, weights, densities, lam, keeps, out=out[start:stop])
    return out.view(shape)
