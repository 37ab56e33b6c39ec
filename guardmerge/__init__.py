"""guardmerge: one merged multi-head guard model around an LLM chat.

The public API is exactly ``__all__``; every module is an implementation detail.
"""

__version__ = "0.1.0"

from ._http import AsyncChatClient, ChatClient, RetryPolicy
from .bundle import BundleInfo, inspect_bundle
from .chunking import Window
from .classifier import BundleClassifier, Classifier, FunctionClassifier, HeadScores, TextScores
from .exceptions import (
    BlockedError,
    ClassifierError,
    ConfigError,
    DataError,
    GuardmergeError,
    MergeError,
    ModelLoadError,
    PolicyError,
    PromptBlockedError,
    RecipeError,
    ResponseBlockedError,
    UpstreamError,
    UpstreamTimeout,
)
from .client import AsyncGuardedClient, GuardedClient, guard_client
from .guard import CachedClassifier, Guard
from .labels import Head
from .policy import Policy, Rule, load_policy
from .verdict import Action, Finding, Verdict

__all__ = [
    "__version__",
    "Action",
    "AsyncChatClient",
    "AsyncGuardedClient",
    "BlockedError",
    "BundleClassifier",
    "BundleInfo",
    "CachedClassifier",
    "ChatClient",
    "Classifier",
    "ClassifierError",
    "ConfigError",
    "DataError",
    "Finding",
    "FunctionClassifier",
    "Guard",
    "GuardedClient",
    "GuardmergeError",
    "Head",
    "HeadScores",
    "MergeError",
    "ModelLoadError",
    "Policy",
    "PolicyError",
    "PromptBlockedError",
    "RecipeError",
    "ResponseBlockedError",
    "RetryPolicy",
    "Rule",
    "TextScores",
    "UpstreamError",
    "UpstreamTimeout",
    "Verdict",
    "Window",
    "guard_client",
    "inspect_bundle",
    "load_policy",
]
