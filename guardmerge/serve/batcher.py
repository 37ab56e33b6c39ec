"""Cross-request micro-batching: concurrent checks share forward passes.

A request's texts are tokenised into windows first (``prepare``, in a worker thread: never on
the event loop), then queued (``run``). One model thread drains the queue whenever the model
is free: it takes checks in arrival order while the batch stays within ``max_windows``
windows and ``max_tokens`` padded tokens (windows x the longest window), optionally waits up
to ``max_wait`` seconds for more when the batch is not full, and runs them as ONE pooled call
(``BundleClassifier.classify_batch``: their windows length-sorted and padded together).
A check always fits a batch of its own, however long.

The queue is bounded (``max_queue`` checks waiting): a check takes its place (``admit``)
before its request's texts are read and tokenised, so the bound covers that work too, and a
check that finds every place taken raises ``GuardOverloaded`` at once. A check whose caller went away (the awaiting task is cancelled:
a client disconnect, a timeout) is taken out of the queue, and never scored. With
``enabled=False`` each check runs alone (one per pass): the baseline the benchmark compares.

Classifiers without ``prepare`` / ``classify_batch`` (``FunctionClassifier``, your own) are
batched too: the texts of the drained checks go to one ``classify`` call.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from ..classifier import Classifier, TextScores
from ..exceptions import ClassifierError, GuardOverloaded

__all__ = ["Batcher", "BatcherStats", "Ticket", "Work"]

logger = logging.getLogger("guardmerge.serve.batcher")


@dataclass(eq=False)
class Work:
    """One check's texts, prepared: ``windows`` rows of at most ``longest`` tokens."""

    prepared: Any
    windows: int
    longest: int
    max_tokens: int | None
    n_texts: int
    future: Any = None
    loop: Any = None
    enqueued: float = 0.0
    ticket: "Ticket | None" = None


class Ticket:
    """A check's place within ``max_queue`` (``Batcher.admit``), from before its texts are
    read and tokenised until the model thread takes it (or it gives up): ``release()`` once."""

    def __init__(self, batcher: "Batcher") -> None:
        self._batcher = batcher
        self.released = False

    def release(self) -> None:
        with self._batcher._cond:
            if not self.released:
                self.released = True
                self._batcher._waiting -= 1


@dataclass
class BatcherStats:
    """Plain counters (read them from any thread): batches run, checks and windows scored,
    the largest batch, and checks dropped before they ran."""

    batches: int = 0
    checks: int = 0
    windows: int = 0
    max_checks: int = 0
    dropped: int = 0
    refused: int = 0
    sizes: list[int] = field(default_factory=list)  # checks per batch, the last 10,000

    @property
    def mean_checks(self) -> float:
        return self.checks / self.batches if self.batches else 0.0

    @property
    def mean_windows(self) -> float:
        return self.windows / self.batches if self.batches else 0.0


class Batcher:
    """See the module doc. ``start()`` the model thread, ``await run(prepare(texts))``,
    ``stop()``. ``observe``: a metrics sink (``guardmerge.serve.metrics.Metrics``) or None."""

    def __init__(self, classifier: Classifier, *, enabled: bool = True, max_windows: int = 32,
                 max_tokens: int = 8192, max_wait: float = 0.0, max_queue: int = 256,
                 observe: Any = None) -> None:
        self.classifier = classifier
        self.enabled = enabled
        self.max_windows = max_windows
        self.max_tokens = max_tokens
        self.max_wait = max_wait
        self.max_queue = max_queue
        self.observe = observe
        self.stats = BatcherStats()
        self._pooled = callable(getattr(classifier, "classify_batch", None)) and \
            callable(getattr(classifier, "prepare", None))
        self._queue: deque[Work] = deque()
        self._waiting = 0  # admitted checks not yet taken by the model thread
        self._cond = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None
        #: called in the model thread just before each batch runs (tests gate batches here)
        self.before_batch: Callable[[list[Work]], None] | None = None
        self._busy_since: float | None = None  # when the running batch started (None: idle)

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> "Batcher":
        if self._thread is None:
            self._stopping = False
            self._thread = threading.Thread(target=self._loop, name="guardmerge-batcher",
                                            daemon=True)
            self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def health(self, wedged_after: float) -> str | None:
        """None when the model thread is alive and its batch (if any) has run for less than
        ``wedged_after`` seconds; else why not (``/readyz`` and Ray's ``check_health``)."""
        thread = self._thread
        if thread is None or self._stopping:
            return "the batcher is stopped"
        if not thread.is_alive():
            return "the batcher's model thread died"
        since = self._busy_since
        if since is not None and time.monotonic() - since > wedged_after:
            return f"a guard batch has run for over {wedged_after:g} s (the model is wedged)"
        return None

    @property
    def depth(self) -> int:
        """Checks waiting for the model (not counting the batch running now)."""
        return len(self._queue)

    # -- the request side --------------------------------------------------------------------

    def admit(self) -> Ticket:
        """A place for one check within ``max_queue``, taken before its request is read,
        tokenised and queued (so a flood of large bodies is refused before that work, not
        after it); ``GuardOverloaded`` at once when every place is taken."""
        with self._cond:
            if self._waiting >= self.max_queue:
                self.stats.refused += 1
                raise GuardOverloaded(f"the guard is overloaded: {self.max_queue} checks are "
                                      "already waiting")
            self._waiting += 1
        return Ticket(self)

    def prepare(self, texts: Sequence[str], max_tokens: int | None = None) -> Work:
        """Tokenise ``texts`` into windows (call it in a worker thread: it is CPU work)."""
        texts = list(texts)
        if self._pooled:
            prepared = self.classifier.prepare(texts, max_tokens=max_tokens)  # type: ignore[attr-defined]
            return Work(prepared, prepared.windows, prepared.longest, max_tokens, len(texts))
        longest = max((len(t.split()) + 2 for t in texts), default=2)
        return Work(texts, len(texts), longest, max_tokens, len(texts))

    async def run(self, work: Work, ticket: Ticket | None = None) -> list[TextScores]:
        """Queue ``work`` and wait for its scores. Cancelling the caller drops it. Without a
        ``ticket`` (from ``admit``), one is taken here."""
        if ticket is None:
            ticket = self.admit()
        loop = asyncio.get_running_loop()
        work.loop = loop
        work.future = loop.create_future()
        work.ticket = ticket
        with self._cond:
            if self._stopping or self._thread is None:
                raise ClassifierError("the guard's batcher is not running")
            work.enqueued = time.monotonic()
            self._queue.append(work)
            depth = len(self._queue)
            self._cond.notify()
        self._observe("queue_depth", depth)
        try:
            return await work.future
        except asyncio.CancelledError:
            self._discard(work)
            raise

    def _discard(self, work: Work) -> None:
        with self._cond:
            try:
                self._queue.remove(work)
            except ValueError:  # already taken by the model thread: its result is ignored
                return
            self._free(work)
            self.stats.dropped += 1
            depth = len(self._queue)
        self._observe("dropped", 1)
        self._observe("queue_depth", depth)

    # -- the model thread --------------------------------------------------------------------

    def _fits(self, batch: list[Work], work: Work) -> bool:
        if not self.enabled:
            return False
        if work.max_tokens != batch[0].max_tokens:
            return False
        windows = sum(w.windows for w in batch) + work.windows
        longest = max(max(w.longest for w in batch), work.longest)
        return windows <= self.max_windows and windows * longest <= self.max_tokens

    def _take(self, batch: list[Work]) -> bool:
        """Move queued checks into ``batch`` while they fit, in order; True when it is full."""
        while self._queue:
            if batch and not self._fits(batch, self._queue[0]):
                return True
            work = self._queue.popleft()
            self._free(work)
            batch.append(work)
        return not self.enabled

    def _free(self, work: Work) -> None:
        """(Under the lock) ``work`` leaves the waiting checks: its place is given back."""
        ticket, work.ticket = work.ticket, None
        if ticket is not None and not ticket.released:
            ticket.released = True
            self._waiting -= 1

    def _loop(self) -> None:
        while True:
            batch: list[Work] = []
            with self._cond:
                while not self._queue and not self._stopping:
                    self._cond.wait()
                if self._stopping:
                    pending, self._queue = list(self._queue), deque()
                    for work in pending:
                        self._free(work)
                    break
                full = self._take(batch)
                if self.max_wait > 0 and not full:
                    deadline = time.monotonic() + self.max_wait
                    while not full and not self._stopping:
                        left = deadline - time.monotonic()
                        if left <= 0:
                            break
                        self._cond.wait(left)
                        full = self._take(batch)
                depth = len(self._queue)
            self._observe("queue_depth", depth)
            self._run(batch)
        for work in pending:
            self._deliver(work, ClassifierError("the guard's batcher stopped"))

    def _run(self, batch: list[Work]) -> None:
        start = time.monotonic()
        for work in batch:
            self._observe("queue_wait", start - work.enqueued)
        windows = sum(w.windows for w in batch)
        padded = windows * max(w.longest for w in batch)
        self._busy_since = start
        try:
            if self.before_batch is not None:
                self.before_batch(batch)
            results: list[Any] = self._score(batch)
        except Exception as exc:  # noqa: BLE001 - one bad check must not fail the others
            logger.warning("guard batch of %d checks failed (%s)%s", len(batch),
                           type(exc).__name__, "; scoring them one by one" if
                           len(batch) > 1 else "")
            results = [_as_error(exc)] if len(batch) == 1 else \
                [self._score_alone(work) for work in batch]
        finally:
            self._busy_since = None
        seconds = time.monotonic() - start
        stats = self.stats
        stats.batches += 1
        stats.checks += len(batch)
        stats.windows += windows
        stats.max_checks = max(stats.max_checks, len(batch))
        stats.sizes.append(len(batch))
        del stats.sizes[:-10_000]
        self._observe("batch", (len(batch), windows, padded, seconds))
        for work, result in zip(batch, results):
            self._deliver(work, result)

    def _score_alone(self, work: Work) -> Any:
        """One check of a failed batch, on its own: its scores, or its own error."""
        try:
            return self._score([work])[0]
        except Exception as exc:  # noqa: BLE001 - delivered to that check's caller only
            return _as_error(exc)

    def _score(self, batch: list[Work]) -> list[list[TextScores]]:
        if self._pooled:
            return self.classifier.classify_batch([w.prepared for w in batch])  # type: ignore[attr-defined]
        texts = [t for w in batch for t in w.prepared]
        scores = self.classifier.classify(texts, max_tokens=batch[0].max_tokens)
        if not isinstance(scores, (list, tuple)) or len(scores) != len(texts):
            got = len(scores) if isinstance(scores, (list, tuple)) else type(scores).__name__
            raise ClassifierError(f"classifier {self.classifier.name or '?'} returned {got} "
                                  f"results for {len(texts)} texts")
        out, at = [], 0
        for w in batch:
            out.append([_renumber(s, i) for i, s in enumerate(scores[at:at + w.n_texts])])
            at += w.n_texts
        return out

    def _deliver(self, work: Work, result: Any) -> None:
        def settle() -> None:
            if work.future.done():  # the caller gave up (disconnect, timeout)
                return
            if isinstance(result, BaseException):
                work.future.set_exception(result)
            else:
                work.future.set_result(result)

        try:
            work.loop.call_soon_threadsafe(settle)
        except RuntimeError:  # the event loop is gone (shutting down)
            pass

    def _observe(self, what: str, value: Any) -> None:
        if self.observe is not None:
            try:
                self.observe.batcher(what, value)
            except Exception:  # metrics never break a check
                logger.exception("metrics observer failed")


def _as_error(exc: Exception) -> ClassifierError:
    """A model failure as the caller's guard sees it (``on_error``); a third-party error by
    its type only: its message may hold the text."""
    if isinstance(exc, ClassifierError):
        return exc
    return ClassifierError(f"guard model failed ({type(exc).__name__})")


def _renumber(scores: Any, index: int) -> Any:
    if isinstance(scores, TextScores) and scores.text_index != index:
        import dataclasses

        return dataclasses.replace(scores, text_index=index)
    return scores
