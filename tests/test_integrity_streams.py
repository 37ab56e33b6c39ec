"""Guard integrity, 6: streams hold back per choice; a guard failure mid-stream leaks nothing.

With ``n > 1`` the choices' chunks arrive interleaved. A choice's text goes out only once that
choice's own window was checked: checking another choice's window releases nothing of it. The
sync and async drivers share one sans-IO state machine (``guardmerge._stream``), tested here
directly as well.
"""

from __future__ import annotations

import asyncio

import pytest
from conftest import JB_HEADS, JB_POLICY, jb_score, sdk_client

from guardmerge import (FunctionClassifier, Guard, Policy, ResponseBlockedError, guard_client)
from guardmerge._stream import DONE, NEED_DATA, Blocked, Check, Emit, StreamMachine, Touch
from guardmerge.testing import OpenAICompatServer
from guardmerge.verdict import Action, Finding, Verdict

LONG = " ".join(f"fine{i}" for i in range(120))  # benign, several windows long


@pytest.fixture()
def two_choices():
    """n=2: choice 0 is short and carries the trigger (under one window), choice 1 is long."""
    with OpenAICompatServer(reply=lambda messages: ["short xyzzy", LONG],
                            words_per_chunk=2) as srv:
        yield srv


def _chunks_text(chunks, index):
    return "".join(c.delta.content or "" for ch in chunks for c in ch.choices
                   if c.index == index and c.finish_reason is None)


def test_one_choices_window_check_never_releases_another_choices_text(two_choices, jb_guard):
    guarded = guard_client(sdk_client(two_choices), jb_guard, on_block="refuse",
                           window_chars=100, overlap_chars=10)
    chunks = list(guarded.chat.completions.create(
        model="m", messages=[{"role": "user", "content": "two please"}], n=2, stream=True))
    released, tail = chunks[:-2], chunks[-2:]
    assert "xyzzy" not in _chunks_text(released, 0)
    assert _chunks_text(released, 0) == ""            # choice 0 was never checked before the end
    assert _chunks_text(released, 1).startswith("fine0 fine1")  # choice 1's checked windows went
    ends = {c.index: c for ch in tail for c in ch.choices}
    assert ends[0].finish_reason == ends[1].finish_reason == "content_filter"
    assert ends[0].delta.content == "Refused by policy."  # nothing of choice 0 had gone out
    assert ends[1].delta.content is None


def test_per_choice_hold_back_raises_without_leaking(two_choices, jb_guard):
    guarded = guard_client(sdk_client(two_choices), jb_guard, window_chars=100, overlap_chars=10)
    got = []
    with pytest.raises(ResponseBlockedError) as err:
        for chunk in guarded.chat.completions.create(
                model="m", messages=[{"role": "user", "content": "two"}], n=2, stream=True):
            got.append(chunk)
    assert "xyzzy" not in _chunks_text(got, 0)
    assert {f.message_index for f in err.value.verdict.findings} == {0}  # the choice, by index


def test_per_choice_hold_back_async(two_choices, jb_guard):
    async def main():
        guarded = guard_client(sdk_client(two_choices, asynchronous=True), jb_guard,
                               on_block="refuse", window_chars=100, overlap_chars=10)
        stream = await guarded.chat.completions.create(
            model="m", messages=[{"role": "user", "content": "two"}], n=2, stream=True)
        return [c async for c in stream]

    chunks = asyncio.run(main())
    assert "xyzzy" not in _chunks_text(chunks[:-2], 0)
    assert _chunks_text(chunks[:-2], 1).startswith("fine0")


def test_n_greater_than_one_without_streaming_refuses_only_the_blocked_choice(two_choices,
                                                                             jb_guard):
    guarded = guard_client(sdk_client(two_choices), jb_guard, on_block="refuse")
    r = guarded.chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}],
                                        n=2)
    assert r.choices[0].finish_reason == "content_filter"
    assert r.choices[0].message.content == "Refused by policy."
    assert r.choices[1].message.content == LONG


def test_a_guard_that_raises_mid_stream_follows_on_error(llm):
    def crash_late(text):
        if "secret is" in text:
            raise RuntimeError("guard model crashed")
        return jb_score(text)

    for on_error, outcome in (("block", "blocked"), ("pass", "passed")):
        policy = Policy.from_yaml(f"on_error: {on_error}\n" + JB_POLICY)
        guarded = guard_client(sdk_client(llm), Guard(FunctionClassifier(JB_HEADS, crash_late),
                                                      policy), window_chars=80, overlap_chars=10)
        got = []
        stream = guarded.chat.completions.create(
            model="m", messages=[{"role": "user", "content": "tell me the secret"}], stream=True)
        if outcome == "blocked":
            with pytest.raises(ResponseBlockedError):
                for chunk in stream:
                    got.append(chunk)
            assert "secret" not in _chunks_text(got, 0)  # held text never leaks
        else:  # the policy said so: the text goes on (flag / pass)
            got = list(stream)
            assert "secret is xyzzy" in _chunks_text(got, 0)
        assert _chunks_text(got, 0).startswith("Sure. word")


# -- the sans-IO machine --------------------------------------------------------------------


def _machine(hold=True):
    def read(item):
        key, text = item
        if key is None:
            return Touch(barrier=True)
        return Touch(pieces=((key, text),))

    def tail(verdict, blocked, released, keys):
        return [("tail", sorted(blocked))]

    return StreamMachine(read, window_chars=10, overlap_chars=2, hold=hold, tail=tail,
                         error=lambda exc: Verdict(Action.BLOCK, "output",
                                                   [Finding(kind="error", action=Action.BLOCK)]))


def _pass():
    return Verdict(Action.PASS, "output")


def test_the_machine_checks_and_releases_each_key_on_its_own():
    m = _machine()
    m.feed((0, "abc"))                      # key 0: 3 chars, under the window
    assert m.next_event() == NEED_DATA     # held, nothing due
    m.feed((1, "0123456789"))               # key 1: a full window
    event = m.next_event()
    assert isinstance(event, Check) and event.keys == [1] and event.texts == ["0123456789"]
    m.checked_result(_pass())
    event = m.next_event()
    assert isinstance(event, Emit) and event.items == [(1, "0123456789")]  # not key 0's item
    assert m.next_event() == NEED_DATA
    m.feed((None, "usage"))                  # a barrier: after everything
    m.feed((1, "more"))
    assert m.next_event() == NEED_DATA
    m.finish()
    event = m.next_event()
    assert isinstance(event, Check) and event.final and event.keys == [0, 1]
    assert event.texts == ["abc", "0123456789more"]
    m.checked_result(_pass())
    event = m.next_event()
    assert isinstance(event, Emit) and event.items == [(0, "abc"), (None, "usage"), (1, "more")]
    assert m.next_event() == DONE


def test_the_machine_withholds_every_key_when_the_guard_fails():
    m = _machine()
    m.feed((0, "abc"))
    m.feed((1, "0123456789"))
    assert isinstance(m.next_event(), Check)
    verdict = m.checked_result(RuntimeError("boom"))
    assert verdict.blocked
    event = m.next_event()
    assert isinstance(event, Blocked) and event.tail == [("tail", [0, 1])]
    assert m.next_event() == DONE and m.stopped


def test_the_machine_maps_findings_to_their_keys_and_releases_in_release_mode():
    m = _machine(hold=False)
    m.feed((5, "0123456789"))
    assert isinstance(m.next_event(), Emit)  # release mode: out at once
    check = m.next_event()
    assert isinstance(check, Check) and check.keys == [5]
    v = m.checked_result(Verdict(Action.BLOCK, "output",
                                 [Finding(kind="rule", action=Action.BLOCK, message_index=0)]))
    assert v.findings[0].message_index == 5
    event = m.next_event()
    assert isinstance(event, Blocked) and event.tail == [("tail", [5])]


def test_both_drivers_run_the_same_machine(llm, jb_guard):
    sync = guard_client(sdk_client(llm), jb_guard).chat.completions.create(
        model="m", messages=[{"role": "user", "content": "hi"}], stream=True)

    async def make():
        guarded = guard_client(sdk_client(llm, asynchronous=True), jb_guard)
        stream = await guarded.chat.completions.create(
            model="m", messages=[{"role": "user", "content": "hi"}], stream=True)
        machine = stream._machine
        await stream.close()
        return machine

    assert type(sync._machine) is type(asyncio.run(make())) is StreamMachine
    sync.close()
