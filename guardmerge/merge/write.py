"""Writing a merged bundle: the streamed block kernel driver and the atomic bundle writer.

Memory: tensors are read block by block (``CHUNK`` elements) from the sources into reused
buffers, merged by the same kernel as ``merge_tensor``, and queued to a background writer that
streams them into ``model.safetensors`` (layout known up front: all shapes come from the plan).
Peak memory is a few blocks per source plus the (small) output layer and, for TIES, one
tensor's top-k masks, whatever the size of the model or the number of sources. The bundle is
written to a temporary folder beside the output and renamed at the end: an interrupted merge
leaves no half bundle.
"""

from __future__ import annotations

import json
import logging
import math
import os
import queue
import struct
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any, BinaryIO, Iterable, Iterator, Mapping, Sequence

import torch

from .._atomic import atomic_directory
from .._progress import progress
from .._safetensors import read_header
from ..bundle import copy_tokenizer, write_manifest
from ..exceptions import MergeError
from .activations import load_model
from .fitting import calibration_for, refit_heads, refit_targets, regmean_statistics
from .methods import Sparsify, block_keeps, get_method, linear_block, magnitude_masks, merge_block
from .options import MergeOptions
from .plan import DTYPE_TO_ST, ST_TO_DTYPE, MergePlan, TensorSpec, storage_dtype
from .recipe import HeadMode, MergeRecipe, load_recipe
from .regmean import regmean
from .sparsify import CHUNK, dare_generator
from .statistics import GramStatistics

__all__ = ["merge", "BlockMerger", "StreamingWriter", "write_support_files", "patch_tensors"]

logger = logging.getLogger("guardmerge.merge")


class BlockMerger:
    """Merged tensors of a plan, block by block, straight from the source files.

    ``blocks(name)`` yields flat blocks of the merged tensor; ``tensor(name)`` is the whole
    tensor. Each block is read into reused per-thread buffers and merged by the same kernel as
    ``merge_tensor``; the yielded blocks are fresh tensors (a writer may queue them).
    """

    def __init__(self, plan: MergePlan, statistics: Sequence[GramStatistics] | None = None) -> None:
        self.plan = plan
        self.statistics = list(statistics) if statistics else []
        self._local = threading.local()

    def _regmean(self, name: str) -> torch.Tensor | None:
        """RegMean's solution for a linear layer's weight (None: not a RegMean tensor)."""
        plan = self.plan
        module = name[:-len(".weight")] if name.endswith(".weight") else None
        if not self.statistics or module not in self.statistics[0].rows:
            return None
        if name in plan.head_tensors:
            if plan.recipe.head_mode is not HeadMode.MERGE:
                return None  # owner / refit rows
            weights = plan.head_rows(name)
        else:
            weights = [plan.source_tensor(i, name).float() for i in range(len(plan.sources))]
        return regmean(weights, [st.gram(module) for st in self.statistics],
                       alpha=plan.recipe.alpha, scales=plan.weights)

    def _buffer(self, slot: Any, st_dtype: str) -> torch.Tensor:
        cache = getattr(self._local, "b", None)
        if cache is None:
            cache = self._local.b = {}
        key = (slot, st_dtype)
        buf = cache.get(key)
        if buf is None:
            buf = cache[key] = torch.empty(CHUNK, dtype=storage_dtype(ST_TO_DTYPE[st_dtype]))
        return buf

    def tensor(self, name: str) -> torch.Tensor:
        """The whole merged tensor (the concatenation of ``blocks``)."""
        blocks = [b.clone() for b in self.blocks(name)]
        return torch.cat(blocks).view(self.plan.specs[name].shape)

    def blocks(self, name: str) -> Iterator[torch.Tensor]:
        plan = self.plan
        spec = plan.specs[name]
        if not spec.dtype.is_floating_point:
            yield plan.buffer_tensor(name).reshape(-1)
            return
        if name in plan.module_tensors:  # per head: its owner's, never merged
            yield plan.module_tensor(name).to(spec.dtype).reshape(-1)
            return
        solved = self._regmean(name)
        if solved is not None:
            yield solved.to(spec.dtype).reshape(-1)
            return
        if name in plan.head_tensors:
            yield plan.merged_head(name).to(spec.dtype).reshape(-1)
            return
        r = plan.recipe
        m = get_method(r.method)
        weights, densities = plan.weights, plan.densities
        n = math.prod(spec.shape)
        inputs = [(s.index, name) for s in plan.sources]
        if m.uses_base:
            inputs.append((plan.base_index, plan.base_names[name]))
        buffers = [self._buffer(i, idx.specs[nm][0]) for i, (idx, nm) in enumerate(inputs)]
        n_src = len(plan.sources)

        def block(k: int, start: int, count: int) -> torch.Tensor:
            idx, nm = inputs[k]
            return idx.get_block(nm, start, count, buffers[k]).float()

        masks: list[torch.Tensor | None] = []
        if m.sparsify is Sparsify.MAGNITUDE:
            base_full = block(n_src, 0, n).clone() if n <= CHUNK else None

            def magnitudes(i: int) -> torch.Tensor:
                mag = torch.empty(n, dtype=torch.float32)
                for start in range(0, n, CHUNK):
                    c = min(CHUNK, n - start)
                    b = base_full[start:start + c] if base_full is not None else \
                        block(n_src, start, c).clone()
                    mag[start:start + c] = block(i, start, c).sub_(b).abs_()
                return mag

            masks = magnitude_masks(m, n, densities, magnitudes)
        gens = [dare_generator(r.seed, name, i) for i in range(n_src)] \
            if m.sparsify is Sparsify.DARE else []
        keep_buffers = [self._buffer(("keep", i), "F32") for i in range(n_src)]
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


class StreamingWriter:
    """Write a safetensors file tensor by tensor, in the (sorted) order of ``specs``.

    The layout is deterministic: tensors sorted by name, header JSON with sorted keys, padded to
    8 bytes. Writing the same tensors twice gives byte-identical files. A block holding NaN or
    infinity is a ``MergeError`` naming the tensor: a merge never writes a non-finite weight.
    """

    def __init__(self, path: str | os.PathLike[str], specs: Mapping[str, TensorSpec],
                 metadata: Mapping[str, str] | None = None) -> None:
        self.path = Path(path)
        self.order = sorted(specs)
        self.specs = dict(specs)
        header: dict[str, Any] = {}
        if metadata:
            header["__metadata__"] = {str(k): str(v) for k, v in sorted(metadata.items())}
        offset = 0
        for name in self.order:
            spec = self.specs[name]
            header[name] = {"dtype": DTYPE_TO_ST[spec.dtype], "shape": list(spec.shape),
                            "data_offsets": [offset, offset + spec.nbytes]}
            offset += spec.nbytes
        raw = json.dumps(header, separators=(",", ":"), sort_keys=True).encode("utf-8")
        raw += b" " * (-len(raw) % 8)
        self._fh: BinaryIO = open(self.path, "wb")
        self._fh.write(struct.pack("<Q", len(raw)))
        self._fh.write(raw)
        self._next = 0
        # A background thread does the (kernel-side slow) writes while the caller computes the
        # next blocks; the queue is bounded, so at most ~32 blocks wait in memory.
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=32)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._drain, name="guardmerge-writer", daemon=True)
        self._thread.start()

    def _drain(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            if self._error is None:
                try:
                    self._fh.write(memoryview(item.numpy()).cast("B"))
                except BaseException as exc:  # reported by the next write() / close()
                    self._error = exc

    def _put(self, t: torch.Tensor) -> None:
        if self._error is not None:
            raise self._error
        self._queue.put(t)

    def _stop(self) -> None:
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()

    def write(self, name: str, tensor: "torch.Tensor | Iterable[torch.Tensor]") -> None:
        """Write tensor ``name`` whole, or as an iterable of flat blocks in order."""
        if self._next >= len(self.order) or self.order[self._next] != name:
            expected = self.order[self._next] if self._next < len(self.order) else None
            raise ValueError(f"tensors must be written in order: got {name!r}, expected {expected!r}")
        spec = self.specs[name]
        if isinstance(tensor, torch.Tensor):
            if tuple(tensor.shape) != spec.shape:
                raise ValueError(f"tensor {name!r}: got shape {tuple(tensor.shape)}, declared "
                                 f"{spec.shape}")
            blocks: Iterable[torch.Tensor] = (tensor,)
        else:
            blocks = tensor
        written = 0
        for block in blocks:
            if block.dtype != spec.dtype:
                raise ValueError(f"tensor {name!r}: got {block.dtype}, declared {spec.dtype}")
            if block.is_floating_point() and not bool(torch.isfinite(block).all()):
                raise MergeError(f"tensor {name!r}: the merge produced NaN or infinite values "
                                 "(check the sources' weights and the recipe's numbers); "
                                 "nothing was written")
            t = block.detach().contiguous().cpu()
            if t.dtype == torch.bfloat16:
                t = t.view(torch.int16)
            elif t.dtype == torch.bool:
                t = t.to(torch.uint8)
            if t.numel():
                self._put(t)
                written += t.numel() * t.element_size()
        if written != spec.nbytes:
            raise ValueError(f"tensor {name!r}: wrote {written} bytes, declared {spec.nbytes}")
        self._next += 1

    def close(self) -> None:
        if self._fh.closed:
            return
        self._stop()
        if self._error is not None:
            self._fh.close()
            raise self._error
        done = self._next == len(self.order)
        self._fh.flush()
        os.fsync(self._fh.fileno())
        self._fh.close()
        if not done:
            raise ValueError(f"{self.path}: only {self._next} of {len(self.order)} tensors written")

    def __enter__(self) -> "StreamingWriter":
        return self

    def __exit__(self, exc_type: Any, *exc: Any) -> None:
        if exc_type is None:
            self.close()
        else:
            self._stop()
            self._fh.close()


def write_support_files(plan: MergePlan, folder: Path,
                        extra: Mapping[str, Any] | None = None) -> None:
    """``config.json`` (re-labelled for the merged heads), the tokenizer (every file of the
    first source's, byte for byte) and the manifest (layout, heads with their kinds and, for a
    per-head bundle, their module tensors)."""
    (folder / "config.json").write_text(json.dumps(plan.config(), indent=2, sort_keys=True)
                                        + "\n", encoding="utf-8")
    copy_tokenizer(plan.sources[0].folder, folder)
    write_manifest(folder, plan.final_heads(), plan.recipe.to_dict(),
                   extra={**plan.manifest_extra(), **(extra or {})},
                   module_tensors=plan.module_tensor_names())


def patch_tensors(path: Path, tensors: Mapping[str, torch.Tensor]) -> None:
    """Overwrite tensors of a safetensors file in place (same names, dtypes and shapes)."""
    header = read_header(path)
    with open(path, "r+b") as fh:
        for name, tensor in tensors.items():
            info = header.tensors.get(name)
            if info is None:
                raise KeyError(f"{path}: no tensor {name!r} to overwrite")
            t = tensor.detach().contiguous().cpu()
            if DTYPE_TO_ST[t.dtype] != info["dtype"] or list(t.shape) != list(info["shape"]):
                raise ValueError(f"{path}: tensor {name!r} is {info['dtype']} {info['shape']}, "
                                 f"got {DTYPE_TO_ST[t.dtype]} {list(t.shape)}")
            t = t.view(storage_dtype(t.dtype)) if t.dtype in (torch.bfloat16, torch.bool) else t
            fh.seek(header.data_start + info["data_offsets"][0])
            fh.write(memoryview(t.numpy()).cast("B"))
        fh.flush()
        os.fsync(fh.fileno())


def _stream(plan: MergePlan, merger: BlockMerger, path: Path, show_progress: bool) -> None:
    """Merge every tensor into ``path``, one torch thread for the maths.

    The writer and the hasher run their own threads beside it; torch's intra-op threads on top
    of those oversubscribe the cores, and spinning OpenMP workers made a 2-core merge about
    twice as slow (measured). Restored at the end.
    """
    torch_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        metadata = {"format": "pt", "guardmerge_method": plan.recipe.method}
        with progress(len(plan.names), "merging", enabled=show_progress, unit="tensor") as bar, \
                StreamingWriter(path, plan.specs, metadata) as writer:
            for name in plan.names:
                writer.write(name, merger.blocks(name))
                bar.update(1)
    finally:
        torch.set_num_threads(torch_threads)


def merge(recipe: MergeRecipe | Mapping[str, Any] | str | os.PathLike[str],
          output: str | os.PathLike[str], options: MergeOptions | None = None,
          **overrides: Any) -> Path:
    """Run an HM3 merge and write a guard bundle to ``output`` (atomically). Returns the path.

    ``recipe``: a ``MergeRecipe``, a dict in the recipe's YAML shape, or a YAML file.
    ``options`` (``MergeOptions``) or its fields as keywords: ``overwrite``, ``progress``.
    RegMean statistics and a head re-fit (when the recipe asks for them) run the source and
    merged models on the recipe's calibration texts; statistics and teacher outputs are cached.
    """
    opts = replace(options or MergeOptions(), **overrides)
    recipe = load_recipe(recipe)
    with atomic_directory(output, overwrite=opts.overwrite) as tmp:
        plan = MergePlan(recipe)
        hasher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="guardmerge-hash")
        try:
            plan.start_hashing(hasher)
            logger.info("merging %d model(s) with %s (head_mode=%s) into %s", len(plan.sources),
                        recipe.method, recipe.head_mode.value, output)
            extra: dict[str, Any] = {}
            statistics, targets = None, None
            if recipe.needs_calibration:
                calibration = calibration_for(plan)
                extra["calibration"] = calibration.describe()
                if get_method(recipe.method).data_aware:
                    statistics = regmean_statistics(plan, calibration, progress=opts.progress)
                    extra["regmean"] = {"alpha": recipe.alpha,
                                        "texts_per_source": [st.texts for st in statistics]}
                if recipe.head_mode is HeadMode.REFIT:
                    targets = refit_targets(plan, calibration, progress=opts.progress)
            _stream(plan, BlockMerger(plan, statistics), tmp / plan.weights_file, opts.progress)
            write_support_files(plan, tmp, extra)
            if targets is not None:
                model, tokenizer = load_model(tmp)
                tensors, extra["refit"] = refit_heads(model, tokenizer, targets,
                                                      progress=opts.progress)
                patch_tensors(tmp / plan.weights_file,
                              {n: t.to(plan.specs[n].dtype) for n, t in tensors.items()})
                write_manifest(tmp, plan.final_heads(), recipe.to_dict(),
                               extra={**plan.manifest_extra(), **extra},
                               module_tensors=plan.module_tensor_names())
        except BaseException:
            hasher.shutdown(wait=True, cancel_futures=True)
            raise
        finally:
            hasher.shutdown(wait=True)
            plan.close()
    return Path(output).expanduser().resolve()
