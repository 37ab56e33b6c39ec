"""Cached statistics of source models on calibration texts.

Two kinds, each computed once per (source content hash, calibration texts hash, settings) and
kept on disk, so a search over RegMean's ``alpha``, a re-fit after another encoder merge, or a
re-run reuses them:

- Gram statistics for RegMean: per linear layer, ``X^T X / rows`` of its inputs over non-pad
  tokens (float64, one safetensors file per source). Read back one layer at a time.
- Teacher logits for re-fit and distillation: a source's logits on the texts (float32).

The cache folder is ``calibration.cache`` in a recipe, else ``$GUARDMERGE_CACHE``, else
``$XDG_CACHE_HOME/guardmerge`` (``~/.cache/guardmerge``). Files are written to a temporary name
and renamed, so an interrupted run never leaves a half file that a later run would trust; a
file whose recorded key does not match is recomputed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any, Sequence

import torch

from .. import __version__

__all__ = ["cache_dir", "texts_sha256", "model_key", "GramStatistics", "gram_statistics",
           "teacher_logits"]

logger = logging.getLogger("guardmerge.merge")

STATISTICS_VERSION = 2


def cache_dir(configured: str | os.PathLike[str] | None = None) -> Path:
    """Where cached statistics live (see the module docstring)."""
    if configured:
        return Path(configured).expanduser()
    env = os.environ.get("GUARDMERGE_CACHE")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(xdg) / "guardmerge"


def texts_sha256(texts: Sequence[str]) -> str:
    """sha256 over the texts in order, each length-prefixed (no two lists hash alike)."""
    digest = hashlib.sha256()
    for t in texts:
        raw = t.encode("utf-8", "surrogatepass")
        digest.update(len(raw).to_bytes(8, "little") + raw)
    return digest.hexdigest()


def model_key(folder: Path, weights_sha256: str) -> str:
    """What a model's outputs depend on: its weights' content hash plus its config and
    tokenizer files (a changed tokenizer or config gives other statistics, so another key)."""
    from ..bundle import TOKENIZER_FILES

    digest = hashlib.sha256(weights_sha256.encode())
    for name in ("config.json", *TOKENIZER_FILES):
        path = folder / name
        if path.is_file():
            raw = path.read_bytes()
            digest.update(name.encode() + len(raw).to_bytes(8, "little") + raw)
    return digest.hexdigest()


def _key(kind: str, **fields: Any) -> str:
    return hashlib.sha256(json.dumps({"kind": kind, "version": STATISTICS_VERSION, **fields},
                                     sort_keys=True).encode()).hexdigest()


def _save(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, Any]) -> None:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file({k: v.contiguous() for k, v in tensors.items()}, tmp,
                  metadata={"guardmerge": json.dumps(metadata, sort_keys=True)})
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _metadata(path: Path) -> dict[str, Any] | None:
    """The recorded key of a cache file, or None when it is missing or unreadable."""
    from safetensors import safe_open

    if not path.is_file():
        return None
    try:
        with safe_open(str(path), "pt") as f:
            return json.loads((f.metadata() or {}).get("guardmerge", "null"))
    except Exception:  # a truncated or foreign file: recompute it
        logger.warning("ignoring unreadable cache file %s", path)
        return None


class GramStatistics:
    """One source's cached Gram statistics; ``gram(module)`` reads one layer's matrix."""

    def __init__(self, path: Path, rows: dict[str, int], texts: int,
                 aliases: dict[str, str] | None = None) -> None:
        self.path = path
        self.aliases = dict(aliases or {})  # module -> the module whose input it shares
        self.rows = {**rows, **{m: rows[a] for m, a in self.aliases.items()}}
        self.texts = texts

    @property
    def modules(self) -> list[str]:
        return sorted(self.rows)

    def gram(self, module: str) -> torch.Tensor:
        """``X^T X / rows`` of the inputs of ``module`` (float64), read from the file alone."""
        from safetensors import safe_open

        with safe_open(str(self.path), "pt") as f:
            return f.get_tensor(self.aliases.get(module, module))


def gram_statistics(folder: Path, source_sha: str, texts: Sequence[str], modules: Sequence[str],
                    *, max_length: int, cache: Path, batch_size: int = 16,
                    show_progress: bool = False, desc: str = "statistics") -> GramStatistics:
    """The Gram statistics of the source in ``folder`` (content hash ``source_sha``) on
    ``texts``, from the cache or computed now (with a progress bar) and cached."""
    key = _key("gram", source=source_sha, texts=texts_sha256(texts), max_length=max_length,
               modules=sorted(modules))
    path = cache / "statistics" / f"gram-{key[:32]}.safetensors"
    meta = _metadata(path)
    if meta is not None and meta.get("key") == key:
        logger.info("RegMean statistics for %s: cached (%s)", folder, path)
        return GramStatistics(path, {k: int(v) for k, v in meta["rows"].items()},
                              int(meta["texts"]), meta.get("aliases"))
    from .activations import linear_grams, load_model

    model, tokenizer = load_model(folder)
    grams, rows, aliases = linear_grams(model, tokenizer, texts, modules, max_length=max_length,
                                        batch_size=batch_size, desc=desc,
                                        show_progress=show_progress)
    missing = sorted(set(modules) - set(grams) - set(aliases))
    if missing:
        raise RuntimeError(f"{folder}: no inputs were seen for {missing[:3]}")
    tensors = {m: g / rows[m] for m, g in grams.items()}
    _save(path, tensors, {"key": key, "source_sha256": source_sha, "texts": len(texts),
                          "max_length": max_length, "rows": rows, "aliases": aliases,
                          "guardmerge": __version__})
    logger.info("RegMean statistics for %s: %d texts, written to %s", folder, len(texts), path)
    return GramStatistics(path, rows, len(texts), aliases)


def teacher_logits(folder: Path, source_sha: str, texts: Sequence[str], *, max_length: int,
                   cache: Path, batch_size: int = 32, show_progress: bool = False,
                   desc: str = "teacher") -> torch.Tensor:
    """A source's logits on ``texts`` (``[len(texts), num_labels]``, float32), cached."""
    key = _key("logits", source=source_sha, texts=texts_sha256(texts), max_length=max_length)
    path = cache / "teachers" / f"logits-{key[:32]}.safetensors"
    meta = _metadata(path)
    if meta is not None and meta.get("key") == key:
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            return f.get_tensor("logits")
    from .activations import load_model, logits

    model, tokenizer = load_model(folder)
    out = logits(model, tokenizer, texts, max_length=max_length, batch_size=batch_size,
                 desc=desc, show_progress=show_progress)
    _save(path, {"logits": out}, {"key": key, "source_sha256": source_sha, "texts": len(texts),
                                   "max_length": max_length, "guardmerge": __version__})
    return out
