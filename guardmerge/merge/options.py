"""The options of the merge package's entry points, declared once for Python and the CLI.

``MergeOptions`` (``merge()`` / ``guardmerge merge``), ``SearchOptions`` (``run_search()`` /
``guardmerge search``) and ``DistillOptions`` (``distill()`` / ``guardmerge distill``): each
field is a keyword argument and a command-line flag with the same default and help (see
``guardmerge._options``). No torch here: ``guardmerge --help`` reads these.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .._options import option
from ..classifier import DType, dtype_name
from ..exceptions import ConfigError

__all__ = ["MergeOptions", "SearchOptions", "DistillOptions"]


@dataclass(frozen=True)
class MergeOptions:
    """How ``merge()`` / ``guardmerge merge`` writes the bundle (the recipe says what to merge)."""

    overwrite: bool = option(False, "replace an existing output folder")
    progress: bool = option(True, "a progress bar on stderr (only on a terminal)",
                            negative_help="no progress bar")


@dataclass(frozen=True)
class SearchOptions:
    """Everything ``run_search`` / ``guardmerge search`` takes besides recipe, data and output.

    Fields marked as identity (the sampling and the objective) define the search: resuming
    with different values is refused, because the trials on disk would not be the same trials.
    """

    trials: int = option(100, "number of trials (raise it with --resume to extend a finished "
                         "search: the trials already run are kept)")
    seed: int = option(0, "search seed: trial k's densities and merge seed come from (seed, k)",
                       identity=True)
    beta: tuple[float, float] = option((2.0, 5.0), "densities ~ Beta(A, B)",
                                       metavar=("A", "B"), identity=True)
    shared_density: bool = option(False, "one density for all models (default: one per model)",
                                  identity=True)
    objective: str = option("mean", "what a trial maximises over the heads' macro-F1: mean, "
                            "min or head:NAME", identity=True)
    min_density: float = option(0.01, "densities are clipped to at least this", identity=True)
    screen: int = option(0, "score every trial on N examples (stratified by head and label) "
                         "first; only the best go on to all examples (0: off)", metavar="N",
                         identity=True)
    finalists: int = option(0, "with --screen: trials evaluated on all examples (0: 5% of "
                            "the trials)", metavar="K", identity=True)
    methods: tuple[str, ...] = option((), "merge methods a trial draws from, uniformly (e.g. ties "
                                      "dare_ties regmean; default: the recipe's)",
                                      metavar="METHOD", identity=True)
    lambda_range: tuple[float, float] | None = option(
        None, "lambda ~ uniform(LO, HI) per trial (default: the recipe's lambda)",
        metavar=("LO", "HI"), identity=True)
    alpha_range: tuple[float, float] | None = option(
        None, "RegMean's alpha ~ uniform(LO, HI) per trial (default: the recipe's alpha)",
        metavar=("LO", "HI"), identity=True)
    workers: int = option(1, "processes running trials (results do not depend on it)")
    dtype: DType = option("float32", "dtype trials are scored in: float32, bfloat16, float16 "
                          "or auto (bf16 where the CPU has it: about 2x faster on this machine)",
                          parse=dtype_name)
    batch_size: int = option(16, "windows per forward pass while scoring")
    resume: bool = option(False, "continue the search already in the output folder")
    progress: bool = option(True, "a progress bar on stderr (only on a terminal)",
                            negative_help="no progress bar")
    save_best: bool = option(True, "write the best trial's bundle to OUT/best-bundle", cli=False)
    compare_sources: bool = option(True, "evaluate the source models too (the report's "
                                   "original column)", cli=False)
    report: bool = option(True, "write OUT/report.md (with plots if matplotlib is there)",
                          cli=False)

    def __post_init__(self) -> None:
        if self.trials < 1:
            raise ConfigError(f"trials: must be >= 1, got {self.trials}")
        if self.screen < 0 or self.finalists < 0:
            raise ConfigError("screen and finalists: must be >= 0")
        if self.finalists and not self.screen:
            raise ConfigError(f"finalists ({self.finalists}) needs screen > 0: without screening "
                              "every trial is evaluated on all examples")
        if self.finalists > self.trials:
            raise ConfigError(f"finalists ({self.finalists}) cannot exceed trials ({self.trials})")
        if len(self.beta) != 2 or min(self.beta) <= 0:
            raise ConfigError(f"beta: two parameters > 0, got {self.beta}")
        if not (self.objective in ("mean", "min") or self.objective.startswith("head:")):
            raise ConfigError(f"objective: must be mean, min or head:<name>, got {self.objective!r}")
        if not 0 < self.min_density <= 1:
            raise ConfigError(f"min_density: must be in (0, 1], got {self.min_density}")
        if self.workers < 1:
            raise ConfigError(f"workers: must be >= 1, got {self.workers}")
        if self.batch_size < 1:
            raise ConfigError(f"batch_size: must be >= 1, got {self.batch_size}")
        object.__setattr__(self, "beta", tuple(float(x) for x in self.beta))
        object.__setattr__(self, "dtype", dtype_name(self.dtype))
        object.__setattr__(self, "methods", tuple(self.methods))
        from .methods import METHODS  # imports torch: only a search builds these options

        for m in self.methods:
            if m not in METHODS:
                raise ConfigError(f"methods: unknown merge method {m!r} (known: "
                                  f"{', '.join(METHODS)})")
        for name, lo_ok, hi in (("lambda_range", 0.0, None), ("alpha_range", 0.0, 1.0)):
            rng = getattr(self, name)
            if rng is None:
                continue
            rng = tuple(float(x) for x in rng)
            if len(rng) != 2 or not all(math.isfinite(x) for x in rng) or not \
                    (lo_ok < rng[0] <= rng[1]) or (hi is not None and rng[1] > hi):
                raise ConfigError(f"{name}: expected LO <= HI in ({lo_ok:g}, "
                                  f"{'inf' if hi is None else f'{hi:g}'}], got {rng}")
            object.__setattr__(self, name, rng)

    @property
    def n_finalists(self) -> int:
        """With screening: the trials (best screening scores) evaluated on every example."""
        return self.finalists or max(1, -(-self.trials // 20))


@dataclass(frozen=True)
class DistillOptions:
    """How ``distill()`` / ``guardmerge distill`` trains."""

    epochs: int = option(1, "passes over the texts")
    steps: int | None = option(None, "stop after this many optimiser steps (default: all "
                               "epochs)")
    lr: float = option(5e-5, "peak learning rate (AdamW; linear warm-up, then linear decay)")
    warmup: float = option(0.06, "fraction of the steps spent warming up the learning rate")
    weight_decay: float = option(0.01, "AdamW weight decay")
    batch_size: int = option(32, "texts per optimiser step")
    max_length: int = option(128, "tokens per text (longer texts are cut)")
    temperature: float = option(1.0, "distillation temperature T")
    label_weight: float = option(0.0, "weight of a cross-entropy term on the texts whose row "
                                 "names a head and a label (0: labels ignored, pure "
                                 "distillation)")
    limit: int | None = option(None, "use at most this many texts (a hash-spread sample; "
                               "default: all)")
    seed: int = option(0, "shuffling seed")
    dtype: DType = option("auto", "compute dtype: bfloat16 autocast (auto: where the CPU has "
                          "native bf16) or float32; weights stay float32", parse=dtype_name)
    cache: str | None = option(None, "cache folder for teacher outputs (default: "
                               "$GUARDMERGE_CACHE or ~/.cache/guardmerge)")
    overwrite: bool = option(False, "replace an existing output folder")
    progress: bool = option(True, "a progress bar on stderr (only on a terminal)",
                            negative_help="no progress bar")

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}: must be >= 1, got {getattr(self, name)}")
        if self.steps is not None and self.steps < 1:
            raise ConfigError(f"steps: must be >= 1, got {self.steps}")
        if self.limit is not None and self.limit < 1:
            raise ConfigError(f"limit: must be >= 1, got {self.limit}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ConfigError(f"lr: must be a positive number, got {self.lr}")
        if not 0 <= self.warmup < 1:
            raise ConfigError(f"warmup: must be in [0, 1), got {self.warmup}")
        if not (self.temperature > 0 and math.isfinite(self.temperature)):
            raise ConfigError(f"temperature: must be > 0, got {self.temperature}")
        if not (self.label_weight >= 0 and math.isfinite(self.label_weight)):
            raise ConfigError(f"label_weight: must be a number >= 0, got {self.label_weight}")
        if self.max_length < 3:
            raise ConfigError(f"max_length: must be >= 3, got {self.max_length}")
        object.__setattr__(self, "dtype", dtype_name(self.dtype))
