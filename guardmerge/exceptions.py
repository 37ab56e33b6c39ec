"""The guardmerge exception tree.

Every error the library raises on purpose derives from :class:`GuardmergeError`, so callers can
catch one type. Third-party errors (transformers, safetensors, yaml, httpx) are translated at the
boundary where they happen, with ``raise ... from exc`` so the original stays attached::

    GuardmergeError
    ├── ConfigError              bad user configuration or option; names the file and the key
    │   │                        path, or the option (also a ValueError)
    │   ├── PolicyError          a YAML policy is invalid, or does not fit the bundle's heads
    │   ├── RecipeError          a merge recipe is invalid
    │   └── DataError            evaluation data has bad rows (file and line for each)
    ├── ModelLoadError           a bundle / model folder is missing, corrupt or inconsistent
    ├── MergeError               sources cannot be merged (shapes, names, configs, vocabularies)
    ├── ClassifierError          the guard model failed while scoring text (run time), returned
    │   │                        results that do not match its input, or took too long
    │   └── GuardOverloaded      ... because the proxy's queue of checks is full (``serve``)
    ├── UnguardedCallError       a guarded client was asked for a call guardmerge does not guard
    ├── UpstreamError            the upstream LLM call failed (status, body), after bounded retries
    │   └── UpstreamTimeout      ... because it took too long
    └── BlockedError             a guarded call was blocked by the policy (carries the verdict)
        ├── PromptBlockedError   ... on the way in (the upstream model was never called)
        └── ResponseBlockedError ... on the way out
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Iterable

if TYPE_CHECKING:  # pragma: no cover
    from .verdict import Verdict

__all__ = [
    "GuardmergeError",
    "ConfigError",
    "PolicyError",
    "RecipeError",
    "DataError",
    "ModelLoadError",
    "MergeError",
    "ClassifierError",
    "GuardOverloaded",
    "UnguardedCallError",
    "UpstreamError",
    "UpstreamTimeout",
    "BlockedError",
    "PromptBlockedError",
    "ResponseBlockedError",
]


class GuardmergeError(Exception):
    """Root of every error guardmerge raises on purpose."""


class ConfigError(GuardmergeError, ValueError):
    """A configuration file, option or value given by the user is invalid.

    Also a ``ValueError``, so code that catches ``ValueError`` for bad arguments keeps working.

    ``problems`` lists every problem found (each already prefixed with ``file: key.path:``), so a
    user fixes them all in one go instead of one per run.
    """

    def __init__(self, problems: str | Iterable[str], *, source: str | None = None) -> None:
        if isinstance(problems, str):
            problems = [problems]
        self.problems: list[str] = list(problems)
        self.source = source
        if len(self.problems) == 1:
            message = self.problems[0]
        else:
            message = f"{len(self.problems)} problems:\n" + "\n".join(
                f"  - {p}" for p in self.problems
            )
        super().__init__(message)


class PolicyError(ConfigError):
    """A policy file is invalid or refers to heads / labels the bundle does not have."""


class RecipeError(ConfigError):
    """A merge recipe is invalid."""


class DataError(ConfigError):
    """Evaluation data has bad rows; ``problems`` lists each with its file and line."""


class ModelLoadError(GuardmergeError):
    """A guard bundle or model folder cannot be loaded; the message names the file and problem."""


class MergeError(GuardmergeError):
    """Source models cannot be merged; the message names the model and tensor."""


class ClassifierError(GuardmergeError):
    """The guard model failed while scoring text."""


class GuardOverloaded(ClassifierError):
    """The guard could not take the check: the proxy's bounded queue of checks is full.
    A guard failure like any other (the policy's ``on_error``); the proxy answers 503."""


class UnguardedCallError(GuardmergeError):
    """A guarded client refused a call that could carry text around the guard.

    ``method`` names it (``"client.embeddings.create"``), ``param`` the refused parameter
    when one was (a plain name, else None). Every request path of a guarded
    client is either guarded or refused: none is passed through unguarded by default. Call it
    on ``guarded.wrapped`` to bypass the guard deliberately.
    """

    def __init__(self, method: str, reason: str | None = None, *,
                 param: str | None = None) -> None:
        self.method = method
        self.param = param  # the refused request parameter, when one is (a plain name)
        reason = reason or "it can carry text to or from a model"
        super().__init__(f"{method}: not guarded by guardmerge ({reason}); call it on the "
                         "client's .wrapped to bypass the guard deliberately")


class UpstreamError(GuardmergeError):
    """The upstream chat-completion call failed.

    ``status`` is the HTTP status (None for connection errors, timeouts and malformed bodies),
    ``body`` the response text (truncated), ``attempts`` how many tries were made.
    """

    def __init__(self, message: str, *, status: int | None = None, body: str | None = None,
                 attempts: int = 1) -> None:
        self.status = status
        self.body = body
        self.attempts = attempts
        super().__init__(message)


class UpstreamTimeout(UpstreamError):
    """The upstream call (or the retry budget) ran out of time."""


class BlockedError(GuardmergeError):
    """A guarded call was blocked by the policy. ``verdict`` holds the findings."""

    def __init__(self, verdict: "Verdict", message: str | None = None) -> None:
        self.verdict = verdict
        super().__init__(message or verdict.summary())


class PromptBlockedError(BlockedError):
    """The prompt was blocked; the upstream model was not called."""


class ResponseBlockedError(BlockedError):
    """The model's response was blocked."""


def error_detail(error: BaseException) -> str:
    """How a guard failure is reported (findings, logs, exception messages): guardmerge's own
    errors with their message, which never carries the text being checked; any other error by
    its type name only, because its message may (``KeyError(text)``)."""
    if isinstance(error, GuardmergeError):
        return f"{type(error).__name__}: {error}"
    return type(error).__name__
