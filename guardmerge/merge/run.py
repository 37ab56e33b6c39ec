"""The HM3 merge: check sources, expand heads, merge tensor by tensor, write a bundle atomically.

Memory: tensors are read one name at a time (``safetensors.safe_open``), merged, and streamed to
the output file before the next name is read, so peak memory is a few copies of the largest
tensor, whatever the number of models. The bundle is written to a temporary folder beside the
output and renamed at the end: an interrupted merge leaves no half bundle.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import struct
import tempfile
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import torch

from .._progress import Progress
from .._safetensors import (ST_TO_DTYPE, StreamingWriter, TensorSpec, read_header, read_tensor,
                            storage_dtype)
from ..bundle import (_weight_files, config_for_heads, hash_files, inspect_bundle,
                      output_layer_prefix, resolve_model_dir, write_manifest)
from ..exceptions import MergeError, ModelLoadError
from ..labels import Head
from .methods import (METHODS, block_keeps, linear_block, magnitude_masks, merge_block,
                      merge_tensor)
from .sparsify import CHUNK, dare_generator
from .recipe import MergeRecipe, ModelSpec, load_recipe

__all__ = ["merge", "MergePlan", "plan_merge"]

logger = logging.getLogger("guardmerge.merge")

_ENCODER_KEYS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                 "vocab_size", "max_position_embeddings", "type_vocab_size", "dim", "n_layers",
                 "n_heads", "hidden_dim")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                    "vocab.txt", "vocab.json", "merges.txt", "added_tokens.json", "spm.model",
                    "sentencepiece.bpe.model")
_UNINFORMATIVE = re.compile(r"^(label_?\d+|\d+)$", re.IGNORECASE)
_OUT_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class TensorIndex:
    """Tensor names -> files of one model; reads one tensor at a time (thread-safe)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.files = _weight_files(folder)
        self.specs: dict[str, tuple[str, tuple[int, ...]]] = {}
        self._where: dict[str, tuple[Path, int, dict[str, Any]]] = {}
        for f in self.files:
            header, _ = read_header(f)
            with open(f, "rb") as fh:
                data_start = 8 + struct.unpack("<Q", fh.read(8))[0]
            for name, info in header.items():
                self.specs[name] = (info["dtype"], tuple(info["shape"]))
                self._where[name] = (f, data_start, info)
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
class _Source:
    spec: ModelSpec
    folder: Path
    revision: str | None
    config: dict[str, Any]
    heads: tuple[Head, ...]          # offsets within this source
    index: TensorIndex
    position: int                    # models[position] in the recipe

    @property
    def num_labels(self) -> int:
        return sum(h.size for h in self.heads)


def _read_config(folder: Path) -> dict[str, Any]:
    path = folder / "config.json"
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ModelLoadError(f"{path}: missing") from None
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelLoadError(f"{path}: not valid JSON ({exc})") from exc


def _head_name_from_id(model_id: str) -> str:
    name = Path(model_id.rstrip("/")).name or model_id
    name = re.sub(r"[^A-Za-z0-9_.\-]+", "_", name).strip("_")
    return name or "head"


def _vocab(folder: Path) -> dict[str, int] | None:
    """The tokenizer vocabulary (token -> id), read from the files (no transformers import)."""
    tj = folder / "tokenizer.json"
    try:
        if tj.exists():
            data = json.loads(tj.read_text(encoding="utf-8"))
            model = data.get("model") or {}
            vocab = model.get("vocab")
            if isinstance(vocab, list):  # unigram: [[piece, score], ...]
                out = {str(p[0]): i for i, p in enumerate(vocab)}
            elif isinstance(vocab, dict):
                out = {str(k): int(v) for k, v in vocab.items()}
            else:
                raise ValueError("no model.vocab")
            for tok in data.get("added_tokens") or []:
                out[str(tok["content"])] = int(tok["id"])
            return out
        vt = folder / "vocab.txt"
        if vt.exists():
            return {line.rstrip("\n"): i for i, line in
                    enumerate(vt.read_text(encoding="utf-8").splitlines())}
        vj = folder / "vocab.json"
        if vj.exists():
            return {str(k): int(v) for k, v in json.loads(vj.read_text(encoding="utf-8")).items()}
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ModelLoadError(f"{folder}: cannot read the tokenizer vocabulary: {exc}") from exc
    return None


class MergePlan:
    """Everything checked and laid out before the first tensor is merged."""

    def __init__(self, recipe: MergeRecipe) -> None:
        self.recipe = recipe
        self.base_folder, self.base_revision = resolve_model_dir(recipe.base, recipe.base_revision)
        self.base_config = _read_config(self.base_folder)
        self.base_index = TensorIndex(self.base_folder)
        self._local_buffers = threading.local()
        self.sources = [self._load_source(i, spec) for i, spec in enumerate(recipe.models)]
        try:
            self._check_compatible()
            self.heads = self._layout_heads()
            self.model_type = str(self.sources[0].config["model_type"])
            self.head_prefix = output_layer_prefix(self.model_type)
            self.head_tensors = {f"{self.head_prefix}.weight", f"{self.head_prefix}.bias"}
            self.names = self._check_tensors()
            self.base_names = self._map_base()
            self.specs = self._output_specs()
        except BaseException:
            self.close()
            raise

    # -- preparation -------------------------------------------------------------------------

    def _load_source(self, position: int, spec: ModelSpec) -> _Source:
        info = inspect_bundle(spec.model, revision=spec.revision)
        folder = info.path
        revision = None
        if not Path(spec.model).expanduser().exists():
            revision = info.heads[0].revision
        heads = list(info.heads)
        where = f"{self.recipe.source}: models[{position}]"
        if len(heads) == 1:
            h = heads[0]
            name = spec.head or _head_name_from_id(spec.model)
            labels = h.labels
            if spec.labels is not None:
                if len(spec.labels) != len(h.labels):
                    raise MergeError(f"{where}.labels gives {len(spec.labels)} labels but "
                                     f"{spec.model} has {len(h.labels)} ({', '.join(h.labels)})")
                labels = spec.labels
            elif any(_UNINFORMATIVE.match(lab) for lab in labels):
                logger.warning("%s (%s) has uninformative labels %s; name them with 'labels:'",
                               where, spec.model, list(labels))
            heads = [Head(name=name, labels=tuple(labels), offset=0)]
        elif spec.head is not None or spec.labels is not None:
            raise MergeError(f"{where}: {spec.model} is a bundle of {len(heads)} heads "
                             f"({', '.join(h.name for h in heads)}); 'head' and 'labels' only "
                             "apply to single-head classifiers")
        return _Source(spec=spec, folder=folder, revision=revision, config=info.config,
                       heads=tuple(heads), index=TensorIndex(folder), position=position)

    def _check_compatible(self) -> None:
        ref = self.sources[0]
        models = [("base", self.recipe.base, self.base_config)] + [
            (f"models[{s.position}]", s.spec.model, s.config) for s in self.sources]
        ref_type = ref.config.get("model_type")
        for label, model_id, cfg in models:
            if cfg.get("model_type") != ref_type:
                raise MergeError(f"{label} ({model_id}): model type {cfg.get('model_type')!r} "
                                 f"differs from {ref.spec.model}'s {ref_type!r}")
            for key in _ENCODER_KEYS:
                if key in cfg and key in ref.config and cfg[key] != ref.config[key]:
                    raise MergeError(f"{label} ({model_id}): {key} = {cfg[key]} but "
                                     f"{ref.spec.model} has {key} = {ref.config[key]}")
        ref_vocab = _vocab(ref.folder)
        if ref_vocab is None:
            raise MergeError(f"models[0] ({ref.spec.model}): no tokenizer files")
        for label, folder, model_id in [("base", self.base_folder, self.recipe.base)] + [
                (f"models[{s.position}]", s.folder, s.spec.model) for s in self.sources[1:]]:
            vocab = _vocab(folder)
            if vocab is None:
                if label == "base":
                    logger.info("base %s has no tokenizer files; vocabulary not compared", model_id)
                    continue
                raise MergeError(f"{label} ({model_id}): no tokenizer files")
            if vocab != ref_vocab:
                diff = sorted(set(vocab.items()) ^ set(ref_vocab.items()))[:3]
                raise MergeError(f"{label} ({model_id}): tokenizer vocabulary differs from "
                                 f"{ref.spec.model}'s ({len(vocab)} vs {len(ref_vocab)} tokens; "
                                 f"e.g. {diff})")

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
                heads.append(Head(name=h.name, labels=h.labels, offset=offset, source=s.spec.model,
                                  revision=s.revision))
                offset += h.size
        return tuple(heads)

    def _check_tensors(self) -> list[str]:
        ref = self.sources[0]
        names = ref.index.names()
        for t in sorted(self.head_tensors):
            if t not in names:
                raise MergeError(f"models[0] ({ref.spec.model}): no output layer tensor {t!r}")
        for s in self.sources[1:]:
            other = s.index.names()
            missing, extra = sorted(names - other), sorted(other - names)
            if missing or extra:
                raise MergeError(f"models[{s.position}] ({s.spec.model}): tensor names differ from "
                                 f"{ref.spec.model}: missing {missing[:5]}, extra {extra[:5]}")
        for name in sorted(names):
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
                if (sd in ("F32", "F16", "BF16", "F64")) != (dtype in ("F32", "F16", "BF16", "F64")):
                    raise MergeError(f"models[{s.position}] ({s.spec.model}): tensor {name!r} has "
                                     f"dtype {sd} but {ref.spec.model} has {dtype}")
        return sorted(names)

    def _map_base(self) -> dict[str, str | None]:
        base_names = self.base_index.names()
        prefix = self.names[0].split(".", 1)[0] + "." if "." in self.names[0] else ""
        mapping: dict[str, str | None] = {}
        for name in self.names:
            if name in self.head_tensors:
                mapping[name] = None  # HM3: the base's output layer is an all-zero head
                continue
            candidates = [name]
            if prefix and name.startswith(prefix):
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
        out_dtype = _OUT_DTYPES[self.recipe.dtype]
        total = sum(h.size for h in self.heads)
        specs = {}
        for name in self.names:
            st_dtype, shape = self.sources[0].index.specs[name]
            dtype = ST_TO_DTYPE[st_dtype]
            if dtype.is_floating_point:
                dtype = out_dtype
            if name in self.head_tensors:
                shape = (total,) + tuple(shape[1:])
            specs[name] = TensorSpec(dtype, shape)
        return specs

    # -- merging -----------------------------------------------------------------------------

    def _expand(self, s: _Source, tensor: torch.Tensor) -> torch.Tensor:
        """HM3: pad a source's output-layer tensor with zero rows for every other head."""
        total = sum(h.size for h in self.heads)
        out = torch.zeros((total,) + tuple(tensor.shape[1:]), dtype=torch.float32)
        start = next(h.offset for h in self.heads if h.name == s.heads[0].name)
        out[start:start + s.num_labels] = tensor.float()
        return out

    def _whole_tensor(self, name: str) -> torch.Tensor:
        """Integer buffers and the (small) output-layer tensors, merged in memory."""
        r = self.recipe
        weights = [s.spec.weight for s in self.sources]
        densities = [s.spec.density for s in self.sources]
        spec = self.specs[name]
        if not spec.dtype.is_floating_point:
            tensors = [s.index.get(name) for s in self.sources]
            base_name = self.base_names.get(name)
            ref = self.base_index.get(base_name) if base_name else tensors[0]
            for s, t in zip(self.sources, tensors):
                if not torch.equal(t, ref):
                    raise MergeError(f"models[{s.position}] ({s.spec.model}): integer buffer "
                                     f"{name!r} differs from the base's; it must be identical")
            return ref.clone()
        expanded = [self._expand(s, s.index.get(name)) for s in self.sources]
        if r.head_mode == "owner":
            out = torch.stack(expanded).sum(dim=0)  # rows are disjoint: an exact copy
        else:
            out = merge_tensor(r.method, torch.zeros_like(expanded[0]), expanded, weights,
                               densities, lam=r.lam, seed=r.seed, name=name)
        return out.to(spec.dtype)

    def merged_blocks(self, name: str) -> Iterator[torch.Tensor]:
        """Tensor ``name`` of the merged model as flat blocks (streamed from the sources).

        Each block is read from the files into reused buffers, merged by the same kernel as
        ``merge_tensor``, and handed on: nothing model-sized is allocated.
        """
        spec = self.specs[name]
        if name in self.head_tensors or not spec.dtype.is_floating_point:
            yield self._whole_tensor(name).reshape(-1)
            return
        r = self.recipe
        m = METHODS[r.method]
        weights = [s.spec.weight for s in self.sources]
        densities = [s.spec.density for s in self.sources]
        n = 1
        for dim in spec.shape:
            n *= dim
        base_name = self.base_names[name]
        inputs = [(s.index, name) for s in self.sources]
        if m.uses_base:
            assert base_name is not None
            inputs.append((self.base_index, base_name))
        buffers = [self._buffer(i, idx.specs[nm][0]) for i, (idx, nm) in enumerate(inputs)]

        def block(k: int, start: int, count: int) -> torch.Tensor:
            idx, nm = inputs[k]
            return idx.get_block(nm, start, count, buffers[k]).float()

        masks: list[torch.Tensor | None] = []
        if m.sparsify == "magnitude":
            base_full = block(len(self.sources), 0, n).clone() if n <= CHUNK else None

            def magnitudes(i: int) -> torch.Tensor:
                mag = torch.empty(n, dtype=torch.float32)
                for start in range(0, n, CHUNK):
                    c = min(CHUNK, n - start)
                    b = base_full[start:start + c] if base_full is not None else \
                        block(len(self.sources), start, c).clone()
                    mag[start:start + c] = block(i, start, c).sub_(b).abs_()
                return mag

            masks = magnitude_masks(m, n, densities, magnitudes)
        gens = [dare_generator(r.seed, name, i) for i in range(len(self.sources))] \
            if m.sparsify == "dare" else []
        keep_buffers = [self._buffer(("keep", i), "F32") for i in range(len(self.sources))]
        for start in range(0, n, CHUNK):
            c = min(CHUNK, n - start)
            # float32 storage: .float() is the reused buffer itself, owned and overwritten here
            blocks = [block(k, start, c) for k in range(len(inputs))]
            if not m.uses_base:
                yield linear_block(blocks, weights).to(spec.dtype)
                continue
            bb = blocks[-1]
            deltas = [x.sub_(bb) for x in blocks[:-1]]
            keeps = block_keeps(m, densities, gens, masks, start, c, keep_buffers)
            out = merge_block(m, bb, deltas, weights, densities, r.lam, keeps,
                              out=torch.empty(c, dtype=torch.float32))
            yield out.to(spec.dtype)  # a fresh tensor, never a reused buffer: the writer queues it

    def _buffer(self, slot: Any, st_dtype: str) -> torch.Tensor:
        cache = getattr(self._local_buffers, "b", None)
        if cache is None:
            cache = self._local_buffers.b = {}
        key = (slot, st_dtype)
        buf = cache.get(key)
        if buf is None:
            buf = cache[key] = torch.empty(CHUNK, dtype=storage_dtype(ST_TO_DTYPE[st_dtype]))
        return buf

    def merged_tensor(self, name: str) -> torch.Tensor:
        """The whole merged tensor (the concatenation of ``merged_blocks``)."""
        blocks = [b.clone() for b in self.merged_blocks(name)]
        return torch.cat(blocks).view(self.specs[name].shape)

    def close(self) -> None:
        self.base_index.close()
        for s in getattr(self, "sources", []):
            s.index.close()

    # -- output ------------------------------------------------------------------------------

    def config(self) -> dict[str, Any]:
        cfg = config_for_heads(self.sources[0].config, self.heads)
        cfg["dtype"] = self.recipe.dtype
        cfg.pop("torch_dtype", None)
        return cfg

    def start_hashing(self, pool: ThreadPoolExecutor) -> None:
        """Content hashes of every input, computed beside the merge (hashlib frees the GIL)."""
        self._hashes: dict[str, Future[str]] = {"base": pool.submit(hash_files, self.base_index.files)}
        for s in self.sources:
            self._hashes[s.spec.model] = pool.submit(hash_files, s.index.files)

    def _hash(self, key: str, files: Sequence[Path]) -> str:
        fut = getattr(self, "_hashes", {}).get(key)
        return fut.result() if fut is not None else hash_files(files)

    def final_heads(self) -> tuple[Head, ...]:
        by_model = {s.spec.model: s for s in self.sources}
        return tuple(replace(h, sha256=self._hash(h.source, by_model[h.source].index.files))
                     for h in self.heads)

    def manifest_extra(self) -> dict[str, Any]:
        return {"base": {"id": self.recipe.base, "revision": self.base_revision,
                         "sha256": self._hash("base", self.base_index.files)}}

    def write_support_files(self, folder: Path) -> None:
        (folder / "config.json").write_text(json.dumps(self.config(), indent=2, sort_keys=True)
                                            + "\n", encoding="utf-8")
        src = self.sources[0].folder
        for name in _TOKENIZER_FILES:
            if (src / name).exists():
                shutil.copyfile(src / name, folder / name)
        if not (folder / "vocab.txt").exists() and self.model_type in {"bert", "distilbert",
                                                                         "electra", "mobilebert"}:
            vocab = _vocab(src) or {}
            ordered = sorted(vocab, key=vocab.__getitem__)
            (folder / "vocab.txt").write_text("\n".join(ordered) + "\n", encoding="utf-8")
        write_manifest(folder, self.final_heads(), self.recipe.to_dict(),
                       extra=self.manifest_extra())


def plan_merge(recipe: MergeRecipe | Mapping[str, Any] | str | os.PathLike[str]) -> MergePlan:
    return MergePlan(load_recipe(recipe))


def merge(recipe: MergeRecipe | Mapping[str, Any] | str | os.PathLike[str],
          output: str | os.PathLike[str], *, overwrite: bool = False,
          progress: bool = False) -> Path:
    """Run an HM3 merge and write a guard bundle to ``output`` (atomically). Returns the path."""
    recipe = load_recipe(recipe)
    output = Path(output).expanduser().resolve()
    if output.exists() and not overwrite:
        raise MergeError(f"{output}: already exists (pass overwrite=True / --overwrite)")
    output.parent.mkdir(parents=True, exist_ok=True)
    plan = MergePlan(recipe)
    tmp = Path(tempfile.mkdtemp(prefix=f".{output.name}.tmp-", dir=output.parent))
    hasher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="guardmerge-hash")
    # The merge runs its own threads (the writer, the hasher) beside the maths on this one;
    # torch's intra-op threads on top of those oversubscribe the cores, and spinning OpenMP
    # workers made a 2-core merge about twice as slow (measured). Restored at the end.
    torch_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        plan.start_hashing(hasher)
        logger.info("merging %d model(s) with %s (head_mode=%s) into %s", len(plan.sources),
                    recipe.method, recipe.head_mode, output)
        metadata = {"format": "pt", "guardmerge_method": recipe.method}
        with Progress(len(plan.names), "merging", enabled=progress) as bar, \
                StreamingWriter(tmp / "model.safetensors", plan.specs, metadata) as writer:
            for name in plan.names:
                writer.write(name, plan.merged_blocks(name))
                bar.update(1, note=name[-40:])
        plan.write_support_files(tmp)
        if output.exists():
            trash = Path(tempfile.mkdtemp(prefix=f".{output.name}.old-", dir=output.parent))
            os.replace(output, trash / output.name)
            os.replace(tmp, output)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(tmp, output)
    except BaseException:
        hasher.shutdown(wait=True, cancel_futures=True)
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        hasher.shutdown(wait=True)
        plan.close()
        torch.set_num_threads(torch_threads)
    return output
