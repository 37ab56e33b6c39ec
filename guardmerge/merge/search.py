"""Model search (the paper's Algorithm 3): sample task-vector densities from Beta(a, b), merge,
evaluate on labelled data, keep the best of N trials.

Trials are cheap: the base and task vectors are loaded once per process and kept in memory,
each candidate is merged in memory by the same kernel as ``guardmerge merge`` (so the saved best
bundle is exactly the evaluated one), evaluation texts are tokenised and windowed once, and with
``dtype="auto"`` the model runs in bfloat16 where the CPU supports it. Every trial is appended to a JSONL file as it
finishes, so an interrupted search loses nothing and ``resume=True`` continues it. A trial is a
plain picklable function of (context, options, trial number): processes (``workers``) or a cluster engine
can run it; results depend only on (seed, trial number), never on the number of workers.

Screening (``SearchOptions.screen``, off by default): a full evaluation costs one forward pass over
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
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Mapping, NamedTuple, Sequence

import numpy as np
import torch

from .._options import identity
from .._progress import format_seconds, progress
from ..exceptions import ConfigError
from .evaluation import (EvalReport, Example, evaluate, load_examples, predicted_label,
                       report_from_predictions)
from .fitting import data_aware, refit_heads, warm_cache
from .heads import merge_head_rows
from .methods import get_method, merge_task_vectors, merge_tensor
from .options import SearchOptions
from .recipe import HeadMode, MergeRecipe, load_recipe
from .regmean import regmean
from .statistics import GramStatistics

__all__ = ["SearchOptions", "TrialResult", "TrialParams", "run_search", "trial_params", "TrialContext",
           "run_trial", "read_results", "screen_subset", "evaluate_sources"]

logger = logging.getLogger("guardmerge.search")


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
    lam: float = 1.0
    alpha: float = 0.9
    report: dict[str, Any] = field(default_factory=dict, repr=False)

    def to_json(self) -> str:
        data = asdict(self)
        data["type"] = "trial"
        return json.dumps(data, sort_keys=True)


@dataclass(frozen=True)
class TrialParams:
    """What a trial merges with: a function of (search seed, trial number) only."""

    densities: list[float]
    seed: int
    method: str
    lam: float
    alpha: float


def trial_params(options: SearchOptions, trial: int, recipe: MergeRecipe) -> TrialParams:
    """Densities ~ Beta(a, b) (per model or shared) and the merge seed, then, where the options
    vary them, the method (uniform over ``methods``), lambda and alpha (uniform over their
    ranges); otherwise the recipe's. Drawn in that order from one generator seeded by
    (search seed, trial), so a trial is the same trial in any search that shares the options."""
    n_models = len(recipe.models)
    rng = np.random.default_rng([options.seed, trial])
    a, b = options.beta
    draws = rng.beta(a, b, size=1 if options.shared_density else n_models)
    if options.shared_density:
        draws = np.repeat(draws, n_models)
    densities = [float(min(1.0, max(options.min_density, round(float(d), 6)))) for d in draws]
    seed = int(rng.integers(0, 2**31 - 1))
    method = recipe.method
    if options.methods:
        method = options.methods[int(rng.integers(0, len(options.methods)))]
    lam, alpha = recipe.lam, recipe.alpha
    if options.lambda_range:
        lam = round(float(rng.uniform(*options.lambda_range)), 6)
    if options.alpha_range:
        alpha = round(float(rng.uniform(*options.alpha_range)), 6)
    return TrialParams(densities, seed, method, lam, alpha)


def objective(options: SearchOptions, report: EvalReport) -> float:
    """The trial's score: mean / min of the heads' macro-F1, or one head's."""
    f1 = {h: r.macro_f1 for h, r in report.heads.items()}
    if options.objective == "mean":
        return sum(f1.values()) / len(f1)
    if options.objective == "min":
        return min(f1.values())
    head = options.objective.split(":", 1)[1]
    if head not in f1:
        raise ConfigError(f"objective head {head!r} has no evaluation data (heads: {sorted(f1)})")
    return f1[head]


class TrialContext:
    """Everything a trial needs, built once per process: base and task vectors in memory, a model
    whose weights each trial overwrites, the evaluation texts tokenised once, and (when a trial
    may need them) the RegMean statistics and the re-fit targets of the calibration texts."""

    def __init__(self, recipe: MergeRecipe, examples: Sequence[Example], *, dtype: str = "float32",
                 batch_size: int = 16, screen: Sequence[int] = (),
                 methods: Sequence[str] = (), progress: bool = False) -> None:
        from .._model import guard_skeleton
        from ..classifier import BundleClassifier, load_tokenizer, resolve_dtype
        from .fitting import calibration_for, refit_targets, regmean_statistics
        from .plan import MergePlan

        self.recipe = recipe
        plan = MergePlan(recipe)
        try:
            self.heads = plan.heads
            self.names = plan.names
            self.specs = plan.specs
            self.head_mode = recipe.head_mode
            self.base: dict[str, torch.Tensor] = {}
            self.deltas: dict[str, list[torch.Tensor]] = {}
            self.head_rows: dict[str, list[torch.Tensor]] = {}
            self.fixed: dict[str, torch.Tensor] = {}
            for name in plan.names:
                if name in plan.module_tensors:  # per head: its owner's, as in a disk merge
                    self.fixed[name] = plan.module_tensor(name)
                elif not plan.specs[name].dtype.is_floating_point:
                    self.fixed[name] = plan.buffer_tensor(name)
                elif name in plan.head_tensors:
                    self.head_rows[name] = plan.head_rows(name)
                else:
                    b = plan.base_tensor(name)
                    self.base[name] = b
                    self.deltas[name] = [plan.source_tensor(i, name).float().sub_(b)
                                         for i in range(len(plan.sources))]
            self.weights = plan.weights
            # data-aware trials: RegMean's statistics stay in the cache and are read one layer
            # at a time; the re-fit's targets are computed once
            self.stats: list[GramStatistics] = []
            self.refit = None
            if data_aware(recipe, methods) or recipe.head_mode is HeadMode.REFIT:
                calibration = calibration_for(plan)
                if data_aware(recipe, methods):
                    self.stats = regmean_statistics(plan, calibration, progress=progress)
                if recipe.head_mode is HeadMode.REFIT:
                    self.refit = refit_targets(plan, calibration, progress=progress)
            config, family = plan.config(), plan.family
            folder = plan.sources[0].folder
        finally:
            plan.close()
        # the same guard model the runtime loads from the bundle this trial would write
        torch_dtype = resolve_dtype(dtype)
        model = guard_skeleton(config, family, self.heads, dtype=torch_dtype)
        self.params = dict(model.state_dict())
        # the re-fit reads features in float32, as merge() does on the saved bundle: a trial
        # scored in bf16 still re-fits exactly the heads the saved best bundle gets
        self._fit_model = model
        if self.refit is not None and torch_dtype != torch.float32:
            self._fit_model = guard_skeleton(config, family, self.heads, dtype=torch.float32)
        self._fit_params = dict(self._fit_model.state_dict())
        missing = [n for n in self.names if n not in self.params]
        if missing:
            raise ConfigError(f"merged tensor names do not match the model: {missing[:5]}")
        self.tokenizer = load_tokenizer(folder)
        self.runtime = BundleClassifier(model, self.tokenizer, self.heads, batch_size=batch_size)
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

    def _regmean(self, name: str, alpha: float) -> torch.Tensor | None:
        module = name[:-len(".weight")] if name.endswith(".weight") else None
        if not self.stats or module not in self.stats[0].rows:
            return None
        if name in self.head_rows:
            if self.head_mode is not HeadMode.MERGE:
                return None
            weights = self.head_rows[name]
        else:
            weights = [self.base[name] + d for d in self.deltas[name]]
        return regmean(weights, [st.gram(module) for st in self.stats], alpha=alpha,
                       scales=self.weights)

    def _merged(self, name: str, params: TrialParams) -> torch.Tensor:
        """Tensor ``name`` of the trial's merge (the same kernels as a disk merge)."""
        method = get_method(params.method)
        solved = self._regmean(name, params.alpha) if method.data_aware else None
        if solved is not None:
            return solved
        if name in self.fixed:
            return self.fixed[name]
        if name in self.head_rows:
            return merge_head_rows(self.recipe.head_mode, method, self.head_rows[name],
                                   self.weights, params.densities, lam=params.lam,
                                   seed=params.seed, name=name)
        if not method.uses_base:
            b = self.base[name]
            return merge_tensor(method, None, [b + d for d in self.deltas[name]], self.weights,
                                params.densities)
        return merge_task_vectors(method, self.base[name], self.deltas[name], self.weights,
                                  params.densities, lam=params.lam, seed=params.seed, name=name)

    def load(self, params: TrialParams) -> None:
        """Merge in memory into the model's weights, then re-fit the heads if the recipe's head
        mode says so."""
        with torch.no_grad():
            for name in self.names:
                # the bundle stores recipe.dtype; round through it so trial == saved bundle
                merged = self._merged(name, params).to(self.specs[name].dtype)
                self.params[name].copy_(merged.view(self.params[name].shape))
                if self._fit_model is not self.runtime.model:
                    self._fit_params[name].copy_(merged.view(self._fit_params[name].shape))
            if self.refit is not None:
                tensors, _ = refit_heads(self._fit_model, self.tokenizer, self.refit)
                for name, t in tensors.items():
                    fitted = t.to(self.specs[name].dtype).view(self.params[name].shape)
                    self.params[name].copy_(fitted)
                    if self._fit_model is not self.runtime.model:
                        self._fit_params[name].copy_(fitted)

    def evaluate(self, stage: str = "full") -> EvalReport:
        """The loaded candidate on every example (``full``) or the screening subset."""
        if stage not in self.sets:
            raise ValueError(f"no {stage!r} evaluation set (stages: {', '.join(self.sets)})")
        ev = self.sets[stage]
        scored = self.runtime.classify_prepared(ev.prepared)
        preds = [predicted_label(scored[ev.position[e.text]].heads[e.head]) for e in ev.examples]
        return report_from_predictions("candidate", ev.examples, preds, self.heads)


_CONTEXT: TrialContext | None = None
_INIT_ERROR: BaseException | None = None


def _init_worker(recipe: Mapping[str, Any], examples: list[Example], dtype: str, batch_size: int,
                 threads: int, screen: Sequence[int] = (), methods: Sequence[str] = ()) -> None:
    global _CONTEXT, _INIT_ERROR
    torch.set_num_threads(max(1, threads))
    try:
        _CONTEXT = TrialContext(MergeRecipe.from_dict(dict(recipe)), examples, dtype=dtype,
                                batch_size=batch_size, screen=screen, methods=methods)
    except BaseException as exc:  # noqa: BLE001 - re-raised by the first trial, in the parent
        # an initializer that raises makes multiprocessing.Pool respawn workers forever
        _INIT_ERROR = exc


def run_trial(options: SearchOptions, trial: int, context: TrialContext | None = None, *,
              stage: str = "full") -> TrialResult:
    """One trial: densities and seed from (search seed, trial), merge in memory, evaluate on
    every example (``stage="full"``) or on the screening subset (``"screen"``)."""
    ctx = context or _CONTEXT
    if ctx is None:
        raise RuntimeError("run_trial needs a TrialContext (or a worker initialised with one)")
    start = time.perf_counter()
    params = trial_params(options, trial, ctx.recipe)
    ctx.load(params)
    report = ctx.evaluate(stage)
    return TrialResult(trial=trial, seed=params.seed, densities=params.densities,
                       score=objective(options, report),
                       heads={h: r.macro_f1 for h, r in report.heads.items()},
                       accuracy={h: r.accuracy for h, r in report.heads.items()},
                       seconds=time.perf_counter() - start, method=params.method,
                       stage=stage, lam=params.lam, alpha=params.alpha, report=report.to_dict())


def _pool_trial(args: tuple[SearchOptions, int, str]) -> TrialResult:
    options, trial, stage = args
    if _INIT_ERROR is not None:
        raise _INIT_ERROR
    return run_trial(options, trial, stage=stage)


def _inputs_sha256(recipe: MergeRecipe, options: SearchOptions) -> dict[str, Any]:
    """The content the trials depend on beyond the recipe's text: every model's weights,
    config and tokenizer, and the calibration texts (a changed file: a different search)."""
    from .fitting import calibration_for, source_key
    from .plan import MergePlan

    plan = MergePlan(recipe)
    try:
        out: dict[str, Any] = {"sources": [source_key(plan, i) for i in range(len(plan.sources))]}
        if recipe.calibration is not None:
            out["calibration"] = calibration_for(plan).sha256
    finally:
        plan.close()
    return out


def _header(recipe: MergeRecipe, options: SearchOptions,
            examples: Sequence[Example]) -> dict[str, Any]:
    data = hashlib.sha256()
    for e in examples:
        for part in (e.head, str(e.label), e.text):
            raw = part.encode("utf-8", "surrogatepass")
            data.update(len(raw).to_bytes(8, "little") + raw)
    recipe_dict = recipe.to_dict()
    recipe_dict.pop("seed", None)
    for m in recipe_dict["models"]:
        m.pop("density", None)
    return {"type": "search", "recipe": recipe_dict, "spec": identity(options),
            "data_sha256": data.hexdigest(), "inputs_sha256": _inputs_sha256(recipe, options)}


def read_results(path: str | os.PathLike[str]) -> tuple[dict[str, Any] | None, list[TrialResult]]:
    """The header and the trials of a results file (a partial last line is skipped)."""
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


class _Search:
    """One run of a search: the results file, the trials done, the best so far, the workers.

    Stage 1 (with screening) scores every trial on the screening subset; stage 2 scores the
    best screening scores (or, without screening, every trial) on every example. Both depend on
    finished results only, so the outcome is the same for any number of workers and across
    resumes.
    """

    def __init__(self, recipe: MergeRecipe, examples: list[Example], out: Path,
                 options: SearchOptions) -> None:
        self.recipe = recipe
        self.examples = examples
        self.options = options
        self.results_path = out / "trials.jsonl"
        header = _header(recipe, options, examples)
        old_header, done = read_results(self.results_path)
        if old_header is not None and not options.resume:
            raise ConfigError(f"{self.results_path}: a search already exists here; pass "
                              "resume=True (--resume) to continue it, or choose another folder")
        if old_header is not None and old_header != json.loads(json.dumps(header)):
            raise ConfigError(f"{self.results_path}: was written by a different search (recipe, "
                              "options or data differ); it cannot be resumed with these settings")
        self.screen = screen_subset(examples, options.screen, options.seed) if options.screen \
            else []
        # (re)write header + completed trials atomically: drops a line half-written by a crash
        tmp = self.results_path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join([json.dumps(header, sort_keys=True) + "\n"] +
                               [t.to_json() + "\n" for t in done]), encoding="utf-8")
        os.replace(tmp, self.results_path)
        self.results = list(done)
        self.finalists: set[int] | None = None  # with screening: set once stage 1 is done
        self.best = self._best()
        self._context: TrialContext | None = None
        self._pool: Any = None
        # ETA per stage: a screening trial and a full one cost very differently. Until a full
        # trial has run, its cost is the screening cost scaled by the text it reads (an
        # overestimate: the merge part does not scale).
        self._text_ratio = (sum(len(e.text) for e in examples) /
                            max(1, sum(len(examples[i].text) for i in self.screen))) \
            if self.screen else 1.0

    # -- bookkeeping -------------------------------------------------------------------------

    def eta(self) -> float | None:
        if not self.screen:
            return None
        costs = {st: [r.seconds for r in self.results if r.stage == st] for st in ("screen", "full")}
        s_mean = sum(costs["screen"]) / len(costs["screen"]) if costs["screen"] else None
        f_mean = (sum(costs["full"]) / len(costs["full"]) if costs["full"]
                  else s_mean * self._text_ratio if s_mean is not None else None)
        if s_mean is None or f_mean is None:
            return None
        left_s = max(0, self.options.trials - len(costs["screen"]))
        left_f = max(0, self.options.n_finalists - len(costs["full"]))
        return (left_s * s_mean + left_f * f_mean) / self.options.workers

    def note(self) -> str:
        """What the progress bar says: the best full score so far, or while screening the best
        screening score (and, with screening, an ETA that prices both stages)."""
        if self.best is not None:
            text = f"best {self.best.score:.4f} (trial {self.best.trial})"
        else:
            top = max((x for x in self.results if x.stage == "screen"),
                      key=lambda x: (x.score, -x.trial), default=None)
            text = f"screening, best {top.score:.4f} (trial {top.trial})" if top else ""
        if self.screen:
            text += f", eta {format_seconds(self.eta())}"
        return text

    def _best(self) -> TrialResult | None:
        """The best full-stage trial; with screening, among the current finalists only (a
        search extended with more trials ranks as a fresh search of that size would)."""
        eligible = [r for r in self.results if r.stage == "full" and
                    (self.finalists is None or r.trial in self.finalists)]
        return max(eligible, key=lambda r: (r.score, -r.trial), default=None)

    def record(self, r: TrialResult, bar: Any) -> None:
        with open(self.results_path, "a", encoding="utf-8") as fh:
            fh.write(r.to_json() + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        self.results.append(r)
        self.best = self._best()
        bar.update(1)
        bar.set_postfix_str(self.note(), refresh=True)

    def missing(self, stage: str, trials: Sequence[int]) -> list[int]:
        have = {r.trial for r in self.results if r.stage == stage}
        return [t for t in trials if t not in have]

    # -- running -----------------------------------------------------------------------------

    def run_stage(self, stage: str, trials: list[int], bar: Any) -> None:
        if not trials:
            return
        opts = self.options
        if opts.workers <= 1:
            if self._context is None:
                self._context = TrialContext(self.recipe, self.examples, dtype=opts.dtype,
                                             batch_size=opts.batch_size, screen=self.screen,
                                             methods=opts.methods, progress=opts.progress)
            for t in trials:
                self.record(run_trial(opts, t, self._context, stage=stage), bar)
            return
        if self._pool is None:
            # statistics and teacher outputs computed once here, so the workers read the cache
            warm_cache(self.recipe, opts.methods, progress=opts.progress)
            threads = max(1, (os.cpu_count() or 2) // opts.workers)
            self._pool = multiprocessing.get_context("spawn").Pool(
                opts.workers, initializer=_init_worker,
                initargs=(self.recipe.to_dict(), self.examples, opts.dtype, opts.batch_size,
                          threads, self.screen, opts.methods))
        for r in self._pool.imap_unordered(_pool_trial, [(opts, t, stage) for t in trials]):
            self.record(r, bar)

    def run(self) -> TrialResult:
        opts = self.options
        total = opts.trials + (opts.n_finalists if self.screen else 0)
        fmt = "{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}{postfix}]" if self.screen else None
        try:
            with progress(total, "search", enabled=opts.progress, unit="trial",
                          initial=len(self.results), bar_format=fmt) as bar:
                if self.screen:
                    self.run_stage("screen", self.missing("screen", range(opts.trials)), bar)
                    screened = sorted((r for r in self.results if r.stage == "screen"),
                                      key=lambda r: (-r.score, r.trial))
                    finalists = sorted(r.trial for r in screened[:opts.n_finalists])
                    self.finalists = set(finalists)
                    self.best = self._best()
                    self.run_stage("full", self.missing("full", finalists), bar)
                else:
                    self.run_stage("full", self.missing("full", range(opts.trials)), bar)
        finally:
            if self._pool is not None:
                self._pool.terminate()
                self._pool.join()
        if self.finalists is not None:  # full scores of trials no longer finalists: not ranked
            self.results = [r for r in self.results
                            if r.stage == "screen" or r.trial in self.finalists]
        self.results.sort(key=lambda r: (r.stage != "screen", r.trial))
        assert self.best is not None  # at least one full trial ran (trials >= 1)
        return self.best


def run_search(recipe: MergeRecipe | Mapping[str, Any] | str | os.PathLike[str],
               data: Sequence[str | os.PathLike[str]] | Sequence[Example],
               out: str | os.PathLike[str], options: SearchOptions | None = None,
               **overrides: Any) -> dict[str, Any]:
    """Run (or resume) a search; write ``out/trials.jsonl``, ``out/best-bundle``, ``out/report.md``.

    ``options`` (``SearchOptions``) or its fields as keywords (``trials=200, screen=100``).
    Returns a summary: the best trial, the files written, the screening stage's figures.
    """
    opts = replace(options or SearchOptions(), **overrides)
    recipe = load_recipe(recipe)
    data_aware = [m for m in opts.methods if get_method(m).data_aware]
    if data_aware and recipe.calibration is None:
        raise ConfigError(f"{recipe.source}: methods {', '.join(data_aware)} need calibration "
                          "texts: add a 'calibration' section to the recipe")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    examples = list(data) if data and isinstance(data[0], Example) else load_examples(data)  # type: ignore[arg-type]
    search = _Search(recipe, examples, out, opts)
    best = search.run()
    results = search.results
    summary: dict[str, Any] = {"trials": opts.trials, "results": str(search.results_path)}
    if search.screen:
        summary["screen"] = {"examples": len(search.screen), "of": len(examples),
                             "finalists": sorted(r.trial for r in results if r.stage == "full")}
    summary["best"] = {"trial": best.trial, "score": best.score, "densities": best.densities,
                       "seed": best.seed, "method": best.method, "lambda": best.lam,
                       "alpha": best.alpha, "heads": best.heads}
    best_recipe = replace(recipe, seed=best.seed, method=best.method, lam=best.lam,
                          alpha=best.alpha).with_densities(best.densities)
    if opts.save_best:
        from .write import merge

        bundle = merge(best_recipe, out / "best-bundle", overwrite=True, progress=False)
        summary["best_bundle"] = str(bundle)
    originals: dict[str, EvalReport] = {}
    if opts.compare_sources:
        originals = evaluate_sources(recipe, examples, dtype=opts.dtype)
    if opts.report:
        from .report import write_search_report

        summary["report"] = str(write_search_report(out, recipe, opts, results, best, originals))
    return summary


def evaluate_sources(recipe: MergeRecipe, examples: Sequence[Example], *,
                     dtype: str = "float32") -> dict[str, EvalReport]:
    """Each source classifier on its own head's examples (the 'original' column)."""
    from ..classifier import BundleClassifier
    from .plan import MergePlan

    plan = MergePlan(recipe)
    try:
        owners = [(s.spec.model, s.folder, [h.name for h in s.heads]) for s in plan.sources]
        merged_heads = {h.name: h for h in plan.heads}
    finally:
        plan.close()
    out: dict[str, EvalReport] = {}
    for model_id, folder, head_names in owners:
        clf = BundleClassifier.from_pretrained(folder, dtype=dtype)
        rename = dict(zip([h.name for h in clf.heads], head_names))
        if len(clf.heads) == 1:
            # a single-head source: its labels as the recipe named them
            clf.relabel(merged_heads[head_names[0]].labels)
        report = evaluate(clf, examples, model=model_id, rename=rename)
        for head in head_names:
            if head in report.heads:
                out[head] = report
    return out
