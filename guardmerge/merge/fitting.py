"""The data-aware steps of a merge, on the recipe's calibration texts: RegMean statistics of the
plan's sources, and the re-fit of a merged model's heads. Shared by ``merge()`` (on disk) and the
search (in memory), so both do exactly the same thing.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from ..exceptions import DataError
from .activations import head_features, head_probabilities, linear_modules
from .calibration import CalibrationSet, load_calibration
from .plan import MergePlan
from .refit import fit_head
from .statistics import (
    GramStatistics,
    cache_dir,
    gram_statistics,
    model_key,
    teacher_logits,
)

__all__ = ["data_aware", "warm_cache", "source_key", "calibration_for", "linear_layer_names", "regmean_statistics", "RefitTargets",
           "refit_targets", "refit_heads"]

logger = logging.getLogger("guardmerge.merge")


def source_key(plan: MergePlan, i: int) -> str:
    """What keys source ``i``'s cached statistics: weights, config and tokenizer files."""
    return model_key(plan.sources[i].folder, plan.source_sha256(i))


def calibration_for(plan: MergePlan) -> CalibrationSet:
    """The recipe's calibration texts (a text may name any of the plan's heads)."""
    spec = plan.recipe.calibration
    if spec is None:
        raise ValueError("the recipe has no calibration section")
    return load_calibration(spec.texts, limit=spec.limit, heads=[h.name for h in plan.heads])


def linear_layer_names(plan: MergePlan) -> list[str]:
    """The merged model's linear layers (module names), found on a weightless ("meta") copy of
    the architecture: every layer RegMean solves (the encoder's and the output layer; never a
    head module, which is per head). A source that is itself a per-head bundle has no one input
    for its output layer (each head's rows read their own modules' output), so with such a
    source the output layer is left to the head mode's plain merge."""
    from .._model import guard_skeleton
    from ..bundle import PER_HEAD

    with torch.device("meta"):
        model = guard_skeleton(plan.config(), plan.family, plan.heads)
    names = set(plan.names) - plan.module_tensors
    if any(s.layout == PER_HEAD for s in plan.sources):
        names -= plan.head_tensors
    return sorted(linear_modules(model, names))


def regmean_statistics(plan: MergePlan, calibration: CalibrationSet, *,
                       progress: bool = False) -> list[GramStatistics]:
    """Per source, the Gram statistics of every linear layer on its calibration texts (those
    naming one of its heads, and those naming none), from the cache or computed now."""
    spec = plan.recipe.calibration
    assert spec is not None
    modules = linear_layer_names(plan)
    out = []
    texts_per_source = []
    for s in plan.sources:
        names = [h.name for h in s.heads]
        texts = calibration.for_head(names, spec.per_source)
        if not texts:
            raise DataError(f"no calibration texts for {s.spec.model} (heads: "
                            f"{', '.join(names)}): every text names another head; add texts "
                            "that name one of these heads, or texts that name none")
        texts_per_source.append(texts)
    for i, (s, texts) in enumerate(zip(plan.sources, texts_per_source)):
        names = [h.name for h in s.heads]
        out.append(gram_statistics(s.folder, source_key(plan, i), texts, modules,
                                   max_length=spec.max_length, cache=cache_dir(spec.cache),
                                   show_progress=progress, desc=f"statistics {names[0]}"))
    return out


@dataclass
class _HeadTarget:
    name: str
    offset: int                 # in the merged logits
    stop: int
    target: torch.Tensor        # [texts, labels]: the source's probabilities at the refit
                                # temperature (softmax, or a sigmoid per label: multi_label)
    weight: torch.Tensor        # the source's rows (start of the fit)
    bias: torch.Tensor
    multi_label: bool = False


@dataclass
class RefitTargets:
    """What a re-fit needs, computed once: the texts, and per head its source's outputs on them
    and its source's rows."""

    texts: list[str]
    heads: list[_HeadTarget]
    weight_name: str
    bias_name: str
    temperature: float
    pull: float
    max_length: int
    calibration: dict[str, Any]


def refit_targets(plan: MergePlan, calibration: CalibrationSet, *,
                  progress: bool = False) -> RefitTargets:
    """Teacher outputs (cached on disk) and starting rows for every head of the plan."""
    spec, cal = plan.recipe.refit, plan.recipe.calibration
    assert cal is not None
    texts = calibration.sample(spec.texts)
    weight_name, bias_name = f"{plan.head_prefix}.weight", f"{plan.head_prefix}.bias"
    if bias_name not in plan.head_tensors:
        raise ValueError(f"{plan.head_prefix} has no bias; re-fit expects weight and bias")
    merged = {h.name: h for h in plan.heads}
    heads = []
    for i, s in enumerate(plan.sources):
        logits = teacher_logits(s.folder, source_key(plan, i), texts, max_length=cal.max_length,
                                cache=cache_dir(cal.cache), show_progress=progress,
                                desc=f"teacher {s.heads[0].name}")
        w, b = plan.source_tensor(i, weight_name).float(), plan.source_tensor(i, bias_name).float()
        probs = head_probabilities(logits, s.heads, temperature=spec.temperature)
        for h in s.heads:  # offsets within this source
            m = merged[h.name]
            heads.append(_HeadTarget(h.name, m.offset, m.stop, probs[h.name],
                                     w[h.offset:h.stop], b[h.offset:h.stop], h.multi_label))
    return RefitTargets(texts=texts, heads=heads, weight_name=weight_name, bias_name=bias_name,
                        temperature=spec.temperature, pull=spec.pull, max_length=cal.max_length,
                        calibration=calibration.describe())


def refit_heads(model: Any, tokenizer: Any, targets: RefitTargets, *, batch_size: int = 32,
                progress: bool = False) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Fit every head's rows of the (merged) guard model's output layer to its source's
    outputs, on what those rows read: the merged encoder's output after the head's own modules
    (which stay as they are). Returns the new output-layer tensors (float32) and a report of
    the mean KL to each source before and after."""
    features = head_features(model, tokenizer, targets.texts, max_length=targets.max_length,
                             batch_size=batch_size, desc="refit features", show_progress=progress)
    layer = model.output_layer
    weight = layer.weight.detach().float().clone()
    bias = layer.bias.detach().float().clone()
    report: dict[str, Any] = {}
    for h in targets.heads:
        fit = fit_head(features[model.group_of(h.name)], h.target, h.weight, h.bias,
                       temperature=targets.temperature, pull=targets.pull,
                       multi_label=h.multi_label)
        weight[h.offset:h.stop] = fit.weight
        bias[h.offset:h.stop] = fit.bias
        report[h.name] = {"kl_before": round(fit.kl_before, 6), "kl_after": round(fit.kl_after, 6)}
        logger.info("refit %s: mean KL to its source %.4f -> %.4f", h.name, fit.kl_before,
                    fit.kl_after)
    summary = {"texts": len(targets.texts), "temperature": targets.temperature,
               "pull": targets.pull, "max_length": targets.max_length, "heads": report}
    return {targets.weight_name: weight, targets.bias_name: bias}, summary


def data_aware(recipe: Any, methods: Sequence[str] = ()) -> bool:
    """Whether merging the recipe (or any of ``methods`` instead of its own) needs RegMean's
    statistics."""
    from .methods import get_method

    return any(get_method(m).data_aware for m in set(methods) | {recipe.method})


def warm_cache(recipe: Any, methods: Sequence[str] = (), *, progress: bool = False) -> None:
    """Compute (or find in the cache) the statistics and teacher outputs that merging the
    recipe reads (with ``methods``: trials of those methods too), so that later merges, search
    workers or build steps only read the cache."""
    from .recipe import HeadMode

    refit = recipe.head_mode is HeadMode.REFIT
    if not (data_aware(recipe, methods) or refit):
        return
    plan = MergePlan(recipe)
    try:
        calibration = calibration_for(plan)
        if data_aware(recipe, methods):
            regmean_statistics(plan, calibration, progress=progress)
        if refit:
            refit_targets(plan, calibration, progress=progress)
    finally:
        plan.close()
