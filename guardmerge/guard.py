"""Guard: messages -> one batched classification -> policy -> Verdict. No I/O of its own."""

from __future__ import annotations

import logging
import os
from typing import Any, Iterable, Mapping, Sequence

from .classifier import BundleClassifier, Classifier
from .exceptions import GuardmergeError
from .policy import Policy
from .verdict import Verdict

__all__ = ["Guard", "message_text"]

logger = logging.getLogger("guardmerge.guard")


def message_text(content: Any) -> str | None:
    """The text of a chat message's content: a string, or the text parts of a list of parts.

    Text parts are joined with a blank line; other parts (images, audio) carry no text.
    """
    if content is None:
        return None
    if isinstance(content, str):
        return content
    if isinstance(content, Sequence):
        texts = []
        for part in content:
            kind = _get(part, "type")
            if kind in ("text", "input_text", "output_text"):
                texts.append(str(_get(part, "text") or ""))
            elif kind == "refusal":
                texts.append(str(_get(part, "refusal") or ""))
        return "\n\n".join(texts) if texts else None
    raise TypeError(f"message content must be a string or a list of parts, got {type(content).__name__}")


def _get(obj: Any, key: str) -> Any:
    if isinstance(obj, Mapping):
        return obj.get(key)
    return getattr(obj, key, None)


class Guard:
    """A classifier and a policy, bound together (the policy is checked against the heads)."""

    def __init__(self, classifier: Classifier, policy: Policy, *, include_scores: bool = False) -> None:
        self.classifier = classifier
        self.policy = policy.bind(classifier.heads)
        self.include_scores = include_scores

    @classmethod
    def from_bundle(cls, bundle: str | os.PathLike[str], policy: str | os.PathLike[str] | Policy,
                    **classifier_options: Any) -> "Guard":
        clf = BundleClassifier.from_pretrained(bundle, **classifier_options)
        pol = policy if isinstance(policy, Policy) else Policy.load(policy)
        return cls(clf, pol)

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
        try:
            for index, msg in enumerate(messages):
                if isinstance(msg, str):
                    role, text = default_role, msg
                else:
                    role = str(_get(msg, "role") or default_role)
                    text = message_text(_get(msg, "content"))
                if text is None or not section.rules_for(role):
                    continue
                picked.append((index, role, text))
        except TypeError as exc:
            return self._failed(direction, exc)
        if not picked:
            return self.policy.evaluate(direction, [])
        try:
            scores = self.classifier.classify([t for _, _, t in picked],
                                              max_tokens=self.policy.max_tokens)
        except Exception as exc:  # fail closed on anything the guard model throws
            return self._failed(direction, exc)
        verdict = self.policy.evaluate(
            direction, [(i, role, s) for (i, role, _), s in zip(picked, scores)],
            include_scores=self.include_scores)
        if not verdict.passed:
            logger.info("guard %s verdict: %s", direction, verdict.summary())
        return verdict

    def check_text(self, text: str, direction: str = "input", role: str | None = None) -> Verdict:
        role = role or ("user" if direction == "input" else "assistant")
        return self.check([{"role": role, "content": text}], direction=direction)

    def _failed(self, direction: str, exc: BaseException) -> Verdict:
        level = logging.WARNING if isinstance(exc, GuardmergeError) else logging.ERROR
        logger.log(level, "guard check failed (%s); applying on_error=%s", exc,
                   self.policy.on_error.value, exc_info=not isinstance(exc, GuardmergeError))
        return self.policy.error_verdict(direction, exc)
