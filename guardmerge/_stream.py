"""The stream hold-back, written once: a sans-IO state machine the sync and async drivers share.

The machine never does I/O. A driver ``feed``s it every item the upstream yields (and calls
``finish`` at the end), then asks ``next_event`` what to do until it says ``NEED_DATA`` or
``DONE``:

- ``Check(texts)``: run the guard on these texts and hand the verdict (or the exception the
  guard raised) to ``checked_result``; a ``Check`` with ``fault`` set stands for an item the
  reader could not read: its outcome is the policy's error verdict whatever the guard says;
- ``Emit(items)``: give these items to the caller;
- ``Blocked(verdict, tail)``: close the upstream; raise, or give the caller ``tail`` (the
  refusal items) and stop.

Text is tracked per *key*: one channel of a chat choice or of a Responses output (its content,
a tool call's arguments, ...); ``label(key)`` is the choice or output index the findings and
the refusal speak of. An item may go out
only when every key it carries text for has been checked up to that text (``hold``), and in
order among the items of the same key; an item of no key (a usage chunk, a whole-response
event) waits for everything before it and for all text to be checked. A check of one key
never releases another key's text. A key's window is due when its unchecked text reaches
``window_chars``; it is checked with ``overlap_chars`` of already checked text before it. At
the end every key's whole text is checked once more, as a non-streamed response would be.
With ``hold=False`` (``stream_mode="release"``) items go out at once and are checked behind.
An item the reader cannot read (``Touch.unreadable``) is a guard failure: ``on_error``.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Callable, Hashable, Iterable

from .exceptions import ClassifierError
from .verdict import Action, Verdict

__all__ = ["Blocked", "Check", "DONE", "Emit", "NEED_DATA", "StreamMachine", "Touch",
           "blocked_keys"]


@dataclass(frozen=True)
class Touch:
    """What one upstream item carries: text pieces per key, keys it belongs to without text,
    and whether it stands for the whole stream (``barrier``)."""

    pieces: tuple[tuple[Hashable, str], ...] = ()
    keys: frozenset[Hashable] = frozenset()
    barrier: bool = False
    unreadable: str | None = None   # why the item cannot be read (never its text)


@dataclass(frozen=True)
class Check:
    texts: list[str]
    keys: list[Hashable]
    lengths: list[int]
    final: bool
    fault: str | None = None


@dataclass(frozen=True)
class Emit:
    items: list[Any]


@dataclass(frozen=True)
class Blocked:
    verdict: Verdict
    tail: list[Any]


NEED_DATA = "need-data"
DONE = "done"


def blocked_keys(verdict: Verdict, every: Iterable[Hashable]) -> set[Hashable]:
    """The keys (message indices) a blocking verdict withholds: those its block findings name,
    or ``every`` key when a block finding names none (the guard itself failed) or none does."""
    blocked = {f.message_index for f in verdict.findings if f.action is Action.BLOCK}
    if None in blocked or not blocked:
        return set(every)
    return blocked


@dataclass
class _Held:
    item: Any
    deps: dict[Hashable, int]   # key -> text length that must be checked before it goes out
    barrier: bool
    text_keys: frozenset[Hashable] = field(default_factory=frozenset)


class StreamMachine:
    """See the module doc. ``read(item) -> Touch``; ``tail(verdict, blocked, released, keys)
    -> items`` builds the refusal (all three in labels); ``error(exc) -> Verdict`` is the
    policy's verdict for a guard that raised; ``label(key)``: the message index of a key
    (default: the key itself)."""

    def __init__(self, read: Callable[[Any], Touch], *, window_chars: int, overlap_chars: int,
                 hold: bool, tail: Callable[..., list[Any]],
                 error: Callable[[BaseException], Verdict],
                 label: Callable[[Hashable], Any] | None = None) -> None:
        self._read = read
        self._tail = tail
        self._error = error
        self._label = label or (lambda key: key)
        self._faults: list[str] = []
        self.window_chars = window_chars
        self.overlap_chars = overlap_chars
        self.hold = hold
        self.text: dict[Hashable, str] = {}
        self.checked: dict[Hashable, int] = {}
        self.released: set[Hashable] = set()
        self.held: list[_Held] = []
        self.verdict: Verdict | None = None
        self._ended = False
        self._final_done = False
        self._awaiting: Check | None = None
        self._outcome: Blocked | None = None
        self._stopped = False

    @property
    def stopped(self) -> bool:
        return self._stopped

    # -- input -------------------------------------------------------------------------------

    def feed(self, item: Any) -> None:
        if self._stopped or self._ended:
            raise RuntimeError("feed() after the stream stopped")
        touch = self._read(item)
        if touch.unreadable is not None:
            self._faults.append(touch.unreadable)
        for key, piece in touch.pieces:
            if piece:
                self.text[key] = self.text.get(key, "") + piece
            self.checked.setdefault(key, 0)
        keys = set(touch.keys) | {k for k, _ in touch.pieces}
        if touch.barrier:
            keys |= set(self.text)
        deps = {k: len(self.text.get(k, "")) for k in keys}
        text_keys = frozenset(k for k, p in touch.pieces if p)
        self.held.append(_Held(item, deps, touch.barrier, text_keys))

    def finish(self) -> None:
        self._ended = True

    def checked_result(self, result: Verdict | BaseException) -> Verdict:
        """Record the outcome of the last ``Check``: the verdict, with findings renumbered to
        the keys they are about (or the policy's error verdict for an exception)."""
        check, self._awaiting = self._awaiting, None
        if check is None:
            raise RuntimeError("checked_result() without a pending Check")
        if check.fault is not None:  # the item could not be read, whatever the guard said
            verdict = self._error(ClassifierError(f"{check.fault}: the guard cannot read it"))
        elif isinstance(result, BaseException):
            verdict = self._error(result)
        else:
            verdict = result
            verdict.findings = [
                replace(f, message_index=self._label(check.keys[f.message_index]))
                if f.message_index is not None and 0 <= f.message_index < len(check.keys)
                else f for f in verdict.findings]
        self.verdict = verdict
        if check.final:
            self._final_done = True
        if verdict.blocked:
            label = self._label
            every = {label(k) for k in self.text} | {label(k) for h in self.held for k in h.deps}
            blocked = blocked_keys(verdict, every)
            self.held = []
            keys = list(dict.fromkeys(label(k) for k in self.text))
            self._outcome = Blocked(verdict, self._tail(verdict, blocked,
                                                        {label(k) for k in self.released}, keys))
            return verdict
        for key, length in zip(check.keys, check.lengths):
            self.checked[key] = max(self.checked.get(key, 0), length)
        return verdict

    # -- output ------------------------------------------------------------------------------

    def next_event(self) -> Check | Emit | Blocked | str:
        if self._awaiting is not None:
            raise RuntimeError("next_event() while a Check is pending")
        if self._outcome is not None:
            outcome, self._outcome = self._outcome, None
            self._stopped = True
            return outcome
        if self._stopped:
            return DONE
        if self._faults:
            self._awaiting = Check(texts=[], keys=[], lengths=[], final=False,
                                   fault=self._faults.pop(0))
            return self._awaiting
        if not self.hold and self.held:
            return self._emit(list(self.held))
        if not self._ended:
            due = [(k, t) for k, t in self.text.items()
                   if len(t) - self.checked.get(k, 0) >= self.window_chars]
            if due:
                return self._check([(k, t[max(0, self.checked.get(k, 0) - self.overlap_chars):])
                                    for k, t in due], final=False)
        ready = self._releasable()
        if ready:
            return self._emit(ready)
        if not self._ended:
            return NEED_DATA
        if not self._final_done:
            keys = [k for k, t in self.text.items() if t]
            if keys:
                return self._check([(k, self.text[k]) for k in keys], final=True)
            self._final_done = True
        if self.held:
            return self._emit(list(self.held))
        self._stopped = True
        return DONE

    def _check(self, texts: list[tuple[Hashable, str]], *, final: bool) -> Check:
        check = Check(texts=[t for _, t in texts], keys=[k for k, _ in texts],
                      lengths=[len(self.text[k]) for k, _ in texts], final=final)
        self._awaiting = check
        return check

    def _emit(self, held: Iterable[_Held]) -> Emit:
        held = list(held)
        ids = {id(h) for h in held}
        self.held = [h for h in self.held if id(h) not in ids]
        for h in held:
            self.released |= h.text_keys
        return Emit([h.item for h in held])

    def _releasable(self) -> list[_Held]:
        """Held items whose text is checked, in order per key; a barrier after everything."""
        out: list[_Held] = []
        waiting: set[Hashable] = set()
        behind_barrier = False
        for position, h in enumerate(self.held):
            ok = not behind_barrier and not (set(h.deps) & waiting) and \
                all(self.checked.get(k, 0) >= n for k, n in h.deps.items()) and \
                not (h.barrier and len(out) != position)
            if ok:
                out.append(h)
            else:
                waiting |= set(h.deps)
                behind_barrier = behind_barrier or h.barrier
        return out
