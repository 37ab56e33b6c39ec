"""The merge plan: sources loaded and checked, heads laid out, tensor names mapped to the base.

Everything that can be wrong with a merge is found here, before the first tensor is merged:
model families and types, encoder sizes and architecture settings, tokenizers (vocabulary,
BPE merges, SentencePiece models), tensor names, shapes and dtypes, the base's names (with or
without the encoder prefix such as ``bert.``), head names, kinds and label counts. Each problem
is a ``MergeError`` naming the model and the tensor.

Every source tensor is one of three kinds (the family table, ``guardmerge.families``, says
which): **encoder** (shared; merged against the base), **output layer** (HM3-expanded; the head
mode decides its rows) or **head module** (``classifier.dense``, ``pooler.dense``, ``head.*``
...: a base lacks them, so they are per head, copied exactly from the source that owns the
head, never merged). A bundle whose heads all read one source's head modules stays plain;
otherwise head ``i``'s modules are written under ``heads.<i>.`` (a per-head bundle). Tensors are read on demand, one (block) at a
time, straight from the safetensors files (``os.preadv`` into reused buffers, no mmap), so a
plan holds no weights in memory.
"""

from __future__ import annotations

import logging
import math
import os
import re
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, BinaryIO, Mapping, Sequence

import torch

from .._safetensors import FLOAT_DTYPES, ITEMSIZE, read_header
from ..bundle import (PER_HEAD, PER_HEAD_WEIGHTS, PLAIN, config_for_heads, hash_files,
                      inspect_bundle, read_json, resolve_model_dir, tokenizer_signature,
                      weight_files)
from ..exceptions import MergeError, ModelLoadError
from ..families import ENCODER_KEYS, Family, family_for
from ..labels import Head, head_name_from_id
from .heads import expand_rows, merge_head_rows
from .recipe import OUTPUT_DTYPES, MergeRecipe, ModelSpec, load_recipe

__all__ = ["MergePlan", "TensorIndex", "TensorSpec", "DTYPE_TO_ST", "ST_TO_DTYPE",
           "storage_dtype", "read_tensor"]

logger = logging.getLogger("guardmerge.merge")

_UNINFORMATIVE = re.compile(r"^(label_?\d+|\d+)$", re.IGNORECASE)
OUT_DTYPES = {name: getattr(torch, name) for name in OUTPUT_DTYPES}

DTYPE_TO_ST: dict[torch.dtype, str] = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}
ST_TO_DTYPE = {v: k for k, v in DTYPE_TO_ST.items()}


def storage_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype whose NumPy view holds ``dtype``'s bytes (bf16 -> int16, bool -> uint8)."""
    return {torch.bfloat16: torch.int16, torch.bool: torch.uint8}.get(dtype, dtype)


def _read_at(fh: BinaryIO, offset: int, view: memoryview) -> int:
    """Fill ``view`` from ``offset`` of the file: ``os.preadv`` where there is one (no seek,
    no buffer), else seek + readinto. Returns the bytes read (fewer only at end of file)."""
    if hasattr(os, "preadv"):
        fd, got = fh.fileno(), 0
        while got < len(view):
            n = os.preadv(fd, [view[got:]], offset + got)
            if n == 0:
                break
            got += n
        return got
    fh.seek(offset)
    return fh.readinto(view) or 0


def read_tensor(fh: BinaryIO, data_start: int, info: Mapping[str, Any], *, start: int = 0,
                count: int | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """Read a tensor, or elements ``start:start+count`` of it flattened, with ``readinto``.

    One copy, no mmap (source pages do not stay resident). ``out``: a flat buffer of the storage
    dtype to read into (reused across calls to avoid fresh allocations and page faults).
    """
    dtype = ST_TO_DTYPE.get(info["dtype"])
    if dtype is None:
        raise ValueError(f"unsupported dtype {info['dtype']}")
    shape = tuple(info["shape"])
    numel = math.prod(shape)
    begin, end = info["data_offsets"]
    whole = count is None
    count = numel - start if count is None else count
    if start < 0 or count < 0 or start + count > numel:
        raise ValueError(f"element range {start}:{start + count} outside 0:{numel}")
    holder_dtype = storage_dtype(dtype)
    if out is None:
        holder = torch.empty(count, dtype=holder_dtype)
    else:
        holder = out[:count]
    if count:
        item = holder.element_size()
        got = _read_at(fh, data_start + begin + start * item, memoryview(holder.numpy()).cast("B"))
        if got != count * item:
            raise ValueError(f"short read ({got} of {count * item} bytes)")
    if dtype == torch.bfloat16:
        result = holder.view(torch.bfloat16)
    elif dtype == torch.bool:
        result = holder.to(torch.bool)
    else:
        result = holder
    return result.view(shape) if whole else result



class TensorSpec:
    """A tensor's dtype and shape, known before its data is computed."""

    __slots__ = ("dtype", "shape")

    def __init__(self, dtype: torch.dtype, shape: tuple[int, ...]) -> None:
        self.dtype = dtype
        self.shape = tuple(int(s) for s in shape)

    @property
    def nbytes(self) -> int:
        return ITEMSIZE[DTYPE_TO_ST[self.dtype]] * math.prod(self.shape)


class TensorIndex:
    """Tensor names -> files of one model; reads one tensor (or block) at a time (thread-safe:
    every thread has its own file handles)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.files = weight_files(folder)
        self.specs: dict[str, tuple[str, tuple[int, ...]]] = {}
        self._where: dict[str, tuple[Path, int, dict[str, Any]]] = {}
        for f in self.files:
            header = read_header(f)
            for name, info in header.tensors.items():
                self.specs[name] = (info["dtype"], tuple(info["shape"]))
                self._where[name] = (f, header.data_start, info)
        self._local = threading.local()
        self._all_handles: list[Any] = []

    def names(self) -> set[str]:
        return set(self.specs)

    def _handle(self, f: Path) -> Any:
        handles = getattr(self._local, "handles", None)
        if handles is None:
            handles = self._local.handles = {}
        fh = handles.get(f)
        if fh is None:
            fh = handles[f] = open(f, "rb")  # noqa: SIM115 - closed in close()
            self._all_handles.append(fh)
        return fh

    def get(self, name: str) -> torch.Tensor:
        return self.get_block(name, 0, None)

    def get_block(self, name: str, start: int, count: int | None,
                  out: torch.Tensor | None = None) -> torch.Tensor:
        """Tensor ``name`` whole (``count=None``), or its flattened elements
        ``start:start+count`` read into ``out``."""
        f, data_start, info = self._where[name]
        try:
            return read_tensor(self._handle(f), data_start, info, start=start, count=count, out=out)
        except (OSError, ValueError) as exc:
            raise ModelLoadError(f"{f}: cannot read tensor {name!r}: {exc}") from exc

    def close(self) -> None:
        for fh in self._all_handles:
            fh.close()
        self._all_handles = []
        self._local = threading.local()


@dataclass
class Source:
    """One model of the recipe, checked: its folder, config, heads (offsets within this
    source) and tensor index."""

    spec: ModelSpec
    folder: Path
    revision: str | None
    config: dict[str, Any]
    heads: tuple[Head, ...]          # ``modules``: each head's prefix in this source, or None
    index: TensorIndex
    position: int                    # models[position] in the recipe
    layout: str = PLAIN

    @property
    def num_labels(self) -> int:
        return sum(h.size for h in self.heads)

    @property
    def where(self) -> str:
        return f"models[{self.position}] ({self.spec.model})"


class MergePlan:
    """Everything checked and laid out before the first tensor is merged.

    ``names``: the merged model's tensor names (sorted); ``specs``: their output dtype and
    shape; ``head_tensors``: the output layer (HM3-expanded); ``module_tensors``: the head
    modules (per head, copied from their owner); ``heads``: the merged heads in logit order
    (``modules`` set for a per-head bundle); ``family`` and ``layout`` (plain / per_head).
    Tensors are read on demand: ``base_tensor``, ``source_tensor``, ``head_rows`` (the
    sources' expanded output layers), ``module_tensor`` (a head module's tensor, exactly as its
    owner has it), ``buffer_tensor`` (integer buffers, checked equal) and ``merged_head`` (the
    head rows merged per the recipe's head mode).
    """

    def __init__(self, recipe: MergeRecipe | Mapping[str, Any] | str | os.PathLike[str]) -> None:
        recipe = load_recipe(recipe)
        self.recipe = recipe
        self.base_folder, self.base_revision = resolve_model_dir(recipe.base, recipe.base_revision)
        self.base_config = read_json(self.base_folder / "config.json")
        self.base_index = TensorIndex(self.base_folder)
        self.sources: list[Source] = []
        self._hashes: dict[str, Future[str]] = {}
        try:
            self.sources = [self._load_source(i, spec) for i, spec in enumerate(recipe.models)]
            self.model_type = str(self.sources[0].config["model_type"])
            self.family: Family = family_for(self.model_type, MergeError,
                                             self.sources[0].where)
            self._check_compatible()
            self.layout = self._choose_layout()
            self.heads = self._layout_heads()
            self.head_prefix = self.family.output
            self.names = self._check_tensors()
            self.base_names = self._map_base()
            self.specs = self._output_specs()
        except BaseException:
            self.close()
            raise

    @property
    def weights(self) -> list[float]:
        return [s.spec.weight for s in self.sources]

    @property
    def densities(self) -> list[float]:
        return [s.spec.density for s in self.sources]

    @property
    def num_labels(self) -> int:
        return sum(h.size for h in self.heads)

    # -- preparation -------------------------------------------------------------------------

    def _load_source(self, position: int, spec: ModelSpec) -> Source:
        info = inspect_bundle(spec.model, revision=spec.revision)
        folder = info.path
        revision = None
        if not Path(spec.model).expanduser().exists():
            revision = info.heads[0].revision
        heads = [Head(name=h.name, labels=h.labels, offset=h.offset, kind=h.kind,
                      modules=h.modules) for h in info.heads]
        where = f"{self.recipe.source}: models[{position}]"
        if len(heads) == 1:
            h = heads[0]
            name = spec.head or head_name_from_id(spec.model)
            labels = h.labels
            if spec.labels is not None:
                if len(spec.labels) != len(h.labels):
                    raise MergeError(f"{where}.labels gives {len(spec.labels)} labels but "
                                     f"{spec.model} has {len(h.labels)} ({', '.join(h.labels)})")
                labels = spec.labels
            elif any(_UNINFORMATIVE.match(lab) for lab in labels):
                logger.warning("%s (%s) has uninformative labels %s; name them with 'labels:'",
                               where, spec.model, list(labels))
            heads = [Head(name=name, labels=tuple(labels), offset=0, kind=h.kind,
                          modules=h.modules)]
        elif spec.head is not None or spec.labels is not None:
            raise MergeError(f"{where}: {spec.model} is a bundle of {len(heads)} heads "
                             f"({', '.join(h.name for h in heads)}); 'head' and 'labels' only "
                             "apply to single-head classifiers")
        return Source(spec=spec, folder=folder, revision=revision, config=info.config,
                       heads=tuple(heads), index=TensorIndex(folder), position=position,
                       layout=info.layout)

    def _check_compatible(self) -> None:
        """One family, one architecture, one tokenizer: every difference names both models."""
        ref = self.sources[0]
        models = [("base", self.recipe.base, self.base_config)] + [
            (f"models[{s.position}]", s.spec.model, s.config) for s in self.sources]
        ref_type = ref.config.get("model_type")
        keys = ENCODER_KEYS + self.family.config_keys
        for label, model_id, cfg in models:
            if cfg.get("model_type") != ref_type:
                raise MergeError(f"{label} ({model_id}): model type {cfg.get('model_type')!r} "
                                 f"differs from {ref.spec.model}'s {ref_type!r}; only models of "
                                 "one family (and one base) merge")
            for key in keys:
                if key in cfg and key in ref.config and cfg[key] != ref.config[key]:
                    raise MergeError(f"{label} ({model_id}): {key} = {cfg[key]} but "
                                     f"{ref.spec.model} has {key} = {ref.config[key]}")
        ref_sig = tokenizer_signature(ref.folder)
        if ref_sig is None:
            raise MergeError(f"models[0] ({ref.spec.model}): no tokenizer files")
        for label, folder, model_id in [("base", self.base_folder, self.recipe.base)] + [
                (f"models[{s.position}]", s.folder, s.spec.model) for s in self.sources[1:]]:
            sig = tokenizer_signature(folder)
            if sig is None:
                if label == "base":
                    logger.info("base %s has no tokenizer files; vocabulary not compared", model_id)
                    continue
                raise MergeError(f"{label} ({model_id}): no tokenizer files")
            for part in ("model", "vocab", "merges", "sentencepiece"):
                if part not in sig or part not in ref_sig or sig[part] == ref_sig[part]:
                    continue
                mine, theirs = sig[part], ref_sig[part]
                if part == "vocab":
                    diff = sorted(set(mine.items()) ^ set(theirs.items()))[:3]
                    detail = f"{len(mine)} vs {len(theirs)} tokens; e.g. {diff}"
                elif part == "merges":
                    at = next((i for i, (a, b) in enumerate(zip(mine, theirs)) if a != b),
                              min(len(mine), len(theirs)))
                    detail = f"{len(mine)} vs {len(theirs)} merges, first difference at {at}"
                else:
                    detail = f"{mine} vs {theirs}"
                what = {"model": "tokenizer model", "vocab": "tokenizer vocabulary",
                        "merges": "BPE merges", "sentencepiece": "SentencePiece model"}[part]
                raise MergeError(f"{label} ({model_id}): {what} differs from "
                                 f"{ref.spec.model}'s ({detail})")

    def _choose_layout(self) -> str:
        """plain where every head reads one set of head modules (a family without head modules,
        or one plain source); per_head otherwise."""
        if not self.family.has_head_modules:
            return PLAIN
        if len(self.sources) == 1 and self.sources[0].layout == PLAIN:
            return PLAIN
        return PER_HEAD

    def _layout_heads(self) -> tuple[Head, ...]:
        heads: list[Head] = []
        offset = 0
        owners: dict[str, str] = {}
        for s in self.sources:
            for h in s.heads:
                if h.name in owners:
                    raise MergeError(f"head name {h.name!r} is used by {owners[h.name]} and "
                                     f"{s.spec.model}; give one of them a 'head:' name")
                owners[h.name] = s.spec.model
                modules = f"heads.{len(heads)}." if self.layout == PER_HEAD else None
                heads.append(Head(name=h.name, labels=h.labels, offset=offset, source=s.spec.model,
                                  revision=s.revision, kind=h.kind, modules=modules))
                offset += h.size
        return tuple(heads)

    def _split(self, s: Source) -> tuple[set[str], set[str], dict[str, dict[str, str]]]:
        """A source's tensor names as (encoder, output layer, {head: {relative: name}}); any
        other tensor is a MergeError naming it."""
        fam = self.family
        encoder: set[str] = set()
        output: set[str] = set()
        modules: dict[str, dict[str, str]] = {h.name: {} for h in s.heads}
        prefixed = {h.modules: h.name for h in s.heads if h.modules is not None}
        for name in s.index.names():
            if fam.is_encoder_tensor(name):
                encoder.add(name)
            elif fam.is_output_tensor(name):
                output.add(name)
            elif not prefixed and fam.head_module_of(name):
                for h in s.heads:  # plain: every head of this source reads these modules
                    modules[h.name][name] = name
            elif prefixed and (p := next((p for p in prefixed if name.startswith(p)), None)) \
                    and fam.head_module_of(name[len(p):]):
                modules[prefixed[p]][name[len(p):]] = name
            else:
                raise MergeError(
                    f"{s.where}: tensor {name!r} is neither the {fam.name} encoder's "
                    f"({fam.encoder}.*), nor its output layer ({fam.output}), nor a head module "
                    f"({', '.join(fam.head_modules) or 'none in this family'})")
        return encoder, output, modules

    def _check_tensors(self) -> list[str]:
        ref = self.sources[0]
        fam = self.family
        self.head_tensors = {f"{fam.output}.weight", f"{fam.output}.bias"}
        split = {s.position: self._split(s) for s in self.sources}
        enc_ref, out_ref, mod_ref = split[ref.position]
        for t in sorted(self.head_tensors):
            if t not in out_ref:
                raise MergeError(f"models[0] ({ref.spec.model}): no output layer tensor {t!r}")
        ref_modules = next(iter(mod_ref.values()))
        for s in self.sources:
            enc, out, mods = split[s.position]
            if s is not ref and (enc != enc_ref or out != out_ref):
                missing = sorted((enc_ref | out_ref) - (enc | out))
                extra = sorted((enc | out) - (enc_ref | out_ref))
                raise MergeError(f"{s.where}: tensor names differ from {ref.spec.model}: "
                                 f"missing {missing[:5]}, extra {extra[:5]}")
            for head, rel in mods.items():
                if set(rel) != set(ref_modules):
                    raise MergeError(
                        f"{s.where}: head {head!r} has head-module tensors {sorted(rel)} but "
                        f"{ref.spec.model} has {sorted(ref_modules)}")
                for r, name in rel.items():
                    want = ref.index.specs[ref_modules[r]]
                    got = s.index.specs[name]
                    if got[1] != want[1] or (got[0] in FLOAT_DTYPES) != (want[0] in FLOAT_DTYPES):
                        raise MergeError(f"{s.where}: head-module tensor {name!r} is {got[0]} "
                                         f"{list(got[1])} but {ref.spec.model}'s {r!r} is "
                                         f"{want[0]} {list(want[1])}")
        for name in sorted(enc_ref | out_ref):
            dtype, shape = ref.index.specs[name]
            for s in self.sources:
                sd, ss = s.index.specs[name]
                if name in self.head_tensors:
                    if ss[0] != s.num_labels or ss[1:] != shape[1:]:
                        raise MergeError(f"models[{s.position}] ({s.spec.model}): tensor {name!r} "
                                         f"has shape {list(ss)}, expected [{s.num_labels}, ...]")
                elif ss != shape:
                    raise MergeError(f"models[{s.position}] ({s.spec.model}): tensor {name!r} has "
                                     f"shape {list(ss)} but {ref.spec.model} has {list(shape)}")
                if (sd in FLOAT_DTYPES) != (dtype in FLOAT_DTYPES):
                    raise MergeError(f"models[{s.position}] ({s.spec.model}): tensor {name!r} has "
                                     f"dtype {sd} but {ref.spec.model} has {dtype}")
        # head modules: where each merged head's come from (source, tensor name there)
        self.module_sources: dict[str, tuple[int, str]] = {}
        merged = {h.name: h for h in self.heads}
        for i, s in enumerate(self.sources):
            for head, rel in split[s.position][2].items():
                prefix = merged[head].modules or ""
                for r, name in rel.items():
                    self.module_sources.setdefault(prefix + r, (i, name))
        self.module_tensors = set(self.module_sources)
        return sorted(enc_ref | out_ref | self.module_tensors)

    def module_tensor_names(self) -> dict[str, list[str]]:
        """Per merged head (per-head layout), its module tensors: what the manifest lists."""
        return {h.name: sorted(n for n in self.module_tensors if n.startswith(h.modules))
                for h in self.heads if h.modules is not None}

    @property
    def weights_file(self) -> str:
        return PER_HEAD_WEIGHTS if self.layout == PER_HEAD else "model.safetensors"

    def _map_base(self) -> dict[str, str | None]:
        base_names = self.base_index.names()
        prefix = self.family.encoder + "."
        mapping: dict[str, str | None] = {}
        for name in self.names:
            if name in self.head_tensors or name in self.module_tensors:
                # HM3: the base's output layer is an all-zero head; head modules have no base
                mapping[name] = None
                continue
            candidates = [name]
            if name.startswith(prefix):
                candidates.append(name[len(prefix):])
            found = next((c for c in candidates if c in base_names), None)
            if found is None:
                hint = (" (BertForMaskedLM checkpoints have no pooler: use a base checkpoint that "
                        "has one, such as BertModel or BertForPreTraining)" if "pooler" in name
                        else "; is it the base encoder of these classifiers?")
                raise MergeError(f"base ({self.recipe.base}): no tensor {name!r} (nor "
                                 f"{candidates[1:] or 'any alias'}){hint}")
            want = self.sources[0].index.specs[name][1]
            got = self.base_index.specs[found][1]
            if got != want:
                raise MergeError(f"base ({self.recipe.base}): tensor {found!r} has shape "
                                 f"{list(got)} but the classifiers have {list(want)}")
            mapping[name] = found
        unused = sorted(base_names - {v for v in mapping.values() if v})
        if unused:
            logger.info("base %s: %d tensors not part of the classifier are not used (%s%s)",
                        self.recipe.base, len(unused), ", ".join(unused[:4]),
                        ", ..." if len(unused) > 4 else "")
        return mapping

    def _output_specs(self) -> dict[str, TensorSpec]:
        out_dtype = OUT_DTYPES[self.recipe.dtype]
        total = sum(h.size for h in self.heads)
        specs = {}
        for name in self.names:
            if name in self.module_tensors:
                i, src_name = self.module_sources[name]
                st_dtype, shape = self.sources[i].index.specs[src_name]
            else:
                st_dtype, shape = self.sources[0].index.specs[name]
            dtype = ST_TO_DTYPE[st_dtype]
            if dtype.is_floating_point:
                dtype = out_dtype
            if name in self.head_tensors:
                shape = (total,) + tuple(shape[1:])
            specs[name] = TensorSpec(dtype, shape)
        return specs

    # -- reading -----------------------------------------------------------------------------

    def base_tensor(self, name: str) -> torch.Tensor:
        """The base's tensor for merged tensor ``name`` (float32); not for the output layer."""
        base_name = self.base_names[name]
        if base_name is None:
            raise KeyError(f"{name!r} is an output-layer or head-module tensor: the base has none")
        return self.base_index.get(base_name).float()

    def source_tensor(self, i: int, name: str) -> torch.Tensor:
        """Source ``i``'s tensor ``name`` as stored (output layers unexpanded)."""
        return self.sources[i].index.get(name)

    def head_rows(self, name: str) -> list[torch.Tensor]:
        """Every source's output-layer tensor ``name``, HM3-expanded to all heads (float32)."""
        total = self.num_labels
        out = []
        for s in self.sources:
            offset = next(h.offset for h in self.heads if h.name == s.heads[0].name)
            out.append(expand_rows(s.index.get(name), offset, total))
        return out

    def module_tensor(self, name: str) -> torch.Tensor:
        """Head-module tensor ``name`` of the merged model: exactly its owner's (never
        merged: a base has no such tensor, each fine-tune initialised its own)."""
        i, src_name = self.module_sources[name]
        return self.sources[i].index.get(src_name)

    def merged_head(self, name: str) -> torch.Tensor:
        """Output-layer tensor ``name`` of the merged model (float32), per the head mode."""
        r = self.recipe
        return merge_head_rows(r.head_mode, r.method, self.head_rows(name), self.weights,
                               self.densities, lam=r.lam, seed=r.seed, name=name)

    def buffer_tensor(self, name: str) -> torch.Tensor:
        """A non-float buffer (``position_ids``, ``token_type_ids``): the base's, which every
        source must equal exactly."""
        tensors = [s.index.get(name) for s in self.sources]
        base_name = self.base_names.get(name)
        ref = self.base_index.get(base_name) if base_name else tensors[0]
        for s, t in zip(self.sources, tensors):
            if not torch.equal(t, ref):
                raise MergeError(f"models[{s.position}] ({s.spec.model}): integer buffer "
                                 f"{name!r} differs from the base's; it must be identical")
        return ref.clone()

    def close(self) -> None:
        self.base_index.close()
        for s in self.sources:
            s.index.close()

    # -- output ------------------------------------------------------------------------------

    def config(self) -> dict[str, Any]:
        cfg = config_for_heads(self.sources[0].config, self.heads)
        cfg["dtype"] = self.recipe.dtype
        cfg.pop("torch_dtype", None)
        return cfg

    def start_hashing(self, pool: ThreadPoolExecutor) -> None:
        """Content hashes of every input, computed beside the merge (hashlib frees the GIL)."""
        self._hashes["base"] = pool.submit(hash_files, self.base_index.files)
        for s in self.sources:
            self._hashes[s.spec.model] = pool.submit(hash_files, s.index.files)

    def _hash(self, key: str, files: Sequence[Path]) -> str:
        fut = self._hashes.get(key)
        if fut is None:  # not started in the background: compute it once, here
            fut = self._hashes[key] = Future()
            fut.set_result(hash_files(files))
        return fut.result()

    def source_sha256(self, i: int) -> str:
        """The content hash of source ``i``'s weights (keys caches of its statistics)."""
        s = self.sources[i]
        return self._hash(s.spec.model, s.index.files)

    def final_heads(self) -> tuple[Head, ...]:
        by_model = {s.spec.model: s for s in self.sources}
        return tuple(replace(h, sha256=self._hash(h.source, by_model[h.source].index.files))
                     for h in self.heads)

    def manifest_extra(self) -> dict[str, Any]:
        return {"base": {"id": self.recipe.base, "revision": self.base_revision,
                         "sha256": self._hash("base", self.base_index.files)},
                "family": {"model_type": self.model_type, "encoder": self.family.encoder,
                           "reads": self.family.reads,
                           "head_modules": list(self.family.head_modules),
                           "output": self.family.output}}

