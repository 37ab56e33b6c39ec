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
        if dtype not in ITEMSIZE:
            raise ModelLoadError(f"{path}: tensor {name!r}: unknown dtype {dtype!r}")
        numel = math.prod(int(dim) for dim in shape)
        if end - start != numel * ITEMSIZE[dtype] or start < 0:
            raise ModelLoadError(
                f"{path}: tensor {name!r}: byte range {start}..{end} does not match shape {shape}"
            )
        if end > data_len:
            raise ModelLoadError(
                f"{path}: truncated: tensor {name!r} needs bytes up to {end} but the file holds "
                f"{data_len} data bytes"
            )
    return Header(header, metadata, 8 + header_len)


