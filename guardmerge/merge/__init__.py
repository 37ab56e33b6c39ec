"""HM3 merging: N classifiers with different label spaces -> one multi-head guard bundle.

What lives here, in the order data flows:

- ``recipe``, ``options``: the YAML recipe, validated (``MergeRecipe``, ``HeadMode``), and the
  options of ``merge()`` / ``run_search()`` (no torch: the CLI's flags come from them)
- ``sparsify``, ``methods``: the merge maths as small functions on tensors (TIES trim, DARE,
  one generalised task-arithmetic kernel; ``Method`` / ``Sparsify`` describe each method)
- ``heads``: HM3 padding and the merged / owner head rows (one implementation for the on-disk
  merge and the in-memory search)
- ``plan``: sources loaded and checked, heads laid out, tensors read on demand
- ``calibration``, ``activations``, ``statistics``: unlabelled calibration texts, running
  models over them, and the cached statistics (Gram matrices, teacher logits)
- ``regmean``, ``refit``, ``fitting``: RegMean's closed form, the head re-fit, and the
  data-aware steps that run them for a plan
- ``write``: the streamed block merge and the atomic bundle writer (``merge()``)
- ``distillation``: multi-teacher distillation of a merged bundle (``distill()``)
- ``interference``: the dry-run report on how much the sources' task vectors interfere
  (``mergeability()``)
- ``evaluation``: labelled data, per-head metrics, the paper's Table-1 comparison
- ``search``, ``report``: the density search (Algorithm 3) and its report

It may import the request-path modules (``guardmerge.bundle``, ``labels``, ``classifier``...),
never ``guardmerge.tools`` or ``guardmerge.testing``. The public API is exactly ``__all__``;
names load on first use, so ``guardmerge.merge.options`` (the CLI's flags) needs no torch.
"""

import importlib as _importlib
import typing as _typing

_EXPORTS = {
    "EvalReport": "evaluation", "Example": "evaluation", "HeadReport": "evaluation",
    "collapse_warnings": "evaluation", "comparison_table": "evaluation", "evaluate": "evaluation", "load_examples": "evaluation",
    "metrics": "evaluation", "render_comparison": "evaluation",
    "METHODS": "methods", "Method": "methods", "Sparsify": "methods",
    "merge_task_vectors": "methods", "merge_tensor": "methods",
    "DistillOptions": "options", "MergeOptions": "options", "SearchOptions": "options",
    "distill": "distillation", "MergeabilityReport": "interference",
    "mergeability": "interference",
    "MergePlan": "plan",
    "HeadMode": "recipe", "MergeRecipe": "recipe", "ModelSpec": "recipe", "load_recipe": "recipe",
    "TrialResult": "search", "read_results": "search", "run_search": "search",
    "dare": "sparsify", "magnitude_trim": "sparsify",
    "merge": "write",
}

__all__ = sorted(_EXPORTS)

if _typing.TYPE_CHECKING:  # pragma: no cover - for type checkers and IDEs
    from .evaluation import (EvalReport, Example, HeadReport, collapse_warnings,
                             comparison_table, evaluate, load_examples, metrics,
                             render_comparison)
    from .methods import METHODS, Method, Sparsify, merge_task_vectors, merge_tensor
    from .distillation import distill
    from .interference import MergeabilityReport, mergeability
    from .options import DistillOptions, MergeOptions, SearchOptions
    from .plan import MergePlan
    from .recipe import HeadMode, MergeRecipe, ModelSpec, load_recipe
    from .search import TrialResult, read_results, run_search
    from .sparsify import dare, magnitude_trim
    from .write import merge


def __getattr__(name: str) -> "_typing.Any":
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'guardmerge.merge' has no attribute {name!r}")
    value = getattr(_importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> "list[str]":
    return sorted(set(globals()) | set(__all__))
