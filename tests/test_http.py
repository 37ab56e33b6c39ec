"""guardmerge's own OpenAI-compatible client: retries, timeouts, faults; with the guard too.

The retry policy is tested deterministically: an ``httpx.MockTransport`` plays the upstream
and ``RetryPolicy(sleep=...)`` records the waits instead of sleeping. The loopback server is
used only where a real socket matters (a stream over chunked HTTP, the SDK's own faults).
"""

from __future__ import annotations

import asyncio
import json

import httpx
import openai
import pytest

from guardmerge import (AsyncChatClient, ChatClient, FunctionClassifier, Guard, Policy,
                        PromptBlockedError, RetryPolicy, UpstreamError, UpstreamTimeout,
                        guard_client)
from guardmerge.testing import OpenAICompatServer

MSG = [{"role": "user", "content": "one two three four five six"}]
URL = "http://upstream.invalid/v1"


def _completion(text: str = "hello") -> dict:
    return {"id": "c1", "object": "chat.completion", "created": 0, "model": "m",
            "choices": [{"index": 0, "finish_reason": "stop",
                         "message": {"role": "assistant", "content": text}}]}


class Upstream:
    """A scripted upstream: each request takes the next response (or exception) off the script;
    when the script is empty it answers a completion. Requests are recorded."""

    def __init__(self, *script) -> None:
        self.script = list(script)
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        item = self.script.pop(0) if self.script else httpx.Response(200, json=_completion())
        if isinstance(item, Exception):
            raise item
        return item


def _policy(sleeps: list[float], **kw) -> RetryPolicy:
    kw = {"max_attempts": 3, "max_retry_time": 5.0, "backoff_initial": 0.01, "backoff_max": 0.05,
          "jitter": 0.0, **kw}
    return RetryPolicy(sleep=sleeps.append, **kw)


def _client(upstream: Upstream, sleeps: list[float], **kw) -> ChatClient:
    return ChatClient(URL, api_key="k", retry=_policy(sleeps, **kw),
                      transport=httpx.MockTransport(upstream))


def test_request_body_and_headers():
    up, sleeps = Upstream(), []
    with _client(up, sleeps) as c:
        r = c.chat.completions.create(model="m", messages=MSG, temperature=None, top_p=0.5)
    assert r == _completion()
    sent = up.requests[0]
    assert sent.url == f"{URL}/chat/completions" and sent.headers["authorization"] == "Bearer k"
    assert json.loads(sent.content) == {"model": "m", "messages": MSG, "top_p": 0.5}
    assert sleeps == []


def test_429_with_retry_after_then_success():
    up, sleeps = Upstream(httpx.Response(429, headers={"Retry-After": "0.3"})), []
    with _client(up, sleeps) as c:
        r = c.chat.completions.create(model="m", messages=MSG)
    assert r["choices"][0]["message"]["content"] == "hello"
    assert len(up.requests) == 2 and sleeps == [0.3]  # Retry-After, not our 0.01 s backoff


def test_retry_after_ms_and_http_date_are_honoured():
    when = "Wed, 21 Oct 2015 07:28:00 GMT"  # in the past: retry at once
    up, sleeps = Upstream(httpx.Response(503, headers={"retry-after-ms": "50"}),
                          httpx.Response(503, headers={"Retry-After": when})), []
    with _client(up, sleeps) as c:
        c.chat.completions.create(model="m", messages=MSG)
    assert sleeps == [0.05, 0.0] and len(up.requests) == 3


def test_500_storm_exhausts_the_bounded_budget_with_exponential_backoff():
    up, sleeps = Upstream(*[httpx.Response(500, text="boom") for _ in range(10)]), []
    with _client(up, sleeps) as c, pytest.raises(UpstreamError) as err:
        c.chat.completions.create(model="m", messages=MSG)
    assert err.value.status == 500 and err.value.attempts == 3 and err.value.body == "boom"
    assert len(up.requests) == 3 and "after 3 attempts" in str(err.value)
    assert sleeps == [0.01, 0.02]


def test_backoff_is_capped_and_jitter_stays_within_its_bound():
    up, sleeps = Upstream(*[httpx.Response(502) for _ in range(6)]), []
    with _client(up, sleeps, max_attempts=6, backoff_initial=0.1, backoff_max=0.3,
                 jitter=0.5) as c, pytest.raises(UpstreamError):
        c.chat.completions.create(model="m", messages=MSG)
    bases = [0.1, 0.2, 0.3, 0.3, 0.3]
    assert len(sleeps) == 5 and all(b <= s <= 1.5 * b for s, b in zip(sleeps, bases))


def test_retry_after_beyond_the_budget_gives_up_at_once():
    up, sleeps = Upstream(*[httpx.Response(503, headers={"Retry-After": "60"})] * 3), []
    with _client(up, sleeps) as c, pytest.raises(UpstreamError) as err:
        c.chat.completions.create(model="m", messages=MSG)
    assert err.value.status == 503 and len(up.requests) == 1 and sleeps == []


def test_other_4xx_is_not_retried():
    up, sleeps = Upstream(httpx.Response(400, json={"error": {"message": "bad field"}})), []
    with _client(up, sleeps) as c, pytest.raises(UpstreamError) as err:
        c.chat.completions.create(model="m", messages=MSG)
    assert err.value.status == 400 and "bad field" in err.value.body
    assert len(up.requests) == 1 and sleeps == []


@pytest.mark.parametrize("status", [408, 409, 429, 500, 502, 503, 504])
def test_retryable_statuses(status):
    up, sleeps = Upstream(httpx.Response(status)), []
    with _client(up, sleeps) as c:
        c.chat.completions.create(model="m", messages=MSG)
    assert len(up.requests) == 2 and len(sleeps) == 1


def test_connection_errors_and_timeouts_are_retried_then_translated():
    up, sleeps = Upstream(*[httpx.ConnectError("refused")] * 3), []
    with _client(up, sleeps) as c, pytest.raises(UpstreamError, match="connection failed") as err:
        c.chat.completions.create(model="m", messages=MSG)
    assert err.value.status is None and err.value.attempts == 3 and len(sleeps) == 2
    up, sleeps = Upstream(httpx.ReadTimeout("slow"), httpx.ReadTimeout("slow")), []
    with _client(up, sleeps, max_attempts=2) as c, pytest.raises(UpstreamTimeout) as err:
        c.chat.completions.create(model="m", messages=MSG)
    assert err.value.attempts == 2 and len(up.requests) == 2


def test_malformed_json_is_an_upstream_error():
    up, sleeps = Upstream(httpx.Response(200, text='{"id": "x", "choices": [ {oops')), []
    with _client(up, sleeps) as c, pytest.raises(UpstreamError, match="malformed JSON"):
        c.chat.completions.create(model="m", messages=MSG)
    assert len(up.requests) == 1


def _sse(*events: str, done: bool = True) -> bytes:
    body = "".join(f"data: {e}\n\n" for e in events)
    return (body + ("data: [DONE]\n\n" if done else "")).encode()


def _chunk(text: str) -> str:
    return json.dumps({"id": "c1", "object": "chat.completion.chunk", "created": 0, "model": "m",
                       "choices": [{"index": 0, "delta": {"content": text},
                                    "finish_reason": None}]})


class _Broken(httpx.SyncByteStream, httpx.AsyncByteStream):
    """A body that sends one event and then loses the connection."""

    def __init__(self, first: bytes) -> None:
        self.first = first

    def __iter__(self):
        yield self.first
        raise httpx.ReadError("connection reset")

    async def __aiter__(self):
        yield self.first
        raise httpx.ReadError("connection reset")


def test_stream_faults():
    ok = httpx.Response(200, content=_sse(_chunk("a"), _chunk("b")),
                        headers={"content-type": "text/event-stream"})
    cut = httpx.Response(200, content=_sse(_chunk("a"), done=False))
    dropped = httpx.Response(200, stream=_Broken(_sse(_chunk("a"), done=False)))
    error = httpx.Response(200, content=_sse(json.dumps({"error": {"message": "overloaded"}})))
    up, sleeps = Upstream(ok, cut, dropped, error), []
    with _client(up, sleeps) as c:
        chunks = list(c.chat.completions.create(model="m", messages=MSG, stream=True))
        assert "".join(ch["choices"][0]["delta"]["content"] for ch in chunks) == "ab"
        with pytest.raises(UpstreamError, match="ended before"):
            list(c.chat.completions.create(model="m", messages=MSG, stream=True))
        with pytest.raises(UpstreamError, match="dropped mid-stream"):
            list(c.chat.completions.create(model="m", messages=MSG, stream=True))
        with pytest.raises(UpstreamError, match="overloaded"):
            list(c.chat.completions.create(model="m", messages=MSG, stream=True))
    assert json.loads(up.requests[0].content)["stream"] is True


def test_a_stream_is_retried_only_before_its_first_byte():
    up, sleeps = Upstream(httpx.Response(429), httpx.Response(200, content=_sse(_chunk("x")))), []
    with _client(up, sleeps) as c:
        chunks = list(c.chat.completions.create(model="m", messages=MSG, stream=True))
    assert len(up.requests) == 2 and chunks[0]["choices"][0]["delta"]["content"] == "x"


def test_async_client_retries_and_streams():
    recorded: list[float] = []

    async def asleep(seconds: float) -> None:
        recorded.append(seconds)

    async def main():
        up = Upstream(httpx.Response(429, headers={"retry-after-ms": "50"}),
                      httpx.Response(200, json=_completion("async")),
                      httpx.Response(200, content=_sse(_chunk("s"), _chunk("ix"))),
                      httpx.Response(200, stream=_Broken(_sse(_chunk("a"), done=False))))
        retry = RetryPolicy(max_attempts=3, backoff_initial=0.01, sleep=asleep)
        async with AsyncChatClient(URL, retry=retry, transport=httpx.MockTransport(up)) as c:
            r = await c.chat.completions.create(model="m", messages=MSG)
            assert r["choices"][0]["message"]["content"] == "async"
            stream = await c.chat.completions.create(model="m", messages=MSG, stream=True)
            assert "".join([ch["choices"][0]["delta"]["content"] async for ch in stream]) == "six"
            stream = await c.chat.completions.create(model="m", messages=MSG, stream=True)
            with pytest.raises(UpstreamError, match="dropped mid-stream"):
                [ch async for ch in stream]
        return up

    up = asyncio.run(main())
    assert len(up.requests) == 4 and recorded == [0.05]


def test_completion_and_stream_over_a_real_socket():
    with OpenAICompatServer(words_per_chunk=2) as server, ChatClient(server.url) as c:
        r = c.chat.completions.create(model="m", messages=MSG)
        assert r["choices"][0]["message"]["content"] == "You said: one two three four five six"
        chunks = list(c.chat.completions.create(model="m", messages=MSG, stream=True))
        assert "".join(ch["choices"][0]["delta"].get("content", "") for ch in chunks) == \
            "You said: one two three four five six"
        assert len(chunks) == 6  # role, 3 pieces of 2 words (+ "You said:"), stop


def _guard():
    heads = {"jailbreak": ["benign", "jailbreak"]}
    clf = FunctionClassifier(heads, lambda t: {"jailbreak": {"jailbreak": 0.99 if "xyzzy" in t else 0.0}})
    return Guard(clf, Policy.from_yaml(
        "input: {rules: [{head: jailbreak, labels: [jailbreak], block: 0.9}]}\n"
        "output: {rules: [{head: jailbreak, labels: [jailbreak], block: 0.9}]}\n"))


def test_guard_wraps_our_own_client():
    dropped = httpx.Response(200, stream=_Broken(_sse(_chunk("a"), done=False)))
    up, sleeps = Upstream(httpx.Response(200, json=_completion("fine")),
                          httpx.Response(200, content=_sse(_chunk("fi"), _chunk("ne"))),
                          dropped), []
    with _client(up, sleeps) as c:
        guarded = guard_client(c, _guard(), on_block="refuse")
        r = guarded.chat.completions.create(model="m", messages=MSG)
        assert isinstance(r, dict) and r["choices"][0]["message"]["content"] == "fine"
        r = guarded.chat.completions.create(model="m", messages=[{"role": "user", "content": "xyzzy"}])
        assert r["choices"][0]["finish_reason"] == "content_filter"
        assert len(up.requests) == 1  # the blocked prompt never went upstream
        chunks = list(guarded.chat.completions.create(model="m", messages=MSG, stream=True))
        assert "".join(ch["choices"][0]["delta"]["content"] for ch in chunks) == "fine"
        with pytest.raises(UpstreamError, match="dropped mid-stream"):
            list(guarded.chat.completions.create(model="m", messages=MSG, stream=True))


def _sdk(upstream: Upstream, **kw) -> openai.OpenAI:
    """The real SDK client on an in-process transport (its own retry sleeps still apply)."""
    return openai.OpenAI(base_url=URL, api_key="k", http_client=httpx.Client(
        transport=httpx.MockTransport(upstream)), **kw)


def test_sdk_http_faults_pass_through_the_guard_as_sdk_errors():
    up = Upstream(httpx.Response(429, headers={"retry-after-ms": "1"}),
                  httpx.Response(200, json=_completion("after a retry")),
                  httpx.Response(500, json={"error": {"message": "boom"}}),
                  httpx.Response(200, text='{"id": "x", "choices": [ {oops',
                                 headers={"content-type": "application/json"}))
    guarded = guard_client(_sdk(up, max_retries=1), _guard())
    assert guarded.chat.completions.create(model="m", messages=MSG).choices[0].message.content \
        == "after a retry"
    assert len(up.requests) == 2  # the SDK retried the 429 itself; the guard checked once
    plain = guard_client(_sdk(up, max_retries=0), _guard())
    with pytest.raises(openai.InternalServerError):
        plain.chat.completions.create(model="m", messages=MSG)
    with pytest.raises(json.JSONDecodeError):  # what openai 1.x+ raises for a broken body
        plain.chat.completions.create(model="m", messages=MSG)
    before = len(up.requests)
    with pytest.raises(PromptBlockedError):
        plain.chat.completions.create(model="m", messages=[{"role": "user", "content": "xyzzy"}])
    assert len(up.requests) == before


def test_sdk_socket_faults_pass_through_the_guard_as_sdk_errors():
    """Socket-level faults need a real socket: a read timeout and a connection dropped
    mid-stream reach the caller as the SDK's own errors."""
    with OpenAICompatServer(words_per_chunk=2) as server:
        guarded = guard_client(openai.OpenAI(base_url=server.url, api_key="k", max_retries=0,
                                             timeout=0.5), _guard())
        server.script.append({"delay": 2.0})
        with pytest.raises(openai.APITimeoutError):
            guarded.chat.completions.create(model="m", messages=MSG)
        server.script.append({"drop_after": 1})
        with pytest.raises(openai.APIConnectionError):
            list(guarded.chat.completions.create(model="m", messages=MSG, stream=True))
