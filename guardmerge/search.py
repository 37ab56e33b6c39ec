"""Model search (the paper's Algorithm 3): sample task-vector densities from Beta(a, b), merge,
evaluate on labelled data, keep the best of N trials.

Trials are cheap: the base and task vectors are loaded once per process and kept in memory,
each candidate is merged in memory by the same kernel as ``guardmerge merge`` (so the saved best
bundle is exactly the evaluated one), evaluation texts are tokenised and windowed once, and the
model runs in bfloat16 where the CPU supports it. Every trial is appended to a JSONL file as it
finishes, so an interrupted search loses nothing and ``resume=True`` continues it. A trial is a
plain picklable function of (context, trial spec): processes (``workers``) or a cluster engine
can run it; results depend only on (seed, trial number), never on the number of workers.

Screening (``SearchSpec.screen``, off by default): a full evaluation costs one forward pass over
every evaluation token, so on a 2-core CPU a BERT-base search of hundreds of trials is bounded by
compute, not by overhead. With ``screen=N`` every trial is first scored on a fixed subset of N
examples, stratified by (head, label) and drawn from the search seed; the ``finalists`` best of
those (5% of the trials by default) are then scored on every example, and only full scores pick
the best bundle. Both stages are written to the results file (``stage`` = ``screen`` / ``full``),
so resume and worker-count invariance hold for each.
"""

from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping, NamedTuple, Sequence

import numpy as np
import torch

from ._progress import Progress
from .evaluate import (EvalReport, Example, evaluate, load_examples, predicted_label,
                       report_from_predictions)
from .exceptions import ConfigError
from .merge.methods import METHODS, merge_task_vectors, merge_tensor
from .merge.recipe import MergeRecipe, load_recipe

__all__ = ["SearchSpec", "TrialResult", "run_search", "trial_densities", "TrialContext",
           "run_trial", "read_results", "screen_subset"]

logger = logging.getLogger("guardmerge.search")


@dataclass(frozen=True)
class SearchSpec:
    trials: int = 100
    seed: int = 0
    beta: tuple[float, float] = (2.0, 5.0)
    shared_density: bool = False
    objective: str = "mean"          # mean | min | head:<name>
    min_density: float = 0.01
    screen: int = 0                  # >0: every trial is scored on this many examples first
    finalists: int = 0               # with screen: how many go on to all examples (0: 5%)

    def __post_init__(self) -> None:
        if self.trials < 1:
            raise ConfigError("trials must be >= 1")
        if self.screen < 0 or self.finalists < 0:
            raise ConfigError("screen and finalists must be >= 0")
        if self.finalists and not self.screen:
            raise ConfigError(f"finalists ({self.finalists}) needs screen > 0: without screening "
                              "every trial is evaluated on all examples")
        if self.finalists > self.trials:
            raise ConfigError(f"finalists ({self.finalists}) cannot exceed trials ({self.trials})")
        if min(self.beta) <= 0:
            raise ConfigError(f"beta parameters must be > 0, got {self.beta}")
        if not (self.objective in ("mean", "min") or self.objective.startswith("head:")):
            raise ConfigError(f"objective must be mean, min or head:<name>, got {self.objective!r}")


    @property
    def n_finalists(self) -> int:
        """With screening: the trials (best screening scores) evaluated on every example."""
        return self.finalists or max(1, -(-self.trials // 20))


def screen_subset(examples: Sequence[Example], size: int, seed: int) -> list[int]:
    """Indices of a fixed screening subset: ``size`` examples stratified by (head, label) in
    proportion (largest remainder, at least one per group while there is room), drawn with
    ``seed``. A function of the data and the seed only."""
    if size >= len(examples):
        raise ConfigError(f"screen = {size} must be smaller than the {len(examples)} evaluation "
                          "examples (0 turns screening off)")
    groups: dict[tuple[str, str], list[int]] = {}
    for i, e in enumerate(examples):
        groups.setdefault((e.head, e.label), []).append(i)
    keys = sorted(groups)
    quota = {k: size * len(groups[k]) / len(examples) for k in keys}
    take = {k: min(len(groups[k]), max(1, int(quota[k]))) for k in keys}
    while sum(take.values()) > size:  # more groups than room: drop the smallest quotas' extras
        k = min((k for k in keys if take[k] > 0), key=lambda k: (quota[k], k))
        take[k] -= 1
    for k in sorted(keys, key=lambda k: (-(quota[k] - int(quota[k])), k)):
        if sum(take.values()) >= size:
            break
        if take[k] < len(groups[k]):
            take[k] += 1
    rng = np.random.default_rng([seed, 0x5C])
    chosen: list[int] = []
    for k in keys:
        idx = groups[k]
        chosen += [idx[j] for j in rng.permutation(len(idx))[:take[k]]]
    return sorted(chosen)


class _EvalSet(NamedTuple):
    """Evaluation examples, each distinct text's position, and those texts prepared."""

    examples: list[Example]
    position: dict[str, int]
    prepared: Any


@dataclass
class TrialResult:
    trial: int
    seed: int
    densities: list[float]
    score: float
    heads: dict[str, float]
    accuracy: dict[str, float]
    seconds: float
    method: str = ""
    stage: str = "full"              # "screen": scored on the screening subset only
    report: dict[str, Any] = field(default_factory=dict, repr=False)

    def to_json(self) -> str:
        data = asdict(self)
        data["type"] = "trial"
        return json.dumps(data, sort_keys=True)


def trial_densities(spec: SearchSpec, trial: int, n_models: int) -> tuple[list[float], int]:
    """(densities, merge seed) of a trial: a function of (search seed, trial number) only."""
    rng = np.random.default_rng([spec.seed, trial])
    a, b = spec.beta
    draws = rng.beta(a, b, size=1 if spec.shared_density else n_models)
    if spec.shared_density:
        draws = np.repeat(draws, n_models)
    densities = [float(min(1.0, max(spec.min_density, round(float(d), 6)))) for d in draws]
    return densities, int(rng.integers(0, 2**31 - 1))


def objective(spec: SearchSpec, report: EvalReport) -> float:
    f1 = {h: r.macro_f1 for h, r in report.heads.items()}
    if spec.objective == "mean":
        return sum(f1.values()) / len(f1)
    if spec.objective == "min":
        return min(f1.values())
    head = spec.objective.split(":", 1)[1]
    if head not in f1:
        raise ConfigError(f"objective head {head!r} has no evaluation data (heads: {sorted(f1)})")
    return f1[head]


class TrialContext:
    """Everything a trial needs, built once per process: base and task vectors in memory, a model
    whose weights each trial overwrites, and the evaluation texts tokenised once."""

    def __init__(self, recipe: MergeRecipe, examples: Sequence[Example], *, dtype: str = "auto",
                 batch_size: int = 16, screen: Sequence[int] = ()) -> None:
        from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

        from .classifier import BundleClassifier, resolve_dtype
        from .merge.run import MergePlan

        self.recipe = recipe
        plan = MergePlan(recipe)
        try:
            self.heads = plan.heads
            self.names = plan.names
            self.head_tensors = plan.head_tensors
            self.specs = plan.specs
            self.base: dict[str, torch.Tensor] = {}
            self.deltas: dict[str, list[torch.Tensor]] = {}
            self.fixed: dict[str, torch.Tensor] = {}
            for name in plan.names:
                spec = plan.specs[name]
                if not spec.dtype.is_floating_point:
                    self.fixed[name] = plan._whole_tensor(name)
                elif name in plan.head_tensors:
                    self.deltas[name] = [plan._expand(s, s.index.get(name)) for s in plan.sources]
                else:
                    base_name = plan.base_names[name]
                    b = plan.base_index.get(base_name).float()
                    self.base[name] = b
                    self.deltas[name] = [s.index.get(name).float().sub_(b) for s in plan.sources]
            config = AutoConfig.for_model(**plan.config())
            folder = plan.sources[0].folder
        finally:
            plan.close()
        self.weights = [m.weight for m in recipe.models]
        torch_dtype = resolve_dtype(dtype)
        model = AutoModelForSequenceClassification.from_config(config, dtype=torch_dtype)
        model.eval()
        self.params = dict(model.state_dict())
        missing = [n for n in self.names if n not in self.params]
        if missing:
            raise ConfigError(f"merged tensor names do not match the model: {missing[:5]}")
        tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=False)
        self.runtime = BundleClassifier(model, tokenizer, self.heads, batch_size=batch_size)
        self.examples = list(examples)
        texts = sorted({e.text for e in self.examples})
        position = {t: i for i, t in enumerate(texts)}
        full = _EvalSet(self.examples, position, self.runtime.prepare(texts))
        self.sets = {"full": full}
        if screen:  # a subset of the full set's windows: its texts are not tokenised again
            subset = [self.examples[i] for i in screen]
            sub_texts = sorted({e.text for e in subset})
            self.sets["screen"] = _EvalSet(subset, {t: i for i, t in enumerate(sub_texts)},
                                           full.prepared.select([position[t] for t in sub_texts]))

    def load(self, method: str, densities: Sequence[float], seed: int) -> None:
        """Merge in memory (the same kernel as a disk merge) into the model's weights."""
        r = self.recipe
        with torch.no_grad():
            for name in self.names:
                if name in self.fixed:
                    merged = self.fixed[name]
                elif name in self.head_tensors:
                    expanded = self.deltas[name]
                    if r.head_mode == "owner":
                        merged = torch.stack(expanded).sum(dim=0)
                    else:
                        merged = merge_tensor(method, torch.zeros_like(expanded[0]), expanded,
                                              self.weights, densities, lam=r.lam, seed=seed, name=name)
                elif method == "linear":
                    b = self.base[name]
                    merged = merge_tensor("linear", None, [b + d for d in self.deltas[name]],
                                          self.weights, densities)
                else:
                    merged = merge_task_vectors(method, self.base[name], self.deltas[name],
                                                self.weights, densities, lam=r.lam, seed=seed,
                                                name=name)
                # the bundle stores recipe.dtype; round through it so trial == saved bundle
                merged = merged.to(self.specs[name].dtype)
                self.params[name].copy_(merged.view(self.params[name].shape))

    def evaluate(self, stage: str = "full") -> EvalReport:
        """The loaded candidate on every example (``full``) or the screening subset."""
        if stage not in self.sets:
            raise ValueError(f"no {stage!r} evaluation set (stages: {', '.join(self.sets)})")
        ev = self.sets[stage]
        scored = self.runtime.classify_prepared(ev.prepared)
        preds = [predicted_label(scored[ev.position[e.text]].heads[e.head]) for e in ev.examples]
        return report_from_predictions("candidate", ev.examples, preds, self.heads)


_CONTEXT: TrialContext | None = None


def _init_worker(recipe: Mapping[str, Any], examples: list[Example], dtype: str, threads: int,
                 screen: Sequence[int] = ()) -> None:
    global _CONTEXT
    torch.set_num_threads(max(1, threads))
    _CONTEXT = TrialContext(MergeRecipe.from_dict(dict(recipe)), examples, dtype=dtype,
                            screen=screen)


def run_trial(spec: SearchSpec, trial: int, context: TrialContext | None = None, *,
              stage: str = "full") -> TrialResult:
    """One trial: densities and seed from (search seed, trial), merge in memory, evaluate on
    every example (``stage="full"``) or on the screening subset (``"screen"``)."""
    ctx = context or _CONTEXT
    if ctx is None:
        raise RuntimeError("run_trial needs a TrialContext (or a worker initialised with one)")
    start = time.perf_counter()
    densities, seed = trial_densities(spec, trial, len(ctx.recipe.models))
    ctx.load(ctx.recipe.method, densities, seed)
    report = ctx.evaluate(stage)
    return TrialResult(trial=trial, seed=seed, densities=densities, score=objective(spec, report),
                       heads={h: r.macro_f1 for h, r in report.heads.items()},
                       accuracy={h: r.accuracy for h, r in report.heads.items()},
                       seconds=time.perf_counter() - start, method=ctx.recipe.method,
                       stage=stage, report=report.to_dict())


def _header(recipe: MergeRecipe, spec: SearchSpec, examples: Sequence[Example]) -> dict[str, Any]:
    data_hash = hashlib.sha256("\x00".join(f"{e.head}\x01{e.label}\x01{e.text}"
                                           for e in examples).encode()).hexdigest()
    recipe_dict = recipe.to_dict()
    recipe_dict.pop("seed", None)
    for m in recipe_dict["models"]:
        m.pop("density", None)
    return {"type": "search", "recipe": recipe_dict, "spec": asdict(spec), "data_sha256": data_hash}


def read_results(path: str | os.PathLike[str]) -> tuple[dict[str, Any] | None, list[TrialResult]]:
    header, trials = None, {}
    p = Path(path)
    if not p.exists():
        return None, []
    for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            logger.warning("%s:%d: ignoring a partial line (interrupted write)", p, n)
            continue
        if row.get("type") == "search":
            header = row
        elif row.get("type") == "trial":
            row.pop("type")
            r = TrialResult(**row)
            trials[(r.trial, r.stage)] = r
    return header, [trials[k] for k in sorted(trials, key=lambda k: (k[1] != "screen", k[0]))]


def run_search(recipe: MergeRecipe | Mapping[str, Any] | str | os.PathLike[str],
               data: Sequence[str | os.PathLike[str]] | Sequence[Example], out: str | os.PathLike[str],
               spec: SearchSpec = SearchSpec(), *, workers: int = 1, dtype: str = "auto",
               resume: bool = False, progress: bool = False, save_best: bool = True,
               compare_sources: bool = True, report: bool = True) -> dict[str, Any]:
    """Run (or resume) a search; write ``out/trials.jsonl``, ``out/best-bundle``, ``out/report.md``."""
    recipe = load_recipe(recipe)
    if recipe.method not in METHODS:
        raise ConfigError(f"unknown method {recipe.method}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    results_path = out / "trials.jsonl"
    examples = list(data) if data and isinstance(data[0], Example) else load_examples(data)  # type: ignore[arg-type]
    header = _header(recipe, spec, examples)
    old_header, done = read_results(results_path)
    if old_header is not None and not resume:
        raise ConfigError(f"{results_path}: a search already exists here; pass resume=True "
                          "(--resume) to continue it, or choose another output folder")
    if old_header is not None and old_header != json.loads(json.dumps(header)):
        raise ConfigError(f"{results_path}: was written by a different search (recipe, spec or "
                          "data differ); it cannot be resumed with these settings")
    screen = screen_subset(examples, spec.screen, spec.seed) if spec.screen else []
    # (re)write header + completed trials atomically: drops a line half-written by a crash
    tmp = results_path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join([json.dumps(header, sort_keys=True) + "\n"] +
                           [t.to_json() + "\n" for t in done]), encoding="utf-8")
    os.replace(tmp, results_path)
    results = list(done)
    final_stage = [r for r in results if r.stage == "full"]
    best = max(final_stage, key=lambda r: (r.score, -r.trial), default=None)
    total = spec.trials + (spec.n_finalists if screen else 0)
    bar = Progress(total, "search", enabled=progress)
    bar.done = len(done)

    # ETA per stage: a screening trial and a full one cost very differently. Until a full trial
    # has run, its cost is the screening cost scaled by the text it reads (an overestimate: the
    # merge part does not scale).
    text_ratio = (sum(len(e.text) for e in examples) /
                  max(1, sum(len(examples[i].text) for i in screen))) if screen else 1.0

    def eta() -> float | None:
        if not screen:
            return None
        mean = {st: [r.seconds for r in results if r.stage == st] for st in ("screen", "full")}
        s_mean = sum(mean["screen"]) / len(mean["screen"]) if mean["screen"] else None
        f_mean = (sum(mean["full"]) / len(mean["full"]) if mean["full"]
                  else s_mean * text_ratio if s_mean is not None else None)
        if s_mean is None or f_mean is None:
            return None
        left_s = max(0, spec.trials - len(mean["screen"]))
        left_f = max(0, spec.n_finalists - len(mean["full"]))
        return (left_s * s_mean + left_f * f_mean) / max(1, workers)

    def record(r: TrialResult) -> None:
        nonlocal best
        with open(results_path, "a", encoding="utf-8") as fh:
            fh.write(r.to_json() + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        results.append(r)
        if r.stage == "full" and (best is None or (r.score, -r.trial) > (best.score, -best.trial)):
            best = r
        if best is not None:
            note = f"best {best.score:.4f} (trial {best.trial})"
        else:
            top = max((x for x in results if x.stage == "screen"), key=lambda x: (x.score, -x.trial))
            note = f"screening, best {top.score:.4f} (trial {top.trial})"
        bar.update(1, note=note, eta=eta())

    def missing(stage: str, trials: Sequence[int]) -> list[int]:
        have = {r.trial for r in results if r.stage == stage}
        return [t for t in trials if t not in have]

    pool = None
    ctx: TrialContext | None = None

    def run_stage(stage: str, trials: list[int]) -> None:
        nonlocal pool, ctx
        if not trials:
            return
        if workers <= 1:
            if ctx is None:
                ctx = TrialContext(recipe, examples, dtype=dtype, screen=screen)
            for t in trials:
                record(run_trial(spec, t, ctx, stage=stage))
            return
        if pool is None:
            threads = max(1, (os.cpu_count() or 2) // workers)
            pool = multiprocessing.get_context("spawn").Pool(
                workers, initializer=_init_worker,
                initargs=(recipe.to_dict(), examples, dtype, threads, screen))
        for r in pool.imap_unordered(_pool_trial, [(spec, t, stage) for t in trials]):
            record(r)

    try:
        with bar:
            if screen:
                # stage 1: every trial on the screening subset; stage 2: the best screening
                # scores on every example. Both depend on the finished stage-1 results only, so
                # the outcome is the same for any number of workers and across resumes.
                run_stage("screen", missing("screen", list(range(spec.trials))))
                screened = sorted((r for r in results if r.stage == "screen"),
                                  key=lambda r: (-r.score, r.trial))
                finalists = sorted(r.trial for r in screened[:spec.n_finalists])
                run_stage("full", missing("full", finalists))
            else:
                run_stage("full", missing("full", list(range(spec.trials))))
    finally:
        if pool is not None:
            pool.terminate()
            pool.join()
    results.sort(key=lambda r: (r.stage != "screen", r.trial))
    summary: dict[str, Any] = {"trials": spec.trials, "results": str(results_path)}
    if screen:
        summary["screen"] = {"examples": len(screen), "of": len(examples),
                             "finalists": sorted(r.trial for r in results if r.stage == "full")}
    assert best is not None
    summary["best"] = {"trial": best.trial, "score": best.score, "densities": best.densities,
                       "seed": best.seed, "heads": best.heads}
    best_recipe = MergeRecipe.from_dict({**recipe.to_dict(), "seed": best.seed}).with_densities(
        best.densities)
    if save_best:
        from .merge import merge

        bundle = merge(best_recipe, out / "best-bundle", overwrite=True)
        summary["best_bundle"] = str(bundle)
    originals: dict[str, EvalReport] = {}
    if compare_sources:
        originals = evaluate_sources(recipe, examples, dtype=dtype)
    if report:
        from .report import write_search_report

        summary["report"] = str(write_search_report(out, recipe, spec, results, best, originals))
    return summary


def _pool_trial(args: tuple[SearchSpec, int, str]) -> TrialResult:
    spec, trial, stage = args
    return run_trial(spec, trial, stage=stage)


def evaluate_sources(recipe: MergeRecipe, examples: Sequence[Example], *,
                     dtype: str = "auto") -> dict[str, EvalReport]:
    """Each source classifier on its own head's examples (the 'original' column)."""
    from .classifier import BundleClassifier
    from .merge.run import MergePlan

    plan = MergePlan(recipe)
    try:
        owners = [(s.spec.model, s.folder, [h.name for h in s.heads]) for s in plan.sources]
    finally:
        plan.close()
    out: dict[str, EvalReport] = {}
    for model_id, folder, head_names in owners:
        clf = BundleClassifier.from_pretrained(folder, dtype=dtype)
        rename = dict(zip([h.name for h in clf.heads], head_names))
        if len(clf.heads) == 1:
            # a single-head source: its labels as the recipe named them
            clf.relabel(next(h for h in plan.heads if h.name == head_names[0]).labels)
        report = evaluate(clf, examples, model=model_id, rename=rename)
        for head in head_names:
            if head in report.heads:
                out[head] = report
    return out
