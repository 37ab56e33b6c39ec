"""Merge recipes: YAML in the spirit of mergekit's, validated strictly.

    base: ./bert-base-uncased            # bare encoder (BertModel / BertForMaskedLM) or classifier
    method: dare_ties                    # linear | task_arithmetic | ties | dare_ties | dare_linear
                                         # | regmean (needs calibration)
    head_mode: merge                     # merge: head rows go through the method (the paper)
                                         # owner: each head's rows copied from the model owning them
                                         # refit: re-fitted to each source's outputs (calibration)
    seed: 0
    dtype: float32                       # output weights: float32 | bfloat16 | float16
    parameters: {lambda: 1.0, weight: 1.0, density: 0.5, alpha: 0.9}   # defaults for every model
    calibration:                         # unlabelled texts for regmean / refit
      texts: calib.jsonl                 # JSONL (text, optional head), CSV or plain lines; or a list
      limit: 2000                        # at most this many texts (a hash-spread sample)
      max_length: 128                    # tokens per text when running the models
      per_source: 300                    # RegMean: texts per source (those naming one of its
                                         # heads first, then unassigned ones)
      cache: .cache/guardmerge           # where statistics are kept (default: ~/.cache/guardmerge)
    refit: {texts: 2000, temperature: 1.0, pull: 1.0e-6}  # head_mode: refit
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
from .methods import METHODS, get_method

__all__ = ["MergeRecipe", "ModelSpec", "HeadMode", "CalibrationSpec", "RefitSpec", "load_recipe",
           "OUTPUT_DTYPES"]


class HeadMode(str, Enum):
    """What happens to the HM3-padded output layers."""

    MERGE = "merge"    # the padded head rows go through the merge method (the paper)
    OWNER = "owner"    # each head's rows are copied from the model that owns them
    REFIT = "refit"    # re-fitted to each source's outputs on calibration texts (merge/refit.py)


@dataclass(frozen=True)
class CalibrationSpec:
    """Where the unlabelled calibration texts come from and how they are run."""

    texts: tuple[str, ...]
    limit: int | None = None
    max_length: int = 128
    per_source: int = 300
    cache: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"texts": list(self.texts), "limit": self.limit, "max_length": self.max_length,
                "per_source": self.per_source, "cache": self.cache}


@dataclass(frozen=True)
class RefitSpec:
    """``head_mode: refit``: how many calibration texts, the distillation temperature, and the
    pull toward each source's own rows."""

    texts: int = 2000
    temperature: float = 1.0
    pull: float = 1e-6

    def to_dict(self) -> dict[str, Any]:
        return {"texts": self.texts, "temperature": self.temperature, "pull": self.pull}


OUTPUT_DTYPES = ("float32", "bfloat16", "float16")
_TOP = {"base", "base_revision", "method", "head_mode", "seed", "dtype", "parameters", "models",
        "name", "calibration", "refit"}
_PARAMS = {"lambda", "weight", "density", "alpha"}
_CALIBRATION = {"texts", "limit", "max_length", "per_source", "cache"}
_REFIT = {"texts", "temperature", "pull"}
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
    alpha: float = 0.9
    base_revision: str | None = None
    name: str | None = None
    calibration: CalibrationSpec | None = None
    refit: RefitSpec = RefitSpec()
    source: str = field(default="<recipe>", compare=False)

    def __post_init__(self) -> None:
        # a recipe built in Python may give the head mode as a string; the method is checked
        # by name (``get_method`` raises a ConfigError listing the known ones)
        try:
            object.__setattr__(self, "head_mode", HeadMode(self.head_mode))
        except ValueError:
            raise RecipeError(f"head_mode: expected one of "
                              f"{', '.join(m.value for m in HeadMode)}, got {self.head_mode!r}") from None
        get_method(self.method)
        if self.needs_calibration and self.calibration is None:
            raise RecipeError(f"{self.source}: method {self.method} / head_mode "
                              f"{self.head_mode.value} needs calibration texts (a 'calibration' "
                              "section)")

    @property
    def needs_calibration(self) -> bool:
        return self.method == "regmean" or self.head_mode is HeadMode.REFIT

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
        out = {
            "name": self.name,
            "base": self.base,
            "base_revision": self.base_revision,
            "method": self.method,
            "head_mode": self.head_mode.value,
            "seed": self.seed,
            "dtype": self.dtype,
            "parameters": {"lambda": self.lam, "alpha": self.alpha},
            "calibration": self.calibration.to_dict() if self.calibration else None,
            "refit": self.refit.to_dict() if self.head_mode is HeadMode.REFIT else None,
            "models": [
                {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(m).items()}
                for m in self.models
            ],
        }
        # absent, not null: ``from_dict`` refuses a null section (a YAML key left empty)
        return {k: v for k, v in out.items() if not (k in ("calibration", "refit") and v is None)}

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
        alpha = c.number(params.get("alpha", 0.9), "parameters.alpha", lo=0.0, hi=1.0,
                         lo_open=True)
        calibration = _calibration(c, top["calibration"]) if "calibration" in top else None
        refit = _refit(c, top["refit"]) if "refit" in top else RefitSpec()
        if calibration is None and "calibration" not in top:
            for key, value, what in (("method", method, "regmean"),
                                     ("head_mode", head_mode, HeadMode.REFIT.value)):
                if value == what:
                    c.add(key, f"{what} needs calibration texts: add a 'calibration' section "
                          "(calibration: {texts: FILE})")

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
        assert base is not None and lam is not None and seed is not None and alpha is not None
        return cls(base=base, models=tuple(models), method=method,
                   head_mode=HeadMode(head_mode), seed=seed, dtype=dtype, lam=lam, alpha=alpha,
                   base_revision=base_revision, name=name, calibration=calibration, refit=refit,
                   source=source)


def _calibration(c: Checker, raw: Any) -> CalibrationSpec | None:
    sec = c.mapping(raw, "calibration", required=("texts",), allowed=_CALIBRATION)
    if sec is None:
        return None
    texts = c.string_list(sec.get("texts"), "calibration.texts") if "texts" in sec else None
    limit = sec.get("limit")
    if limit is not None:
        limit = c.integer(limit, "calibration.limit", lo=1)
    max_length = c.integer(sec.get("max_length", 128), "calibration.max_length", lo=3)
    per_source = c.integer(sec.get("per_source", 300), "calibration.per_source", lo=1)
    cache = sec.get("cache")
    if cache is not None:
        cache = c.string(cache, "calibration.cache")
    if texts is None or max_length is None or per_source is None:
        return None
    return CalibrationSpec(texts=tuple(texts), limit=limit, max_length=max_length,
                           per_source=per_source, cache=cache)


def _refit(c: Checker, raw: Any) -> RefitSpec:
    sec = c.mapping(raw, "refit", allowed=_REFIT) or {}  # an empty / null section: an error
    texts = c.integer(sec.get("texts", 2000), "refit.texts", lo=1)
    temperature = c.number(sec.get("temperature", 1.0), "refit.temperature", lo=0.0, lo_open=True)
    pull = c.number(sec.get("pull", 1e-6), "refit.pull", lo=0.0)
    return RefitSpec(texts=texts or 2000, temperature=temperature or 1.0,
                     pull=1e-6 if pull is None else pull)


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
