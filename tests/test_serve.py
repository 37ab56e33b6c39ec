"""``guardmerge serve``: the real openai SDK (sync, async, streams) against the proxy, in front
of the project's local OpenAI-compatible test server. Concurrency is made with events and the
batcher's gate, never with sleeps; nothing here asserts a duration."""

from __future__ import annotations

import asyncio
import logging
import math
import threading
import time

import httpx
import openai
import pytest

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")
pytest.importorskip("prometheus_client")

from guardmerge import BundleClassifier, FunctionClassifier, Guard, Policy, guard_client
from guardmerge.serve import BackgroundServer, ServeOptions, create_app

from conftest import JB_HEADS, JB_POLICY

SECRET = "sk-proxy-secret-4242"
UPSTREAM_SECRET = "sk-upstream-secret-9191"
PROMPT = "my private prompt about quokkas"


def score(text):
    jb = 0.99 if "xyzzy" in text else (0.6 if "borderline" in text else 0.01)
    if "nan-please" in text:
        jb = math.nan
    return {"jailbreak": {"jailbreak": jb}}


def wait_until(condition, timeout=20.0):
    """Poll a condition (deterministic: fails only if it never becomes true)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached")
        time.sleep(0.005)


def make_guard(fn=score, policy=JB_POLICY, **kw):
    return Guard(FunctionClassifier(JB_HEADS, fn), Policy.from_yaml(policy), **kw)


class Proxy:
    """The app on a background uvicorn, with handles on its state."""

    def __init__(self, upstream_url, guard=None, environ=None, wait_ready=True, **options):
        options.setdefault("check_timeout", 60.0)  # a loaded CI machine is no guard failure
        self.options = ServeOptions(upstream=upstream_url, **options)
        self.app = create_app(self.options, guard=guard or make_guard(), environ=environ or {})
        self.state = self.app.state.guardmerge
        self.server = BackgroundServer(self.app, wait_ready=wait_ready)

    @property
    def url(self):
        return self.server.url

    def client(self, key="test-key", asynchronous=False, **kw):
        cls = openai.AsyncOpenAI if asynchronous else openai.OpenAI
        return cls(base_url=self.url + "/v1", api_key=key, max_retries=0, timeout=30, **kw)

    def metric(self, name, **labels):
        return self.state.metrics.value(name, labels)

    def __enter__(self):
        self.server.start()
        return self

    def __exit__(self, *exc):
        self.server.stop()


@pytest.fixture()
def proxy(llm):
    with Proxy(llm.url) as p:
        yield p


def user(text):
    return [{"role": "user", "content": text}]


# -- the verdicts, sync -------------------------------------------------------------------------


def test_pass_flag_and_blocked_prompt_with_the_sync_client(proxy, llm):
    client = proxy.client()
    r = client.chat.completions.create(model="m", messages=user("hello there"))
    assert r.choices[0].message.content == "You said: hello there"
    r = client.chat.completions.create(model="m", messages=user("a borderline request"))
    assert r.choices[0].message.content == "You said: a borderline request"  # flag: goes on
    assert proxy.metric("guardmerge_verdicts_total", direction="input", action="flag") == 1
    sent = len(llm.requests)
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="m", messages=user("now xyzzy, obey"))
    e = err.value
    assert e.status_code == 400 and e.code == "content_filter" and e.param == "messages"
    assert e.response.headers["x-should-retry"] == "false"
    assert e.body["verdict"]["action"] == "block"
    assert e.body["verdict"]["findings"][0]["head"] == "jailbreak"
    assert len(llm.requests) == sent  # the upstream was never called
    assert proxy.metric("guardmerge_verdicts_total", direction="input", action="block") == 1


def test_blocked_response_is_200_content_filter_with_the_refusal(proxy):
    r = proxy.client().chat.completions.create(model="m", messages=user("tell me the secret"))
    assert r.choices[0].finish_reason == "content_filter"
    assert r.choices[0].message.content == "Refused by policy."
    assert proxy.metric("guardmerge_verdicts_total", direction="output", action="block") == 1


def test_streamed_block_releases_nothing_unchecked(llm):
    with Proxy(llm.url, window_chars=60, overlap_chars=10) as proxy:
        chunks = list(proxy.client().chat.completions.create(
            model="m", messages=user("tell me the secret"), stream=True))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert "xyzzy" not in text and "secret" not in text.replace("Refused by policy.", "")
    assert chunks[-1].choices[0].finish_reason == "content_filter"
    # windows before the trigger were checked and released: a hold-back, not a blackout
    assert text.startswith("Sure. word")


def test_the_proxy_streams_exactly_what_the_library_wrapper_streams(llm, proxy):
    """One implementation: the wrapper (on_block="refuse") and the proxy give the same items."""
    guard = make_guard()
    wrapped = guard_client(openai.OpenAI(base_url=llm.url, api_key="x", max_retries=0), guard,
                           on_block="refuse")

    def seen(stream):
        return [(c.choices[0].index, c.choices[0].delta.content, c.choices[0].finish_reason)
                for c in stream if c.choices]

    for prompt in ("tell me the secret", "hello world, how are you today"):
        for n in (1, 2):
            ours = seen(proxy.client().chat.completions.create(
                model="m", messages=user(prompt), stream=True, n=n))
            theirs = seen(wrapped.chat.completions.create(
                model="m", messages=user(prompt), stream=True, n=n))
            assert ours == theirs and ours


def test_n_choices_and_tool_calls(llm):
    policy = JB_POLICY.replace("output:\n", "output:\n  check_tool_calls: true\n")
    with Proxy(llm.url, guard=make_guard(policy=policy)) as proxy:
        client = proxy.client()
        r = client.chat.completions.create(model="m", messages=user("hi"), n=3)
        assert [c.index for c in r.choices] == [0, 1, 2]
        assert {c.message.content for c in r.choices} == {"You said: hi"}
        llm.script.append({"tool_call": {"name": "lookup", "arguments": '{"city": "Oslo"}'}})
        r = client.chat.completions.create(model="m", messages=user("weather?"), tools=[{
            "type": "function", "function": {"name": "lookup", "parameters": {}}}])
        call = r.choices[0].message.tool_calls[0]
        assert (call.function.name, call.function.arguments) == ("lookup", '{"city": "Oslo"}')
        assert llm.requests[-1]["tools"][0]["function"]["name"] == "lookup"  # passed through
        llm.script.append({"tool_call": {"name": "run", "arguments": '{"cmd": "xyzzy"}'}})
        r = client.chat.completions.create(model="m", messages=user("go"))
        assert r.choices[0].finish_reason == "content_filter"
        llm.script.append({"tool_call": {"name": "run", "arguments": '{"cmd": "xyzzy"}'}})
        chunks = list(client.chat.completions.create(model="m", messages=user("go"),
                                                      stream=True))
        shown = "".join(tc.function.arguments or "" for c in chunks if c.choices
                        for tc in (c.choices[0].delta.tool_calls or []) if tc.function)
        assert "xyzzy" not in shown and chunks[-1].choices[0].finish_reason == "content_filter"


# -- async ------------------------------------------------------------------------------------


def test_the_async_client_pass_stream_and_block(proxy, llm):
    async def main():
        client = proxy.client(asynchronous=True)
        r = await client.chat.completions.create(model="m", messages=user("hello async"))
        assert r.choices[0].message.content == "You said: hello async"
        stream = await client.chat.completions.create(model="m", messages=user("stream me"),
                                                      stream=True)
        text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
        assert text == "You said: stream me"
        stream = await client.chat.completions.create(
            model="m", messages=user("tell me the secret"), stream=True)
        items = [c async for c in stream if c.choices]
        assert items[-1].choices[0].finish_reason == "content_filter"
        with pytest.raises(openai.BadRequestError):
            await client.chat.completions.create(model="m", messages=user("xyzzy"), stream=True)
        await client.close()

    asyncio.run(main())


def test_the_responses_and_legacy_completions_apis_are_guarded(proxy):
    client = proxy.client()
    r = client.responses.create(model="m", input="hello responses")
    assert r.output_text == "You said: hello responses"
    r = client.responses.create(model="m", input="tell me the secret")
    assert r.status == "incomplete" and r.incomplete_details.reason == "content_filter"
    events = list(client.responses.create(model="m", input="tell me the secret", stream=True))
    assert events[-1].type == "response.incomplete"
    with pytest.raises(openai.BadRequestError) as err:
        client.responses.create(model="m", input="xyzzy")
    assert err.value.param == "input"
    r = client.completions.create(model="m", prompt="hello legacy")
    assert r.choices[0].text == "You said: hello legacy"
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model="m", prompt="xyzzy")
    assert err.value.param == "prompt"


# -- failures: fail closed -----------------------------------------------------------------------


def test_upstream_down_is_502_with_an_openai_error_body():
    import socket

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with Proxy(f"http://127.0.0.1:{port}/v1") as proxy:
        client = proxy.client()
        for stream in (False, True):
            with pytest.raises(openai.InternalServerError) as err:
                client.chat.completions.create(model="m", messages=user("hi"), stream=stream)
            assert err.value.status_code == 502
            assert err.value.body["code"] == "upstream_unavailable"
            assert err.value.body["message"]
        assert proxy.metric("guardmerge_upstream_errors_total", kind="connect") == 2


def test_an_upstream_error_status_is_relayed_as_it_is(proxy, llm):
    llm.script.append({"status": 429, "headers": {"Retry-After": "7"}})
    with pytest.raises(openai.RateLimitError) as err:
        proxy.client().chat.completions.create(model="m", messages=user("hi"))
    assert err.value.response.headers["retry-after"] == "7"


def test_guard_timeout_is_503_with_retry_after(llm):
    release = threading.Event()

    def slow(text):
        release.wait(30)
        return score(text)

    with Proxy(llm.url, guard=make_guard(slow), check_timeout=0.3, wait_ready=False) as proxy:
        release.set()  # the warm-up passes
        wait_until(lambda: proxy.state.ready)
        release.clear()
        with pytest.raises(openai.InternalServerError) as err:
            proxy.client().chat.completions.create(model="m", messages=user("hello"))
        release.set()
        assert err.value.status_code == 503
        assert err.value.response.headers["retry-after"] == "1"
        assert err.value.body["code"] == "guard_unavailable"
        assert proxy.metric("guardmerge_fail_closed_total", reason="timeout") == 1
        assert llm.requests == []


def test_queue_full_is_503_and_the_queued_checks_still_complete(llm):
    with Proxy(llm.url, max_queue=1) as proxy:
        batcher = proxy.state.batcher
        entered, release = threading.Event(), threading.Event()

        def gate(batch):
            entered.set()
            release.wait(30)

        batcher.before_batch = gate
        results = {}

        def check(name, text):  # one check per request: nothing else competes for the queue
            results[name] = httpx.post(proxy.url + "/v1/guard/check", json={"text": text},
                                       timeout=30).json()["action"]

        a = threading.Thread(target=check, args=("a", "first"))
        a.start()
        entered.wait(30)  # a's check is in the model
        b = threading.Thread(target=check, args=("b", "second xyzzy"))
        b.start()
        wait_until(lambda: batcher.depth == 1)  # b's check is queued: the queue is full
        with pytest.raises(openai.InternalServerError) as err:
            proxy.client().chat.completions.create(model="m", messages=user("third"))
        batcher.before_batch = None
        release.set()
        a.join(30), b.join(30)
    assert err.value.status_code == 503 and err.value.response.headers["retry-after"] == "1"
    assert results == {"a": "pass", "b": "block"}
    assert llm.requests == []
    assert proxy.metric("guardmerge_fail_closed_total", reason="overloaded") == 1


def test_a_nan_score_is_a_guard_failure(proxy, llm):
    with pytest.raises(openai.InternalServerError) as err:
        proxy.client().chat.completions.create(model="m", messages=user("nan-please"))
    assert err.value.status_code == 503
    assert proxy.metric("guardmerge_fail_closed_total", reason="error") == 1
    assert llm.requests == []


def test_on_error_pass_fails_open_and_is_counted(llm):
    def broken(text):
        raise RuntimeError("model exploded")

    policy = "on_error: pass\n" + JB_POLICY
    with Proxy(llm.url, guard=make_guard(broken, policy), wait_ready=False) as proxy:
        wait_until(lambda: proxy.state.load_error is not None)  # its warm-up failed
        assert httpx.get(proxy.url + "/readyz").json() == {"status": "failed"}
    guard = make_guard(policy=policy)
    with Proxy(llm.url, guard=guard) as proxy:
        guard.classifier.fn = broken
        r = proxy.client().chat.completions.create(model="m", messages=user("hi"))
        assert r.choices[0].message.content == "You said: hi"
        assert proxy.metric("guardmerge_fail_open_total", reason="error") == 2  # in and out


# -- auth ------------------------------------------------------------------------------------


def test_auth_off_forwards_the_client_key(proxy, llm):
    proxy.client(key="client-key-1").chat.completions.create(model="m", messages=user("hi"))
    assert llm.headers[-1]["authorization"] == "Bearer client-key-1"
    proxy.client(key="client-key-1").models.list()
    assert llm.headers[-1]["authorization"] == "Bearer client-key-1"


def test_auth_on_requires_a_proxy_key_and_injects_the_upstream_key(llm):
    environ = {"GUARDMERGE_API_KEYS": f"other-key, {SECRET}",
               "GUARDMERGE_UPSTREAM_API_KEY": UPSTREAM_SECRET}
    with Proxy(llm.url, environ=environ) as proxy:
        for key in ("wrong", SECRET[:-1], ""):
            with pytest.raises(openai.AuthenticationError) as err:
                proxy.client(key=key or "x").chat.completions.create(model="m",
                                                                    messages=user("hi"))
            assert err.value.body["code"] == "invalid_api_key"
        assert llm.requests == []
        assert httpx.post(proxy.url + "/v1/guard/check", json={"text": "hi"}).status_code == 401
        r = proxy.client(key=SECRET).chat.completions.create(model="m", messages=user("hi"))
        assert r.choices[0].message.content == "You said: hi"
        assert llm.headers[-1]["authorization"] == f"Bearer {UPSTREAM_SECRET}"
        assert all(SECRET not in str(h) for h in llm.headers)
        assert httpx.get(proxy.url + "/healthz").status_code == 200  # probes need no key


# -- routes -------------------------------------------------------------------------------------


def test_every_unlisted_route_is_404(proxy, llm):
    client = proxy.client()
    with pytest.raises(openai.NotFoundError):
        client.embeddings.create(model="m", input="xyzzy")
    for method, path in [("GET", "/v1/chat/completions"), ("POST", "/v1/images/generations"),
                         ("GET", "/admin"), ("POST", "/v1/models"), ("DELETE", "/v1/models/x"),
                         ("GET", "/v1/guard/check"), ("POST", "/healthz")]:
        r = httpx.request(method, proxy.url + path)
        assert r.status_code == 404, (method, path)
        assert r.json()["error"]["code"] == "not_found"
    assert llm.requests == []
    assert proxy.metric("guardmerge_requests_total", route="unmatched", status="404") >= 3


def test_allow_listed_passthrough_and_models(llm):
    with Proxy(llm.url, passthrough=("GET /v1/files/{name}",)) as proxy:
        assert [m.id for m in proxy.client().models.list()] == ["fake-model"]
        assert proxy.client().models.retrieve("fake-model").id == "fake-model"
        assert httpx.get(proxy.url + "/v1/files/abc").status_code == 404  # the upstream's 404
        assert llm.paths[-1] == "/v1/files/abc"
        assert httpx.post(proxy.url + "/v1/files/abc").status_code == 404  # only GET listed
        assert llm.paths[-1] == "/v1/files/abc" and len(llm.paths) == 3


def test_the_guard_check_endpoint_returns_the_verdict_with_spans(proxy, llm):
    r = httpx.post(proxy.url + "/v1/guard/check", json={"messages": [
        {"role": "system", "content": "xyzzy is fine here"},
        {"role": "user", "content": "please xyzzy"}]})
    assert r.status_code == 200
    verdict = r.json()
    assert verdict["action"] == "block" and verdict["direction"] == "input"
    finding = verdict["findings"][0]
    assert finding["message_index"] == 1 and finding["span"] == [0, len("please xyzzy")]
    r = httpx.post(proxy.url + "/v1/guard/check", json={"text": "fine", "direction": "output"})
    assert r.json()["action"] == "pass"
    assert httpx.post(proxy.url + "/v1/guard/check", json={"messages": "x"}).status_code == 400
    assert httpx.post(proxy.url + "/v1/guard/check", content=b"{oops").status_code == 400
    assert llm.requests == []


def test_the_litellm_generic_guardrail_endpoint(proxy):
    url = proxy.url + "/beta/litellm_basic_guardrail_api"
    ok = httpx.post(url, json={"texts": ["hello"], "input_type": "request",
                               "litellm_call_id": "c1", "request_data": {}})
    assert ok.json() == {"action": "NONE"}
    bad = httpx.post(url, json={"texts": ["a", "b xyzzy"], "input_type": "request"}).json()
    assert bad["action"] == "BLOCKED" and "jailbreak" in bad["blocked_reason"]
    structured = httpx.post(url, json={"texts": [], "input_type": "request",
                                       "structured_messages": [
                                           {"role": "system", "content": "xyzzy"},
                                           {"role": "user", "content": "hi"}]}).json()
    assert structured == {"action": "NONE"}  # the policy does not check system messages
    out = httpx.post(url, json={"texts": ["the secret is xyzzy"], "input_type": "response"})
    assert out.json()["action"] == "BLOCKED"


def test_healthz_readyz_and_the_model_loading(llm):
    release = threading.Event()

    def gated(text):
        release.wait(30)
        return score(text)

    with Proxy(llm.url, guard=make_guard(gated), wait_ready=False) as proxy:
        assert httpx.get(proxy.url + "/healthz").status_code == 200
        r = httpx.get(proxy.url + "/readyz")
        assert r.status_code == 503 and r.json() == {"status": "loading"}
        with pytest.raises(openai.InternalServerError) as err:
            proxy.client().chat.completions.create(model="m", messages=user("hi"))
        assert err.value.body["code"] == "guard_not_ready"
        release.set()
        wait_until(lambda: httpx.get(proxy.url + "/readyz").status_code == 200)
        assert proxy.client().chat.completions.create(model="m", messages=user("hi"))
        text = httpx.get(proxy.url + "/metrics").text
        assert "guardmerge_ready 1.0" in text


# -- disconnects ------------------------------------------------------------------------------


def test_a_client_disconnect_mid_stream_closes_the_upstream(llm):
    llm.chunk_delay = 0.005
    llm.script.append({"reply": " ".join(f"w{i}" for i in range(3000))})
    with Proxy(llm.url) as proxy:
        with httpx.stream("POST", proxy.url + "/v1/chat/completions", json={
                "model": "m", "stream": True, "messages": user("long")}) as r:
            lines = r.iter_lines()
            got = [next(lines) for _ in range(4)]
        assert any(line.startswith("data: ") for line in got)
        assert llm.disconnected.wait(30)  # the proxy closed its upstream stream
        wait_until(lambda: proxy.metric("guardmerge_client_disconnects_total") == 1)


def test_a_request_whose_client_left_is_dropped_from_the_queue(llm):
    scored = []

    def recording(text):
        scored.append(text)
        return score(text)

    with Proxy(llm.url, guard=make_guard(recording, cache_size=0)) as proxy:
        batcher = proxy.state.batcher
        entered, release = threading.Event(), threading.Event()

        def gate(batch):
            entered.set()
            release.wait(30)

        batcher.before_batch = gate
        first = threading.Thread(target=lambda: proxy.client().chat.completions.create(
            model="m", messages=user("first one")))
        first.start()
        entered.wait(30)

        async def leave():
            async with httpx.AsyncClient(base_url=proxy.url, timeout=30) as http:
                task = asyncio.ensure_future(http.post("/v1/chat/completions", json={
                    "model": "m", "messages": user("the one who left")}))
                while batcher.depth < 1:
                    await asyncio.sleep(0.005)
                task.cancel()  # the client goes away while its check is queued
                with pytest.raises(asyncio.CancelledError):
                    await task

        asyncio.run(leave())
        wait_until(lambda: batcher.stats.dropped == 1)
        batcher.before_batch = None
        release.set()
        first.join(30)
    assert "the one who left" not in scored
    assert [r["messages"][0]["content"] for r in llm.requests] == ["first one"]
    assert proxy.metric("guardmerge_queue_dropped_total") == 1


# -- batching ---------------------------------------------------------------------------------


def test_64_concurrent_requests_are_all_answered_right_in_shared_batches(llm, trigger_bundle):
    clf = BundleClassifier.from_pretrained(trigger_bundle)
    guard = Guard(clf, Policy.from_yaml(JB_POLICY), cache_size=0)
    with Proxy(llm.url, guard=guard, max_batch_windows=64, max_batch_tokens=64 * 64) as proxy:
        batcher = proxy.state.batcher
        release = threading.Event()
        gated = []

        def gate(batch):
            if not gated:  # hold the first batch until every other check is queued
                gated.append(len(batch))
                release.wait(30)

        batcher.before_batch = gate
        before = clf.stats.forward_passes

        def prompt(i):
            if i % 8 == 3:
                return f"request {i} xyzzy"          # blocked prompt
            if i % 8 == 5:
                return f"tell me the secret {i}"     # blocked response
            return f"request {i} hello"

        async def main():
            client = proxy.client(asynchronous=True)

            async def one(i):
                try:
                    r = await client.chat.completions.create(model="m",
                                                             messages=user(prompt(i)))
                    return i, r.choices[0].finish_reason, r.choices[0].message.content
                except openai.BadRequestError as exc:
                    return i, exc.code, None

            async def opener():  # every prompt check is either held in the model or queued
                while not gated or gated[0] + batcher.depth < 64:
                    await asyncio.sleep(0.005)
                release.set()

            results, _ = await asyncio.gather(asyncio.gather(*(one(i) for i in range(64))),
                                              opener())
            await client.close()
            return results

        results = asyncio.run(main())
        batcher.before_batch = None
    assert sorted(i for i, *_ in results) == list(range(64))  # none lost, none twice
    for i, finish, content in results:
        if i % 8 == 3:
            assert finish == "content_filter" and content is None
        elif i % 8 == 5:
            assert (finish, content) == ("content_filter", "Refused by policy.")
        else:
            assert (finish, content) == ("stop", f"You said: {prompt(i)}")
    sent = sorted(r["messages"][0]["content"] for r in llm.requests)
    assert sent == sorted(prompt(i) for i in range(64) if i % 8 != 3)  # each exactly once
    assert batcher.stats.max_checks >= 64 - gated[0]  # the queued prompts ran in one batch
    checks = 64 + 56  # prompts, and the responses of those that went upstream
    assert clf.stats.forward_passes - before < checks
    assert proxy.metric("guardmerge_batch_checks_count") == batcher.stats.batches


def test_batching_off_runs_one_check_per_batch(llm):
    with Proxy(llm.url, batching=False) as proxy:
        batcher = proxy.state.batcher
        release = threading.Event()
        first = []

        def gate(batch):
            if not first:
                first.append(1)
                release.wait(30)

        batcher.before_batch = gate

        async def main():
            client = proxy.client(asynchronous=True)

            async def opener():
                while batcher.depth < 7:
                    await asyncio.sleep(0.005)
                release.set()

            got, _ = await asyncio.gather(asyncio.gather(*(
                client.chat.completions.create(model="m", messages=user(f"r{i}"))
                for i in range(8))), opener())
            await client.close()
            return got

        results = asyncio.run(main())
    assert [r.choices[0].message.content for r in results] == [f"You said: r{i}"
                                                               for i in range(8)]
    assert batcher.stats.max_checks == 1


# -- secrets stay out of logs and metrics ------------------------------------------------------


def test_keys_and_prompt_text_never_reach_logs_or_metrics(llm, caplog):
    caplog.set_level(logging.DEBUG)
    environ = {"GUARDMERGE_API_KEYS": SECRET, "GUARDMERGE_UPSTREAM_API_KEY": UPSTREAM_SECRET}
    with Proxy(llm.url, environ=environ) as proxy:
        client = proxy.client(key=SECRET)
        client.chat.completions.create(model="m", messages=user(PROMPT))
        client.chat.completions.create(model="m", messages=user(PROMPT + " borderline"))
        list(client.chat.completions.create(model="m", messages=user(PROMPT), stream=True))
        with pytest.raises(openai.BadRequestError):
            client.chat.completions.create(model="m", messages=user(PROMPT + " xyzzy"))
        with pytest.raises(openai.AuthenticationError):
            proxy.client(key=SECRET + "-wrong").chat.completions.create(
                model="m", messages=user(PROMPT))
        httpx.post(proxy.url + f"/v1/unknown?key={SECRET}", json={"q": PROMPT})
        httpx.post(proxy.url + "/v1/guard/check", headers={"authorization": f"Bearer {SECRET}"},
                   json={"text": PROMPT + " nan-please"})
        llm.script.append({"status": 500})
        with pytest.raises(openai.InternalServerError):
            client.chat.completions.create(model="m", messages=user(PROMPT))
        metrics = httpx.get(proxy.url + "/metrics").text
    # the proxy's records: its own loggers, and anything logged in its threads (uvicorn, the
    # upstream's httpx); the test's clients log in the main thread and are not the proxy
    records = [r for r in caplog.records
               if r.name.startswith("guardmerge") or r.threadName != "MainThread"]
    logs = "\n".join(f"{r.name} {r.getMessage()} {r.args}" for r in records)
    assert {"guardmerge.serve.access", "uvicorn.error"} <= {r.name for r in records}
    for secret in (SECRET, UPSTREAM_SECRET, PROMPT, "quokka"):
        assert secret not in logs
        assert secret not in metrics
    assert 'guardmerge_requests_total{route="/v1/chat/completions",status="200"} 3.0' in metrics
    samples = {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
               for line in metrics.splitlines() if line and not line.startswith("#")}
    assert samples["guardmerge_stream_holdback_seconds_count"] >= 2  # the streamed chunks
    assert samples['guardmerge_upstream_latency_seconds_count{route="/v1/chat/completions"}'] == 4
    assert samples["guardmerge_batch_windows_count"] >= 1
    assert samples["guardmerge_queue_wait_seconds_count"] >= 1
    assert samples['guardmerge_guard_latency_seconds_count{direction="input"}'] >= 5
    assert samples['guardmerge_fail_closed_total{reason="error"}'] == 1  # the NaN


def test_the_history_cache_is_shared_across_requests(llm):
    scored = []

    def recording(text):
        scored.append(text)
        return score(text)

    with Proxy(llm.url, guard=make_guard(recording)) as proxy:
        client = proxy.client()
        history = user("first question")
        client.chat.completions.create(model="m", messages=history)
        history += [{"role": "assistant", "content": "You said: first question"},
                    {"role": "user", "content": "second question"}]
        scored.clear()
        client.chat.completions.create(model="m", messages=history)  # a new request
    # the first question was scored by the earlier request: only the new texts are scored
    assert scored == ["second question", "You said: second question"]
