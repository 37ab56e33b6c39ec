"""Model families: how each transformers sequence classifier is built from its encoder and its
classification head. The one table the merge, the runtime, the search and the re-fit read.

For every supported ``model_type``:

- ``encoder``: the encoder's attribute in ``XForSequenceClassification`` (``bert``, ``roberta``,
  ``deberta``, ``model`` ...), which is also the prefix of its tensors. Encoder tensors are
  shared: they are what a merge merges.
- ``reads``: what the head reads from the encoder's output: ``pooler`` (the encoder's own pooled
  output: BERT and ALBERT keep a pooler inside the encoder, pretrained with it), ``first_token``
  (the hidden state of the first token, [CLS] / <s>), or ``pooling`` (``config.classifier_pooling``:
  ``cls`` or ``mean`` over the non-pad tokens: ModernBERT).
- ``head``: the head's own steps between what it reads and the output layer, in order: module
  names (``classifier.dense``, ``pre_classifier``, ``pooler.dense``, ``head.dense`` ...) and
  activations (``act:tanh``; ``act:@key`` takes the activation named by ``config.key``). The
  modules are **head modules**: a base checkpoint lacks them (they were initialised per
  fine-tune), so they belong to one head and are never merged.
- ``output``: the final linear layer, the one HM3 expands (one row per label of every head).
- ``token_types``: whether the encoder takes ``token_type_ids`` (all zeros for one segment).
- ``position_offset``: ``pad_token_id`` where position ids start after the padding index
  (RoBERTa and its kin: a window holds ``max_position_embeddings - pad_token_id - 1`` tokens).
- ``config_keys``: architecture settings every source of one merge must share (besides the
  sizes every family shares), because the merged bundle has one config.

No torch here: the command line and the bundle checks read this table too.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

from .exceptions import ModelLoadError

__all__ = ["Family", "FAMILIES", "family_for", "supported_model_types", "ENCODER_KEYS",
           "HEAD_READS"]

#: sizes every family's sources must share (the names differ per family; absent keys are skipped)
ENCODER_KEYS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                "vocab_size", "max_position_embeddings", "type_vocab_size", "dim", "n_layers",
                "n_heads", "hidden_dim", "embedding_size", "hidden_act", "activation")
HEAD_READS = ("pooler", "first_token", "pooling")


@dataclass(frozen=True)
class Family:
    """How one model family's sequence classifier is put together (see the module docstring)."""

    name: str
    encoder: str
    reads: str
    head: tuple[str, ...]
    output: str
    token_types: bool
    position_offset: str | None = None
    config_keys: tuple[str, ...] = ()

    @property
    def head_modules(self) -> tuple[str, ...]:
        """The head's own modules (dotted names in the classifier), in the order they run."""
        return tuple(s for s in self.head if not s.startswith("act:"))

    @property
    def has_head_modules(self) -> bool:
        return bool(self.head_modules)

    def is_encoder_tensor(self, name: str) -> bool:
        return name.startswith(self.encoder + ".")

    def is_output_tensor(self, name: str) -> bool:
        return name.startswith(self.output + ".") and name.count(".") == self.output.count(".") + 1

    def head_module_of(self, name: str) -> str | None:
        """The head module a tensor name (relative to a head's prefix) belongs to, or None."""
        for module in self.head_modules:
            if name.startswith(module + ".") and name.count(".") == module.count(".") + 1:
                return module
        return None

    def describe_reads(self, config: Mapping[str, Any] | None = None) -> str:
        """In words: what the head reads (for ``inspect`` and the README)."""
        if self.reads == "pooler":
            return "the encoder's pooler output"
        if self.reads == "first_token":
            return "the first token's hidden state"
        pooling = (config or {}).get("classifier_pooling", "cls")
        return f"{'the mean of the hidden states' if pooling == 'mean' else 'the first token'} " \
               f"(classifier_pooling: {pooling})"

    def max_positions(self, config: Mapping[str, Any]) -> int | None:
        """Tokens one window may hold (special tokens included), from the config: its
        ``max_position_embeddings``, less the padding offset where positions start after it."""
        limit = config.get("max_position_embeddings")
        if not isinstance(limit, int) or isinstance(limit, bool) or limit <= 0:
            return None
        if self.position_offset == "pad_token_id":
            pad = config.get("pad_token_id")
            limit -= (int(pad) + 1) if isinstance(pad, int) and not isinstance(pad, bool) else 2
        return limit

    def takes_token_types(self, config: Mapping[str, Any]) -> bool:
        """The encoder reads ``token_type_ids`` (DeBERTa-v3 has none: ``type_vocab_size: 0``)."""
        return self.token_types and int(config.get("type_vocab_size", 1) or 0) > 0


_ROBERTA = dict(encoder="roberta", reads="first_token", head=("classifier.dense", "act:tanh"),
                output="classifier.out_proj", token_types=False, position_offset="pad_token_id",
                config_keys=("pad_token_id",))

FAMILIES: dict[str, Family] = {f.name: f for f in (
    Family("bert", encoder="bert", reads="pooler", head=(), output="classifier",
           token_types=True),
    Family("albert", encoder="albert", reads="pooler", head=(), output="classifier",
           token_types=True, config_keys=("num_hidden_groups", "inner_group_num")),
    Family("distilbert", encoder="distilbert", reads="first_token",
           head=("pre_classifier", "act:relu"), output="classifier", token_types=False,
           config_keys=("sinusoidal_pos_embds",)),
    Family("roberta", **_ROBERTA),
    Family("xlm-roberta", **_ROBERTA),
    Family("camembert", **_ROBERTA),
    Family("electra", encoder="electra", reads="first_token",
           head=("classifier.dense", "act:gelu"), output="classifier.out_proj",
           token_types=True),
    Family("deberta-v2", encoder="deberta", reads="first_token",
           head=("pooler.dense", "act:@pooler_hidden_act"), output="classifier",
           token_types=True,
           config_keys=("relative_attention", "max_relative_positions", "position_buckets",
                        "pos_att_type", "position_biased_input", "share_att_key",
                        "norm_rel_ebd", "pooler_hidden_size", "pooler_hidden_act")),
    Family("modernbert", encoder="model", reads="pooling",
           head=("head.dense", "act:@classifier_activation", "head.norm"), output="classifier",
           token_types=False,
           config_keys=("classifier_pooling", "classifier_activation", "classifier_bias",
                        "hidden_activation", "layer_types", "local_attention", "norm_bias",
                        "norm_eps", "rope_parameters", "global_attn_every_n_layers")),
)}


def supported_model_types() -> list[str]:
    return sorted(FAMILIES)


def family_for(model_type: Any, error: type[Exception] = ModelLoadError,
               where: str = "") -> Family:
    """The family of ``model_type``; ``error`` (naming ``where``) for one guardmerge does not
    know how to split into encoder and head."""
    family = FAMILIES.get(str(model_type))
    if family is None:
        prefix = f"{where}: " if where else ""
        raise error(f"{prefix}model type {model_type!r} is not supported (supported: "
                    f"{', '.join(supported_model_types())})")
    return family
