"""Task-vector sparsifiers: small pure functions on tensors.

- ``magnitude_trim``: TIES' trim step (Yadav et al. 2023, https://arxiv.org/abs/2306.01708):
  keep the ``k = max(1, int(density * numel))`` largest magnitudes of the tensor, zero the rest.
- ``dare``: DARE's drop-and-rescale (Yu et al. 2024, https://arxiv.org/abs/2311.03099): drop each
  entry with probability ``1 - density`` and scale the kept ones by ``1 / density``, so the
  expectation of the result is the input.

DARE's random bits come from NumPy's SFC64 bit generator (its raw stream is fixed across NumPy
versions), seeded from (seed, tensor name, source index): a merge is reproducible whatever the
tensor order. An entry is kept with probability ``floor(density * 2**32) / 2**32`` (see
``dare_keep``). SFC64 is ~3x faster than torch's CPU generator here, and DARE's draws are a
large part of a merge.
"""

from __future__ import annotations

import hashlib

import numpy as np
import torch

__all__ = ["CHUNK", "check_density", "magnitude_trim", "dare", "dare_", "dare_keep", "dare_generator", "seed_for",
           "topk_mask"]


def check_density(density: float) -> None:
    if not 0.0 < density <= 1.0:
        raise ValueError(f"density must be in (0, 1], got {density}")


def topk_mask(magnitudes: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean mask (flat) of the ``k`` largest entries of a non-negative float32 tensor.

    Exact and deterministic: among entries equal to the k-th largest value, lower indices win.
    A radix select (the float32 bit patterns of non-negative numbers sort like integers): one
    histogram of the top 11 bits finds the bin holding the k-th value, and only that bin is
    sorted. About 3x faster than ``torch.topk`` for k ~ n/2 on large tensors.
    """
    flat = magnitudes.reshape(-1)
    n = flat.numel()
    if k >= n:
        return torch.ones(n, dtype=torch.bool)
    if k <= 0:
        return torch.zeros(n, dtype=torch.bool)
    bits = flat.contiguous().view(torch.int32)
    keys = bits >> 20
    counts = torch.bincount(keys, minlength=2048)
    from_top = counts.flip(0).cumsum(0)
    idx = int(torch.searchsorted(from_top, torch.tensor(k, dtype=from_top.dtype)).item())
    cut = 2047 - idx
    above = int(from_top[idx - 1]) if idx > 0 else 0
    mask = keys > cut
    in_bin = (keys == cut).nonzero().squeeze(1)
    order = torch.sort(bits[in_bin], descending=True, stable=True).indices
    mask[in_bin[order[: k - above]]] = True
    return mask


def magnitude_trim(delta: torch.Tensor, density: float) -> torch.Tensor:
    """Keep exactly ``max(1, int(density * numel))`` entries of largest magnitude (new tensor).

    Ties at the k-th magnitude are broken towards lower indices (deterministic).
    """
    check_density(density)
    if density >= 1.0 or delta.numel() == 0:
        return delta.clone()
    k = max(1, int(density * delta.numel()))
    flat = delta.reshape(-1)
    mask = topk_mask(flat.abs().float(), k)
    return (flat * mask).view_as(delta)


CHUNK = 1 << 18  # elements per block of the merge loop (1 MiB of float32: stays in cache)


def dare_keep(generator: np.random.BitGenerator, count: int, density: float,
              out: torch.Tensor | None = None) -> torch.Tensor:
    """DARE's keep mask for the next ``count`` entries: float32 1.0 (kept) or 0.0 (dropped).

    An entry is kept with probability exactly ``floor(density * 2**32) / 2**32``: its 16-bit
    draw is compared with the threshold's high half, and only the entries that tie with it
    (1 in 65,536) draw 16 more bits for the low half. Half the random bits of one 32-bit draw
    per entry, the same distribution. A float mask (not bool): multiplying by it is several
    times faster than by a bool tensor here.
    """
    threshold = min(int(density * 2**32), 2**32 - 1)
    hi, lo = np.uint16(threshold >> 16), np.uint16(threshold & 0xFFFF)
    draws = generator.random_raw((count + 3) // 4).view(np.uint16)[:count]
    if out is None:
        out = torch.empty(count, dtype=torch.float32)
    mask = out.numpy()[:count]
    np.less(draws, hi, out=mask, casting="unsafe")
    ties = np.flatnonzero(draws == hi)
    if ties.size:
        low = generator.random_raw((ties.size + 3) // 4).view(np.uint16)[:ties.size]
        mask[ties[low < lo]] = 1.0
    return out[:count]


def dare_(chunk: torch.Tensor, density: float, generator: np.random.BitGenerator) -> torch.Tensor:
    """In place on a flat float32 block: zero entries with probability ``1 - density``, scale
    the rest by ``1 / density``."""
    if density >= 1.0:
        return chunk
    return chunk.mul_(dare_keep(generator, chunk.numel(), density)).div_(density)


def dare(delta: torch.Tensor, density: float, generator: np.random.BitGenerator) -> torch.Tensor:
    """Drop entries with probability ``1 - density``, rescale survivors by ``1 / density``.

    Random numbers are drawn block by block (``CHUNK`` elements, in order), exactly as the merge
    loop draws them, so this function and a merge give the same mask for the same generator.
    """
    check_density(density)
    out = delta.reshape(-1).to(torch.float32, copy=True)
    for start in range(0, out.numel(), CHUNK):
        dare_(out[start:start + CHUNK], density, generator)
    return out.view(delta.shape).to(delta.dtype)


def seed_for(seed: int, name: str, source: int = 0) -> int:
    """A 63-bit seed from (seed, tensor name, source index): independent of tensor order."""
    digest = hashlib.sha256(f"{int(seed)}\x00{name}\x00{int(source)}".encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def dare_generator(seed: int, name: str, source: int = 0) -> np.random.BitGenerator:
    """The bit generator DARE uses for one source's task vector of one tensor."""
    return np.random.SFC64(seed_for(seed, name, source))
