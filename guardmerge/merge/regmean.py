"""RegMean (Jin et al. 2023, https://arxiv.org/abs/2212.09849): merge linear layers by
regression on their inputs.

For a linear layer ``y = x W^T`` (torch's ``[out, in]`` weight) with source weights ``W_i`` and
input Gram matrices ``G_i = X_i^T X_i`` (source i's own activations, non-pad tokens), the merged
weight minimises ``sum_i c_i ||X_i W^T - X_i W_i^T||^2``:

    W = (sum_i c_i W_i G_i~) (sum_i c_i G_i~)^-1,   G_i~ = alpha G_i + (1 - alpha) diag(G_i)

``alpha`` in (0, 1] shrinks the off-diagonal terms (the paper's regularisation: at alpha -> 0
every input dimension is fitted on its own, which is a per-column weighted mean of the
``W_i``). Our dialect: ``G_i`` is normalised by its row count (``X^T X / rows``), so sources
count equally whatever their number of calibration tokens, and ``c_i`` is the recipe's
``weight``. Solved in float64.

Every other tensor (biases, embeddings, LayerNorm) is the weighted mean of the sources (the
paper: "simple averaging"); output layers follow the recipe's head mode (``merge``: RegMean on
the HM3-padded rows, with the output layer's input statistics). Directions of the input space
that no calibration row spans (alpha = 1 with fewer rows than inputs, or an input that is always
zero) are unconstrained by the regression: there the weighted mean of the sources is kept.
"""

from __future__ import annotations

from typing import Sequence

import torch

__all__ = ["regmean", "regularised_gram"]

#: below this reciprocal condition number a Gram direction is treated as unconstrained
_RCOND = 1e-10


def regularised_gram(gram: torch.Tensor, alpha: float) -> torch.Tensor:
    """``alpha G + (1 - alpha) diag(G)`` (float64)."""
    g = gram.double()
    if alpha >= 1.0:
        return g
    return alpha * g + (1.0 - alpha) * torch.diag(torch.diagonal(g))


def regmean(weights: Sequence[torch.Tensor], grams: Sequence[torch.Tensor], *, alpha: float,
            scales: Sequence[float] | None = None) -> torch.Tensor:
    """The RegMean merge of linear weights ``W_i`` (``[out, in]``) with input Grams ``G_i``
    (``[in, in]``); float32 result. ``scales``: the per-source ``c_i`` (default 1)."""
    if not weights or len(weights) != len(grams):
        raise ValueError("one Gram matrix per weight (and at least one weight)")
    if not 0.0 < alpha <= 1.0:
        raise ValueError(f"alpha must be in (0, 1], got {alpha}")
    scales = [1.0] * len(weights) if scales is None else list(scales)
    num = torch.zeros(weights[0].shape, dtype=torch.float64)
    den = torch.zeros(grams[0].shape, dtype=torch.float64)
    for w, g, c in zip(weights, grams, scales):
        if g.shape != (w.shape[1], w.shape[1]):
            raise ValueError(f"Gram matrix of shape {tuple(g.shape)} does not fit a weight of "
                             f"shape {tuple(w.shape)}")
        gr = regularised_gram(g, alpha)
        num += float(c) * (w.double() @ gr)
        den += float(c) * gr
    mean = sum(float(c) * w.double() for w, c in zip(weights, scales)) / float(sum(scales))
    # W den = num  <=>  den W^T = num^T (den is symmetric positive semi-definite). Cholesky
    # when den is well conditioned; otherwise (alpha = 1 with fewer calibration rows than
    # inputs, or an input no token ever used) the equations say nothing about part of the input
    # space, and there the weighted mean of the sources is kept:
    # W = M + (num - M den) pinv(den), which is num den^-1 whenever den is invertible.
    factor, info = torch.linalg.cholesky_ex(den)
    diag = torch.diagonal(factor)
    if int(info) == 0 and float(diag.min()) > 0 and \
            float((diag.min() / diag.max()) ** 2) > _RCOND:
        solved = torch.cholesky_solve(num.T, factor).T
    else:
        values, vectors = torch.linalg.eigh(den)
        keep = values > _RCOND * float(values.max().clamp_min(0))
        inv = (vectors[:, keep] / values[keep]) @ vectors[:, keep].T
        solved = mean + (num - mean @ den) @ inv
    return solved.to(torch.float32).contiguous()
