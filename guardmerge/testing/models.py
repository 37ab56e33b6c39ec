"""Tiny (or BERT-base-sized) models, tokenizers and bundles built locally, with no download.

Every function here works offline and is deterministic for a given seed.
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


def build_tokenizer(words: Sequence[str] = WORDS, *, extra_words: Sequence[str] = (TRIGGER,),
                    model_max_length: int = 512) -> Any:
    """A BERT WordPiece tokenizer (fast, uncased) over ``words`` plus single characters."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import BertTokenizer

    chars = list("abcdefghijklmnopqrstuvwxyz0123456789.,!?;:'\"()-")
    vocab_list = SPECIALS + chars + ["##" + ch for ch in chars] + list(dict.fromkeys(
        [w for w in list(words) + list(extra_words) if w not in chars]))
    vocab = {tok: i for i, tok in enumerate(dict.fromkeys(vocab_list))}
    backend = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]", max_input_chars_per_word=100))
    backend.normalizer = normalizers.BertNormalizer(lowercase=True)
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    backend.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])])
    backend.decoder = decoders.WordPiece()
    return BertTokenizer(tokenizer_object=backend, unk_token="[UNK]", sep_token="[SEP]",
                         pad_token="[PAD]", cls_token="[CLS]", mask_token="[MASK]",
                         model_max_length=model_max_length)


def tiny_config(vocab_size: int, num_labels: int = 2, *, hidden: int = 32, layers: int = 2,
                attention_heads: int = 2, intermediate: int = 64, max_position: int = 512,
                id2label: Mapping[int, str] | None = None) -> Any:
    from transformers import BertConfig

    kwargs: dict[str, Any] = {}
    if id2label is not None:
        kwargs["id2label"] = dict(id2label)
        kwargs["label2id"] = {v: k for k, v in id2label.items()}
    return BertConfig(vocab_size=vocab_size, hidden_size=hidden, num_hidden_layers=layers,
                      num_attention_heads=attention_heads, intermediate_size=intermediate,
                      max_position_embeddings=max_position, num_labels=num_labels, **kwargs)


def save_model_folder(model: Any, tokenizer: Any, folder: str | os.PathLike[str]) -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder, safe_serialization=True)
    save_tokenizer(tokenizer, folder)
    return folder


def build_classifier_folder(folder: str | os.PathLike[str], labels: Sequence[str], *,
                            tokenizer: Any = None, seed: int = 0, base_state: Mapping[str, torch.Tensor] | None = None,
                            noise: float = 0.02, **config_kw: Any) -> Path:
    """A plain single-head transformers classifier folder (no manifest).

    With ``base_state``, the encoder starts from it plus ``noise``-scaled Gaussian deltas: a
    stand-in "fine-tune" of a shared base, as model merging needs.
    """
    from transformers import BertForSequenceClassification

    tokenizer = tokenizer or build_tokenizer()
    torch.manual_seed(seed)
    config = tiny_config(len(tokenizer.get_vocab()), len(labels),
                         id2label=dict(enumerate(labels)), **config_kw)
    model = BertForSequenceClassification(config)
    if base_state is not None:
        gen = torch.Generator().manual_seed(seed + 1)
        sd = model.state_dict()
        for name, tensor in sd.items():
            key = name[len("bert."):] if name.startswith("bert.") else name
            if key in base_state and tensor.is_floating_point():
                base = base_state[key]
                tensor.copy_(base + noise * torch.randn(base.shape, generator=gen))
    return save_model_folder(model, tokenizer, folder)


def build_base_folder(folder: str | os.PathLike[str], *, tokenizer: Any = None, seed: int = 0,
                      **config_kw: Any) -> tuple[Path, dict[str, torch.Tensor]]:
    """A bare encoder checkpoint (BertModel names, no ``bert.`` prefix, no classifier)."""
    from transformers import BertModel

    tokenizer = tokenizer or build_tokenizer()
    torch.manual_seed(seed)
    model = BertModel(tiny_config(len(tokenizer.get_vocab()), **config_kw))
    folder = save_model_folder(model, tokenizer, folder)
    return folder, {k: v.clone() for k, v in model.state_dict().items()}


def build_bundle(folder: str | os.PathLike[str], heads: Mapping[str, Sequence[str]], *,
                 tokenizer: Any = None, model: Any = None, seed: int = 0,
                 recipe: Mapping[str, Any] | None = None, **config_kw: Any) -> Path:
    """A random-weight guard bundle with the given heads (``{"jb": ["benign", "jailbreak"]}``)."""
    from transformers import BertForSequenceClassification

    tokenizer = tokenizer or build_tokenizer()
    layout = heads_from_layout(heads.items())
    if model is None:
        torch.manual_seed(seed)
        n = sum(h.size for h in layout)
        config = tiny_config(len(tokenizer.get_vocab()), n, **config_kw)
        model = BertForSequenceClassification(config)
    return write_bundle(folder, model, tokenizer, layout, recipe=recipe)


def write_bundle(folder: str | os.PathLike[str], model: Any, tokenizer: Any,
                 heads: Sequence[Head], recipe: Mapping[str, Any] | None = None) -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder, safe_serialization=True)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(config_for_heads(config, heads), indent=2))
    save_tokenizer(tokenizer, folder)
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

