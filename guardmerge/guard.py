"""Guard: messages -> one batched classification -> policy -> Verdict.

A ``Guard`` binds a classifier to a policy (checked against its heads). ``check`` is pure
computation over the messages it is given; the only I/O is loading a bundle in ``from_bundle``.
A history cache in front of the classifier makes each turn of a conversation cost only its new
text.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import logging
import os
import threading
from collections import OrderedDict
from typing import Any, Iterable, Mapping, Sequence

from .classifier import BundleClassifier, Classifier, TextScores
from .exceptions import ConfigError, GuardmergeError
from .policy import Policy
from .verdict import Action, Finding, Verdict

__all__ = ["Guard", "CachedClassifier", "message_text"]

logger = logging.getLogger("guardmerge.guard")

_TEXT_PARTS = ("text", "input_text", "output_text")


def message_text(content: Any) -> str | None:
    """The text of a chat message's content: a string, or the text parts of a list of parts.

    Text parts are joined with a blank line; other parts (images, audio) carry no text.
    """
    text, _ = _split_content(content)
    return text


def _split_content(content: Any) -> tuple[str | None, int]:
    """(text, number of non-text parts) of a message's content."""
    if content is None:
        return None, 0
    if isinstance(content, str):
        return content, 0
    if isinstance(content, Sequence):
        texts: list[str] = []
        other = 0
        for part in content:
            if isinstance(part, str):
                texts.append(part)
                continue
            kind = _get(part, "type")
            if kind in _TEXT_PARTS:
                texts.append(str(_get(part, "text") or ""))
            elif kind == "refusal":
                texts.append(str(_get(part, "refusal") or ""))
            else:
                other += 1
        return ("\n\n".join(texts) if texts else None), other
    raise TypeError(f"message content must be a string or a list of parts, got {type(content).__name__}")


def _get(obj: Any, key: str) -> Any:
    if isinstance(obj, Mapping):
        return obj.get(key)
    return getattr(obj, key, None)


class CachedClassifier(Classifier):
    """A bounded LRU cache of scores in front of a classifier.

    Chat clients resend the whole conversation every turn; with this, each turn costs only its
    new text. Keyed by (token budget, sha256 of the exact text); one cache per classifier, so one
    bundle. ``hits`` / ``misses`` count texts.
    """

    def __init__(self, inner: Classifier, maxsize: int = 1024) -> None:
        if maxsize < 1:
            raise ConfigError(f"cache maxsize: must be >= 1, got {maxsize}")
        self.inner = inner
        self.heads = inner.heads
        self.name = inner.name
        self.maxsize = maxsize
        self._cache: OrderedDict[tuple[int | None, bytes], TextScores] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    @property
    def stats(self) -> Any:
        return getattr(self.inner, "stats", None)

    def classify(self, texts: Sequence[str], *, max_tokens: int | None = None) -> list[TextScores]:
        keys = [(max_tokens, hashlib.sha256(t.encode("utf-8", "surrogatepass")).digest())
                for t in texts]
        results: list[TextScores | None] = [None] * len(keys)
        missing: dict[tuple[int | None, bytes], list[int]] = {}
        with self._lock:
            for i, key in enumerate(keys):
                hit = self._cache.get(key)
                if hit is not None:
                    self._cache.move_to_end(key)
                    results[i] = dataclasses.replace(hit, text_index=i)
                    self.hits += 1
                else:
                    missing.setdefault(key, []).append(i)
        if missing:
            order = list(missing)
            fresh = self.inner.classify([texts[missing[k][0]] for k in order], max_tokens=max_tokens)
            with self._lock:
                for key, scores in zip(order, fresh):
                    self.misses += len(missing[key])
                    self._cache[key] = scores
                    self._cache.move_to_end(key)
                    for i in missing[key]:
                        results[i] = dataclasses.replace(scores, text_index=i)
                while len(self._cache) > self.maxsize:
                    self._cache.popitem(last=False)
        return [r for r in results if r is not None]

    def clear(self) -> None:
        with self._lock:
            self._cache.clear()


class Guard:
    """A classifier and a policy, bound together (the policy is checked against the heads).

    ``cache_size``: texts whose scores are remembered (0 disables the history cache).
    """

    def __init__(self, classifier: Classifier, policy: Policy, *, include_scores: bool = False,
                 cache_size: int = 1024) -> None:
        self.classifier = classifier
        self.policy = policy.bind(classifier.heads)
        self.include_scores = include_scores
        self.scorer: Classifier = CachedClassifier(classifier, cache_size) if cache_size else classifier

    @classmethod
    def from_bundle(cls, bundle: str | os.PathLike[str], policy: str | os.PathLike[str] | Policy,
                    *, cache_size: int = 1024, include_scores: bool = False,
                    **runtime_options: Any) -> "Guard":
        """Load a bundle and a policy. ``runtime_options``: ``RuntimeOptions`` fields (``dtype``,
        ``threads``, ``batch_size``, ``overlap``, ``max_length``) or ``options=RuntimeOptions``."""
        clf = BundleClassifier.from_pretrained(bundle, **runtime_options)
        pol = policy if isinstance(policy, Policy) else Policy.load(policy)
        return cls(clf, pol, cache_size=cache_size, include_scores=include_scores)

    def check(self, messages: Iterable[Any] | str, direction: str = "input") -> Verdict:
        """Check chat messages (``{"role", "content"}`` dicts or objects, or plain strings).

        ``input``: messages whose role the policy's input section lists are scored.
        ``output``: each item is a response; plain strings count as ``assistant``.
        A guard failure gives the policy's ``on_error`` verdict (block unless told otherwise).
        """
        section = self.policy.rules(direction)
        if isinstance(messages, str):
            messages = [messages]
        default_role = "user" if direction == "input" else "assistant"
        picked: list[tuple[int, str, str]] = []
        extra: list[Finding] = []
        try:
            for index, msg in enumerate(messages):
                if isinstance(msg, str):
                    role, text, other = default_role, msg, 0
                else:
                    role = str(_get(msg, "role") or default_role)
                    text, other = _split_content(_get(msg, "content"))
                if role not in section.roles:
                    continue
                if other and section.non_text_parts is not Action.PASS:
                    extra.append(Finding(kind="non_text", action=section.non_text_parts,
                                         message_index=index, role=role,
                                         detail=f"{other} non-text content part(s) cannot be "
                                                "checked by a text guard"))
                if text is None or not section.rules_for(role):
                    continue
                picked.append((index, role, text))
        except TypeError as exc:
            return self._failed(direction, exc)
        scores: list[TextScores] = []
        if picked:
            try:
                scores = self.scorer.classify([t for _, _, t in picked],
                                              max_tokens=self.policy.max_tokens)
            except Exception as exc:  # fail closed on anything the guard model throws
                return self._failed(direction, exc)
        verdict = self.policy.evaluate(
            direction, [(i, role, s) for (i, role, _), s in zip(picked, scores)],
            include_scores=self.include_scores, extra=extra)
        if not verdict.passed:
            logger.info("guard %s verdict: %s", direction, verdict.summary())
        return verdict

    async def acheck(self, messages: Iterable[Any] | str, direction: str = "input") -> Verdict:
        """``check`` in a worker thread: the event loop never runs model work."""
        if not isinstance(messages, str):
            messages = list(messages)
        return await asyncio.to_thread(self.check, messages, direction)

    def check_text(self, text: str, direction: str = "input", role: str | None = None) -> Verdict:
        role = role or ("user" if direction == "input" else "assistant")
        return self.check([{"role": role, "content": text}], direction=direction)

    def _failed(self, direction: str, exc: BaseException) -> Verdict:
        level = logging.WARNING if isinstance(exc, GuardmergeError) else logging.ERROR
        logger.log(level, "guard check failed (%s); applying on_error=%s", exc,
                   self.policy.on_error.value, exc_info=not isinstance(exc, GuardmergeError))
        return self.policy.error_verdict(direction, exc)
