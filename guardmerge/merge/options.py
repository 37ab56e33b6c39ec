"""The options of the merge package's entry points, declared once for Python and the CLI.

``MergeOptions`` (``merge()`` / ``guardmerge merge``) and ``SearchOptions`` (``run_search()`` /
``guardmerge search``): each field is a keyword argument and a command-line flag with the same
default and help (see ``guardmerge._options``). No torch here: ``guardmerge --help`` reads these.
"""

from __future__ import annotations

from dataclasses import dataclass

from .._options import option
from ..classifier import DType, dtype_name
from ..exceptions import ConfigError

__all__ = ["MergeOptions", "SearchOptions"]


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

    trials: int = option(100, "number of trials", identity=True)
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

    @property
    def n_finalists(self) -> int:
        """With screening: the trials (best screening scores) evaluated on every example."""
        return self.finalists or max(1, -(-self.trials // 20))
