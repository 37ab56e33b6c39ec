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
- ``regmean`` (https://arxiv.org/abs/2212.09849): linear layers by regression on calibration
  statistics (``regmean.py``); every other tensor as ``linear``.

The work is done on flat blocks of ``CHUNK`` elements (1 MiB of float32), so the chain of
element-wise steps runs in cache; only the TIES trim needs the whole tensor (its top-k mask).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from enum import Enum
from typing import Any, Callable, Sequence

import torch

from ..exceptions import ConfigError
from .sparsify import CHUNK, check_density, dare_generator, dare_keep, topk_mask

__all__ = ["METHODS", "Method", "Sparsify", "get_method", "merge_tensor", "merge_task_vectors",
           "merge_block", "block_keeps", "linear_block", "magnitude_masks"]


class Sparsify(str, Enum):
    """How a method sparsifies each task vector before combining them."""

    NONE = "none"            # every entry kept
    MAGNITUDE = "magnitude"  # TIES' trim: the top-k magnitudes of each tensor
    DARE = "dare"            # DARE: random drop with probability 1 - density, kept ones rescaled


@dataclass(frozen=True, kw_only=True)
class Method:
    """One configuration of the generalised task-arithmetic routine."""

    name: str
    sparsify: Sparsify
    sign_election: bool    # TIES' elected sign and disjoint mean (else a plain weighted sum)
    uses_base: bool        # task vectors against the base (False: a weighted mean of sources)
    paper: str
    data_aware: bool = False  # linear layers solved from calibration statistics (RegMean);
                              # every other tensor: the weighted mean of the sources


METHODS: dict[str, Method] = {m.name: m for m in (
    Method(name="linear", sparsify=Sparsify.NONE, sign_election=False, uses_base=False,
           paper="https://arxiv.org/abs/2203.05482"),
    Method(name="task_arithmetic", sparsify=Sparsify.NONE, sign_election=False, uses_base=True,
           paper="https://arxiv.org/abs/2212.04089"),
    Method(name="ties", sparsify=Sparsify.MAGNITUDE, sign_election=True, uses_base=True,
           paper="https://arxiv.org/abs/2306.01708"),
    Method(name="dare_ties", sparsify=Sparsify.DARE, sign_election=True, uses_base=True,
           paper="https://arxiv.org/abs/2311.03099"),
    Method(name="dare_linear", sparsify=Sparsify.DARE, sign_election=False, uses_base=True,
           paper="https://arxiv.org/abs/2311.03099"),
    Method(name="regmean", sparsify=Sparsify.NONE, sign_election=False, uses_base=False,
           paper="https://arxiv.org/abs/2212.09849", data_aware=True),
)}


def get_method(method: "str | Method") -> Method:
    """A ``Method`` from its name (or the method itself); a ConfigError for an unknown name."""
    if isinstance(method, Method):
        return method
    try:
        return METHODS[method]
    except KeyError:
        raise ConfigError(f"unknown merge method {method!r} (known: {', '.join(METHODS)})") from None


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


def _check(method: "str | Method", n: int, weights: Sequence[float],
           densities: Sequence[float]) -> Method:
    m = get_method(method)
    if n == 0 or len(weights) != n or len(densities) != n:
        raise ValueError("need one weight and one density per source (and at least one source)")
    for p in densities:
        check_density(p)
    return m


def merge_task_vectors(method: "str | Method", base: torch.Tensor, deltas: Sequence[torch.Tensor],
                       weights: Sequence[float], densities: Sequence[float], *, lam: float = 1.0,
                       seed: int = 0, name: str = "") -> torch.Tensor:
    """``B + lambda * merge(d_i)`` for precomputed task vectors (float32 result, inputs untouched).

    DARE draws from ``dare_generator(seed, name, i)`` for source ``i``, block by block.
    """
    m = _check(method, len(deltas), weights, densities)
    if m.uses_base is False:
        raise ValueError("linear merges sources, not task vectors")
    return _merge_flat(m, base, deltas, weights, densities, lam, seed, name, are_deltas=True)


def merge_tensor(method: "str | Method", base: torch.Tensor | None, sources: Sequence[torch.Tensor],
                 weights: Sequence[float], densities: Sequence[float], *, lam: float = 1.0,
                 seed: int = 0, name: str = "") -> torch.Tensor:
    """Merge one tensor (float32 maths and result). ``base`` may be None only for ``linear``."""
    m = _check(method, len(sources), weights, densities)
    if not m.uses_base:
        return linear_block(sources, weights)
    if base is None:
        raise ValueError(f"{m.name} needs a base tensor")
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
    scales = [1.0 / p if m.sparsify is Sparsify.DARE and p < 1.0 else 1.0 for p in densities]
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
        elif m.sparsify is Sparsify.DARE and p < 1.0:
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
    if m.sparsify is not Sparsify.MAGNITUDE:
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
    gens = [dare_generator(seed, name, i) for i in range(len(xs))] \
        if m.sparsify is Sparsify.DARE else []
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
