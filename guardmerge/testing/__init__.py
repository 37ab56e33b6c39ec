"""guardmerge's public test kit: build guards and an LLM stand-in locally, with no download.

- ``models``: tiny tokenizers, classifiers, base encoders and bundles of every supported model
  family (``FAMILY_NAMES``) from transformers configs; a Hugging Face cache laid out by hand
  (``add_to_hub_cache``) for the Hub path offline; the hand-wired *trigger* model (its ``jailbreak`` head fires iff a word is in the
  window, deterministically); BERT-base-sized random bundles for benchmarks.
- ``server``: ``OpenAICompatServer``, a real OpenAI-compatible HTTP server on 127.0.0.1 with
  scripted faults, for the real ``openai`` SDK and for ``ChatClient``.

Used by guardmerge's own tests, benchmarks and examples, and meant for yours (the way
``httpx.MockTransport`` ships with httpx). It imports the library, never ``guardmerge.tools``;
the library never imports it. The public API is exactly ``__all__``.
"""

from .models import (FAMILY_NAMES, TRIGGER, WORDS, add_to_hub_cache, bert_base_vocab,
                     build_base_folder, build_bundle,
                     build_classifier_folder, build_tokenizer, build_trigger_model, random_text,
                     save_model_folder, tiny_config, write_bundle)
from .server import OpenAICompatServer, echo_reply
from ..bundle import save_tokenizer  # the kit's home for it: bundle is private

__all__ = [
    "FAMILY_NAMES",
    "OpenAICompatServer",
    "TRIGGER",
    "WORDS",
    "add_to_hub_cache",
    "bert_base_vocab",
    "build_base_folder",
    "build_bundle",
    "build_classifier_folder",
    "build_tokenizer",
    "build_trigger_model",
    "echo_reply",
    "random_text",
    "save_model_folder",
    "save_tokenizer",
    "tiny_config",
    "write_bundle",
]
