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


# -- every channel of a streamed response, as a non-streamed one is read --------------------------

TOOLS_POLICY = JB_POLICY.replace("output:\n", "output:\n  check_tool_calls: true\n")
BASE = {"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "m"}


def _tools_guard(on_error="block"):
    return Guard(FunctionClassifier(JB_HEADS, jb_score),
                 Policy.from_yaml(f"on_error: {on_error}\n" + TOOLS_POLICY))


def _mock(body, *, asynchronous=False, sse=True):
    import json

    import httpx
    import openai

    def handler(request):
        if sse:
            text = "".join(f"data: {json.dumps(e)}\n\n" for e in body) + "data: [DONE]\n\n"
            return httpx.Response(200, headers={"content-type": "text/event-stream"},
                                  content=text.encode())
        return httpx.Response(200, json=body)

    if asynchronous:
        return openai.AsyncOpenAI(base_url="http://upstream.invalid/v1", api_key="k",
                                  max_retries=0, http_client=httpx.AsyncClient(
                                      transport=httpx.MockTransport(handler)))
    return openai.OpenAI(base_url="http://upstream.invalid/v1", api_key="k", max_retries=0,
                         http_client=httpx.Client(transport=httpx.MockTransport(handler)))


def _chunk(delta, index=0, finish=None):
    return {**BASE, "choices": [{"index": index, "delta": delta, "finish_reason": finish}]}


def _call(n, args, name=None):
    return {"tool_calls": [{"index": n, **({"id": f"t{n}", "type": "function"} if name else {}),
                            "function": {**({"name": name} if name else {}),
                                         "arguments": args}}]}


# (streamed deltas, the non-streamed message with the same text)
CHANNELS = {
    "interleaved tool calls": (
        [_call(0, "xy", "f"), _call(1, "ab", "g"), _call(0, "zzy")],
        {"content": None, "tool_calls": [
            {"id": "t0", "type": "function", "function": {"name": "f", "arguments": "xyzzy"}},
            {"id": "t1", "type": "function", "function": {"name": "g", "arguments": "ab"}}]}),
    "tool name": (
        [_call(0, "{}", "xyzzy")],
        {"content": None, "tool_calls": [
            {"id": "t0", "type": "function", "function": {"name": "xyzzy", "arguments": "{}"}}]}),
    "audio transcript": (
        [{"audio": {"id": "a", "transcript": "xy"}}, {"audio": {"transcript": "zzy"}}],
        {"content": None, "audio": {"id": "a", "data": "", "expires_at": 1,
                                    "transcript": "xyzzy"}}),
    "reasoning_content (vLLM / DeepSeek)": (
        [{"reasoning_content": "xy"}, {"reasoning_content": "zzy"}, {"content": "fine"}],
        {"content": "fine", "reasoning_content": "xyzzy"}),
    "legacy function_call": (
        [{"function_call": {"name": "f", "arguments": "xy"}},
         {"function_call": {"arguments": "zzy"}}],
        {"content": None, "function_call": {"name": "f", "arguments": "xyzzy"}}),
}


@pytest.mark.parametrize("name", list(CHANNELS))
def test_a_chat_stream_scores_every_channel_a_response_is_scored_on(name):
    deltas, message = CHANNELS[name]
    chunks = [_chunk({"role": "assistant"})] + [_chunk(d) for d in deltas] + \
        [_chunk({}, finish="stop")]
    guarded = guard_client(_mock(chunks), _tools_guard())
    got = []
    with pytest.raises(ResponseBlockedError) as err:
        for chunk in guarded.chat.completions.create(
                model="m", messages=[{"role": "user", "content": "hi"}], stream=True):
            got.append(chunk)
    shown = "".join(c.model_dump_json() for c in got)
    assert "xy" not in shown and "zzy" not in shown  # at most the role chunk went out
    assert err.value.verdict.findings[0].message_index == 0  # the choice, not a channel key
    body = {**BASE, "object": "chat.completion", "choices": [
        {"index": 0, "finish_reason": "stop", "message": {"role": "assistant", **message}}]}
    with pytest.raises(ResponseBlockedError):  # the same text, not streamed: the same verdict
        guard_client(_mock(body, sse=False), _tools_guard()).chat.completions.create(
            model="m", messages=[{"role": "user", "content": "hi"}])


def test_a_chat_stream_without_tool_checks_still_passes_tool_calls():
    chunks = [_chunk(_call(0, "xyzzy", "f")), _chunk({}, finish="tool_calls")]
    guard = Guard(FunctionClassifier(JB_HEADS, jb_score), Policy.from_yaml(JB_POLICY))
    out = list(guard_client(_mock(chunks), guard).chat.completions.create(
        model="m", messages=[{"role": "user", "content": "hi"}], stream=True))
    assert len(out) == 2  # check_tool_calls is off: arguments are not scored, as unstreamed


@pytest.mark.parametrize("index", ["1", 1.0, [1]])
def test_a_choice_index_that_is_not_an_integer_fails_closed(index):
    chunks = [_chunk({"content": "xy"}, index=index), _chunk({"content": "zzy"}, index=1),
              _chunk({}, index=1, finish="stop")]
    seen = []
    guarded = guard_client(_mock(chunks), _tools_guard(), on_verdict=seen.append)
    with pytest.raises(ResponseBlockedError) as err:
        list(guarded.chat.completions.create(
            model="m", messages=[{"role": "user", "content": "hi"}], stream=True))
    assert err.value.verdict.findings[0].kind == "error"
    assert "choices[0].index" in err.value.verdict.findings[0].detail
    # on_error: flag is the policy's choice: a flag, the stream goes on, never a silent pass
    seen.clear()
    flagging = guard_client(_mock([_chunk({"content": "ok"}, index=index)]), _tools_guard("flag"),
                            on_verdict=seen.append)
    assert len(list(flagging.chat.completions.create(
        model="m", messages=[{"role": "user", "content": "hi"}], stream=True))) == 1
    assert [v.action.value for v in seen if v.direction == "output"][0] == "flag"


def test_content_a_stream_cannot_read_fails_closed():
    chunks = [_chunk({"content": ["xyzzy"]}), _chunk({}, finish="stop")]
    with pytest.raises(ResponseBlockedError) as err:
        list(guard_client(_mock(chunks), _tools_guard()).chat.completions.create(
            model="m", messages=[{"role": "user", "content": "hi"}], stream=True))
    assert "delta.content is a list" in err.value.verdict.findings[0].detail


# -- Responses streams: the snapshots are checked as well as the deltas ---------------------------

RESPONSE = {"id": "r", "object": "response", "created_at": 1, "model": "m",
            "status": "in_progress", "output": [], "parallel_tool_calls": True,
            "tool_choice": "auto", "tools": []}


def _message(text):
    return {"type": "message", "id": "m1", "role": "assistant", "status": "completed",
            "content": [{"type": "output_text", "text": text, "annotations": []}]}


def _events(*events):
    created = {"type": "response.created", "response": RESPONSE}
    return [{**e, "sequence_number": n} for n, e in enumerate((created, *events))]


def _delta(text, kind="response.output_text.delta", **extra):
    return {"type": kind, "output_index": 0, "item_id": "m1", "content_index": 0,
            "delta": text, "logprobs": [], **extra}


SNAPSHOTS = {
    "output_item.done only": _events(
        {"type": "response.output_item.done", "output_index": 0, "item": _message("xyzzy")}),
    "completed only": _events(
        {"type": "response.completed",
         "response": {**RESPONSE, "status": "completed", "output": [_message("xyzzy")]}}),
    "output_text.done only": _events(
        {"type": "response.output_text.done", "output_index": 0, "item_id": "m1",
         "content_index": 0, "text": "xyzzy", "logprobs": []}),
    "content_part.done only": _events(
        {"type": "response.content_part.done", "output_index": 0, "item_id": "m1",
         "content_index": 0, "part": {"type": "output_text", "text": "xyzzy",
                                      "annotations": []}}),
    "completed differs from the deltas": _events(
        _delta("hello"), {"type": "response.completed", "response": {
            **RESPONSE, "status": "completed", "output": [_message("xyzzy")]}}),
    "audio transcript deltas": _events(
        {"type": "response.audio.transcript.delta", "delta": "xy", "response_id": "r"},
        {"type": "response.audio.transcript.delta", "delta": "zzy", "response_id": "r"}),
    "mcp_call arguments deltas": _events(
        {"type": "response.mcp_call_arguments.delta", "output_index": 0, "item_id": "x",
         "delta": "xy"},
        {"type": "response.mcp_call_arguments.delta", "output_index": 0, "item_id": "x",
         "delta": "zzy"}),
    "mcp_call output in output_item.done": _events(
        {"type": "response.output_item.done", "output_index": 0, "item": {
            "type": "mcp_call", "id": "1", "server_label": "s", "name": "t", "arguments": "{}",
            "output": "xyzzy"}}),
}


@pytest.mark.parametrize("name", list(SNAPSHOTS))
def test_responses_stream_snapshots_are_checked(name):
    guarded = guard_client(_mock(SNAPSHOTS[name]), _tools_guard())
    got = []
    with pytest.raises(ResponseBlockedError):
        for event in guarded.responses.create(model="m", input="hi", stream=True):
            got.append(event)
    assert [e.type for e in got] == ["response.created"]  # nothing with text went out


def test_the_sdk_final_response_is_checked_in_the_stream_helper():
    events = SNAPSHOTS["completed differs from the deltas"]
    with pytest.raises(ResponseBlockedError):
        with guard_client(_mock(events), _tools_guard()).responses.stream(
                model="m", input="hi") as stream:
            stream.get_final_response()


def test_a_snapshot_equal_to_the_deltas_is_not_scored_again(llm):
    scored = []
    guard = Guard(FunctionClassifier(JB_HEADS, lambda t: scored.append(t) or jb_score(t)),
                  Policy.from_yaml(JB_POLICY), cache_size=0)
    events = list(guard_client(sdk_client(llm), guard).responses.create(
        model="m", input="plain words", stream=True))
    assert events[-1].type == "response.completed"
    assert scored.count("You said: plain words") == 1  # deltas, done, item, completed: once


@pytest.mark.parametrize("kind,extra", [
    ("mcp_call", {"server_label": "s", "name": "t", "arguments": "{}", "output": "xyzzy"}),
    ("code_interpreter_call", {"container_id": "c", "status": "completed", "code": "print(1)",
                               "outputs": [{"type": "logs", "logs": "xyzzy"}]}),
])
def test_non_streamed_tool_outputs_are_checked(kind, extra):
    body = {**RESPONSE, "status": "completed", "output": [{"type": kind, "id": "1", **extra}]}
    with pytest.raises(ResponseBlockedError):
        guard_client(_mock(body, sse=False), _tools_guard()).responses.create(model="m",
                                                                               input="hi")
    quiet = Guard(FunctionClassifier(JB_HEADS, jb_score), Policy.from_yaml(JB_POLICY))
    assert guard_client(_mock(body, sse=False), quiet).responses.create(model="m", input="hi")


def test_the_machine_turns_an_unreadable_item_into_an_error_check():
    def read(item):
        return Touch(unreadable="choices[0].index is a str") if item == "bad" else \
            Touch(pieces=((0, item),))

    m = StreamMachine(read, window_chars=10, overlap_chars=2, hold=True,
                      tail=lambda *a: ["tail"],
                      error=lambda exc: Verdict(Action.BLOCK, "output", [
                          Finding(kind="error", action=Action.BLOCK, detail=str(exc))]))
    m.feed("ok")
    m.feed("bad")
    check = m.next_event()
    assert isinstance(check, Check) and check.fault and check.texts == []
    verdict = m.checked_result(_pass())  # whatever the guard says: the item was unreadable
    assert verdict.blocked and "cannot read" in verdict.findings[0].detail
    assert m.next_event() == Blocked(verdict, ["tail"])


def test_the_async_driver_checks_channels_snapshots_and_faults_the_same_way():
    cases = {
        "chat": [_chunk(_call(0, "xy", "f")), _chunk(_call(1, "ab", "g")), _chunk(_call(0, "zzy"))],
        "chat fault": [_chunk({"content": "fine"}, index="0")],
        "responses": SNAPSHOTS["completed differs from the deltas"],
    }

    async def run(name, body):
        guarded = guard_client(_mock(body, asynchronous=True), _tools_guard())
        if name.startswith("chat"):
            stream = await guarded.chat.completions.create(
                model="m", messages=[{"role": "user", "content": "hi"}], stream=True)
        else:
            stream = await guarded.responses.create(model="m", input="hi", stream=True)
        with pytest.raises(ResponseBlockedError) as err:
            async for _ in stream:
                pass
        return err.value.verdict

    for name, body in cases.items():
        verdict = asyncio.run(run(name, body))
        assert verdict.blocked and (verdict.findings[0].kind == "error") == (name == "chat fault")
