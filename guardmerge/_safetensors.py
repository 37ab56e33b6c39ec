"""Small, strict safetensors helpers: header validation and a streaming writer.

The header check catches truncated and corrupted files with a message that names the file,
before torch or transformers see them. The writer lays the header out first (all shapes are
known before any tensor is computed) and then streams tensors one at a time, so a merge never
holds the whole model in memory.
"""

from __future__ import annotations

import json
import os
import queue
import struct
import threading
from pathlib import Path
from typing import Any, BinaryIO, Iterable, Mapping

import torch

from .exceptions import ModelLoadError

__all__ = ["read_header", "read_tensor", "TensorSpec", "StreamingWriter", "DTYPE_TO_ST", "ST_TO_DTYPE"]

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
_ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1,
             "U8": 1, "BOOL": 1, "U16": 2, "U32": 4, "U64": 8, "F8_E4M3": 1, "F8_E5M2": 1}
_MAX_HEADER = 100 * 1024 * 1024


def read_header(path: str | os.PathLike[str]) -> tuple[dict[str, dict[str, Any]], dict[str, str]]:
    """Validate a safetensors file's header against its size; return (tensors, metadata).

    Raises ModelLoadError naming the file for: too short, absurd header length, invalid JSON,
    unknown dtype, a tensor whose byte range does not match its shape, or data past the end.
    """
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            raw_len = fh.read(8)
            if len(raw_len) < 8:
                raise ModelLoadError(f"{path}: not a safetensors file (only {size} bytes)")
            (header_len,) = struct.unpack("<Q", raw_len)
            if header_len > _MAX_HEADER or 8 + header_len > size:
                raise ModelLoadError(
                    f"{path}: corrupt or truncated safetensors file (header claims {header_len} "
                    f"bytes, file has {size})"
                )
            raw = fh.read(header_len)
    except OSError as exc:
        raise ModelLoadError(f"{path}: cannot read: {exc}") from exc
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelLoadError(f"{path}: corrupt safetensors header ({exc})") from exc
    if not isinstance(header, dict):
        raise ModelLoadError(f"{path}: corrupt safetensors header (not a JSON object)")
    metadata = header.pop("__metadata__", None) or {}
    data_len = size - 8 - header_len
    for name, info in header.items():
        try:
            dtype, shape, (start, end) = info["dtype"], info["shape"], info["data_offsets"]
        except (KeyError, TypeError, ValueError) as exc:
            raise ModelLoadError(f"{path}: tensor {name!r}: malformed header entry") from exc
        if dtype not in _ITEMSIZE:
            raise ModelLoadError(f"{path}: tensor {name!r}: unknown dtype {dtype!r}")
        numel = 1
        for dim in shape:
            numel *= int(dim)
        if end - start != numel * _ITEMSIZE[dtype] or start < 0:
            raise ModelLoadError(
                f"{path}: tensor {name!r}: byte range {start}..{end} does not match shape {shape}"
            )
        if end > data_len:
            raise ModelLoadError(
                f"{path}: truncated: tensor {name!r} needs bytes up to {end} but the file holds "
                f"{data_len} data bytes"
            )
    return header, metadata


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
    numel = 1
    for dim in shape:
        numel *= dim
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
    __slots__ = ("dtype", "shape")

    def __init__(self, dtype: torch.dtype, shape: tuple[int, ...]) -> None:
        self.dtype = dtype
        self.shape = tuple(int(s) for s in shape)

    @property
    def nbytes(self) -> int:
        n = _ITEMSIZE[DTYPE_TO_ST[self.dtype]]
        for s in self.shape:
            n *= s
        return n


class StreamingWriter:
    """Write a safetensors file tensor by tensor, in the (sorted) order of ``specs``.

    The layout is deterministic: tensors sorted by name, header JSON with sorted keys, padded to
    8 bytes. Writing the same tensors twice gives byte-identical files.
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

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self._stop()
            self._fh.close()
