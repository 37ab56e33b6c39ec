"""Guard: messages -> one batched classification -> policy -> Verdict.

A ``Guard`` binds a classifier to a policy (checked against its heads). ``check`` is pure
computation over the messages it is given; the only I/O is loading a bundle in ``from_bundle``.
A history cache in front of the classifier makes each turn of a conversation cost only its new
text.

What a check does, in order: read every message once (``_messages``: roles case-insensitive,
every content part accounted for); pick the texts the policy's roles ask for (a role outside
the known ones follows ``input.unknown_roles``); normalise each text (``normalized_forms``) and
score the original and every normalised form that differs from it in one batch; validate what the
classifier returned (count, heads, labels, finite probabilities); turn the scores into a
verdict. Anything that goes wrong on the way, a classifier that raises, returns a malformed
result or takes longer than the timeout, gives the policy's ``on_error`` verdict.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import logging
import os
import threading
import traceback
from collections import OrderedDict
from typing import Any, Iterable, Sequence

from ._messages import read_messages
from .classifier import BundleClassifier, Classifier, TextScores, validate_scores
from .exceptions import ClassifierError, ConfigError, GuardmergeError, error_detail
from .normalize import NormalizedText, normalized_forms
from .policy import ROLES, Policy, Target
from .verdict import Action, Finding, Verdict

__all__ = ["Guard", "CachedClassifier", "CacheLookup", "CheckPlan"]

logger = logging.getLogger("guardmerge.guard")


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
        lookup = self.lookup(texts, max_tokens=max_tokens)
        if lookup.missing:
            lookup.fill(self.inner.classify(lookup.missing, max_tokens=max_tokens))
        return lookup.results()

    def lookup(self, texts: Sequence[str], *, max_tokens: int | None = None) -> "CacheLookup":
        """The cached scores of ``texts``; score ``.missing`` elsewhere (the server's batcher
        does) and hand them to ``.fill()`` to cache them, then read ``.results()``."""
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
        return CacheLookup(self, list(texts), results, missing)

    def _store(self, lookup: "CacheLookup", fresh: Any) -> None:
        order = list(lookup.pending)
        validate_scores(fresh, len(order), self.heads, self.name)  # never cache a bad result
        with self._lock:
            for key, scores in zip(order, fresh):
                self.misses += len(lookup.pending[key])
                self._cache[key] = scores
                self._cache.move_to_end(key)
                for i in lookup.pending[key]:
                    lookup.found[i] = dataclasses.replace(scores, text_index=i)
            while len(self._cache) > self.maxsize:
                self._cache.popitem(last=False)

    def clear(self) -> None:
        with self._lock:
            self._cache.clear()


class CacheLookup:
    """One ``CachedClassifier.lookup``: ``missing`` are the distinct texts still to score."""

    def __init__(self, cache: CachedClassifier, texts: list[str],
                 found: list[TextScores | None],
                 pending: dict[tuple[int | None, bytes], list[int]]) -> None:
        self._cache = cache
        self.found = found
        self.pending = pending
        self.missing = [texts[indices[0]] for indices in pending.values()]

    def fill(self, fresh: Any) -> None:
        """Cache the scores of ``missing`` (validated first: a bad result is never cached)."""
        self._cache._store(self, fresh)

    def results(self) -> list[TextScores]:
        return [r for r in self.found if r is not None]


@dataclasses.dataclass
class CheckPlan:
    """What a check will score (``Guard.plan``): ``texts`` go to the classifier, in one batch,
    and ``Guard.decide`` turns their scores into the verdict. ``verdict`` is set when the plan
    already decided (the messages could not be read)."""

    direction: str
    picked: list[tuple[int, str, str, str]]
    forms: list[tuple[NormalizedText, ...]]
    texts: list[str]
    extra: list[Finding]
    verdict: Verdict | None = None


class Guard:
    """A classifier and a policy, bound together (the policy is checked against the heads).

    ``cache_size``: texts whose scores are remembered (0 disables the history cache).
    ``timeout``: seconds a check may take (default: the policy's ``timeout``, else none); a
    check that takes longer gives ``on_error`` at once, while the model work it started
    finishes in the background.
    """

    def __init__(self, classifier: Classifier, policy: Policy, *, include_scores: bool = False,
                 cache_size: int = 1024, timeout: float | None = None) -> None:
        if timeout is not None and not 0 < timeout < float("inf"):
            raise ConfigError(f"timeout: must be a number of seconds > 0, got {timeout!r}")
        self.classifier = classifier
        self.policy = policy.bind(classifier.heads)
        self.include_scores = include_scores
        self.timeout = timeout if timeout is not None else policy.timeout
        self.scorer: Classifier = CachedClassifier(classifier, cache_size) if cache_size else classifier

    @classmethod
    def from_bundle(cls, bundle: str | os.PathLike[str], policy: str | os.PathLike[str] | Policy,
                    *, cache_size: int = 1024, include_scores: bool = False,
                    timeout: float | None = None, **runtime_options: Any) -> "Guard":
        """Load a bundle and a policy. ``runtime_options``: ``RuntimeOptions`` fields (``dtype``,
        ``threads``, ``batch_size``, ``overlap``, ``max_length``) or ``options=RuntimeOptions``."""
        clf = BundleClassifier.from_pretrained(bundle, **runtime_options)
        pol = policy if isinstance(policy, Policy) else Policy.load(policy)
        return cls(clf, pol, cache_size=cache_size, include_scores=include_scores, timeout=timeout)

    def check(self, messages: Iterable[Any] | str, direction: str = "input") -> Verdict:
        """Check chat messages (``{"role", "content"}`` dicts or objects, or plain strings).

        ``input``: messages whose role the policy's input section lists are scored (roles are
        matched case-insensitively; unknown roles follow ``input.unknown_roles``).
        ``output``: each item is a response, scored with the output rules.
        A guard failure gives the policy's ``on_error`` verdict (block unless told otherwise).
        """
        plan = self.plan(messages, direction)
        if plan.verdict is not None:
            return plan.verdict
        scores: Any = []
        if plan.texts:
            try:
                scores = self._run(self.scorer.classify, plan.texts,
                                   max_tokens=self.policy.max_tokens)
            except Exception as exc:  # fail closed on anything the guard model does wrong
                return self.failed(direction, exc)
        return self.decide(plan, scores)

    def plan(self, messages: Iterable[Any] | str, direction: str = "input") -> CheckPlan:
        """The first half of ``check``, with no model work: read the messages once, pick the
        texts the policy's roles ask for, normalise them. Score ``plan.texts`` (in one batch,
        with ``max_tokens=policy.max_tokens``) and pass the scores to ``decide``."""
        section = self.policy.rules(direction)
        default_role = "user" if direction == "input" else "assistant"
        try:
            read = read_messages(messages, default_role)
        except Exception as exc:  # a message iterable that raises: the guard could not read it
            return CheckPlan(direction, [], [], [], [], verdict=self.failed(direction, exc))
        picked: list[tuple[int, str, str, str]] = []  # (index, role, rules role, text)
        extra: list[Finding] = []
        for m in read:
            rules_role = m.role
            if direction == "output":
                rules_role = "assistant"
            elif m.role not in ROLES:
                m.role = "unknown"  # reported so: a role name the caller chose is never echoed
                if section.unknown_roles == "pass":
                    continue
                if section.unknown_roles == "block":
                    extra.append(Finding(kind="unknown_role", action=Action.BLOCK,
                                         message_index=m.index, role=m.role,
                                         detail="the message's role is not one the policy "
                                                "knows"))
                    continue
                rules_role = "user"
            elif m.role not in section.roles:
                continue
            if m.media_parts and section.non_text_parts is not Action.PASS:
                extra.append(Finding(kind="non_text", action=section.non_text_parts,
                                     message_index=m.index, role=m.role,
                                     detail=f"{m.media_parts} non-text content part(s) cannot "
                                            "be checked by a text guard"))
            for reason in m.unreadable:
                extra.append(Finding(kind="unreadable", action=self.policy.on_error,
                                     message_index=m.index, role=m.role,
                                     detail=f"{reason}: the guard cannot read it"))
            if m.text is not None and section.rules_for(rules_role):
                picked.append((m.index, m.role, rules_role, m.text))
        try:  # every normalised form of a text that differs from it is scored too
            forms = [normalized_forms(text) for *_, text in picked]
        except Exception as exc:
            return CheckPlan(direction, [], [], [], [], verdict=self.failed(direction, exc))
        texts = [text for *_, text in picked] + [f.text for fs in forms for f in fs]
        return CheckPlan(direction, picked, forms, texts, extra)

    def decide(self, plan: CheckPlan, scores: Any) -> Verdict:
        """The second half of ``check``: the verdict from the scores of ``plan.texts`` (one
        ``TextScores`` each, validated here: a malformed result is a guard failure)."""
        if plan.verdict is not None:
            return plan.verdict
        direction = plan.direction
        targets: list[Target] = []
        if plan.texts:
            try:
                targets = self._targets(plan, scores)
            except Exception as exc:  # fail closed on anything the guard model does wrong
                return self.failed(direction, exc)
        verdict = self.policy.evaluate(direction, targets, include_scores=self.include_scores,
                                       extra=plan.extra)
        if not verdict.passed:
            logger.info("guard %s verdict: %s", direction, verdict.summary())
        return verdict

    def _targets(self, plan: CheckPlan, scores: Any) -> list[Target]:
        """One target per scored text: the originals, then the normalised forms that differ."""
        validate_scores(scores, len(plan.texts), self.classifier.heads, self.classifier.name)
        picked = plan.picked
        targets = [Target(i, role, s, None, rules_role)
                   for (i, role, rules_role, _), s in zip(picked, scores)]
        extra = iter(scores[len(picked):])
        targets += [Target(i, role, next(extra), form, rules_role)
                    for (i, role, rules_role, _), fs in zip(picked, plan.forms) for form in fs]
        return targets

    def _run(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        """``fn(*args, **kwargs)``, given at most ``timeout`` seconds (in a daemon thread, so a model that
        hangs can neither hold this caller nor the interpreter's exit)."""
        if self.timeout is None:
            return fn(*args, **kwargs)
        box: dict[str, Any] = {}
        done = threading.Event()

        def work() -> None:
            try:
                box["value"] = fn(*args, **kwargs)
            except BaseException as exc:  # handed to the caller below
                box["error"] = exc
            finally:
                done.set()

        threading.Thread(target=work, name="guardmerge-check", daemon=True).start()
        if not done.wait(self.timeout):
            raise ClassifierError(f"the guard check took longer than its timeout of "
                                  f"{self.timeout:g} s")
        if "error" in box:
            raise box["error"]
        return box["value"]

    async def acheck(self, messages: Iterable[Any] | str, direction: str = "input") -> Verdict:
        """``check`` in a worker thread: the event loop never runs model work, and never waits
        past the timeout."""
        if not isinstance(messages, str):
            try:
                messages = list(messages)
            except Exception as exc:
                return self.failed(direction, exc)
        return await asyncio.to_thread(self.check, messages, direction)

    def check_text(self, text: str, direction: str = "input", role: str | None = None) -> Verdict:
        role = role or ("user" if direction == "input" else "assistant")
        return self.check([{"role": role, "content": text}], direction=direction)

    def failed(self, direction: str, exc: BaseException) -> Verdict:
        """The ``on_error`` verdict. Logged with ``error_detail``: guardmerge's own messages
        (which never carry the text being checked), a third-party error by its type only (its
        message, and so a traceback, may hold the text: ``KeyError(text)``); where it was
        raised goes to the DEBUG log as stack frames, without the message or any values."""
        own = isinstance(exc, GuardmergeError)
        logger.log(logging.WARNING if own else logging.ERROR,
                   "guard check failed (%s); applying on_error=%s", error_detail(exc),
                   self.policy.on_error.value)
        if not own and logger.isEnabledFor(logging.DEBUG):
            logger.debug("guard check failure raised at: %s", " <- ".join(
                f"{f.filename}:{f.lineno} in {f.name}"
                for f in reversed(traceback.extract_tb(exc.__traceback__))))
        return self.policy.error_verdict(direction, exc)
