"""guardmerge: one merged multi-head guard model around an LLM chat.

The public API is exactly ``__all__`` here, in ``guardmerge.merge`` (HM3 merging, evaluation,
search) and in ``guardmerge.testing`` (the test kit); everything else, modules included, is an
implementation detail. ``guardmerge.tools`` holds the benchmarks and the demo builder; the
library never imports it.

Layers point one way (each imports only those above it)::

    exceptions, labels, chunking, verdict, normalize, _files, _validate, _options,
    _safetensors, _atomic, _messages, families (the model-family table)
    bundle                       folders, manifests, layouts, headers (no torch)
    classifier, _model           the runtime and the guard model (torch and transformers only
                                 once a model loads)
    policy -> guard              rules -> verdicts; messages -> one batched classification
    _http, client                the OpenAI-style client and the guard wrapper
    merge/                       HM3 merge, evaluation, search (torch)
    serve/                       the OpenAI-compatible guard proxy (the [server] extra; the
                                 library never imports it)
    cli                          the command line; imports the rest lazily

Names are loaded on first use, so ``import guardmerge`` (and the CLI's fast commands) does not
import torch or transformers.
"""

import importlib as _importlib
import typing as _typing

__version__ = "0.1.0"

_EXPORTS = {
    "AsyncChatClient": "_http", "ChatClient": "_http", "RetryPolicy": "_http",
    "BundleInfo": "bundle", "inspect_bundle": "bundle",
    "Window": "chunking",
    "BundleClassifier": "classifier", "Classifier": "classifier",
    "FunctionClassifier": "classifier", "HeadScores": "classifier",
    "RuntimeOptions": "classifier", "TextScores": "classifier",
    "BlockedError": "exceptions", "ClassifierError": "exceptions", "ConfigError": "exceptions",
    "DataError": "exceptions", "GuardmergeError": "exceptions", "GuardOverloaded": "exceptions",
    "MergeError": "exceptions",
    "ModelLoadError": "exceptions", "PolicyError": "exceptions",
    "PromptBlockedError": "exceptions", "RecipeError": "exceptions",
    "ResponseBlockedError": "exceptions", "UnguardedCallError": "exceptions",
    "UpstreamError": "exceptions",
    "UpstreamTimeout": "exceptions",
    "AsyncGuardedClient": "client", "GuardedClient": "client", "guard_client": "client",
    "CachedClassifier": "guard", "Guard": "guard",
    "Head": "labels",
    "NormalizedText": "normalize", "normalize_text": "normalize",
    "normalized_forms": "normalize",
    "DirectionRules": "policy", "Policy": "policy", "Rule": "policy",
    "Action": "verdict", "Finding": "verdict", "Verdict": "verdict",
}

__all__ = ["__version__", *sorted(_EXPORTS)]

if _typing.TYPE_CHECKING:  # pragma: no cover - for type checkers and IDEs
    from ._http import AsyncChatClient, ChatClient, RetryPolicy
    from .bundle import BundleInfo, inspect_bundle
    from .chunking import Window
    from .classifier import (BundleClassifier, Classifier, FunctionClassifier, HeadScores,
                             RuntimeOptions, TextScores)
    from .client import AsyncGuardedClient, GuardedClient, guard_client
    from .exceptions import (BlockedError, ClassifierError, ConfigError, DataError,
                             GuardmergeError, GuardOverloaded, MergeError, ModelLoadError,
                             PolicyError, PromptBlockedError, RecipeError, ResponseBlockedError,
                             UnguardedCallError, UpstreamError, UpstreamTimeout)
    from .guard import CachedClassifier, Guard
    from .labels import Head
    from .normalize import NormalizedText, normalize_text, normalized_forms
    from .policy import DirectionRules, Policy, Rule
    from .verdict import Action, Finding, Verdict


def __getattr__(name: str) -> "_typing.Any":
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'guardmerge' has no attribute {name!r}")
    value = getattr(_importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> "list[str]":
    return sorted(set(globals()) | set(__all__))
