"""Guard bundles: a transformers sequence-classifier folder plus a manifest of heads.

Layout (every file is also what plain ``AutoModelForSequenceClassification`` expects)::

    config.json           num_labels = all heads; id2label holds unique "head:label" names
    model.safetensors     weights (or sharded, with model.safetensors.index.json)
    tokenizer.json, tokenizer_config.json, vocab.txt, ...   the full tokenizer
    guardmerge.json       manifest: format version, heads (name, labels, offset, source), recipe

A plain single-head classifier folder (no manifest) is read as a bundle of one head named after
the folder. Weights are safetensors only: pickle files are refused, never unpickled.

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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from ._files import MAX_CONFIG_BYTES, MAX_JSON_BYTES, open_regular, read_text
from ._safetensors import read_header
from ._validate import Checker, parse_json, parse_yaml
from .exceptions import ModelLoadError
from .labels import Head, check_heads, duplicates, head_name_from_id, qualified_label

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
    "output_layer_prefix",
    "hash_files",
    "read_json",
    "read_vocab",
    "save_tokenizer",
    "copy_tokenizer",
]

FORMAT_VERSION = 1
MANIFEST_FILE = "guardmerge.json"
_MANIFEST_NAMES = ("guardmerge.json", "guardmerge.yaml", "guardmerge.yml")
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
#: every file a tokenizer may consist of: all of them are copied into a bundle. ``True`` marks
#: the files that carry a vocabulary (a folder needs at least one of those).
TOKENIZER_FILES: dict[str, bool] = {
    "tokenizer.json": True, "vocab.txt": True, "vocab.json": True, "spm.model": True,
    "sentencepiece.bpe.model": True, "merges.txt": False, "tokenizer_config.json": False,
    "special_tokens_map.json": False, "added_tokens.json": False,
}
# Hub downloads: everything a bundle needs, never a pickle.
HUB_ALLOW_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.model", "*.yaml", "*.yml"]

# Name (prefix) of the final classification layer per model type: the tensors HM3 expands.
_OUTPUT_LAYERS = {
    "bert": "classifier",
    "distilbert": "classifier",
    "albert": "classifier",
    "deberta": "classifier",
    "deberta-v2": "classifier",
    "mobilebert": "classifier",
    "roberta": "classifier.out_proj",
    "xlm-roberta": "classifier.out_proj",
    "electra": "classifier.out_proj",
    "camembert": "classifier.out_proj",
    "modernbert": "classifier",
}


def output_layer_prefix(model_type: str) -> str:
    try:
        return _OUTPUT_LAYERS[model_type]
    except KeyError:
        raise ModelLoadError(
            f"model type {model_type!r} is not supported (supported: {sorted(_OUTPUT_LAYERS)})"
        ) from None


@dataclass
class BundleInfo:
    """What a bundle folder holds, validated; no weights are loaded."""

    path: Path
    heads: tuple[Head, ...]
    config: dict[str, Any]
    weight_files: list[Path]
    tensors: dict[str, dict[str, Any]] = field(repr=False)
    manifest: dict[str, Any] | None = None

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
    """The safetensors weight files of a model folder (one file, or the shards of an index),
    each checked to be a regular file inside the folder."""
    single = folder / "model.safetensors"
    index = folder / "model.safetensors.index.json"
    if single.exists() or single.is_symlink():
        return [_check_file(folder, single, "weights file")]
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
    version = manifest.get("format_version")
    if version != FORMAT_VERSION or isinstance(version, bool):
        raise ModelLoadError(
            f"{path}: format_version is {version!r}; this guardmerge reads version {FORMAT_VERSION}"
        )
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
        extra = {k: v for k, v in h.items() if k not in {"name", "labels", "offset", "source"}}
        if name is None or labels is None or offset is None or c.problems:
            continue
        heads.append(Head(name=name, labels=tuple(labels), offset=offset, source=src.get("id"),
                          revision=src.get("revision"), sha256=src.get("sha256"), extra=extra))
    c.raise_if_any(ModelLoadError)
    return tuple(heads)


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
    labels = _id2label(config, config_path)
    files = weight_files(folder)
    tensors: dict[str, dict[str, Any]] = {}
    for wf in files:
        tensors.update(read_header(wf).tensors)
    prefix = _OUTPUT_LAYERS.get(str(config["model_type"]))
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
    else:
        heads = (Head(name=head_name_from_id(str(model) if hub_revision else folder.name),
                      labels=tuple(labels), offset=0, source=str(model), revision=hub_revision),)

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
                      tensors=tensors, manifest=manifest)


def hash_files(paths: Sequence[Path]) -> str:
    """sha256 over the given files' bytes, in order (a content hash for a model's weights)."""
    digest = hashlib.sha256()
    for p in paths:
        with open(p, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def write_manifest(folder: Path, heads: Sequence[Head], recipe: Mapping[str, Any] | None,
                   extra: Mapping[str, Any] | None = None) -> Path:
    """Write ``guardmerge.json`` (deterministic: sorted keys, no timestamps)."""
    from . import __version__

    manifest: dict[str, Any] = {
        "format": "guardmerge-bundle",
        "format_version": FORMAT_VERSION,
        "guardmerge_version": __version__,
        "heads": [h.to_dict() for h in heads],
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
    return out


def read_vocab(folder: Path) -> dict[str, int] | None:
    """The tokenizer vocabulary (token -> id) read from a folder's files (no transformers
    import); None when the folder has no vocabulary file."""
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
    """Copy every tokenizer file of ``src`` (``TOKENIZER_FILES``) into ``dst``."""
    import shutil

    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copyfile(src / name, dst / name)
    _ensure_vocab_txt(dst)
