"""HM3 heads: the output layers of N classifiers with different label spaces, as one layer.

Each source's output-layer tensors (weight ``[labels_i, hidden]``, bias ``[labels_i]``) are
zero-padded to the full label count at the source's logit offset (the base gets an all-zero
head), so every model has the same shapes (the paper's HM3 expansion). The padded rows are then
either merged by the recipe's method (``head_mode: merge``, the paper) or taken from the model
that owns them (``owner``: the rows are disjoint, so their sum is an exact copy).

``refit`` starts from the owners' rows and then re-fits them on the merged encoder
(``refit.py``). This is the one implementation of these steps; the on-disk merge and the
in-memory search call it.
"""

from __future__ import annotations

from typing import Sequence

import torch

from .methods import Method, merge_tensor
from .recipe import HeadMode

__all__ = ["expand_rows", "merge_head_rows"]


def expand_rows(tensor: torch.Tensor, offset: int, total: int) -> torch.Tensor:
    """``tensor`` (rows = this source's labels) placed at rows ``offset:offset+len`` of a
    float32 zero tensor with ``total`` rows."""
    out = torch.zeros((total,) + tuple(tensor.shape[1:]), dtype=torch.float32)
    out[offset:offset + tensor.shape[0]] = tensor.float()
    return out


def merge_head_rows(mode: HeadMode, method: "str | Method", expanded: Sequence[torch.Tensor],
                    weights: Sequence[float], densities: Sequence[float], *, lam: float,
                    seed: int, name: str) -> torch.Tensor:
    """The merged output-layer tensor ``name`` from the sources' expanded tensors (float32).

    ``owner`` (and ``refit``, before its fit): each head's rows exactly as its source has
    them. ``merge``: the rows go through ``method`` against the base's all-zero head, like any
    other tensor.
    """
    if HeadMode(mode) in (HeadMode.OWNER, HeadMode.REFIT):
        return torch.stack(list(expanded)).sum(dim=0)  # rows are disjoint: an exact copy
    return merge_tensor(method, torch.zeros_like(expanded[0]), list(expanded), weights, densities,
                        lam=lam, seed=seed, name=name)
