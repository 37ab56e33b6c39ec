"""Running models over calibration texts: what re-fit, RegMean and distillation read from them.

- ``load_model``: a classifier or bundle folder as a float32 guard model (``guardmerge._model``:
  the encoder once, each head's own modules) and its tokenizer.
- ``batches``: texts tokenised (truncated to ``max_length``) in fixed-size padded batches of
  similar lengths (little padding; each row goes back to its text's index).
- ``logits`` / ``head_probabilities``: a model's logits on texts and their per-head
  probabilities (softmax or sigmoid per the head's kind: the teachers' outputs).
- ``head_features``: what each head's rows of the output layer read (after the head's own
  modules), per text: what a re-fit fits on.
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
from ..labels import Head

__all__ = ["load_model", "batches", "logits", "head_probabilities", "head_features",
           "linear_grams", "linear_modules"]

logger = logging.getLogger("guardmerge.merge")


def load_model(folder: str | Path) -> tuple[Any, Any]:
    """(guard model, tokenizer) of a classifier or bundle folder, float32, eval mode;
    safetensors only, checked as the runtime checks it."""
    from .._model import load_guard_model
    from ..bundle import inspect_bundle
    from ..classifier import load_tokenizer

    info = inspect_bundle(folder)
    model = load_guard_model(info, torch.float32)
    return model, load_tokenizer(info.path)


def batches(tokenizer: Any, texts: Sequence[str], *, max_length: int,
            batch_size: int) -> Iterator[tuple[list[int], dict[str, torch.Tensor]]]:
    """(indices into ``texts``, encoded batch) over ``texts``, each batch padded to its longest.

    Batches are made of texts of similar length (sorted by token count, longest first; ties
    in input order), so little is padding: on the demo's calibration texts, 176k padded
    tokens instead of 527k for batches in input order. A model's output for a text does not
    depend on what else is in its batch (the padding is masked), so callers put each row back
    at its index; the order is a pure function of the texts, so results stay deterministic.
    """
    texts = list(texts)
    if not texts:
        return
    lengths = [len(ids) for ids in tokenizer(texts, truncation=True, max_length=max_length,
                                              add_special_tokens=True)["input_ids"]]
    order = sorted(range(len(texts)), key=lambda i: -lengths[i])
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        enc = tokenizer([texts[i] for i in idx], truncation=True, max_length=max_length,
                        padding=True, return_tensors="pt")
        yield idx, {k: v for k, v in enc.items() if k in ("input_ids", "attention_mask",
                                                         "token_type_ids")}


def progress_bar(total: int, desc: str, enabled: bool) -> Any:
    return progress(total, desc, enabled=enabled, unit="text")


def logits(model: Any, tokenizer: Any, texts: Sequence[str], *, max_length: int = 128,
           batch_size: int = 32, desc: str = "logits", show_progress: bool = False) -> torch.Tensor:
    """The model's logits on ``texts`` (``[len(texts), num_labels]``, float32)."""
    out = torch.empty(len(texts), int(model.config.num_labels))
    with torch.inference_mode(), progress_bar(len(texts), desc, show_progress) as bar:
        for idx, enc in batches(tokenizer, texts, max_length=max_length, batch_size=batch_size):
            z = model(**enc).logits.float()
            out[idx] = z
            bar.update(len(z))
    return out


def head_probabilities(logits: torch.Tensor, heads: Sequence[Head], *,
                       temperature: float = 1.0) -> dict[str, torch.Tensor]:
    """Per head (``heads`` with offsets into these logits): its probabilities at temperature T,
    one row per text (softmax over a single-label head's labels, a sigmoid per label of a
    multi-label head)."""
    z = logits.float() / temperature
    return {h.name: torch.sigmoid(z[:, h.offset:h.stop]) if h.multi_label else
            torch.softmax(z[:, h.offset:h.stop], dim=-1) for h in heads}


def head_features(model: Any, tokenizer: Any, texts: Sequence[str], *, max_length: int = 128,
                  batch_size: int = 32, desc: str = "features",
                  show_progress: bool = False) -> list[torch.Tensor]:
    """Per head group of a guard model (``model.groups``: one for a plain bundle, one per head
    for a per-head bundle), what its rows of the output layer read for each text
    (``[len(texts), in_features]``, float32): the head's own modules' output."""
    width = model.output_layer.in_features
    out = [torch.empty(len(texts), width) for _ in model.groups]
    with torch.inference_mode(), progress_bar(len(texts), desc, show_progress) as bar:
        for idx, enc in batches(tokenizer, texts, max_length=max_length, batch_size=batch_size):
            for k, f in enumerate(model.features(**enc)):
                out[k][idx] = f.detach().float()
            bar.update(len(idx))
    return out


def linear_modules(model: Any, names: set[str]) -> dict[str, torch.nn.Linear]:
    """The model's ``nn.Linear`` modules whose ``weight`` is one of the tensors ``names``."""
    return {n: m for n, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and f"{n}.weight" in names}


def linear_grams(model: Any, tokenizer: Any, texts: Sequence[str], modules: Sequence[str], *,
                 max_length: int = 128, batch_size: int = 16, desc: str = "statistics",
                 show_progress: bool = False,
                 ) -> tuple[dict[str, torch.Tensor], dict[str, int], dict[str, str]]:
    """``{module: X^T X}`` (float64, ``[in, in]``) of the listed linear layers' inputs over the
    non-pad tokens of ``texts``, ``{module: rows}`` (the input vectors summed: tokens, or texts
    for layers that read one vector per text, such as a pooler or the output layer), and
    ``{module: same_as}``: layers that read the very same input as another (an attention
    block's query, key and value) share that one's matrix, computed and kept once."""
    grams: dict[str, torch.Tensor] = {}
    rows: dict[str, int] = {}
    aliases: dict[str, str] = {}
    state: dict[str, Any] = {"first": True}

    def hook(name: str) -> Callable[..., None]:
        def fn(_module: Any, args: tuple[torch.Tensor, ...]) -> None:
            raw = args[0]  # the module's very input object (detach would make a new one)
            if name in aliases:
                return
            # the same input tensor (not just equal values): the key holds a reference, so no
            # freed block can be reused by another input under the same address in this pass
            key = (raw.data_ptr(), tuple(raw.shape), tuple(raw.stride()))
            seen = state["seen"].get(key)
            if seen is not None and seen[1] is raw:
                if state["first"]:  # decided on the first batch, kept for every batch
                    aliases[name] = seen[0]
                return
            state["seen"][key] = (name, raw)
            x = raw.detach()
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
                state["seen"] = {}
                model(**enc)
                state["first"] = False
                bar.update(len(enc["input_ids"]))
    finally:
        for h in handles:
            h.remove()
    return grams, rows, aliases
