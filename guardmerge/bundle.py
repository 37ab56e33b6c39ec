"""Guard bundles: a transformers sequence-classifier folder plus a manifest of heads.

Two layouts. **plain** (every head a linear layer over one shared representation: BERT and
ALBERT bundles, and any bundle whose heads all come from one source) is a folder plain
``AutoModelForSequenceClassification`` loads::

    config.json           num_labels = all heads; id2label holds unique "head:label" names
    model.safetensors     weights (or sharded, with model.safetensors.index.json)
    tokenizer.json, tokenizer_config.json, vocab.txt / vocab.json + merges.txt / spm.model ...
    guardmerge.json       manifest: format version, layout, heads (name, labels, offset, kind,
                          source), recipe

**per_head** (heads with their own head modules from different sources: RoBERTa's
``classifier.dense``, DeBERTa's ``pooler.dense``, ...; see ``families``): the shared encoder
and the HM3 output layer under their usual names, and head ``i``'s modules under
``heads.<i>.``, in ``guardmerge.safetensors``. The manifest lists each head's modules
(prefix and tensors). There is no ``model.safetensors``, so plain transformers refuses the
folder loudly instead of loading random head modules; its config and tokenizer still load.

Manifests of format version 1 (plain, softmax heads) still load. A plain single-head
classifier folder (no manifest) is read as a bundle of one head named after the folder, a
sigmoid head if its config says ``problem_type: multi_label_classification``; regression heads
are refused. Weights are safetensors only: pickle files are refused, never unpickled.

Every file is read only if it is a regular file inside the bundle folder (symlinks resolved;
for a Hub download, inside that model's cache folder): an index entry with ``..`` or an
absolute path, a symlink out, a FIFO or a device is a ``ModelLoadError`` naming the file, and
so is every malformed manifest or header field. The manifest is at most 1 MiB.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from ._files import MAX_CONFIG_BYTES, MAX_JSON_BYTES, open_regular, read_bytes, read_text
from ._safetensors import read_header
from ._validate import Checker, parse_json, parse_yaml
from .exceptions import ModelLoadError
from .families import FAMILIES, Family
from .labels import (HEAD_KINDS, MULTI_LABEL, SINGLE_LABEL, Head, check_heads, duplicates,
                     head_name_from_id, qualified_label)

__all__ = [
    "BundleInfo",
    "FORMAT_VERSION",
    "MANIFEST_FILE",
    "TOKENIZER_FILES",
    "inspect_bundle",
    "resolve_model_dir",
    "weight_files",
    "write_manifest",
    "config_for_heads",
    "head_kind",
    "hash_files",
    "read_json",
    "read_vocab",
    "tokenizer_signature",
    "save_tokenizer",
    "copy_tokenizer",
    "PLAIN",
    "PER_HEAD",
    "PER_HEAD_WEIGHTS",
]

FORMAT_VERSION = 2
_READABLE_VERSIONS = (1, 2)
MANIFEST_FILE = "guardmerge.json"
#: layouts (see the module docstring)
PLAIN = "plain"
PER_HEAD = "per_head"
#: a per-head bundle's weights (not model.safetensors: plain transformers must not load it)
PER_HEAD_WEIGHTS = "guardmerge.safetensors"
_MANIFEST_NAMES = ("guardmerge.json", "guardmerge.yaml", "guardmerge.yml")
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
#: every file a tokenizer may consist of: all of them are copied into a bundle. ``True`` marks
#: the files that carry a vocabulary (a folder needs at least one of those).
TOKENIZER_FILES: dict[str, bool] = {
    "tokenizer.json": True, "vocab.txt": True, "vocab.json": True, "spm.model": True,
    "sentencepiece.bpe.model": True, "merges.txt": False, "tokenizer_config.json": False,
    "special_tokens_map.json": False, "added_tokens.json": False, "chat_template.jinja": False,
}
# Hub downloads: everything a bundle needs, never a pickle.
HUB_ALLOW_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.model", "*.yaml", "*.yml"]



@dataclass
class BundleInfo:
    """What a bundle folder holds, validated; no weights are loaded.

    ``layout``: ``plain`` or ``per_head``; ``family``: the model family (None for a plain
    classifier of a type guardmerge cannot split into encoder and head: it still runs, as
    transformers runs it, but cannot be merged).
    """

    path: Path
    heads: tuple[Head, ...]
    config: dict[str, Any]
    weight_files: list[Path]
    tensors: dict[str, dict[str, Any]] = field(repr=False)
    manifest: dict[str, Any] | None = None
    layout: str = PLAIN
    family: Family | None = None

    def module_tensors(self) -> dict[str, list[str]]:
        """Per head of a per-head bundle, its module tensors as the manifest lists them."""
        raw = (self.manifest or {}).get("heads") or []
        return {h.name: list(r["modules"]["tensors"]) for h, r in zip(self.heads, raw)
                if h.modules is not None}

    @property
    def plain_transformers(self) -> bool:
        """Whether plain ``AutoModelForSequenceClassification`` loads this folder (it then
        returns the concatenated logits; the per-head softmax / sigmoid is guardmerge's)."""
        return self.layout == PLAIN

    @property
    def num_labels(self) -> int:
        return sum(h.size for h in self.heads)

    @property
    def recipe(self) -> dict[str, Any] | None:
        return (self.manifest or {}).get("recipe")

    @property
    def num_parameters(self) -> int:
        return sum(math.prod(info["shape"]) for info in self.tensors.values())

    @property
    def weight_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.weight_files)

    @property
    def weight_dtypes(self) -> list[str]:
        return sorted({info["dtype"] for info in self.tensors.values()})


def resolve_model_dir(model: str | os.PathLike[str], revision: str | None = None) -> tuple[Path, str | None]:
    """Return (local folder, revision) for a local folder or a Hugging Face Hub id.

    Hub downloads fetch safetensors, JSON and tokenizer files only (never pickles). The revision
    returned is the Hub commit hash, or None for local folders.
    """
    path = Path(model).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ModelLoadError(f"{path}: expected a model folder, found a file")
        return path, None
    text = str(model)
    if text.startswith((".", "/", "~")) or text.count("/") > 1 or os.sep in text.replace("/", ""):
        raise ModelLoadError(f"{text}: no such model folder")
    try:
        from huggingface_hub import snapshot_download

        local = Path(snapshot_download(repo_id=text, revision=revision,
                                       allow_patterns=HUB_ALLOW_PATTERNS))
    except Exception as exc:  # translate every Hub failure at this boundary
        raise ModelLoadError(
            f"{text}: not a local folder, and fetching it from the Hugging Face Hub failed: "
            f"{type(exc).__name__}: {exc}"
        ) from exc
    return local, local.name if len(local.name) == 40 else revision


def folder_root(folder: Path) -> Path:
    """The folder a model's files must lie in: the folder itself, or for a Hugging Face cache
    snapshot (``models--org--name/snapshots/<rev>``, whose files link to ``../../blobs``) that
    model's cache folder."""
    if folder.parent.name == "snapshots" and (folder.parent.parent / "blobs").is_dir():
        return folder.parent.parent
    return folder


def read_json(path: Path, limit: int = MAX_JSON_BYTES) -> Any:
    """A JSON file inside its model folder (regular file, size-capped, no duplicate keys); a
    ModelLoadError naming the file and the problem."""
    text = read_text(path, ModelLoadError, root=folder_root(path.parent), limit=limit)
    return parse_json(text, str(path), ModelLoadError)


def _check_file(folder: Path, path: Path, what: str = "file") -> Path:
    """``path`` must be a regular file inside the folder (else a ModelLoadError naming it)."""
    os.close(open_regular(path, ModelLoadError, root=folder_root(folder), what=what))
    return path


def _shard_name(index: Path, key: str, name: Any) -> str:
    where = f"{index}: weight_map[{key!r}]"
    if not isinstance(name, str) or not name:
        raise ModelLoadError(f"{where}: expected a file name, got {type(name).__name__}")
    if Path(name).is_absolute() or ".." in Path(name).parts or "\\" in name or ":" in name:
        raise ModelLoadError(f"{where}: {name!r} is not a file name inside the bundle folder "
                             "(absolute paths and '..' are refused)")
    return name


def weight_files(folder: Path) -> list[Path]:
    """The safetensors weight files of a model folder (one file, the shards of an index, or a
    per-head bundle's ``guardmerge.safetensors``), each checked to be a regular file inside the
    folder."""
    single = folder / "model.safetensors"
    index = folder / "model.safetensors.index.json"
    per_head = folder / PER_HEAD_WEIGHTS
    if single.exists() or single.is_symlink():
        return [_check_file(folder, single, "weights file")]
    if (per_head.exists() or per_head.is_symlink()) and not index.exists():
        return [_check_file(folder, per_head, "weights file")]
    if index.exists():
        data = read_json(index)
        weight_map = data.get("weight_map") if isinstance(data, dict) else None
        if not isinstance(weight_map, dict) or not weight_map:
            raise ModelLoadError(f"{index}: weight_map: expected a mapping of tensor names to "
                                 "shard files")
        names = sorted({_shard_name(index, k, v) for k, v in weight_map.items()})
        files = [folder / n for n in names]
        for f in files:
            if not f.exists() and not f.is_symlink():
                raise ModelLoadError(f"{f}: missing (listed in {index.name})")
            _check_file(folder, f, "weights file")
        return files
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix in _PICKLE_SUFFIXES)
    if pickles:
        raise ModelLoadError(
            f"{folder}: only pickle weights found ({', '.join(pickles)}); guardmerge refuses to "
            "unpickle model files. Convert them to model.safetensors first."
        )
    raise ModelLoadError(f"{folder / 'model.safetensors'}: missing (no safetensors weights)")


def _id2label(config: Mapping[str, Any], config_path: Path) -> list[str] | None:
    """Labels in id order; None when the config has none (transformers omits default LABEL_i)."""
    raw = config.get("id2label")
    if not raw:
        n = config.get("num_labels")
        if isinstance(n, int) and n > 0:
            return [f"LABEL_{i}" for i in range(n)]
        return None
    if not isinstance(raw, dict):
        raise ModelLoadError(f"{config_path}: id2label: expected a mapping of ids to labels")
    try:
        items = sorted((int(k), v) for k, v in raw.items())
    except (ValueError, TypeError) as exc:
        raise ModelLoadError(f"{config_path}: id2label keys must be integers") from exc
    if [k for k, _ in items] != list(range(len(items))):
        raise ModelLoadError(f"{config_path}: id2label must have ids 0..{len(items) - 1}")
    for k, v in items:
        if not isinstance(v, str) or not v:
            raise ModelLoadError(f"{config_path}: id2label[{k}]: expected a non-empty string, "
                                 f"got {type(v).__name__}")
    labels = [v for _, v in items]
    dupes = duplicates(labels)
    if dupes:
        raise ModelLoadError(f"{config_path}: duplicate label names in id2label: {dupes}")
    return labels


def _read_manifest(folder: Path) -> tuple[Path | None, dict[str, Any] | None]:
    for name in _MANIFEST_NAMES:
        path = folder / name
        if not path.exists() and not path.is_symlink():
            continue
        if name.endswith(".json"):
            data = read_json(path, MAX_CONFIG_BYTES)
        else:
            text = read_text(path, ModelLoadError, root=folder_root(folder),
                             limit=MAX_CONFIG_BYTES, what="manifest")
            data = parse_yaml(text, str(path), ModelLoadError)
        if not isinstance(data, dict):
            raise ModelLoadError(f"{path}: manifest must be a mapping")
        return path, data
    return None, None


def _heads_from_manifest(path: Path, manifest: Mapping[str, Any]) -> tuple[Head, ...]:
    """The manifest's heads; every malformed field is a ModelLoadError naming file and field."""
    version = manifest_version(path, manifest)
    c = Checker(str(path))
    raw_heads = manifest.get("heads")
    if not isinstance(raw_heads, list) or not raw_heads:
        raise ModelLoadError(f"{path}: heads: expected a non-empty list")
    heads = []
    for i, h in enumerate(raw_heads):
        where = f"heads[{i}]"
        h = c.mapping(h, where, required=("name", "labels"))
        if h is None:
            continue
        name = c.string(h.get("name"), f"{where}.name") if "name" in h else None
        labels = c.string_list(h.get("labels"), f"{where}.labels", allow_single=False) \
            if "labels" in h else None
        offset = c.integer(h.get("offset"), f"{where}.offset", lo=0) if "offset" in h else -1
        src = h.get("source")
        if src is None:
            src = {}
        src = c.mapping(src, f"{where}.source") or {}
        for key in ("id", "revision", "sha256"):
            if src.get(key) is not None:
                c.string(src[key], f"{where}.source.{key}")
        kind = SINGLE_LABEL
        if version >= 2:
            kind = c.choice(h.get("kind", SINGLE_LABEL), f"{where}.kind", HEAD_KINDS)
        modules = None
        if h.get("modules") is not None:
            mod = c.mapping(h["modules"], f"{where}.modules", required=("prefix", "tensors"),
                            allowed=("prefix", "tensors")) if version >= 2 else \
                c.add(f"{where}.modules", "per-head modules need format_version 2")
            if mod is not None:
                modules = c.string(mod.get("prefix"), f"{where}.modules.prefix")
                if modules is not None and not re.fullmatch(r"heads\.\d+\.", modules):
                    c.add(f"{where}.modules.prefix", f"expected 'heads.<n>.', got {modules!r}")
                    modules = None
                c.string_list(mod.get("tensors"), f"{where}.modules.tensors",
                              allow_single=False)
        extra = {k: v for k, v in h.items()
                 if k not in {"name", "labels", "offset", "source", "kind", "modules"}}
        if name is None or labels is None or offset is None or kind is None or c.problems:
            continue
        heads.append(Head(name=name, labels=tuple(labels), offset=offset, source=src.get("id"),
                          revision=src.get("revision"), sha256=src.get("sha256"), extra=extra,
                          kind=kind, modules=modules))
    c.raise_if_any(ModelLoadError)
    return tuple(heads)


def manifest_version(path: Path, manifest: Mapping[str, Any]) -> int:
    version = manifest.get("format_version")
    if version not in _READABLE_VERSIONS or isinstance(version, bool):
        raise ModelLoadError(
            f"{path}: format_version is {version!r}; this guardmerge reads versions "
            f"{', '.join(map(str, _READABLE_VERSIONS))}")
    return int(version)


def head_kind(config: Mapping[str, Any], config_path: Path | str, n_labels: int) -> str:
    """A plain classifier's head kind from its config's ``problem_type``: ``multi_label``
    for multi_label_classification, else ``single_label``. A regression head (problem_type
    regression, or one output without a problem_type, which transformers trains as regression)
    is a ModelLoadError: it gives a number, not label probabilities."""
    problem = config.get("problem_type")
    if problem == "multi_label_classification":
        return MULTI_LABEL
    if problem == "regression" or (problem is None and n_labels == 1):
        why = "problem_type: regression" if problem == "regression" else \
            "one output and no problem_type (transformers trains that as regression)"
        raise ModelLoadError(f"{config_path}: a regression head ({why}); guardmerge scores "
                             "classification heads only (softmax or multi-label sigmoid)")
    if problem not in (None, "single_label_classification"):
        raise ModelLoadError(f"{config_path}: problem_type: unknown value {problem!r}")
    return SINGLE_LABEL


def _check_layout(path: Path, manifest: Mapping[str, Any], heads: Sequence[Head],
                  family: Family | None, files: Sequence[Path],
                  tensors: Mapping[str, Any]) -> str:
    """The manifest's layout, checked against the weights: a per-head bundle lists each head's
    module tensors, which must exist, and keeps its weights in ``guardmerge.safetensors``."""
    layout = manifest.get("layout", PLAIN)
    if layout not in (PLAIN, PER_HEAD):
        raise ModelLoadError(f"{path}: layout: expected {PLAIN} or {PER_HEAD}, got {layout!r}")
    moduled = [h for h in heads if h.modules is not None]
    if layout == PLAIN:
        if moduled:
            raise ModelLoadError(f"{path}: heads[{heads.index(moduled[0])}].modules: a plain "
                                 "bundle has no per-head modules")
        if any(f.name == PER_HEAD_WEIGHTS for f in files):
            raise ModelLoadError(f"{path}: layout is plain but the weights are in "
                                 f"{PER_HEAD_WEIGHTS} (expected model.safetensors)")
        return layout
    if family is None or not family.has_head_modules:
        raise ModelLoadError(f"{path}: layout {PER_HEAD} needs a model family with head modules")
    if [f.name for f in files] != [PER_HEAD_WEIGHTS]:
        raise ModelLoadError(f"{path}: a {PER_HEAD} bundle keeps its weights in "
                             f"{PER_HEAD_WEIGHTS}, found {', '.join(f.name for f in files)}")
    raw = manifest.get("heads") or []
    for i, h in enumerate(heads):
        if h.modules is None:
            raise ModelLoadError(f"{path}: heads[{i}].modules: missing (layout {PER_HEAD})")
        listed = list(raw[i]["modules"]["tensors"])
        for name in listed:
            if not name.startswith(h.modules) or \
                    family.head_module_of(name[len(h.modules):]) is None:
                raise ModelLoadError(f"{path}: heads[{i}].modules.tensors: {name!r} is not a "
                                     f"{family.name} head-module tensor under {h.modules!r} "
                                     f"(head modules: {', '.join(family.head_modules)})")
            if name not in tensors:
                raise ModelLoadError(f"{files[0]}: no tensor {name!r} (listed for head "
                                     f"{h.name!r} in {path.name})")
        present = sorted(n for n in tensors if n.startswith(h.modules))
        if present != sorted(listed):
            raise ModelLoadError(f"{path}: heads[{i}].modules.tensors lists {sorted(listed)}, "
                                 f"the weights hold {present} under {h.modules!r}")
    return layout


def inspect_bundle(model: str | os.PathLike[str], revision: str | None = None) -> BundleInfo:
    """Validate a bundle (or a plain single-head classifier folder) without loading weights."""
    folder, hub_revision = resolve_model_dir(model, revision)
    config_path = folder / "config.json"
    config = read_json(config_path)
    if not isinstance(config, dict) or not isinstance(config.get("model_type"), str):
        raise ModelLoadError(f"{config_path}: not a transformers config (no model_type)")
    if config.get("auto_map"):
        raise ModelLoadError(
            f"{config_path}: declares custom code (auto_map); guardmerge never runs remote code"
        )
    family = FAMILIES.get(str(config["model_type"]))
    labels = _id2label(config, config_path)
    files = weight_files(folder)
    tensors: dict[str, dict[str, Any]] = {}
    for wf in files:
        tensors.update(read_header(wf).tensors)
    prefix = family.output if family else None
    if labels is None:
        out = tensors.get(f"{prefix}.weight") if prefix else None
        if out is None:
            raise ModelLoadError(f"{config_path}: no id2label and no output layer "
                                 "(is this a sequence classifier?)")
        labels = [f"LABEL_{i}" for i in range(out["shape"][0])]
    vocab_files = [name for name, has_vocab in TOKENIZER_FILES.items() if has_vocab]
    for name in TOKENIZER_FILES:  # transformers reads these: regular files inside the folder
        if (folder / name).exists() or (folder / name).is_symlink():
            _check_file(folder, folder / name, "tokenizer file")
    if not any((folder / f).exists() for f in vocab_files):
        raise ModelLoadError(f"{folder}: no tokenizer files (expected one of "
                             f"{', '.join(vocab_files)})")

    manifest_path, manifest = _read_manifest(folder)
    layout = PLAIN
    if manifest is not None:
        assert manifest_path is not None
        heads = _heads_from_manifest(manifest_path, manifest)
        problems = check_heads(heads, num_labels=len(labels))
        if problems:
            raise ModelLoadError(f"{manifest_path}: " + "; ".join(problems))
        expected = [q for h in heads for q in h.qualified()]
        if expected != labels:
            raise ModelLoadError(
                f"{manifest_path}: heads do not match {config_path.name} id2label "
                f"(manifest gives {expected}, config has {labels})"
            )
        layout = _check_layout(manifest_path, manifest, heads, family, files, tensors)
    else:
        if any(f.name == PER_HEAD_WEIGHTS for f in files):
            raise ModelLoadError(f"{folder}: {PER_HEAD_WEIGHTS} without a manifest")
        heads = (Head(name=head_name_from_id(str(model) if hub_revision else folder.name),
                      labels=tuple(labels), offset=0, source=str(model), revision=hub_revision,
                      kind=head_kind(config, config_path, len(labels))),)

    if prefix is not None:
        weight = tensors.get(f"{prefix}.weight")
        if weight is None:
            raise ModelLoadError(
                f"{files[0]}: no tensor '{prefix}.weight' (is this a sequence classifier?)"
            )
        if weight["shape"][0] != len(labels):
            raise ModelLoadError(
                f"{files[0]}: tensor '{prefix}.weight' has {weight['shape'][0]} rows but "
                f"{config_path.name} declares {len(labels)} labels"
            )
    return BundleInfo(path=folder, heads=heads, config=config, weight_files=files,
                      tensors=tensors, manifest=manifest, layout=layout, family=family)


def hash_files(paths: Sequence[Path]) -> str:
    """sha256 over the given files' bytes, in order (a content hash for a model's weights)."""
    digest = hashlib.sha256()
    for p in paths:
        with open(p, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def write_manifest(folder: Path, heads: Sequence[Head], recipe: Mapping[str, Any] | None,
                   extra: Mapping[str, Any] | None = None, *,
                   module_tensors: Mapping[str, Sequence[str]] | None = None) -> Path:
    """Write ``guardmerge.json`` (deterministic: sorted keys, no timestamps).

    ``module_tensors``: head name -> its module tensors (full names), for a per-head bundle
    (every head then has ``modules``, its prefix)."""
    from . import __version__

    entries = []
    for h in heads:
        entry = h.to_dict()
        entry.pop("modules", None)
        if h.modules is not None:
            if module_tensors is None or h.name not in module_tensors:
                raise ValueError(f"head {h.name!r} has modules but no tensors were given")
            entry["modules"] = {"prefix": h.modules, "tensors": sorted(module_tensors[h.name])}
        entries.append(entry)
    per_head = any(h.modules is not None for h in heads)
    manifest: dict[str, Any] = {
        "format": "guardmerge-bundle",
        "format_version": FORMAT_VERSION,
        "guardmerge_version": __version__,
        "layout": PER_HEAD if per_head else PLAIN,
        "heads": entries,
        "recipe": dict(recipe) if recipe is not None else None,
    }
    if extra:
        manifest.update(extra)
    path = folder / MANIFEST_FILE
    path.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return path


def config_for_heads(config: Mapping[str, Any], heads: Sequence[Head]) -> dict[str, Any]:
    """A copy of a transformers config dict re-labelled for the given heads."""
    names = [qualified_label(h.name, lab) for h in heads for lab in h.labels]
    out = {k: v for k, v in config.items() if k not in {"label2id", "id2label", "num_labels",
                                                        "_name_or_path"}}
    out["id2label"] = {str(i): n for i, n in enumerate(names)}
    out["label2id"] = {n: i for i, n in enumerate(names)}
    # transformers' problem_type says how its own training would score the logits; guardmerge
    # reads each head's kind from the manifest. All sigmoid heads: multi-label; all softmax:
    # single-label; mixed: left out (no transformers setting describes it).
    out.pop("problem_type", None)
    kinds = {h.kind for h in heads}
    if kinds == {MULTI_LABEL}:
        out["problem_type"] = "multi_label_classification"
    elif kinds == {SINGLE_LABEL} and len(names) > 1:
        out["problem_type"] = "single_label_classification"
    return out


#: a tokenizer.json may be large (XLM-RoBERTa's is 17 MB); read at most this much
MAX_TOKENIZER_BYTES = 256 << 20


def _tokenizer_text(folder: Path, name: str) -> str | None:
    path = folder / name
    if not path.exists() and not path.is_symlink():
        return None
    return read_text(path, ModelLoadError, root=folder_root(folder), limit=MAX_TOKENIZER_BYTES,
                     what="tokenizer file")


def _merge_pairs(merges: Any) -> list[tuple[str, str]]:
    """BPE merges as pairs, whichever way the file writes them ("a b" or ["a", "b"])."""
    out = []
    for m in merges or []:
        if isinstance(m, str):
            a, _, b = m.partition(" ")
            out.append((a, b))
        else:
            out.append((str(m[0]), str(m[1])))
    return out


def tokenizer_signature(folder: Path) -> dict[str, Any] | None:
    """What decides which ids a text becomes, read from a folder's tokenizer files (no
    transformers): ``model`` (WordPiece / BPE / Unigram), ``vocab`` (token -> id, added tokens
    included), ``merges`` (BPE merge pairs, in order) and ``sentencepiece`` (sha256 of each
    SentencePiece model file). None when the folder has no vocabulary file. Two sources merge
    only where every part both have is equal."""
    sig: dict[str, Any] = {}
    try:
        text = _tokenizer_text(folder, "tokenizer.json")
        if text is not None:
            data = json.loads(text)
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
            sig["model"] = str(model.get("type"))
            sig["vocab"] = out
            if model.get("type") == "BPE":
                sig["merges"] = _merge_pairs(model.get("merges"))
        else:
            vt = _tokenizer_text(folder, "vocab.txt")
            vj = _tokenizer_text(folder, "vocab.json")
            if vt is not None:
                lines = vt.split("\n")
                if lines and lines[-1] == "":
                    lines.pop()
                sig["vocab"] = {line.rstrip("\r"): i for i, line in enumerate(lines)}
            elif vj is not None:
                sig["vocab"] = {str(k): int(v) for k, v in json.loads(vj).items()}
            mt = _tokenizer_text(folder, "merges.txt")
            if mt is not None:
                lines = [ln for ln in mt.splitlines() if ln and not ln.startswith("#version")]
                sig["merges"] = _merge_pairs(lines)
    except (ValueError, KeyError, TypeError, IndexError) as exc:
        raise ModelLoadError(f"{folder}: cannot read the tokenizer vocabulary: {exc}") from exc
    for name in ("spm.model", "sentencepiece.bpe.model"):
        path = folder / name
        if path.exists() or path.is_symlink():
            data = read_bytes(path, ModelLoadError, root=folder_root(folder),
                              limit=MAX_TOKENIZER_BYTES, what="tokenizer file")
            sig.setdefault("sentencepiece", {})[name] = hashlib.sha256(data).hexdigest()
    return sig or None


def read_vocab(folder: Path) -> dict[str, int] | None:
    """The tokenizer vocabulary (token -> id) read from a folder's files (no transformers
    import); None when the folder has none that can be read without a SentencePiece parser."""
    sig = tokenizer_signature(folder)
    return None if sig is None else sig.get("vocab")


def _wordpiece(folder: Path) -> bool:
    try:
        data = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and (data.get("model") or {}).get("type") == "WordPiece"


def _ensure_vocab_txt(folder: Path) -> None:
    """transformers 5 no longer writes ``vocab.txt`` for WordPiece tokenizers; bundles carry it
    (older loaders and other tools read it), so it is written from ``tokenizer.json``."""
    if (folder / "vocab.txt").exists() or not _wordpiece(folder):
        return
    vocab = read_vocab(folder) or {}
    ordered = sorted(vocab, key=vocab.__getitem__)
    (folder / "vocab.txt").write_text("\n".join(ordered) + "\n", encoding="utf-8")


def save_tokenizer(tokenizer: Any, folder: str | os.PathLike[str]) -> None:
    """``tokenizer.save_pretrained(folder)``, plus ``vocab.txt`` for WordPiece tokenizers."""
    folder = Path(folder)
    tokenizer.save_pretrained(folder)
    _ensure_vocab_txt(folder)


def copy_tokenizer(src: Path, dst: Path) -> None:
    """Copy every tokenizer file of ``src`` (``TOKENIZER_FILES``: WordPiece, BPE's vocab.json
    + merges.txt, SentencePiece models, tokenizer.json and its configs) into ``dst``, byte for
    byte; each read only as a regular file inside ``src`` (its Hub cache folder for a download)."""
    for name in TOKENIZER_FILES:
        path = src / name
        if path.exists() or path.is_symlink():
            data = read_bytes(path, ModelLoadError, root=folder_root(src),
                              limit=MAX_TOKENIZER_BYTES, what="tokenizer file")
            (dst / name).write_bytes(data)
    _ensure_vocab_txt(dst)
    _ensure_tokenizer_json(dst)


def _ensure_tokenizer_json(folder: Path) -> None:
    """A SentencePiece-only tokenizer (``spm.model``, no ``tokenizer.json``) gets the
    ``tokenizer.json`` transformers converts it to, beside the model file, so that the bundle
    loads without the sentencepiece and protobuf packages (which the conversion needs)."""
    from .classifier import load_tokenizer, sentencepiece_only

    if sentencepiece_only(folder) is None:
        return
    backend = getattr(load_tokenizer(folder), "backend_tokenizer", None)
    if backend is None:
        raise ModelLoadError(f"{folder}: the SentencePiece tokenizer did not convert to a fast "
                             "tokenizer (no tokenizer.json can be written)")
    backend.save(str(folder / "tokenizer.json"))
