"""Head re-fit (``head_mode: refit``): after the encoder is merged, each head's rows of the
output layer are fitted to its source model's output distribution on unlabelled texts.

A merged encoder's features drift away from what each source's head was trained on, so a head
copied from its source (``owner``) often no longer fits: on the demo's family it collapsed to
one class. Re-fit keeps the encoder and re-learns only the small linear heads:

    min_{W,b}  mean_t KL( softmax(z_src(t) / T) || softmax((W f(t) + b) / T) )
               + pull * (||W - W_src||^2 + ||b - b_src||^2)

where ``f(t)`` is what the head's rows of the merged model's output layer read for text ``t``
(the merged encoder's output after the head's own modules, which are kept) and ``z_src(t)`` the
source's logits for its own head. For a multi-label (sigmoid) head the KL is that of each
label's Bernoulli, summed over labels. No labels are used. Started from the source's rows, solved by
L-BFGS in float64 (deterministic); the problem is small (texts x hidden features).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

__all__ = ["FitResult", "fit_head", "divergence"]


@dataclass(frozen=True)
class FitResult:
    weight: torch.Tensor     # [labels, hidden], float32
    bias: torch.Tensor       # [labels], float32
    kl_before: float         # mean KL to the source with the starting rows
    kl_after: float


def divergence(target: torch.Tensor, logits: torch.Tensor, multi_label: bool = False
               ) -> torch.Tensor:
    """Mean over rows of KL(target || model): a softmax over ``logits`` (target rows are
    distributions), or for a multi-label head each label's Bernoulli KL between ``target``
    (probabilities) and ``sigmoid(logits)``, summed over labels."""
    if multi_label:
        p = target.clamp(1e-12, 1 - 1e-12)
        logq, log1mq = F.logsigmoid(logits), F.logsigmoid(-logits)
        kl = p * (torch.log(p) - logq) + (1 - p) * (torch.log1p(-p) - log1mq)
        return kl.sum(dim=-1).mean()
    logq = torch.log_softmax(logits, dim=-1)
    logp = torch.log(target.clamp_min(1e-12))
    return (target * (logp - logq)).sum(dim=-1).mean()


def fit_head(features: torch.Tensor, target: torch.Tensor, weight: torch.Tensor,
             bias: torch.Tensor, *, temperature: float = 1.0, pull: float = 1e-6,
             max_iter: int = 200, multi_label: bool = False) -> FitResult:
    """Fit one head's rows (``weight`` ``[labels, hidden]``, ``bias``) so that
    ``softmax((features @ W.T + b) / T)`` matches ``target`` (``[texts, labels]``, rows summing
    to 1, e.g. the source's softmax at temperature T); with ``multi_label``, so that each
    label's ``sigmoid`` matches its target probability."""
    if features.shape[0] != target.shape[0] or target.shape[1] != weight.shape[0]:
        raise ValueError(f"features {tuple(features.shape)}, target {tuple(target.shape)} and "
                         f"weight {tuple(weight.shape)} do not fit together")
    f = features.double()
    p = target.double()
    w0, b0 = weight.detach().double(), bias.detach().double()
    w = w0.clone().requires_grad_(True)
    b = b0.clone().requires_grad_(True)

    def _kl(target: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        return divergence(target, logits, multi_label)

    def loss_fn() -> torch.Tensor:
        kl = _kl(p, (f @ w.T + b) / temperature)
        return kl + pull * ((w - w0).pow(2).sum() + (b - b0).pow(2).sum())

    with torch.no_grad():
        before = float(_kl(p, (f @ w0.T + b0) / temperature))
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=max_iter, tolerance_grad=1e-9,
                            tolerance_change=1e-12, history_size=20, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = loss_fn()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    with torch.no_grad():
        after = float(_kl(p, (f @ w.T + b) / temperature))
    return FitResult(weight=w.detach().float(), bias=b.detach().float(), kl_before=before,
                     kl_after=after)
