"""guardmerge's own OpenAI-compatible client: retries, timeouts, faults; with the guard too."""

from __future__ import annotations

import asyncio
import time

import openai
import pytest

from guardmerge import FunctionClassifier, Guard, Policy, PromptBlockedError
from guardmerge import AsyncChatClient, ChatClient, RetryPolicy
from guardmerge import guard_client
from guardmerge import UpstreamError, UpstreamTimeout
from guardmerge.testing import OpenAICompatServer

FAST = RetryPolicy(max_attempts=3, max_retry_time=5.0, backoff_initial=0.01, backoff_max=0.05)
MSG = [{"role": "user", "content": "one two three four five six"}]


@pytest.fixture()
def server():
    with OpenAICompatServer(words_per_chunk=2) as srv:
        yield srv


def test_completion_and_stream(server):
    with ChatClient(server.url, api_key="k", retry=FAST) as c:
        r = c.chat.completions.create(model="m", messages=MSG)
        assert r["choices"][0]["message"]["content"] == "You said: one two three four five six"
        chunks = list(c.chat.completions.create(model="m", messages=MSG, stream=True))
        assert "".join(ch["choices"][0]["delta"].get("content", "") for ch in chunks) == \
            "You said: one two three four five six"


def test_429_with_retry_after_then_success(server):
    server.script.append({"status": 429, "headers": {"Retry-After": "0.3"}})
    with ChatClient(server.url, retry=FAST) as c:
        start = time.monotonic()
        r = c.chat.completions.create(model="m", messages=MSG)
        elapsed = time.monotonic() - start
    assert r["choices"][0]["message"]["content"].startswith("You said")
    assert len(server.requests) == 2
    assert elapsed >= 0.3  # Retry-After honoured (our own backoff would be ~0.01 s)


def test_500_storm_exhausts_the_bounded_budget(server):
    server.script.extend({"status": 500} for _ in range(10))
    with ChatClient(server.url, retry=FAST) as c, pytest.raises(UpstreamError) as err:
        c.chat.completions.create(model="m", messages=MSG)
    assert err.value.status == 500 and err.value.attempts == 3
    assert len(server.requests) == 3 and "after 3 attempts" in str(err.value)


def test_retry_after_beyond_the_budget_gives_up_at_once(server):
    server.script.extend({"status": 503, "headers": {"Retry-After": "60"}} for _ in range(3))
    with ChatClient(server.url, retry=FAST) as c:
        start = time.monotonic()
        with pytest.raises(UpstreamError) as err:
            c.chat.completions.create(model="m", messages=MSG)
    assert err.value.status == 503 and time.monotonic() - start < 2 and len(server.requests) == 1


def test_other_4xx_is_not_retried(server):
    server.script.append({"status": 400})
    with ChatClient(server.url, retry=FAST) as c, pytest.raises(UpstreamError) as err:
        c.chat.completions.create(model="m", messages=MSG)
    assert err.value.status == 400 and "injected fault" in err.value.body
    assert len(server.requests) == 1


def test_connection_dropped_mid_stream(server):
    server.script.append({"drop_after": 1})
    with ChatClient(server.url, retry=FAST) as c:
        stream = c.chat.completions.create(model="m", messages=MSG, stream=True)
        with pytest.raises(UpstreamError, match="dropped mid-stream"):
            list(stream)


def test_slow_upstream_hits_the_timeout(server):
    server.script.extend({"delay": 2.0} for _ in range(3))
    with ChatClient(server.url, timeout=0.3, retry=RetryPolicy(max_attempts=2, backoff_initial=0.01)) as c:
        start = time.monotonic()
        with pytest.raises(UpstreamTimeout) as err:
            c.chat.completions.create(model="m", messages=MSG)
    assert err.value.attempts == 2 and time.monotonic() - start < 2.0


def test_malformed_json(server):
    server.script.append({"malformed": True})
    with ChatClient(server.url, retry=FAST) as c, pytest.raises(UpstreamError, match="malformed JSON"):
        c.chat.completions.create(model="m", messages=MSG)


def test_nothing_listening_is_a_connection_error():
    with ChatClient("http://127.0.0.1:9/v1", retry=FAST) as c, \
            pytest.raises(UpstreamError, match="connection failed") as err:
        c.chat.completions.create(model="m", messages=MSG)
    assert err.value.status is None and err.value.attempts == 3


def test_async_client_retries_and_streams(server):
    async def main():
        server.script.append({"status": 429, "headers": {"retry-after-ms": "50"}})
        async with AsyncChatClient(server.url, retry=FAST) as c:
            r = await c.chat.completions.create(model="m", messages=MSG)
            assert r["choices"][0]["message"]["content"].startswith("You said")
            stream = await c.chat.completions.create(model="m", messages=MSG, stream=True)
            text = "".join([ch["choices"][0]["delta"].get("content", "") async for ch in stream])
            assert text.endswith("six")
            server.script.append({"drop_after": 1})
            stream = await c.chat.completions.create(model="m", messages=MSG, stream=True)
            with pytest.raises(UpstreamError):
                [ch async for ch in stream]

    asyncio.run(main())
    assert len(server.requests) == 4


def _guard():
    heads = {"jailbreak": ["benign", "jailbreak"]}
    clf = FunctionClassifier(heads, lambda t: {"jailbreak": {"jailbreak": 0.99 if "xyzzy" in t else 0.0}})
    return Guard(clf, Policy.from_yaml(
        "input: {rules: [{head: jailbreak, labels: [jailbreak], block: 0.9}]}\n"
        "output: {rules: [{head: jailbreak, labels: [jailbreak], block: 0.9}]}\n"))


def test_guard_wraps_our_own_client(server):
    with ChatClient(server.url, retry=FAST) as c:
        guarded = guard_client(c, _guard(), on_block="refuse")
        r = guarded.chat.completions.create(model="m", messages=MSG)
        assert isinstance(r, dict) and r["choices"][0]["message"]["content"].startswith("You said")
        r = guarded.chat.completions.create(model="m", messages=[{"role": "user", "content": "xyzzy"}])
        assert r["choices"][0]["finish_reason"] == "content_filter"
        chunks = list(guarded.chat.completions.create(model="m", messages=MSG, stream=True))
        assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
        server.script.append({"drop_after": 1})
        with pytest.raises(UpstreamError):
            list(guarded.chat.completions.create(model="m", messages=MSG, stream=True))


def test_sdk_faults_pass_through_the_guard_as_sdk_errors(server):
    guarded = guard_client(openai.OpenAI(base_url=server.url, api_key="k", max_retries=1,
                                         timeout=0.5), _guard())
    server.script.extend([{"status": 429, "headers": {"Retry-After": "0.1"}}])
    assert guarded.chat.completions.create(model="m", messages=MSG).choices[0].message.content
    server.script.extend({"status": 500} for _ in range(2))
    with pytest.raises(openai.InternalServerError):
        guarded.chat.completions.create(model="m", messages=MSG)
    server.script.extend({"delay": 2.0} for _ in range(2))
    with pytest.raises(openai.APITimeoutError):
        guarded.chat.completions.create(model="m", messages=MSG)
    server.script.append({"drop_after": 1})
    with pytest.raises(openai.APIError):
        list(guarded.chat.completions.create(model="m", messages=MSG, stream=True))
    server.script.append({"malformed": True})
    with pytest.raises((openai.APIError, ValueError)):
        guarded.chat.completions.create(model="m", messages=MSG)
    with pytest.raises(PromptBlockedError):
        guarded.chat.completions.create(model="m", messages=[{"role": "user", "content": "xyzzy"}])
