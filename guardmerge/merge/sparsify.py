"""Task-vector sparsifiers: small pure functions on tensors.

- ``magnitude_trim``: TIES' trim step (Yadav et al. 2023, https://arxiv.org/abs/2306.01708):
  keep the ``k = max(1, int(density * numel))`` largest magnitudes of the tensor, zero the rest.
- ``dare``: DARE's drop-and-rescale (Yu et al. 2024, https://arxiv.org/abs/2311.03099): drop each
  entry with probability ``1 - density`` and scale the kept ones by ``1 / density``, so the
  expectation of the result is the input.
"""

from __future__ import annotations

import hashlib

import torch

__all__ = ["magnitude_trim", "dare", "tensor_generator", "seed_for"]


def _check_density(density: float) -> None:
    if not 0.0 < density <= 1.0:
        raise ValueError(f"density must be in (0, 1], got {density}")


def magnitude_trim(delta: torch.Tensor, density: float) -> torch.Tensor:
    """Keep exactly ``max(1, int(density * numel))`` entries of largest magnitude (new tensor)."""
    _check_density(density)
    if density >= 1.0 or delta.numel() == 0:
        return delta.clone()
    k = max(1, int(density * delta.numel()))
    flat = delta.reshape(-1)
    keep = torch.topk(flat.abs(), k, largest=True, sorted=False).indices
    out = torch.zeros_like(flat)
    out[keep] = flat[keep]
    return out.view_as(delta)


def dare(delta: torch.Tensor, density: float, generator: torch.Generator) -> torch.Tensor:
    """Drop entries with probability ``1 - density``, rescale survivors by ``1 / density``."""
    _check_density(density)
    if density >= 1.0:
        return delta.clone()
    keep = torch.rand(delta.shape, generator=generator, dtype=torch.float32) < density
    return torch.where(keep, delta / density, torch.zeros((), dtype=delta.dtype))


def seed_for(seed: int, name: str) -> int:
    """A 63-bit seed derived from (seed, tensor name): independent of tensor order."""
    digest = hashlib.sha256(f"{int(seed)}\x00{name}".encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def tensor_generator(seed: int, name: str) -> torch.Generator:
    return torch.Generator(device="cpu").manual_seed(seed_for(seed, name))
