"""The proxy's guard: the library's ``Guard`` with its model work behind the shared batcher.

``GuardService.check(messages, direction)`` is ``Guard.check`` split around the model:
``Guard.plan`` (read the messages, pick and normalise the texts), the shared history cache
(``CachedClassifier.lookup``), the batcher's ``prepare`` (tokenise), all in one worker
thread (or, for messages of at most ``INLINE_CHARS`` characters of text in at most
``INLINE_ITEMS`` values, inline on the event loop: ~0.07 ms for a 24-word prompt here, less
than the hand-off to a thread and back, ~0.1 ms busy and ~0.26 ms after an idle wait),
after the check took its place in the batcher's bounded queue (``admit``: a full queue
refuses the check before that work); then the queue and the pooled forward pass in the
batcher's model thread; then
``Guard.decide`` (validate the scores, the policy's verdict). So the verdict is the one the
client wrapper's ``Guard.check`` gives for the same messages, with the same policy. Any
failure (a timeout, a full queue, a model error, a malformed or NaN score) is the policy's
``on_error`` verdict with an ``error`` finding, counted as fail-closed (``on_error: block``)
or fail-open.

``core`` is the client wrapper's own decision core (``guardmerge.client``) with this check
plugged in: the proxy's streams run on the wrapper's async stream driver and sans-IO stream
machine, and a blocked response is refused by the wrapper's own adapters.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from ..client import _Core
from ..exceptions import ClassifierError, GuardOverloaded
from ..guard import CachedClassifier, Guard
from ..verdict import Action, Verdict
from .batcher import Batcher

__all__ = ["GuardService", "guard_failed"]

#: messages this small are planned and tokenised on the event loop (see the module doc);
#: normalising and tokenising cost ~0.3 ms per 1,000 characters on the benchmark machine
INLINE_CHARS = 1024
INLINE_ITEMS = 64

logger = logging.getLogger("guardmerge.serve.guard")


def guard_failed(verdict: Verdict) -> bool:
    """True when the verdict is the policy's ``on_error`` for a guard that failed."""
    return any(f.kind == "error" for f in verdict.findings)


def _small(messages: Any) -> bool:
    """True when ``messages`` holds at most ``INLINE_CHARS`` characters of strings in at most
    ``INLINE_ITEMS`` values (dicts, lists and strings; anything else: False). Stops early."""
    chars, items = 0, 0
    todo = [messages]
    while todo:
        value = todo.pop()
        items += 1
        if items > INLINE_ITEMS:
            return False
        if isinstance(value, str):
            chars += len(value)
            if chars > INLINE_CHARS:
                return False
        elif isinstance(value, dict):
            todo.extend(value.values())
        elif isinstance(value, (list, tuple)):
            todo.extend(value)
        elif value is not None and not isinstance(value, (bool, int, float)):
            return False  # an SDK object or an iterable: its size is not known cheaply
    return True


def _reason(exc: BaseException) -> str:
    if isinstance(exc, GuardOverloaded):
        return "overloaded"
    if isinstance(exc, asyncio.TimeoutError):
        return "timeout"
    return "error"


class GuardService:
    """``guard`` + ``batcher`` (+ ``metrics``): see the module doc."""

    def __init__(self, guard: Guard, batcher: Batcher, *, timeout: float, metrics: Any = None,
                 stream_mode: str = "hold", window_chars: int = 2000,
                 overlap_chars: int = 200) -> None:
        self.guard = guard
        self.batcher = batcher
        self.timeout = timeout
        self.metrics = metrics
        self.cache = guard.scorer if isinstance(guard.scorer, CachedClassifier) else None
        self.core = _Core(guard, on_block="refuse", on_flag=None, on_verdict=None,
                          check_output=True, stream_mode=stream_mode,  # type: ignore[arg-type]
                          window_chars=window_chars, overlap_chars=overlap_chars,
                          sdk_types=False, is_async=True, acheck=self.check)

    def _before(self, messages: Any, direction: str) -> tuple[Any, Any, Any]:
        """Worker-thread half: plan, cache lookup, tokenise the texts the cache lacks."""
        plan = self.guard.plan(messages, direction)
        if plan.verdict is not None or not plan.texts:
            return plan, None, None
        max_tokens = self.guard.policy.max_tokens
        lookup = self.cache.lookup(plan.texts, max_tokens=max_tokens) if self.cache else None
        texts = lookup.missing if lookup is not None else plan.texts
        work = self.batcher.prepare(texts, max_tokens) if texts else None
        return plan, lookup, work

    async def check(self, messages: Any, direction: str = "input") -> Verdict:
        """The verdict for ``messages`` (see ``Guard.check``); never raises for a guard failure."""
        start = time.monotonic()
        if not isinstance(messages, str):
            try:
                messages = list(messages)
            except Exception as exc:
                return self._failed(direction, exc)
        try:
            verdict = await asyncio.wait_for(self._check(messages, direction), self.timeout)
        except asyncio.TimeoutError:
            verdict = self._failed(direction, ClassifierError(
                f"the guard check took longer than its timeout of {self.timeout:g} s"),
                reason="timeout")
        except Exception as exc:  # fail closed on anything the guard does wrong
            verdict = self._failed(direction, exc)
        else:
            if guard_failed(verdict):
                self._count_failure(verdict, "error")
        self._count(verdict, start)
        return verdict

    async def _check(self, messages: Any, direction: str) -> Verdict:
        ticket = self.batcher.admit()  # GuardOverloaded before any work: fail closed at once
        try:
            if _small(messages):
                plan, lookup, work = self._before(messages, direction)
            else:
                plan, lookup, work = await asyncio.to_thread(self._before, messages, direction)
            if plan.verdict is not None or not plan.texts:
                return self.guard.decide(plan, [])
            scores = await self.batcher.run(work, ticket) if work is not None else []
        finally:
            ticket.release()  # (a no-op once the model thread took the check)
        if lookup is not None:
            if work is not None:
                try:
                    lookup.fill(scores)
                except Exception as exc:  # validated: a malformed result is a guard failure
                    return self.guard.failed(direction, exc)
            scores = lookup.results()
        return self.guard.decide(plan, scores)

    def _failed(self, direction: str, exc: BaseException,
                reason: str | None = None) -> Verdict:
        verdict = self.guard.failed(direction, exc)
        self._count_failure(verdict, reason or _reason(exc))
        return verdict

    def _count_failure(self, verdict: Verdict, reason: str) -> None:
        if self.metrics is None:
            return
        if verdict.action is Action.BLOCK:
            self.metrics.fail_closed.labels(reason=reason).inc()
        else:
            self.metrics.fail_open.labels(reason=reason).inc()

    def _count(self, verdict: Verdict, start: float) -> None:
        if self.metrics is None:
            return
        self.metrics.verdicts.labels(direction=verdict.direction,
                                     action=verdict.action.value).inc()
        self.metrics.guard_latency.labels(direction=verdict.direction).observe(
            time.monotonic() - start)
