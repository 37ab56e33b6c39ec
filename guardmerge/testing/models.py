"""Tiny (or BERT-base-sized) models, tokenizers and bundles built locally, with no download.

Every function here works offline and is deterministic for a given seed. ``family=`` picks the
model family (``FAMILY_NAMES``: bert, distilbert, roberta, xlm-roberta, camembert, deberta-v2,
electra, modernbert, albert) with its own kind of tokenizer: WordPiece (BERT, DistilBERT,
ELECTRA), byte-level BPE with ``vocab.json`` + ``merges.txt`` (RoBERTa, ModernBERT) or
SentencePiece-style Unigram (XLM-RoBERTa, CamemBERT, DeBERTa-v3, ALBERT), built in memory with
the ``tokenizers`` library and saved the way the Hub ships them. ``add_to_hub_cache`` lays a
folder out as a Hugging Face cache entry (``models--org--name/blobs``, ``snapshots/<sha>``,
``refs``), so Hub ids resolve offline.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from ..bundle import config_for_heads, save_tokenizer, write_manifest
from ..labels import Head, heads_from_layout

__all__ = [
    "WORDS",
    "TRIGGER",
    "FAMILY_NAMES",
    "add_to_hub_cache",
    "build_tokenizer",
    "tiny_config",
    "save_model_folder",
    "build_bundle",
    "write_bundle",
    "build_classifier_folder",
    "build_base_folder",
    "build_trigger_model",
    "random_text",
    "bert_base_vocab",
]

SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
TRIGGER = "xyzzy"
WORDS = (
    "the a an and or but if then else when while of to in on at by for with about against "
    "between into through during before after above below from up down out off over under "
    "again further once here there all any both each few more most other some such no nor not "
    "only own same so than too very can will just should now i you he she it we they me him "
    "her us them my your his its our their what which who whom this that these those am is are "
    "was were be been being have has had having do does did doing would could ought hello world "
    "cat dog sat mat house tree car road city river weather today tomorrow please thanks help "
    "write story poem code review movie book film great terrible good bad love hate kill "
    "ignore previous instructions pretend system prompt rules jailbreak dan mode unlocked "
    "developer reveal secret password bomb weapon steal hack attack people group stupid idiot "
    "recipe cake bread soup travel plan trip summary summarise explain question answer"
).split()


FAMILY_NAMES = ("bert", "distilbert", "roberta", "xlm-roberta", "camembert", "deberta-v2",
                "electra", "modernbert", "albert")
# special tokens in each family's usual id order (their configs' pad / bos / eos ids follow)
_UNIGRAM_SPECIALS = {
    "xlm-roberta": ["<s>", "<pad>", "</s>", "<unk>"],
    "camembert": ["<s>NOTUSED", "<pad>", "</s>NOTUSED", "<unk>", "<s>", "</s>"],
    "deberta-v2": ["[PAD]", "[CLS]", "[SEP]", "[UNK]"],
    "albert": ["<pad>", "<unk>", "[CLS]", "[SEP]"],
}
_CHARS = list("abcdefghijklmnopqrstuvwxyz0123456789.,!?;:'\"()-")


def _wordpiece(words: Sequence[str], model_max_length: int, cls: Any) -> Any:
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    vocab_list = SPECIALS + _CHARS + ["##" + ch for ch in _CHARS] + list(dict.fromkeys(
        [w for w in words if w not in _CHARS]))
    vocab = {tok: i for i, tok in enumerate(dict.fromkeys(vocab_list))}
    backend = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]", max_input_chars_per_word=100))
    backend.normalizer = normalizers.BertNormalizer(lowercase=True)
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    backend.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])])
    backend.decoder = decoders.WordPiece()
    return cls(tokenizer_object=backend, unk_token="[UNK]", sep_token="[SEP]",
               pad_token="[PAD]", cls_token="[CLS]", mask_token="[MASK]",
               model_max_length=model_max_length)


def _bpe_parts(words: Sequence[str], specials: Sequence[str]) -> tuple[dict[str, int],
                                                                      list[tuple[str, str]]]:
    """A byte-level BPE vocabulary and merges, trained (deterministically, in memory, by the
    ``tokenizers`` library) on ``words`` so each of them is one token, with or without its
    leading space (``Ġ``); the specials come first, then the 256 byte symbols."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=100_000, min_frequency=1,
                                  special_tokens=list(specials), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    words = list(dict.fromkeys(words))
    tok.train_from_iterator([" ".join(words)] * 2 + words, trainer)
    model = json.loads(tok.to_str())["model"]
    merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else (m[0], m[1])
              for m in model["merges"]]
    return dict(model["vocab"]), merges  # type: ignore[return-value]


def _unigram(words: Sequence[str], family: str, model_max_length: int) -> Any:
    from transformers import (AlbertTokenizer, CamembertTokenizer, DebertaV2Tokenizer,
                              XLMRobertaTokenizer)

    cls = {"xlm-roberta": XLMRobertaTokenizer, "camembert": CamembertTokenizer,
           "deberta-v2": DebertaV2Tokenizer, "albert": AlbertTokenizer}[family]
    mask = "<mask>" if family in ("xlm-roberta", "camembert") else "[MASK]"
    pieces = [(t, 0.0) for t in [*_UNIGRAM_SPECIALS[family], mask]]
    pieces += [("\u2581" + w, -1.0) for w in dict.fromkeys(words)] + [("\u2581", -2.0)]
    pieces += [(ch, -5.0) for ch in _CHARS]
    return cls(vocab=pieces, model_max_length=model_max_length)


def build_tokenizer(words: Sequence[str] = WORDS, *, extra_words: Sequence[str] = (TRIGGER,),
                    model_max_length: int = 512, family: str = "bert") -> Any:
    """A fast tokenizer of ``family``'s kind over ``words`` (plus single characters, so any
    text tokenises): BERT-style WordPiece (uncased) for bert / distilbert / electra, byte-level
    BPE for roberta / modernbert, Unigram for xlm-roberta / camembert / deberta-v2 / albert."""
    words = [w for w in list(words) + list(extra_words)]
    if family in ("bert", "distilbert", "electra"):
        from transformers import BertTokenizer, DistilBertTokenizer, ElectraTokenizer

        cls = {"bert": BertTokenizer, "distilbert": DistilBertTokenizer,
               "electra": ElectraTokenizer}[family]
        return _wordpiece(words, model_max_length, cls)
    if family in _UNIGRAM_SPECIALS:
        return _unigram(words, family, model_max_length)
    if family == "roberta":
        from transformers import RobertaTokenizer

        vocab, merges = _bpe_parts(words, ["<s>", "<pad>", "</s>", "<unk>", "<mask>"])
        return RobertaTokenizer(vocab=vocab, merges=merges, model_max_length=model_max_length)
    if family == "modernbert":
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
        from transformers import PreTrainedTokenizerFast

        specials = ["[UNK]", "[CLS]", "[SEP]", "[PAD]", "[MASK]"]
        vocab, merges = _bpe_parts(words, specials)
        backend = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="[UNK]"))
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        backend.decoder = decoders.ByteLevel()
        backend.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]",
            special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])])
        return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]",
                                       cls_token="[CLS]", sep_token="[SEP]", pad_token="[PAD]",
                                       mask_token="[MASK]", model_max_length=model_max_length)
    raise ValueError(f"unknown family {family!r} (families: {', '.join(FAMILY_NAMES)})")


def tiny_config(vocab_size: int, num_labels: int = 2, *, hidden: int = 32, layers: int = 2,
                attention_heads: int = 2, intermediate: int = 64, max_position: int = 512,
                id2label: Mapping[int, str] | None = None, family: str = "bert",
                tokenizer: Any = None, multi_label: bool = False, **extra: Any) -> Any:
    """A small transformers config of ``family``; ``max_position``: tokens per window (special
    tokens included; RoBERTa's padding offset is added). ``tokenizer``: its special-token ids
    go into the config (pad / bos / eos / cls / sep). ``multi_label``: problem_type
    multi_label_classification (a sigmoid head)."""
    from transformers import AutoConfig

    kwargs: dict[str, Any] = {"num_labels": num_labels}
    if id2label is not None:
        kwargs["id2label"] = dict(id2label)
        kwargs["label2id"] = {v: k for k, v in id2label.items()}
    if multi_label:
        kwargs["problem_type"] = "multi_label_classification"
    if tokenizer is not None:
        kwargs["pad_token_id"] = tokenizer.pad_token_id
        for key, tok_id in (("bos_token_id", tokenizer.cls_token_id),
                            ("eos_token_id", tokenizer.sep_token_id),
                            ("cls_token_id", tokenizer.cls_token_id),
                            ("sep_token_id", tokenizer.sep_token_id)):
            if tok_id is not None and family in ("roberta", "xlm-roberta", "camembert",
                                                 "modernbert"):
                kwargs[key] = tok_id
    if family == "distilbert":
        kwargs.update(dim=hidden, n_layers=layers, n_heads=attention_heads, hidden_dim=intermediate,
                      max_position_embeddings=max_position)
    else:
        kwargs.update(hidden_size=hidden, num_hidden_layers=layers,
                      num_attention_heads=attention_heads, intermediate_size=intermediate,
                      max_position_embeddings=max_position)
    if family in ("roberta", "xlm-roberta", "camembert"):
        pad = kwargs.get("pad_token_id", 1)
        kwargs["pad_token_id"] = pad
        kwargs["max_position_embeddings"] = max_position + pad + 1
        kwargs["type_vocab_size"] = 1
    elif family in ("albert", "electra"):
        kwargs["embedding_size"] = hidden // 2
    elif family == "deberta-v2":  # DeBERTa-v3: relative positions only, no token types
        kwargs.update(relative_attention=True, position_biased_input=False, type_vocab_size=0,
                      pos_att_type=["p2c", "c2p"], max_relative_positions=-1,
                      position_buckets=32, norm_rel_ebd="layer_norm", share_att_key=True,
                      pooler_hidden_size=hidden, pooler_hidden_act="gelu")
    elif family == "modernbert":
        kwargs.update(local_attention=16, classifier_pooling="mean")
    kwargs.update(extra)
    return AutoConfig.for_model(family, vocab_size=vocab_size, **kwargs)


def _vocab_files(tokenizer: Any, folder: Path) -> None:
    """What a Hub BPE repository also ships beside tokenizer.json: vocab.json and merges.txt."""
    data = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
    model = data.get("model") or {}
    if model.get("type") != "BPE":
        return
    (folder / "vocab.json").write_text(json.dumps(model["vocab"], ensure_ascii=False),
                                       encoding="utf-8")
    lines = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(lines) + "\n",
                                       encoding="utf-8")


def save_model_folder(model: Any, tokenizer: Any, folder: str | os.PathLike[str]) -> Path:
    """``model`` and ``tokenizer`` saved as the Hub keeps them (a BPE tokenizer with its
    vocab.json and merges.txt too)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder, safe_serialization=True)
    save_tokenizer(tokenizer, folder)
    _vocab_files(tokenizer, folder)
    return folder


def _encoder_prefix(family: str) -> str:
    from ..families import family_for

    return family_for(family).encoder + "."


def build_classifier_folder(folder: str | os.PathLike[str], labels: Sequence[str], *,
                            tokenizer: Any = None, seed: int = 0,
                            base_state: Mapping[str, torch.Tensor] | None = None,
                            noise: float = 0.02, family: str = "bert", multi_label: bool = False,
                            **config_kw: Any) -> Path:
    """A plain single-head transformers classifier folder of ``family`` (no manifest).

    With ``base_state`` (a bare encoder's tensors, as ``build_base_folder`` returns them), the
    encoder starts from it plus ``noise``-scaled Gaussian deltas: a stand-in "fine-tune" of a
    shared base, as model merging needs (``noise=0``: exactly the base's encoder). The head
    modules and the output layer are freshly initialised from ``seed``, as a fine-tune's are.
    ``multi_label``: a sigmoid head (problem_type multi_label_classification).
    """
    from transformers import AutoModelForSequenceClassification

    tokenizer = tokenizer or build_tokenizer(family=family)
    torch.manual_seed(seed)
    config = tiny_config(len(tokenizer.get_vocab()), len(labels), family=family,
                         tokenizer=tokenizer, id2label=dict(enumerate(labels)),
                         multi_label=multi_label, **config_kw)
    model = AutoModelForSequenceClassification.from_config(config)
    if base_state is not None:
        prefix = _encoder_prefix(family)
        gen = torch.Generator().manual_seed(seed + 1)
        sd = model.state_dict()
        for name, tensor in sd.items():
            key = name[len(prefix):] if name.startswith(prefix) else name
            if key in base_state and tensor.is_floating_point() and name.startswith(prefix):
                base = base_state[key]
                tensor.copy_(base + noise * torch.randn(base.shape, generator=gen) if noise
                             else base)
    return save_model_folder(model, tokenizer, folder)


def build_base_folder(folder: str | os.PathLike[str], *, tokenizer: Any = None, seed: int = 0,
                      family: str = "bert", **config_kw: Any
                      ) -> tuple[Path, dict[str, torch.Tensor]]:
    """A bare encoder checkpoint of ``family`` (``AutoModel`` names, no encoder prefix, no
    classifier), and its tensors."""
    from transformers import AutoModel

    tokenizer = tokenizer or build_tokenizer(family=family)
    torch.manual_seed(seed)
    model = AutoModel.from_config(tiny_config(len(tokenizer.get_vocab()), family=family,
                                              tokenizer=tokenizer, **config_kw))
    folder = save_model_folder(model, tokenizer, folder)
    return folder, {k: v.clone() for k, v in model.state_dict().items()}


def add_to_hub_cache(cache: str | os.PathLike[str], repo_id: str,
                     folder: str | os.PathLike[str], *, commit: str,
                     refs: Sequence[str] = ("main",)) -> Path:
    """Lay ``folder``'s files out as the Hugging Face cache keeps a download of ``repo_id`` at
    ``commit`` (40 hex digits): ``models--org--name/blobs/<sha256>``,
    ``snapshots/<commit>/<file>`` linking to them, and ``refs/<ref>`` holding the commit. Several
    commits of one repository may be added; the last one added for a ref wins. Returns the
    snapshot folder."""
    import hashlib
    import re

    if not re.fullmatch(r"[0-9a-f]{40}", commit):
        raise ValueError(f"commit must be 40 hex digits, got {commit!r}")
    repo = Path(cache) / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / commit
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    snapshot.mkdir(parents=True, exist_ok=True)
    for f in sorted(Path(folder).iterdir()):
        if not f.is_file():
            continue
        data = f.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        link = snapshot / f.name
        if link.exists() or link.is_symlink():
            link.unlink()
        link.symlink_to(os.path.relpath(blob, snapshot))
    (repo / "refs").mkdir(exist_ok=True)
    for ref in refs:
        (repo / "refs" / ref).write_text(commit)
    return snapshot


def build_bundle(folder: str | os.PathLike[str], heads: Mapping[str, Sequence[str]], *,
                 tokenizer: Any = None, model: Any = None, seed: int = 0,
                 recipe: Mapping[str, Any] | None = None, multi_label: Sequence[str] = (),
                 family: str = "bert", **config_kw: Any) -> Path:
    """A random-weight plain guard bundle with the given heads (``{"jb": ["benign",
    "jailbreak"]}``); the heads named in ``multi_label`` are sigmoid heads."""
    from transformers import AutoModelForSequenceClassification

    tokenizer = tokenizer or build_tokenizer(family=family)
    layout = heads_from_layout(heads.items(), multi_label=multi_label)
    if model is None:
        torch.manual_seed(seed)
        n = sum(h.size for h in layout)
        config = tiny_config(len(tokenizer.get_vocab()), n, family=family, tokenizer=tokenizer,
                             **config_kw)
        model = AutoModelForSequenceClassification.from_config(config)
    return write_bundle(folder, model, tokenizer, layout, recipe=recipe)


def write_bundle(folder: str | os.PathLike[str], model: Any, tokenizer: Any,
                 heads: Sequence[Head], recipe: Mapping[str, Any] | None = None) -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder, safe_serialization=True)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(config_for_heads(config, heads), indent=2))
    save_tokenizer(tokenizer, folder)
    _vocab_files(tokenizer, folder)
    write_manifest(folder, heads, recipe)
    return folder


def build_trigger_model(tokenizer: Any, *, head_layout: Mapping[str, Sequence[str]] | None = None,
                        trigger: str = TRIGGER, hidden: int = 32) -> tuple[Any, tuple[Head, ...]]:
    """A hand-wired BERT whose ``jailbreak`` head fires iff ``trigger`` is in the window.

    Embeddings: every ordinary token has a zero-mean, unit-variance vector with 0 in dim 0; the
    trigger has +a/-a in dims 0/1 (so after LayerNorm its dim 0 is +4). Attention has zero
    queries/keys (uniform attention) and copies dim 0 with a large gain, so [CLS] receives a
    positive dim 0 if any attended token is the trigger, wherever it is. The pooler reads dim 0
    and the jailbreak logit is ``20 * tanh(dim0) - 10``. Deterministic: no training, no seed luck.
    """
    from transformers import BertForSequenceClassification

    layout = heads_from_layout((head_layout or {"jailbreak": ["benign", "jailbreak"],
                                                "topic": ["chat", "code", "travel"]}).items())
    n_labels = sum(h.size for h in layout)
    vocab = tokenizer.get_vocab()
    config = tiny_config(len(vocab), n_labels, hidden=hidden, layers=1, attention_heads=2,
                         intermediate=hidden * 2)
    model = BertForSequenceClassification(config)
    gen = torch.Generator().manual_seed(1234)
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        emb = model.bert.embeddings
        words = torch.randn(len(vocab), hidden - 2, generator=gen)
        words = (words - words.mean(dim=1, keepdim=True))
        words = words / words.pow(2).sum(dim=1, keepdim=True).div(hidden).sqrt()
        emb.word_embeddings.weight[:, 2:] = words
        t = vocab[trigger]
        emb.word_embeddings.weight[t] = 0.0
        emb.word_embeddings.weight[t, 0] = 1.0
        emb.word_embeddings.weight[t, 1] = -1.0
        emb.LayerNorm.weight.fill_(1.0)
        layer = model.bert.encoder.layer[0]
        gain = 2560.0  # 1 trigger among 512 tokens moves [CLS] dim 0 by ~20 before LayerNorm
        layer.attention.self.value.weight[0, 0] = gain
        layer.attention.output.dense.weight[0, 0] = 1.0
        layer.attention.output.LayerNorm.weight.fill_(1.0)
        layer.output.LayerNorm.weight.fill_(1.0)
        model.bert.pooler.dense.weight[0, 0] = 1.0
        jb = next(h for h in layout if h.name == "jailbreak")
        model.classifier.weight[jb.offset + 1, 0] = 20.0
        model.classifier.bias[jb.offset + 1] = -10.0
        # the other heads: fixed, mildly informative rows so their distributions are not uniform
        for h in layout:
            if h.name == "jailbreak":
                continue
            rows = torch.randn(h.size, hidden, generator=gen) * 0.5
            model.classifier.weight[h.offset:h.stop] = rows
            model.classifier.bias[h.offset:h.stop] = torch.linspace(-0.5, 0.5, h.size)
    model.eval()
    return model, layout


def random_text(n_words: int, *, seed: int = 0, words: Sequence[str] = WORDS,
                insert: Mapping[int, str] | None = None) -> str:
    """``n_words`` words drawn from ``words``; ``insert={position: word}`` places words exactly."""
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, len(words), (n_words,), generator=gen).tolist()
    out = [words[i] for i in idx]
    for pos, word in sorted((insert or {}).items()):
        out.insert(pos, word)
    return " ".join(out)


def bert_base_vocab(size: int = 30522) -> list[str]:
    """Synthetic whole words filling a BERT-base-sized vocabulary (for benchmarks)."""
    base = list(WORDS)
    n_extra = size - len(SPECIALS) - 2 * 47 - len(base) - 1
    return base + [f"w{i}" for i in range(max(0, n_extra))]

