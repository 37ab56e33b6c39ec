"""Strict safetensors header validation, without torch (the CLI's fast paths read headers).

The check catches truncated and corrupted files with a message that names the file, before
torch or transformers see them. Reading and writing tensor data is the merge's business
(``guardmerge.merge.plan`` / ``guardmerge.merge.write``).
"""

from __future__ import annotations

import json
import math
import os
import struct
from pathlib import Path
from typing import Any, NamedTuple

from ._files import open_regular
from .exceptions import ModelLoadError

__all__ = ["Header", "read_header", "ITEMSIZE", "FLOAT_DTYPES"]

ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1,
            "U8": 1, "BOOL": 1, "U16": 2, "U32": 4, "U64": 8, "F8_E4M3": 1, "F8_E5M2": 1}
FLOAT_DTYPES = frozenset({"F64", "F32", "F16", "BF16"})
_MAX_HEADER = 100 * 1024 * 1024


class Header(NamedTuple):
    """A validated safetensors header: tensor entries, ``__metadata__``, where the data starts."""

    tensors: dict[str, dict[str, Any]]
    metadata: dict[str, str]
    data_start: int


def read_header(path: str | os.PathLike[str]) -> Header:
    """Validate a safetensors file's header against its size.

    Raises ModelLoadError naming the file (and the tensor and field) for: not a regular file,
    too short, absurd header length, invalid JSON, a malformed entry (dtype, shape,
    data_offsets, ``__metadata__``), a tensor whose byte range does not match its shape,
    overlapping tensors, or data past the end.
    """
    path = Path(path)
    fd = open_regular(path, ModelLoadError, what="weights file")
    try:
        with os.fdopen(fd, "rb") as fh:
            size = os.fstat(fh.fileno()).st_size
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
    except RecursionError:
        raise ModelLoadError(f"{path}: corrupt safetensors header (nested too deeply)") from None
    except (UnicodeDecodeError, ValueError) as exc:
        raise ModelLoadError(f"{path}: corrupt safetensors header ({exc})") from exc
    if not isinstance(header, dict):
        raise ModelLoadError(f"{path}: corrupt safetensors header (not a JSON object)")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise ModelLoadError(f"{path}: __metadata__: expected a mapping of strings to strings")
    data_len = size - 8 - header_len
    ranges = []
    for name, info in header.items():
        dtype, shape, (start, end) = _entry(path, name, info)
        numel = math.prod(shape)
        if end - start != numel * ITEMSIZE[dtype]:
            raise ModelLoadError(
                f"{path}: tensor {name!r}: byte range {start}..{end} does not match shape {shape}"
            )
        if end > data_len:
            raise ModelLoadError(
                f"{path}: truncated: tensor {name!r} needs bytes up to {end} but the file holds "
                f"{data_len} data bytes"
            )
        ranges.append((start, end, name))
    ranges.sort()
    for (_, end_a, a), (start_b, end_b, b) in zip(ranges, ranges[1:]):
        if start_b < end_a and end_b > start_b:
            raise ModelLoadError(f"{path}: tensors {a!r} and {b!r}: data_offsets overlap")
    return Header(header, metadata, 8 + header_len)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _entry(path: Path, name: str, info: Any) -> tuple[str, list[int], tuple[int, int]]:
    """(dtype, shape, (start, end)) of one header entry, each field checked."""
    where = f"{path}: tensor {name!r}"
    if not isinstance(info, dict):
        raise ModelLoadError(f"{where}: malformed header entry (expected a mapping)")
    for key in ("dtype", "shape", "data_offsets"):
        if key not in info:
            raise ModelLoadError(f"{where}: malformed header entry (no {key!r})")
    dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
    if not isinstance(dtype, str) or dtype not in ITEMSIZE:
        raise ModelLoadError(f"{where}: dtype: unknown dtype {dtype!r}")
    if not isinstance(shape, list) or not all(_is_int(d) for d in shape):
        raise ModelLoadError(f"{where}: shape: expected a list of non-negative integers, got "
                             f"{shape!r:.80}")
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_int(o) for o in offsets) \
            or offsets[0] > offsets[1]:
        raise ModelLoadError(f"{where}: data_offsets: expected [start, end] with 0 <= start <= "
                             f"end, got {offsets!r:.80}")
    return dtype, shape, (offsets[0], offsets[1])
