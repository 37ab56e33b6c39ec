"""Merge recipes: YAML in the spirit of mergekit's, validated strictly.

    base: ./bert-base-uncased            # bare encoder (BertModel / BertForMaskedLM) or classifier
    method: dare_ties                    # linear | task_arithmetic | ties | dare_ties | dare_linear
    head_mode: merge                     # merge: head rows go through the method (the paper)
                                         # owner: each head's rows copied from the model owning them
    seed: 0
    dtype: float32                       # output weights: float32 | bfloat16 | float16
    parameters: {lambda: 1.0, weight: 1.0, density: 0.5}   # defaults for every model
    models:
      - model: ./jailbreak-classifier    # local folder or Hub id
        head: jailbreak                  # head name (default: from the model id)
        labels: [benign, jailbreak]      # rename labels (e.g. LABEL_0, LABEL_1)
        weight: 1.0
        density: 0.6

One model is a self-merge (the paper's Table 7): the model's task vector through the method
alone, e.g. DARE at a low density.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field, replace
from enum import Enum
from typing import Any, Mapping, Sequence

from .._validate import Checker, load_yaml, parse_yaml
from ..exceptions import RecipeError
from ..labels import HEAD_NAME, duplicates
from .methods import METHODS

__all__ = ["MergeRecipe", "ModelSpec", "HeadMode", "load_recipe", "OUTPUT_DTYPES"]


class HeadMode(str, Enum):
    """What happens to the HM3-padded output layers."""

    MERGE = "merge"    # the padded head rows go through the merge method (the paper)
    OWNER = "owner"    # each head's rows are copied from the model that owns them


OUTPUT_DTYPES = ("float32", "bfloat16", "float16")
_TOP = {"base", "base_revision", "method", "head_mode", "seed", "dtype", "parameters", "models",
        "name"}
_PARAMS = {"lambda", "weight", "density"}
#: lambda and weights are float32 factors in the merge kernels: finite, and finite there too
_F32_MAX = 3.4028234663852886e38
_MODEL = {"model", "revision", "head", "labels", "weight", "density"}


@dataclass(frozen=True)
class ModelSpec:
    model: str
    head: str | None = None
    labels: tuple[str, ...] | None = None
    weight: float = 1.0
    density: float = 1.0
    revision: str | None = None


@dataclass(frozen=True)
class MergeRecipe:
    base: str
    models: tuple[ModelSpec, ...]
    method: str = "dare_ties"
    head_mode: HeadMode = HeadMode.MERGE
    seed: int = 0
    dtype: str = "float32"
    lam: float = 1.0
    base_revision: str | None = None
    name: str | None = None
    source: str = field(default="<recipe>", compare=False)

    @property
    def self_merge(self) -> bool:
        return len(self.models) == 1

    def with_densities(self, densities: Sequence[float]) -> "MergeRecipe":
        """A copy with new per-model densities (used by model search)."""
        if len(densities) != len(self.models):
            raise ValueError("one density per model")
        return replace(self, models=tuple(replace(m, density=float(d))
                                          for m, d in zip(self.models, densities)))

    def to_dict(self) -> dict[str, Any]:
        """The recipe as written into a bundle's manifest (rebuilds the bundle bit-for-bit)."""
        return {
            "name": self.name,
            "base": self.base,
            "base_revision": self.base_revision,
            "method": self.method,
            "head_mode": self.head_mode.value,
            "seed": self.seed,
            "dtype": self.dtype,
            "parameters": {"lambda": self.lam},
            "models": [
                {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(m).items()}
                for m in self.models
            ],
        }

    # -- loading -----------------------------------------------------------------------------

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> "MergeRecipe":
        return cls.from_dict(load_yaml(path, RecipeError), source=str(path))

    @classmethod
    def from_yaml(cls, text: str, *, source: str = "<string>") -> "MergeRecipe":
        return cls.from_dict(parse_yaml(text, source, RecipeError), source=source)

    @classmethod
    def from_dict(cls, data: Any, *, source: str = "<dict>") -> "MergeRecipe":
        c = Checker(source)
        top = c.mapping(data, "", required=("base", "models"), allowed=_TOP)
        if top is None:
            c.raise_if_any(RecipeError)
            raise AssertionError("unreachable")
        base = c.string(top.get("base"), "base") if "base" in top else None
        method = top.get("method", "dare_ties")
        c.choice(method, "method", list(METHODS))
        head_mode = c.choice(top.get("head_mode", "merge"), "head_mode",
                             [m.value for m in HeadMode])
        dtype = top.get("dtype", "float32")
        c.choice(dtype, "dtype", OUTPUT_DTYPES)
        seed = c.integer(top.get("seed", 0), "seed", lo=0)
        base_revision = top.get("base_revision")
        if base_revision is not None:
            c.string(base_revision, "base_revision")
        name = top.get("name")
        if name is not None:
            c.string(name, "name")
        params = c.mapping(top.get("parameters", {}) or {}, "parameters", allowed=_PARAMS) or {}
        lam = _factor(c, params.get("lambda", 1.0), "parameters.lambda")
        dweight = _factor(c, params.get("weight", 1.0), "parameters.weight")
        ddensity = c.number(params.get("density", 1.0), "parameters.density", lo=0.0, hi=1.0,
                            lo_open=True)

        models: list[ModelSpec] = []
        raw_models = top.get("models")
        if "models" in top and (not isinstance(raw_models, list) or not raw_models):
            c.add("models", "expected a non-empty list of models")
            raw_models = []
        heads_seen: dict[str, int] = {}
        for i, raw in enumerate(raw_models or []):
            path = f"models[{i}]"
            m = c.mapping(raw, path, required=("model",), allowed=_MODEL)
            if m is None:
                continue
            model = c.string(m.get("model"), f"{path}.model") if "model" in m else None
            head = m.get("head")
            if head is not None and c.string(head, f"{path}.head") is not None:
                if not HEAD_NAME.match(head):
                    c.add(f"{path}.head", f"head name {head!r} may only use letters, digits, "
                          "'_', '-' and '.'")
                if head in heads_seen:
                    c.add(f"{path}.head", f"duplicate head name {head!r} "
                          f"(also models[{heads_seen[head]}].head)")
                heads_seen[head] = i
            labels = None
            if m.get("labels") is not None:
                got = c.string_list(m["labels"], f"{path}.labels", allow_single=False)
                if got is not None:
                    dupes = duplicates(got)
                    if dupes:
                        c.add(f"{path}.labels", f"duplicate labels {dupes}")
                    labels = tuple(got)
            weight = _factor(c, m.get("weight", dweight if dweight is not None else 1.0),
                             f"{path}.weight")
            density = c.number(m.get("density", ddensity if ddensity is not None else 1.0),
                               f"{path}.density", lo=0.0, hi=1.0, lo_open=True)
            revision = m.get("revision")
            if revision is not None:
                c.string(revision, f"{path}.revision")
            if model is not None and weight is not None and density is not None:
                models.append(ModelSpec(model=model, head=head, labels=labels, weight=weight,
                                        density=density, revision=revision))
        c.raise_if_any(RecipeError)
        assert base is not None and lam is not None and seed is not None
        return cls(base=base, models=tuple(models), method=method,
                   head_mode=HeadMode(head_mode),
                   seed=seed, dtype=dtype, lam=lam, base_revision=base_revision, name=name,
                   source=source)


def _factor(c: Checker, value: Any, path: str) -> float | None:
    """A lambda or weight: a finite number > 0 that fits the kernels' float32."""
    v = c.number(value, path, lo=0.0, lo_open=True)
    if v is not None and v > _F32_MAX:
        c.add(path, f"{value} does not fit a float32 (at most {_F32_MAX:.4g})")
        return None
    return v


def load_recipe(recipe: "MergeRecipe | Mapping[str, Any] | str | os.PathLike[str]") -> MergeRecipe:
    if isinstance(recipe, MergeRecipe):
        return recipe
    if isinstance(recipe, Mapping):
        return MergeRecipe.from_dict(recipe)
    return MergeRecipe.load(recipe)
