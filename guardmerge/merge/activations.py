"""Running models over calibration texts: what re-fit, RegMean and distillation read from them.

- ``load_model``: a classifier folder as a float32 transformers model and its tokenizer.
- ``batches``: texts tokenised (truncated to ``max_length``) in fixed-size padded batches.
- ``logits`` / ``head_probabilities``: a model's logits on texts and their per-head softmax
  (the teachers' outputs).
- ``output_inputs``: what the output layer reads (its input features), per text.
- ``linear_grams``: for every linear layer, ``X^T X`` of its inputs over non-pad tokens.

Everything runs under ``torch.inference_mode`` in batches, so memory is bounded by one batch of
activations plus what is accumulated (features: texts x hidden; Gram matrices: one per layer).
Results are float64 where they are sums (Gram matrices) and deterministic for a given thread
count.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch

from .._progress import progress
from ..bundle import output_layer_prefix
from ..labels import Head

__all__ = ["load_model", "batches", "logits", "head_probabilities", "output_layer",
           "output_inputs", "linear_grams", "linear_modules"]

logger = logging.getLogger("guardmerge.merge")


def load_model(folder: str | Path) -> tuple[Any, Any]:
    """(model, tokenizer) of a classifier folder, float32, eval mode; safetensors only."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=False)
    model = AutoModelForSequenceClassification.from_pretrained(
        folder, dtype=torch.float32, use_safetensors=True, trust_remote_code=False)
    model.eval()
    return model, tokenizer


def batches(tokenizer: Any, texts: Sequence[str], *, max_length: int,
            batch_size: int) -> Iterator[tuple[int, dict[str, torch.Tensor]]]:
    """(start index, encoded batch) over ``texts`` in order, each batch padded to its longest."""
    for start in range(0, len(texts), batch_size):
        enc = tokenizer(list(texts[start:start + batch_size]), truncation=True,
                        max_length=max_length, padding=True, return_tensors="pt")
        yield start, {k: v for k, v in enc.items() if k in ("input_ids", "attention_mask",
                                                           "token_type_ids")}


def progress_bar(total: int, desc: str, enabled: bool) -> Any:
    return progress(total, desc, enabled=enabled, unit="text")


def logits(model: Any, tokenizer: Any, texts: Sequence[str], *, max_length: int = 128,
           batch_size: int = 32, desc: str = "logits", show_progress: bool = False) -> torch.Tensor:
    """The model's logits on ``texts`` (``[len(texts), num_labels]``, float32)."""
    out = torch.empty(len(texts), int(model.config.num_labels))
    with torch.inference_mode(), progress_bar(len(texts), desc, show_progress) as bar:
        for start, enc in batches(tokenizer, texts, max_length=max_length, batch_size=batch_size):
            z = model(**enc).logits.float()
            out[start:start + len(z)] = z
            bar.update(len(z))
    return out


def head_probabilities(logits: torch.Tensor, heads: Sequence[Head], *,
                       temperature: float = 1.0) -> dict[str, torch.Tensor]:
    """Per head (``heads`` with offsets into these logits): softmax(logits / T) over the head's
    labels, one row per text."""
    z = logits.float() / temperature
    return {h.name: torch.softmax(z[:, h.offset:h.stop], dim=-1) for h in heads}


def output_layer(model: Any) -> torch.nn.Module:
    """The final linear layer of a sequence classifier (the module HM3 expands)."""
    return model.get_submodule(output_layer_prefix(model.config.model_type))


def output_inputs(model: Any, tokenizer: Any, texts: Sequence[str], *, max_length: int = 128,
                  batch_size: int = 32, desc: str = "features",
                  show_progress: bool = False) -> torch.Tensor:
    """What the output layer reads for each text (``[len(texts), in_features]``, float32): the
    representation a head's rows are applied to."""
    layer = output_layer(model)
    rows: list[torch.Tensor] = []

    def grab(_module: Any, args: tuple[torch.Tensor, ...]) -> None:
        rows.append(args[0].detach().float().reshape(-1, args[0].shape[-1]).clone())

    handle = layer.register_forward_pre_hook(grab)
    try:
        with torch.inference_mode(), progress_bar(len(texts), desc, show_progress) as bar:
            for _, enc in batches(tokenizer, texts, max_length=max_length, batch_size=batch_size):
                model(**enc)
                bar.update(len(enc["input_ids"]))
    finally:
        handle.remove()
    return torch.cat(rows) if rows else torch.empty(0, layer.in_features)


def linear_modules(model: Any, names: set[str]) -> dict[str, torch.nn.Linear]:
    """The model's ``nn.Linear`` modules whose ``weight`` is one of the tensors ``names``."""
    return {n: m for n, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and f"{n}.weight" in names}


def linear_grams(model: Any, tokenizer: Any, texts: Sequence[str], modules: Sequence[str], *,
                 max_length: int = 128, batch_size: int = 16, desc: str = "statistics",
                 show_progress: bool = False,
                 ) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
    """``{module: X^T X}`` (float64, ``[in, in]``) of every listed linear layer's inputs over
    the non-pad tokens of ``texts``, and ``{module: rows}``, the number of input vectors summed
    (tokens; texts for layers that read one vector per text, such as a pooler or the output
    layer)."""
    grams: dict[str, torch.Tensor] = {}
    rows: dict[str, int] = {}
    state: dict[str, Any] = {}

    def hook(name: str) -> Callable[..., None]:
        def fn(_module: Any, args: tuple[torch.Tensor, ...]) -> None:
            x = args[0].detach()
            mask = state["mask"]
            if x.dim() == 3 and x.shape[:2] == mask.shape:
                x = x[mask]                       # token-level input: non-pad tokens only
            x = x.reshape(-1, x.shape[-1]).float()
            g = (x.T @ x).double()  # float32 products per batch, summed in float64
            if name in grams:
                grams[name] += g
            else:
                grams[name] = g
            rows[name] = rows.get(name, 0) + x.shape[0]
        return fn

    targets = dict(model.named_modules())
    handles = [targets[m].register_forward_pre_hook(hook(m)) for m in modules]
    try:
        with torch.inference_mode(), progress_bar(len(texts), desc, show_progress) as bar:
            for _, enc in batches(tokenizer, texts, max_length=max_length, batch_size=batch_size):
                state["mask"] = enc["attention_mask"].bool()
                model(**enc)
                bar.update(len(enc["input_ids"]))
    finally:
        for h in handles:
            h.remove()
    return grams, rows
