"""HM3 merging: N classifiers with different label spaces -> one multi-head guard bundle."""

from .methods import METHODS, merge_task_vectors, merge_tensor
from .recipe import MergeRecipe, ModelSpec, load_recipe
from .run import MergePlan, merge, plan_merge
from .sparsify import dare, magnitude_trim

merge_from_recipe = merge

__all__ = ["METHODS", "MergePlan", "MergeRecipe", "ModelSpec", "dare", "load_recipe",
           "magnitude_trim", "merge", "merge_from_recipe", "merge_task_vectors", "merge_tensor",
           "plan_merge"]
