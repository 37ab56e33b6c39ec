"""Guard bundles: a transformers sequence-classifier folder plus a manifest of heads.

Layout (every file is also what plain ``AutoModelForSequenceClassification`` expects)::

    config.json           num_labels = all heads; id2label holds unique "head:label" names
    model.safetensors     weights (or sharded, with model.safetensors.index.json)
    tokenizer.json, tokenizer_config.json, vocab.txt, ...   the full tokenizer
    guardmerge.json       manifest: format version, heads (name, labels, offset, source), recipe

A plain single-head classifier folder (no manifest) is read as a bundle of one head named after
the folder. Weights are safetensors only: pickle files are refused, never unpickled.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import yaml

from ._safetensors import read_header
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


def read_json(path: Path) -> Any:
    """A JSON file's content; a ModelLoadError naming the file if it is missing or invalid."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ModelLoadError(f"{path}: missing") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelLoadError(f"{path}: not valid JSON ({exc})") from exc


def weight_files(folder: Path) -> list[Path]:
    """The safetensors weight files of a model folder (one file, or the shards of an index)."""
    single = folder / "model.safetensors"
    index = folder / "model.safetensors.index.json"
    if single.exists():
        return [single]
    if index.exists():
        data = read_json(index)
        try:
            names = sorted(set(data["weight_map"].values()))
        except (KeyError, AttributeError, TypeError) as exc:
            raise ModelLoadError(f"{index}: no 'weight_map'") from exc
        files = [folder / n for n in names]
        for f in files:
            if not f.exists():
                raise ModelLoadError(f"{f}: missing (listed in {index.name})")
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
    try:
        items = sorted((int(k), v) for k, v in raw.items())
    except (ValueError, AttributeError) as exc:
        raise ModelLoadError(f"{config_path}: id2label keys must be integers") from exc
    if [k for k, _ in items] != list(range(len(items))):
        raise ModelLoadError(f"{config_path}: id2label must have ids 0..{len(items) - 1}")
    labels = [str(v) for _, v in items]
    dupes = duplicates(labels)
    if dupes:
        raise ModelLoadError(f"{config_path}: duplicate label names in id2label: {dupes}")
    return labels


def _read_manifest(folder: Path) -> tuple[Path | None, dict[str, Any] | None]:
    for name in _MANIFEST_NAMES:
        path = folder / name
        if not path.exists():
            continue
        if name.endswith(".json"):
            data = read_json(path)
        else:
            try:
                data = yaml.safe_load(path.read_text(encoding="utf-8"))
            except (OSError, yaml.YAMLError) as exc:
                raise ModelLoadError(f"{path}: not valid YAML ({exc})") from exc
        if not isinstance(data, dict):
            raise ModelLoadError(f"{path}: manifest must be a mapping")
        return path, data
    return None, None


def _heads_from_manifest(path: Path, manifest: Mapping[str, Any]) -> tuple[Head, ...]:
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise ModelLoadError(
            f"{path}: format_version is {version!r}; this guardmerge reads version {FORMAT_VERSION}"
        )
    raw_heads = manifest.get("heads")
    if not isinstance(raw_heads, list) or not raw_heads:
        raise ModelLoadError(f"{path}: 'heads' must be a non-empty list")
    heads = []
    for i, h in enumerate(raw_heads):
        if not isinstance(h, dict) or "name" not in h or "labels" not in h:
            raise ModelLoadError(f"{path}: heads[{i}] needs 'name' and 'labels'")
        if not isinstance(h["labels"], list):
            raise ModelLoadError(f"{path}: heads[{i}].labels must be a list")
        src = h.get("source") or {}
        extra = {k: v for k, v in h.items() if k not in {"name", "labels", "offset", "source"}}
        heads.append(Head(
            name=str(h["name"]), labels=tuple(str(x) for x in h["labels"]),
            offset=int(h.get("offset", -1)), source=src.get("id"), revision=src.get("revision"),
            sha256=src.get("sha256"), extra=extra,
        ))
    return tuple(heads)


def inspect_bundle(model: str | os.PathLike[str], revision: str | None = None) -> BundleInfo:
    """Validate a bundle (or a plain single-head classifier folder) without loading weights."""
    folder, hub_revision = resolve_model_dir(model, revision)
    config_path = folder / "config.json"
    config = read_json(config_path)
    if not isinstance(config, dict) or "model_type" not in config:
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
