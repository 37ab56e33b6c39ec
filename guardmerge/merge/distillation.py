"""Multi-teacher distillation: train a merged bundle (encoder and heads) to match every source.

A training-free merge of full fine-tunes caps linear heads below their sources (the merged
encoder's features are a compromise). A short distillation closes most of the gap without
labels: every source model (the teacher of its heads) scores the unlabelled texts once, and the
bundle is trained so that each head's softmax matches its teacher's:

    loss = sum_heads T^2 * KL( softmax(z_teacher / T) || softmax(z_student_head / T) )

(for a multi-label head, each label's Bernoulli KL between the sigmoids, summed over labels).

Where the texts carry labels (rows naming a head and a label, as ``eval``'s data does) and
``label_weight`` is above 0, a supervised term is added:

    loss += label_weight * (sum over labelled (text, head) pairs in the batch of
                            CE(label, softmax(z_student_head))) / (number of such pairs)

(a multi-label head's pair: the binary cross-entropy summed over its labels). The teachers
still score every text. With labels the student learns from the data its sources learnt from
as well as from the sources; without them (the default) it learns from the sources only.

Teacher logits are computed once per (source hash, texts hash) and cached (``statistics``), so
every epoch, and a re-run, reuses them. The result is a bundle of the same format (same heads,
labels, sources and recipe in the manifest, plus a ``distillation`` record); the runtime loads
it unchanged and it still runs one encoder pass for all heads (a per-head bundle's own head
modules are trained with it and stay per head). It is written to a temporary
folder and renamed at the end: an interrupted run leaves no half bundle.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from .._atomic import atomic_directory
from .._model import save_weights
from .._progress import progress as progress_bar
from .._safetensors import FLOAT_DTYPES
from ..bundle import (
    copy_tokenizer,
    hash_files,
    inspect_bundle,
    resolve_model_dir,
    weight_files,
    write_manifest,
)
from ..classifier import resolve_dtype
from ..exceptions import ConfigError
from ..labels import Head
from .activations import batches, head_probabilities, load_model
from .calibration import load_calibration
from .options import DistillOptions
from .plan import ST_TO_DTYPE
from .refit import divergence
from .statistics import cache_dir, model_key, teacher_logits

__all__ = ["distill", "teachers_for"]

logger = logging.getLogger("guardmerge.merge")


@dataclass
class _Teacher:
    source: str
    folder: Path
    sha256: str
    pairs: list[tuple[Head, Head]]   # (head in the bundle, the same head in the teacher)


def teachers_for(bundle_heads: Sequence[Head], sources: Mapping[str, str] | None = None
                 ) -> list[_Teacher]:
    """Group the bundle's heads by the model they came from (the manifest's source ids, or
    ``sources``: head name -> folder / Hub id to use instead). A source whose weights changed
    since the merge (content hash) is an error unless it was given explicitly."""
    sources = dict(sources or {})
    unknown = sorted(set(sources) - {h.name for h in bundle_heads})
    if unknown:
        raise ConfigError(f"sources given for heads the bundle does not have: {unknown} (its "
                          f"heads: {', '.join(h.name for h in bundle_heads)})")
    groups: dict[str, list[Head]] = {}
    for h in bundle_heads:
        model = sources.get(h.name) or h.source
        if not model:
            raise ConfigError(f"head {h.name!r}: the manifest names no source model; pass it "
                              f"(--source {h.name}=DIR)")
        groups.setdefault(model, []).append(h)
    teachers = []
    for model, heads in groups.items():
        folder, _ = resolve_model_dir(model, heads[0].revision if model == heads[0].source else None)
        info = inspect_bundle(folder)
        theirs = {h.name: h for h in info.heads}
        if len(heads) > 1 and all(h.name in theirs for h in heads):
            pairs = [(h, theirs[h.name]) for h in heads]  # a bundle source: its heads by name
        elif len(info.heads) == len(heads):
            pairs = list(zip(heads, info.heads))  # a classifier (renamed by the recipe)
        else:
            pairs = []
        if not pairs or any(a.size != b.size or a.kind != b.kind for a, b in pairs):
            raise ConfigError(f"{model}: has heads {[(h.name, h.size) for h in info.heads]} but "
                              f"the bundle takes {[(h.name, h.size) for h in heads]} from it")
        sha = hash_files(weight_files(folder))
        explicit = any(h.name in sources for h in heads)
        recorded = heads[0].sha256
        if recorded and sha != recorded and not explicit:
            raise ConfigError(f"{model}: its weights changed since the merge (sha256 {sha[:12]} "
                              f"!= {recorded[:12]} in the manifest); pass --source "
                              f"{heads[0].name}=DIR to distil from it anyway")
        teachers.append(_Teacher(model, folder, model_key(folder, sha), pairs))
    return teachers


def _lr_lambda(total: int, warmup: int):
    def fn(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (total - step) / max(1, total - warmup))
    return fn


def distill(bundle: str | os.PathLike[str], texts: Sequence[str | os.PathLike[str]],
            output: str | os.PathLike[str], options: DistillOptions | None = None, *,
            sources: Mapping[str, str] | None = None, **overrides: Any) -> Path:
    """Distil every source into the merged ``bundle`` on the ``texts`` (files, as for
    calibration; their labels are read only with ``label_weight`` > 0); write the trained
    bundle to ``output``. ``options`` (``DistillOptions``) or its fields as keywords. Returns
    the output path."""
    opts = replace(options or DistillOptions(), **overrides)
    info = inspect_bundle(bundle)
    data = load_calibration(texts, limit=opts.limit, heads=[h.name for h in info.heads],
                            labels=info.heads if opts.label_weight else None)
    if opts.label_weight and not data.labelled:
        kept = f" among the {data.size} kept by limit={opts.limit}" if opts.limit else ""
        raise ConfigError(f"label_weight is {opts.label_weight:g} but no text{kept} in "
                          f"{', '.join(data.files)} has a label (rows need a head and a label)")
    corpus = list(data.texts)
    teachers = teachers_for(info.heads, sources)
    cache = cache_dir(opts.cache)
    with atomic_directory(output, overwrite=opts.overwrite) as tmp:
        targets: list[tuple[Head, torch.Tensor]] = []  # bundle head, teacher probabilities
        for t in teachers:
            logits = teacher_logits(t.folder, t.sha256, corpus, max_length=opts.max_length,
                                    cache=cache, show_progress=opts.progress,
                                    desc=f"teacher {t.pairs[0][0].name}")
            probs = head_probabilities(logits, [theirs for _, theirs in t.pairs],
                                       temperature=opts.temperature)
            for mine, theirs in t.pairs:
                if mine.kind != theirs.kind:
                    raise ConfigError(f"{t.source}: head {theirs.name!r} is {theirs.kind}, the "
                                      f"bundle's {mine.name!r} is {mine.kind}")
                targets.append((mine, probs[theirs.name]))
        model, tokenizer = load_model(info.path)  # trained in float32 (autocast computes)
        report = _train(model, tokenizer, corpus, targets, opts,
                        _label_targets(info.heads, data.labels) if opts.label_weight else {})
        stored = {d for d in info.weight_dtypes if d in FLOAT_DTYPES}
        if len(stored) == 1:  # written back in the bundle's own float dtype (a bf16 stays bf16)
            model.to(ST_TO_DTYPE[stored.pop()])
        save_weights(model, tmp / info.weight_files[0].name)
        (tmp / "config.json").write_text(json.dumps(info.config, indent=2, sort_keys=True) + "\n",
                                         encoding="utf-8")
        copy_tokenizer(info.path, tmp)
        manifest = dict(info.manifest or {})
        extra = {k: v for k, v in manifest.items()
                 if k not in {"format", "format_version", "guardmerge_version", "heads", "recipe"}}
        extra["distillation"] = {
            "from": str(bundle), "texts": data.describe(),
            "options": {k: v for k, v in asdict(opts).items()
                        if k not in {"overwrite", "progress", "cache"}},
            "teachers": {t.source: t.sha256 for t in teachers}, **report}
        write_manifest(tmp, info.heads, manifest.get("recipe"), extra=extra,
                       module_tensors=info.module_tensors())
    return Path(output).expanduser().resolve()


def _epoch_batches(lengths: list[int], batch_size: int, gen: torch.Generator,
                   group: int = 50) -> list[list[int]]:
    """One epoch's batches: a seeded shuffle, cut into groups of ``group`` batches, each group
    sorted by length before it is cut into batches, then the batches shuffled. Texts of similar
    length share a batch, so padding (to the longest in the batch) costs little: the demo's
    texts range from 10-token reviews to 128-token jailbreaks."""
    order = torch.randperm(len(lengths), generator=gen).tolist()
    chunk = batch_size * group
    out: list[list[int]] = []
    for start in range(0, len(order), chunk):
        part = sorted(order[start:start + chunk], key=lambda i: lengths[i])
        out += [part[b:b + batch_size] for b in range(0, len(part), batch_size)]
    return [out[i] for i in torch.randperm(len(out), generator=gen).tolist()]


def _label_targets(heads: Sequence[Head], labels: Sequence[Mapping[str, Any]]
                   ) -> dict[str, tuple[Head, torch.Tensor, torch.Tensor]]:
    """Per head with at least one label: (head, targets, mask) over the texts. A single-label
    head's targets are class indices; a multi-label head's a 0 / 1 matrix. ``mask``: labelled
    texts."""
    out = {}
    for h in heads:
        mask = torch.tensor([h.name in lab for lab in labels], dtype=torch.bool)
        if not mask.any():
            continue
        if h.multi_label:
            y = torch.zeros(len(labels), h.size)
            for i, lab in enumerate(labels):
                for name in lab.get(h.name, ()):
                    y[i, h.labels.index(name)] = 1.0
        else:
            y = torch.tensor([h.labels.index(lab[h.name]) if h.name in lab else 0
                              for lab in labels], dtype=torch.long)
        out[h.name] = (h, y, mask)
    return out


def _supervised(logits: torch.Tensor, idx: list[int],
                labelled: Mapping[str, tuple[Head, torch.Tensor, torch.Tensor]]
                ) -> tuple[torch.Tensor, dict[str, tuple[float, int]]]:
    """The batch's cross-entropy summed over its labelled (text, head) pairs, and per head
    (its sum, its pairs), for the running means."""
    total = torch.zeros(())
    parts = {}
    rows = torch.tensor(idx)
    for name, (h, y, mask) in labelled.items():
        keep = mask[rows]
        if not keep.any():
            continue
        z = logits[keep][:, h.offset:h.stop]
        target = y[rows][keep]
        if h.multi_label:
            ce = torch.nn.functional.binary_cross_entropy_with_logits(z, target, reduction="sum")
        else:
            ce = torch.nn.functional.cross_entropy(z, target, reduction="sum")
        total = total + ce
        parts[name] = (float(ce.detach()), int(keep.sum()))
    return total, parts


def _train(model: Any, tokenizer: Any, texts: list[str],
           targets: list[tuple[Head, torch.Tensor]], opts: DistillOptions,
           labelled: Mapping[str, tuple[Head, torch.Tensor, torch.Tensor]] | None = None
           ) -> dict[str, Any]:
    """The training loop; returns what the manifest records: steps, seconds, and per head the
    mean KL to its teacher during the first and the last epoch (running means while training),
    and with labels (``labelled``: from ``_label_targets``) the mean cross-entropy per labelled
    pair likewise."""
    labelled = labelled or {}
    n = len(texts)
    per_epoch = math.ceil(n / opts.batch_size)
    total = min(opts.steps, per_epoch * opts.epochs) if opts.steps else per_epoch * opts.epochs
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=opts.lr, weight_decay=opts.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(total, max(1, int(opts.warmup * total))))
    gen = torch.Generator().manual_seed(opts.seed)
    amp = resolve_dtype(opts.dtype)
    amp = None if amp == torch.float32 else amp  # autocast's compute dtype; weights stay fp32
    t2 = opts.temperature ** 2
    kl_sum = {h.name: 0.0 for h, _ in targets}
    ce_sum = {name: [0.0, 0] for name in labelled}
    first: dict[str, float] | None = None
    first_ce: dict[str, float] | None = None
    epoch_ce: dict[str, float] = {}
    seen = 0
    step = 0
    start = time.perf_counter()
    # Dropout stays off: a re-fitted head sits on exact features, and dropout noise alone moved
    # the demo's merged heads by a mean KL of 0.5-2.5 from their teachers (measured); with it
    # the first steps undo the re-fit instead of improving on it.
    model.eval()
    lengths = [len(ids) for ids in tokenizer(texts, truncation=True, max_length=opts.max_length,
                                             add_special_tokens=True)["input_ids"]]
    with progress_bar(total, "distill", enabled=opts.progress, unit="step") as bar:
        while step < total:
            for idx in _epoch_batches(lengths, opts.batch_size, gen):
                if step >= total:
                    break
                sub, enc = next(batches(tokenizer, [texts[i] for i in idx],
                                        max_length=opts.max_length, batch_size=len(idx)))
                idx = [idx[j] for j in sub]  # the encoded rows' order (longest first)
                with torch.autocast("cpu", dtype=amp, enabled=amp is not None):
                    logits = model(**enc).logits
                logits = logits.float()
                scaled = logits / opts.temperature
                loss = torch.zeros(())
                for h, probs in targets:
                    kl = divergence(probs[idx], scaled[:, h.offset:h.stop], h.multi_label)
                    kl_sum[h.name] += float(kl.detach()) * len(idx)
                    loss = loss + t2 * kl
                if labelled:
                    ce, parts = _supervised(logits, idx, labelled)
                    pairs = sum(count for _, count in parts.values())
                    if pairs:
                        loss = loss + opts.label_weight * ce / pairs
                    for name, (value, count) in parts.items():
                        ce_sum[name][0] += value
                        ce_sum[name][1] += count
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                opt.step()
                sched.step()
                opt.zero_grad(set_to_none=True)
                step += 1
                seen += len(idx)
                bar.update(1)
                bar.set_postfix_str(f"loss {float(loss.detach()):.4f}", refresh=False)
            epoch_kl = {k: v / max(1, seen) for k, v in kl_sum.items()}
            epoch_ce = {k: v / count for k, (v, count) in ce_sum.items() if count}
            if first is None:
                first, first_ce = epoch_kl, epoch_ce
            kl_sum = {k: 0.0 for k in kl_sum}
            ce_sum = {k: [0.0, 0] for k in ce_sum}
            seen = 0
    out = {"steps": total, "seconds": round(time.perf_counter() - start, 1),
           "mean_kl_first_epoch": {k: round(v, 6) for k, v in (first or {}).items()},
           "mean_kl_last_epoch": {k: round(v, 6) for k, v in epoch_kl.items()}}
    if labelled:
        out["mean_ce_first_epoch"] = {k: round(v, 6) for k, v in (first_ce or {}).items()}
        out["mean_ce_last_epoch"] = {k: round(v, 6) for k, v in epoch_ce.items()}
    return out
