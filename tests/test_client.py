"""The middleware against a real local OpenAI-compatible server, with the real openai SDK."""

from __future__ import annotations

import asyncio

import openai
import pytest

from guardmerge import (FunctionClassifier, Guard, Policy, PromptBlockedError,
                        ResponseBlockedError)
from guardmerge import guard_client
from guardmerge.testing import OpenAICompatServer, echo_reply

HEADS = {"jailbreak": ["benign", "jailbreak"], "toxicity": ["normal", "offensive", "hateful"]}
POLICY = """
refusal_message: "Refused by policy."
input:
  roles: [user, tool]
  rules:
    - {id: jb, head: jailbreak, labels: [jailbreak], flag: 0.5, block: 0.9}
output:
  rules:
    - {id: jb-out, head: jailbreak, labels: [jailbreak], block: 0.9}
    - {id: tox-out, head: toxicity, labels: [hateful], flag: 0.5}
"""


def score(text: str):
    jb = 0.99 if "xyzzy" in text else (0.6 if "borderline" in text else 0.01)
    hateful = 0.7 if "grumpy" in text else 0.0
    return {"jailbreak": {"jailbreak": jb},
            "toxicity": {"normal": 1 - hateful, "offensive": 0.0, "hateful": hateful}}


def reply(messages):
    last = echo_reply(messages)
    if "tell me the secret" in last:
        return "Sure. " + " ".join(["word"] * 60) + " the secret is xyzzy and more words after it"
    if "long story" in last:
        return " ".join(f"w{i}" for i in range(400))
    if "be grumpy" in last:
        return "I am grumpy today."
    return last


@pytest.fixture()
def server():
    with OpenAICompatServer(reply=reply, words_per_chunk=2) as srv:
        yield srv


@pytest.fixture()
def guard():
    return Guard(FunctionClassifier(HEADS, score), Policy.from_yaml(POLICY))


def _client(server, **kw):
    return openai.OpenAI(base_url=server.url, api_key="test", max_retries=0, timeout=10, **kw)


def user(text):
    return [{"role": "user", "content": text}]


def test_pass_through_returns_the_sdk_object(server, guard):
    guarded = guard_client(_client(server), guard)
    r = guarded.chat.completions.create(model="m", messages=user("hello there"))
    assert type(r).__name__ == "ChatCompletion"
    assert r.choices[0].message.content == "You said: hello there"
    assert guarded.models.list == guarded.wrapped.models.list  # carries no text: passed through
    assert isinstance(guarded.with_options(timeout=5).chat.completions.create(
        model="m", messages=user("again")).choices[0].message.content, str)


def test_blocked_prompt_raises_and_never_calls_upstream(server, guard):
    guarded = guard_client(_client(server), guard)
    with pytest.raises(PromptBlockedError) as err:
        guarded.chat.completions.create(model="m", messages=user("ignore all, xyzzy"))
    assert err.value.verdict.blocked and err.value.verdict.findings[0].head == "jailbreak"
    assert server.requests == []


def test_blocked_prompt_refusal_completion(server, guard):
    guarded = guard_client(_client(server), guard, on_block="refuse")
    r = guarded.chat.completions.create(model="m", messages=user("xyzzy now"))
    assert r.choices[0].finish_reason == "content_filter"
    assert r.choices[0].message.content == "Refused by policy."
    assert server.requests == []
    chunks = list(guarded.chat.completions.create(model="m", messages=user("xyzzy"), stream=True))
    assert [c.choices[0].finish_reason for c in chunks] == ["content_filter"]
    assert server.requests == []


def test_flags_reach_the_callback_and_the_call_goes_on(server, guard, caplog):
    seen = []
    guarded = guard_client(_client(server), guard, on_flag=seen.append)
    r = guarded.chat.completions.create(model="m", messages=user("a borderline request"))
    assert r.choices[0].message.content.startswith("You said:")
    assert [v.direction for v in seen] == ["input"] and seen[0].flagged
    r = guarded.chat.completions.create(model="m", messages=user("please be grumpy"))
    assert [v.direction for v in seen] == ["input", "output"]
    assert "guard flagged" in caplog.text


def test_content_parts_and_roles(server, guard):
    guarded = guard_client(_client(server), guard)
    msgs = [{"role": "system", "content": "xyzzy is our codename"},  # system not checked
            {"role": "user", "content": [{"type": "text", "text": "hello"},
                                         {"type": "image_url", "image_url": {"url": "data:,"}}]}]
    assert guarded.chat.completions.create(model="m", messages=msgs).choices[0].message.content
    msgs[1]["content"].append({"type": "text", "text": "xyzzy"})
    with pytest.raises(PromptBlockedError):
        guarded.chat.completions.create(model="m", messages=msgs)


def test_non_text_parts_follow_the_policy(server):
    policy = Policy.from_yaml(POLICY.replace("  roles: [user, tool]\n",
                                             "  roles: [user, tool]\n  non_text_parts: block\n"))
    guarded = guard_client(_client(server), Guard(FunctionClassifier(HEADS, score), policy))
    msgs = [{"role": "user", "content": [{"type": "text", "text": "hi"},
                                         {"type": "image_url", "image_url": {"url": "data:,"}}]}]
    with pytest.raises(PromptBlockedError) as err:
        guarded.chat.completions.create(model="m", messages=msgs)
    assert err.value.verdict.findings[0].kind == "non_text"


def test_blocked_response_raise_and_refuse(server, guard):
    guarded = guard_client(_client(server), guard)
    with pytest.raises(ResponseBlockedError) as err:
        guarded.chat.completions.create(model="m", messages=user("tell me the secret"))
    assert err.value.verdict.direction == "output"
    refusing = guard_client(_client(server), guard, on_block="refuse")
    r = refusing.chat.completions.create(model="m", messages=user("tell me the secret"))
    assert r.choices[0].finish_reason == "content_filter"
    assert r.choices[0].message.content == "Refused by policy."


def test_stream_passes_through_whole_text(server, guard):
    guarded = guard_client(_client(server), guard, window_chars=200, overlap_chars=20)
    stream = guarded.chat.completions.create(model="m", messages=user("long story"), stream=True)
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == " ".join(f"w{i}" for i in range(400))
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert stream.verdict.passed


def test_stream_hold_back_never_shows_blocked_text(server, guard):
    guarded = guard_client(_client(server), guard, on_block="refuse", window_chars=120,
                           overlap_chars=20)
    chunks = list(guarded.chat.completions.create(model="m", messages=user("tell me the secret"),
                                                  stream=True))
    shown = "".join(c.choices[0].delta.content or "" for c in chunks[:-1] if c.choices)
    assert "xyzzy" not in shown
    assert shown.startswith("Sure. word")  # earlier, checked windows did reach the caller
    assert chunks[-1].choices[0].finish_reason == "content_filter"


def test_stream_block_raises_after_released_text(server, guard):
    guarded = guard_client(_client(server), guard, window_chars=120, overlap_chars=20)
    got = []
    with pytest.raises(ResponseBlockedError):
        for c in guarded.chat.completions.create(model="m", messages=user("tell me the secret"),
                                                 stream=True):
            got.append(c.choices[0].delta.content or "")
    assert "xyzzy" not in "".join(got)


def test_release_mode_is_weaker_and_checks_behind(server, guard):
    guarded = guard_client(_client(server), guard, on_block="refuse", stream_mode="release",
                           window_chars=120, overlap_chars=20)
    chunks = list(guarded.chat.completions.create(model="m", messages=user("tell me the secret"),
                                                  stream=True))
    shown = "".join(c.choices[0].delta.content or "" for c in chunks[:-1] if c.choices)
    assert "xyzzy" in shown  # released before it was checked: the documented weakness
    assert chunks[-1].choices[0].finish_reason == "content_filter"


def test_guard_failure_fails_closed(server):
    def boom(text):
        raise RuntimeError("guard model crashed")

    guarded = guard_client(_client(server), Guard(FunctionClassifier(HEADS, boom),
                                                  Policy.from_yaml(POLICY)))
    with pytest.raises(PromptBlockedError) as err:
        guarded.chat.completions.create(model="m", messages=user("hello"))
    assert err.value.verdict.findings[0].kind == "error"
    assert server.requests == []


def test_async_client_guard(server, guard):
    async def main():
        guarded = guard_client(openai.AsyncOpenAI(base_url=server.url, api_key="t", max_retries=0),
                               guard)
        r = await guarded.chat.completions.create(model="m", messages=user("hi async"))
        assert r.choices[0].message.content == "You said: hi async"
        with pytest.raises(PromptBlockedError):
            await guarded.chat.completions.create(model="m", messages=user("xyzzy"))
        stream = await guarded.chat.completions.create(model="m", messages=user("long story"),
                                                       stream=True)
        text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
        assert text.endswith("w399")
        refusing = guard_client(openai.AsyncOpenAI(base_url=server.url, api_key="t", max_retries=0),
                                guard, on_block="refuse", window_chars=120, overlap_chars=20)
        stream = await refusing.chat.completions.create(model="m",
                                                        messages=user("tell me the secret"), stream=True)
        chunks = [c async for c in stream]
        assert chunks[-1].choices[0].finish_reason == "content_filter"
        assert "xyzzy" not in "".join(c.choices[0].delta.content or "" for c in chunks[:-1])
        results = await asyncio.gather(*[
            guarded.chat.completions.create(model="m", messages=user(f"concurrent {i}"))
            for i in range(8)])
        assert [r.choices[0].message.content for r in results] == [
            f"You said: concurrent {i}" for i in range(8)]

    asyncio.run(main())


def test_async_guard_never_blocks_the_event_loop(server):
    """The classifier waits until a coroutine on the event loop has run: if model work ran on
    the loop, that coroutine could never run and the check would time out (fail closed)."""
    import threading

    loop_ran = threading.Event()
    waited = []

    def needs_the_loop(text):
        waited.append(loop_ran.wait(timeout=10))
        return score(text)

    guard = Guard(FunctionClassifier(HEADS, needs_the_loop), Policy.from_yaml(POLICY))

    async def main():
        guarded = guard_client(openai.AsyncOpenAI(base_url=server.url, api_key="t", max_retries=0),
                               guard)

        async def on_the_loop():
            await asyncio.sleep(0)
            loop_ran.set()

        task = asyncio.create_task(on_the_loop())
        reply = await guarded.chat.completions.create(model="m", messages=user("check me"))
        await task
        return reply

    reply = asyncio.run(main())
    assert waited == [True, True]  # input and output checks both saw the loop keep running
    assert reply.choices[0].message.content == "You said: check me"


def test_real_bundle_end_to_end_with_sdk(server, trigger_bundle):
    from guardmerge import BundleClassifier

    policy = Policy.from_yaml("""
input: {rules: [{head: jailbreak, labels: [jailbreak], block: 0.9}]}
output: {rules: [{head: jailbreak, labels: [jailbreak], block: 0.9}]}
""")
    guard = Guard(BundleClassifier.from_pretrained(trigger_bundle), policy)
    guarded = guard_client(_client(server), guard, on_block="refuse")
    assert guarded.chat.completions.create(model="m", messages=user("hello world")).choices[0] \
        .finish_reason == "stop"
    from guardmerge.testing import TRIGGER, random_text

    long_prompt = random_text(3000, seed=1, insert={2500: TRIGGER})
    r = guarded.chat.completions.create(model="m", messages=user(long_prompt))
    assert r.choices[0].finish_reason == "content_filter" and len(server.requests) == 1


def test_tool_call_arguments_are_checked_when_the_policy_asks(guard):
    import httpx

    from guardmerge import ChatClient

    body = {"id": "c", "object": "chat.completion", "created": 0, "model": "m",
            "choices": [{"index": 0, "finish_reason": "tool_calls", "message": {
                "role": "assistant", "content": None,
                "tool_calls": [{"id": "c1", "type": "function",
                                "function": {"name": "run", "arguments": "{\"cmd\": \"xyzzy\"}"}}]}}]}
    upstream = lambda: ChatClient("http://upstream.invalid/v1", transport=httpx.MockTransport(  # noqa: E731
        lambda request: httpx.Response(200, json=body)))
    off = guard_client(upstream(), guard, on_block="refuse")
    r = off.chat.completions.create(model="m", messages=user("run something"))
    assert r["choices"][0]["finish_reason"] == "tool_calls"  # not asked: arguments not scored
    policy = Policy.from_yaml(POLICY.replace("output:\n", "output:\n  check_tool_calls: true\n"))
    seen = []
    on = guard_client(upstream(), Guard(FunctionClassifier(HEADS, score), policy),
                      on_block="refuse", on_verdict=seen.append)
    refused = on.chat.completions.create(model="m", messages=user("run something"))
    assert refused["choices"][0]["finish_reason"] == "content_filter"
    assert refused["choices"][0]["message"]["content"] == "Refused by policy."
    assert [v.direction for v in seen] == ["input", "output"] and seen[1].blocked
    assert seen[1].findings[0].head == "jailbreak"
