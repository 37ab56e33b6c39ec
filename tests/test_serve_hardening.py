"""``guardmerge serve`` under hostile input: path tricks on the pass-through routes, malformed
bodies, poisoned batches, a dead batcher, disconnects, open relays. The real openai SDK and
raw HTTP against the proxy, in front of the project's local test upstream."""

from __future__ import annotations

import socket

import httpx
import openai
import pytest

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")
pytest.importorskip("prometheus_client")

from guardmerge import ConfigError
from guardmerge.serve import ServeOptions

from test_serve import Proxy, make_guard, proxy, score, user, wait_until  # noqa: F401


def raw_request(url, method, target, body=b"", headers=()):
    """One HTTP/1.1 request with ``target`` sent byte for byte (httpx would normalise it)."""
    host, port = url.split("//")[1].split(":")
    head = [f"{method} {target} HTTP/1.1", "Host: x", f"Content-Length: {len(body)}",
            "Connection: close", *headers]
    with socket.create_connection((host, int(port)), timeout=30) as s:
        s.sendall(("\r\n".join(head) + "\r\n\r\n").encode() + body)
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    return int(data.split(b" ", 2)[1]), data.split(b"\r\n\r\n", 1)[1]


# -- 1. pass-through paths -----------------------------------------------------------------------

TRICKS = ["/v1/models/../chat/completions", "/v1/models/%2e%2e/chat/completions",
          "/v1/models/..%2Fchat%2Fcompletions", "/v1/models/%2E%2E", "/v1/models/.",
          "/v1/models//chat", "/v1/models/a%3Fb", "/v1/models/a%2Fb", "/v1/models/a%00b",
          "/v1/models/a%5Cb", "/v1//models", "/v1/files/..", "/v1/files/%2e%2e",
          "/v1/files/..%2F..%2Fchat%2Fcompletions", "/v1/files/a%23b"]


def test_path_tricks_never_reach_another_upstream_route(llm):
    with Proxy(llm.url, passthrough=("GET /v1/files/{name}",)) as proxy:
        for target in TRICKS:
            status, body = raw_request(proxy.url, "GET", target)
            assert status == 404, target
            assert b'"not_found"' in body, target  # the proxy's own 404, not the upstream's
        assert llm.paths == []
        assert raw_request(proxy.url, "GET", "/v1/models/fake-model")[0] == 200
        assert raw_request(proxy.url, "GET", "/v1/files/file-abc.txt")[0] == 404  # upstream's
        assert llm.paths == ["/v1/models/fake-model", "/v1/files/file-abc.txt"]
        assert proxy.client().models.retrieve("fake-model").id == "fake-model"


@pytest.mark.parametrize("entry, problem", [
    ("GET /v1/files/{p:path}", "only single-segment parameters"),
    ("GET /v1/{x}/completions", "covers the proxy's own route /v1/chat/completions"),
    ("POST /v1/chat/completions/{id}", "covers the proxy's own route /v1/chat/completions"),
    ("GET /v1/chat/completions", "covers the proxy's own route"),
    ("GET /{anything}", "covers the proxy's own route"),
    ("GET /v1/files/../chat", "segment '..'"),
    ("GET /v1//files", "segment ''"),
    ("GET /v1/files/*", "segment '*'"),
    ("GET /v1/files/%2e%2e", "segment '%2e%2e'"),
    ("FETCH /v1/files", "expected 'METHOD /path'"),
])
def test_a_passthrough_that_could_cover_a_guarded_route_is_a_config_error(tmp_path, entry,
                                                                            problem):
    path = tmp_path / "serve.yaml"
    path.write_text(f"server: {{passthrough: ['GET /v1/files/{{name}}', '{entry}']}}\n")
    from guardmerge.serve import load_config

    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert f"{path}: server.passthrough[1]: " in str(err.value) and problem in str(err.value)
    with pytest.raises(ConfigError, match=r"passthrough\[0\]"):
        ServeOptions(passthrough=(entry,))


# -- 9. no open relay -------------------------------------------------------------------------------


def test_a_public_address_without_proxy_keys_refuses_to_start(llm, tmp_path, capsys,
                                                               monkeypatch):
    from guardmerge.cli import main
    from guardmerge.serve import create_app

    guard = make_guard()
    for host in ("0.0.0.0", "::", "10.1.2.3", "guard.example.com"):
        options = ServeOptions(upstream=llm.url, host=host)
        with pytest.raises(ConfigError) as err:
            create_app(options, guard=guard, environ={"GUARDMERGE_UPSTREAM_API_KEY": "sk-up"})
        text = str(err.value)
        assert "$GUARDMERGE_API_KEYS" in text and "server.allow_open" in text
        assert "$GUARDMERGE_UPSTREAM_API_KEY" in text and "sk-up" not in text
        with pytest.raises(ConfigError):
            create_app(options, guard=guard, environ={})  # no upstream key either
        create_app(options, guard=guard, environ={"GUARDMERGE_API_KEYS": "k1"})
        create_app(ServeOptions(upstream=llm.url, host=host, allow_open=True), guard=guard,
                   environ={})
    for host in ("127.0.0.1", "localhost", "::1", "127.0.0.2"):
        create_app(ServeOptions(upstream=llm.url, host=host), guard=guard, environ={})
    monkeypatch.delenv("GUARDMERGE_API_KEYS", raising=False)
    path = tmp_path / "serve.yaml"
    path.write_text(f"server: {{host: 0.0.0.0}}\nupstream: {{base_url: '{llm.url}'}}\n"
                    "guard: {bundle: b, policy: p.yaml}\n")
    assert main(["serve", "--config", str(path)]) == 2
    assert "server.allow_open" in capsys.readouterr().err


# -- 2. malformed requests --------------------------------------------------------------------------

HI = user("hi")
MALFORMED = [  # (route, body, param)
    ("chat/completions", {"model": "m"}, "messages"),
    ("chat/completions", {"model": "m", "messages": "xyzzy"}, "messages"),
    ("chat/completions", {"model": "m", "messages": {"role": "user", "content": "x"}},
     "messages"),
    ("chat/completions", {"model": "m", "messages": 5}, "messages"),
    ("chat/completions", {"model": "m", "messages": ["xyzzy"]}, "messages[0]"),
    ("chat/completions", {"model": "m", "messages": [{"role": 5, "content": "hi"}]},
     "messages[0].role"),
    ("chat/completions", {"model": "m", "messages": [{"content": "hi"}]}, "messages[0].role"),
    ("chat/completions", {"model": "m", "messages": [{"role": "user", "content": 5}]},
     "messages[0].content"),
    ("chat/completions", {"model": "m", "messages": [{"role": "user", "content": {"t": 1}}]},
     "messages[0].content"),
    ("chat/completions", {"model": "m", "messages": [{"role": "user", "content": ["xyzzy"]}]},
     "messages[0].content[0]"),
    ("chat/completions", {"model": "m", "messages": [
        {"role": "user", "content": [{"text": "hi"}]}]}, "messages[0].content[0].type"),
    ("chat/completions", {"model": "m", "messages": [
        {"role": "user", "content": [{"type": "text", "text": 7}]}]},
     "messages[0].content[0].text"),
    ("chat/completions", {"model": "m", "messages": [
        {"role": "user", "content": "hi", "name": 7}]}, "messages[0].name"),
    ("chat/completions", {"model": "m", "messages": [
        {"role": "assistant", "content": None, "tool_calls": [
            {"type": "function", "function": {"name": "f", "arguments": {"a": 1}}}]}]},
     "messages[0].tool_calls[0].function.arguments"),
    ("chat/completions", {"model": "m", "messages": HI, "stream": "yes"}, "stream"),
    ("chat/completions", {"model": "m", "messages": HI, "stream": 1}, "stream"),
    ("chat/completions", {"model": "m", "messages": HI, "n": 0}, "n"),
    ("chat/completions", {"model": "m", "messages": HI, "n": "2"}, "n"),
    ("chat/completions", {"model": "m", "messages": HI, "n": True}, "n"),
    ("chat/completions", {"model": 5, "messages": HI}, "model"),
    ("chat/completions", {"model": "m", "messages": HI, "my_prompt": "xyzzy"}, "my_prompt"),
    ("chat/completions", {"model": "m", "messages": HI, "vendor": {"deep": ["xyzzy"]}},
     "vendor"),
    ("completions", {"model": "m", "prompt": {"text": "xyzzy"}}, "prompt"),
    ("completions", {"model": "m", "prompt": "hi", "n": -1}, "n"),
    ("responses", {"model": "m", "input": 5}, "input"),
    ("responses", {"model": "m", "input": [7]}, "input[0]"),
    ("responses", {"model": "m", "input": [{"role": "user", "content": 7}]},
     "input[0].content"),
    ("responses", {"model": "m", "input": "hi", "stream": "true"}, "stream"),
    ("responses", {"model": "m", "input": "hi", "instructions": ["xyzzy"]}, "instructions"),
]


def test_malformed_requests_are_400_naming_the_param_and_never_go_upstream(proxy, llm):
    import json

    for route, body, param in MALFORMED:
        r = httpx.post(f"{proxy.url}/v1/{route}", content=json.dumps(body), timeout=30)
        assert r.status_code == 400, (route, body, r.text)
        error = r.json()["error"]
        assert error["param"] == param and error["type"] == "invalid_request_error", body
        assert "xyzzy" not in error["message"]  # never echoes the text
    for raw in (b"{oops", b"[1, 2]", b"\xff\xfe", b"", b"null", b'"text"'):
        r = httpx.post(proxy.url + "/v1/chat/completions", content=raw)
        assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json", raw
    assert llm.requests == []
    assert proxy.metric("guardmerge_requests_total", route="/v1/chat/completions",
                        status="500") == 0
    # the SDK, with the malformed values where an application would put them
    client = proxy.client()
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="m", messages=HI, n=0)
    assert err.value.param == "n"
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="m", messages=HI, extra_body={"stream": "no"})
    assert err.value.param == "stream"
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="m", messages=HI,
                                       extra_body={"hidden": "xyzzy obey"})
    assert err.value.param == "hidden" and err.value.code == "unguarded_parameter"
    assert llm.requests == []


def test_unknown_fields_without_text_pass_through_untouched(proxy, llm):
    extra = {"top_k": 20, "min_p": 0.05, "chat_template_kwargs": {"enable_thinking": False},
             "guided_json": {"type": "object"}, "repetition_penalty": 1.1}
    r = proxy.client().chat.completions.create(model="m", messages=HI, extra_body=extra)
    assert r.choices[0].message.content == "You said: hi"
    sent = llm.requests[-1]
    assert {k: sent[k] for k in extra} == extra
    msg = {"role": "user", "content": "hi", "name": "alice", "x_vendor_meta": 3}
    proxy.client().chat.completions.create(model="m", messages=[msg])
    assert llm.requests[-1]["messages"] == [msg]


def test_text_where_the_guard_does_not_look_is_guarded_or_refused_as_the_wrapper_does(llm,
                                                                                     proxy):
    """Unknown content parts and tool results: the proxy decides what the library wrapper
    decides, for the same messages (one implementation)."""
    from guardmerge import guard_client

    wrapped = guard_client(openai.OpenAI(base_url=llm.url, api_key="x", max_retries=0),
                           make_guard())
    cases = [
        [{"role": "user", "content": [{"type": "weird_part", "text": "xyzzy"}]}],
        [{"role": "user", "content": [{"type": "weird_part", "text": "hello"}]}],
        [{"role": "user", "content": "hi"},
         {"role": "tool", "tool_call_id": "c1", "content": "xyzzy, obey"}],
        [{"role": "user", "content": "hi"},
         {"role": "function", "name": "f", "content": "xyzzy"}],
        [{"role": "user", "content": [{"type": "text", "text": "fine"},
                                      {"type": "refusal", "refusal": "xyzzy"}]}],
    ]
    for messages in cases:
        try:
            wrapped.chat.completions.create(model="m", messages=messages)
            theirs = "pass"
        except Exception as exc:  # noqa: BLE001 - the wrapper's decision
            theirs = type(exc).__name__
        try:
            proxy.client().chat.completions.create(model="m", messages=messages)
            ours = "pass"
        except openai.BadRequestError as exc:
            ours = exc.code
        assert (theirs, ours) in {("pass", "pass"), ("PromptBlockedError", "content_filter")}
        assert ours != "pass" or theirs == "pass", messages
    assert all("xyzzy" not in str(r) for r in llm.requests)


# -- 5. one bad check does not poison its batch -------------------------------------------------------


def test_a_check_that_makes_the_model_raise_fails_alone_not_its_whole_batch(llm):
    import asyncio
    import threading

    def fragile(text):
        if "poison" in text:
            raise RuntimeError(f"model exploded on {text}")  # a message holding the text
        return score(text)

    with Proxy(llm.url, guard=make_guard(fragile, cache_size=0)) as proxy:
        batcher = proxy.state.batcher
        release, sizes = threading.Event(), []

        shared = []

        def gate(batch):
            sizes.append(len(batch))
            texts = [t for w in batch for t in w.prepared]
            if len(batch) > 1 and "a poison pill" in texts:
                shared.append(len(batch))
            if len(sizes) == 1:
                release.wait(30)

        batcher.before_batch = gate
        prompts = ["first hello", "a poison pill", "fine one", "bad xyzzy", "another fine"]

        async def main():
            client = proxy.client(asynchronous=True)

            async def one(text):
                try:
                    r = await client.chat.completions.create(model="m", messages=user(text))
                    return r.choices[0].message.content
                except openai.APIStatusError as exc:
                    return exc.status_code, exc.body.get("code")

            first = asyncio.ensure_future(one(prompts[0]))
            while not sizes:  # the first check holds the model...
                await asyncio.sleep(0.005)
            rest = asyncio.ensure_future(asyncio.gather(*(one(p) for p in prompts[1:])))
            while batcher.depth < len(prompts) - 1:  # ...while the others queue behind it
                await asyncio.sleep(0.005)
            release.set()
            got = [await first, *await rest]
            await client.close()
            return got

        results = asyncio.run(main())
        batcher.before_batch = None
    assert shared == [4]  # the poisoned check shared one batch with the three others
    assert results == ["You said: first hello", (503, "guard_unavailable"),
                       "You said: fine one", (400, "content_filter"), "You said: another fine"]
    assert proxy.metric("guardmerge_fail_closed_total", reason="error") == 1


# -- 6. readiness follows the model thread ------------------------------------------------------------


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_readyz_goes_unready_when_the_model_thread_dies_or_is_wedged(llm):
    import threading

    from guardmerge.serve.deployment import replica_health
    from guardmerge import GuardmergeError

    with Proxy(llm.url, check_timeout=0.3) as proxy:
        assert httpx.get(proxy.url + "/readyz").status_code == 200
        replica_health(proxy.app)  # Ray's check_health: healthy
        batcher = proxy.state.batcher
        entered, release = threading.Event(), threading.Event()

        def wedge(batch):
            entered.set()
            release.wait(30)

        batcher.before_batch = wedge
        hung = threading.Thread(target=lambda: httpx.post(
            proxy.url + "/v1/guard/check", json={"text": "hello"}, timeout=30))
        hung.start()
        entered.wait(30)
        wait_until(lambda: httpx.get(proxy.url + "/readyz").status_code == 503)
        r = httpx.get(proxy.url + "/readyz").json()
        assert r["status"] == "unhealthy" and "wedged" in r["reason"]
        with pytest.raises(GuardmergeError, match="wedged"):
            replica_health(proxy.app)
        with pytest.raises(openai.InternalServerError) as err:
            proxy.client().chat.completions.create(model="m", messages=user("hi"))
        assert err.value.body["code"] == "guard_not_ready"
        batcher.before_batch = None
        release.set()
        hung.join(30)
        wait_until(lambda: httpx.get(proxy.url + "/readyz").status_code == 200)

        def die(batch):
            raise SystemExit  # not an Exception: the model thread ends

        batcher.before_batch = die
        httpx.post(proxy.url + "/v1/guard/check", json={"text": "hello"}, timeout=30)
        wait_until(lambda: not batcher._thread.is_alive())
        r = httpx.get(proxy.url + "/readyz")
        assert r.status_code == 503 and "died" in r.json()["reason"]
        assert "guardmerge_ready 0.0" in httpx.get(proxy.url + "/metrics").text
        with pytest.raises(GuardmergeError, match="died"):
            replica_health(proxy.app)
        assert llm.requests == []


# -- 3. a client that left is a 499, never a fail-open or a pass ------------------------------------


def test_a_client_that_left_is_499_everywhere_and_never_a_verdict(llm):
    import asyncio
    import threading

    from test_serve import JB_POLICY

    guard = make_guard(policy="on_error: pass\n" + JB_POLICY, cache_size=0)
    llm.chunk_delay = 0.005
    with Proxy(llm.url, guard=guard) as proxy:
        batcher = proxy.state.batcher
        entered, release = threading.Event(), threading.Event()

        def gate(batch):
            entered.set()
            release.wait(30)

        verdicts = proxy.metric("guardmerge_verdicts_total", direction="input", action="pass")
        batcher.before_batch = gate

        async def leave():  # 1. while its check is in the model
            async with httpx.AsyncClient(base_url=proxy.url, timeout=30) as http:
                task = asyncio.ensure_future(http.post("/v1/chat/completions", json={
                    "model": "m", "messages": user("leaving early")}))
                while not entered.is_set():
                    await asyncio.sleep(0.005)
                task.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await task

        asyncio.run(leave())
        wait_until(lambda: proxy.metric("guardmerge_requests_total",
                                        route="/v1/chat/completions", status="499") == 1)
        batcher.before_batch = None
        release.set()
        # 2. in the middle of its request body
        host, port = proxy.url.split("//")[1].split(":")
        with socket.create_connection((host, int(port))) as s:
            s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
                      b"Content-Length: 1000\r\nContent-Type: application/json\r\n\r\n{\"mo")
        wait_until(lambda: proxy.metric("guardmerge_requests_total",
                                        route="/v1/chat/completions", status="499") == 2)
        # 3. in the middle of a stream (its headers, 200, already went out)
        llm.script.append({"reply": " ".join(f"w{i}" for i in range(3000))})
        with httpx.stream("POST", proxy.url + "/v1/chat/completions", json={
                "model": "m", "stream": True, "messages": user("long")}) as r:
            lines = r.iter_lines()
            [next(lines) for _ in range(3)]
        wait_until(lambda: proxy.metric("guardmerge_requests_total",
                                        route="/v1/chat/completions", status="499") == 3)
        assert llm.disconnected.wait(30)
        m = proxy.metric
        assert m("guardmerge_requests_total", route="/v1/chat/completions", status="500") == 0
        assert m("guardmerge_client_disconnects_total") == 3
        assert m("guardmerge_fail_open_total", reason="error") == 0
        assert m("guardmerge_fail_open_total", reason="timeout") == 0
        # the one prompt that was checked to the end is the streamed one; the others left
        assert m("guardmerge_verdicts_total", direction="input", action="pass") == verdicts + 1
    assert [r["messages"][0]["content"] for r in llm.requests] == ["long"]


# -- 4. bounded work before the queue -----------------------------------------------------------------


def test_a_body_over_the_limit_is_413_and_a_full_queue_refuses_before_tokenising(llm):
    import threading

    with Proxy(llm.url, max_queue=1, max_body_bytes=64 * 1024) as proxy:
        big = "word " * 20_000
        r = httpx.post(proxy.url + "/v1/chat/completions", json={
            "model": "m", "messages": user(big)})
        assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
        with pytest.raises(openai.APIStatusError) as err:
            proxy.client().chat.completions.create(model="m", messages=user(big))
        assert err.value.status_code == 413
        batcher = proxy.state.batcher
        prepared = []
        real_prepare = batcher.prepare
        batcher.prepare = lambda texts, *a: prepared.append(len(texts)) or real_prepare(texts, *a)
        entered, release = threading.Event(), threading.Event()

        def gate(batch):
            entered.set()
            release.wait(30)

        batcher.before_batch = gate
        a = threading.Thread(target=lambda: httpx.post(
            proxy.url + "/v1/guard/check", json={"text": "first"}, timeout=30))
        a.start()
        entered.wait(30)
        b = threading.Thread(target=lambda: httpx.post(
            proxy.url + "/v1/guard/check", json={"text": "second"}, timeout=30))
        b.start()
        wait_until(lambda: batcher.depth == 1)
        before = len(prepared)
        r = httpx.post(proxy.url + "/v1/chat/completions", json={
            "model": "m", "messages": user("word " * 10_000)}, timeout=30)
        assert r.status_code == 503 and r.headers["retry-after"] == "1"
        assert len(prepared) == before  # refused before its text was tokenised
        batcher.before_batch = None
        release.set()
        a.join(30), b.join(30)
        assert batcher._waiting == 0  # every place given back
    assert llm.requests == []


# -- 8. how much of a verdict a caller sees -----------------------------------------------------------


def test_verdict_detail_is_the_operators_choice(llm):
    body = {"messages": [{"role": "user", "content": "please xyzzy"}]}
    with Proxy(llm.url) as proxy:  # default: findings with spans, no per-head scores
        v = httpx.post(proxy.url + "/v1/guard/check", json=body).json()
        assert v["findings"][0]["span"] == [0, len("please xyzzy")] and "scores" not in v
    with Proxy(llm.url, verdict_detail="action",
               environ={"GUARDMERGE_API_KEYS": "k"}) as proxy:
        auth = {"authorization": "Bearer k"}
        v = httpx.post(proxy.url + "/v1/guard/check", json=body, headers=auth).json()
        assert v == {"action": "block", "direction": "input"}
        with pytest.raises(openai.BadRequestError) as err:
            proxy.client(key="k").chat.completions.create(model="m", messages=user("xyzzy"))
        assert err.value.body["verdict"] == {"action": "block", "direction": "input"}
        r = httpx.post(proxy.url + "/beta/litellm_basic_guardrail_api", headers=auth,
                       json={"texts": ["xyzzy"], "input_type": "request"}).json()
        assert r["action"] == "BLOCKED" and "jailbreak" not in r["blocked_reason"]
    guard = make_guard(include_scores=True)
    with Proxy(llm.url, guard=guard, verdict_detail="scores") as proxy:
        v = httpx.post(proxy.url + "/v1/guard/check", json=body).json()
        assert v["scores"] and v["findings"]
    with Proxy(llm.url, guard=make_guard(include_scores=True)) as proxy:
        assert "scores" not in httpx.post(proxy.url + "/v1/guard/check", json=body).json()


# -- 7. the response side ---------------------------------------------------------------------------


def _completion(*messages, **extra):
    return {"id": "c1", "object": "chat.completion", "created": 1, "model": "m",
            "system_fingerprint": "fp", "x_vendor": {"trace": [1, 2]}, **extra,
            "choices": [{"index": i, "finish_reason": "stop", "logprobs": None,
                         "x_choice_meta": i, "message": {"role": "assistant", **m}}
                        for i, m in enumerate(messages)]}


RESPONSES = {  # name -> (upstream answer, the choices the guard must refuse)
    "clean": (_completion({"content": "fine", "annotations": []}, {"content": "also fine"}),
              set()),
    "n2": (_completion({"content": "fine"}, {"content": "now xyzzy"}), {1}),
    "refusal": (_completion({"content": None, "refusal": "xyzzy refusal"}), {0}),
    "audio": (_completion({"content": None, "audio": {"id": "a", "transcript": "xyzzy said",
                                                      "data": "", "expires_at": 1}}), {0}),
    "reasoning": (_completion({"content": "ok", "reasoning_content": "xyzzy thoughts"}), {0}),
    "tool": (_completion({"content": None, "tool_calls": [
        {"id": "t", "type": "function",
         "function": {"name": "run", "arguments": '{"cmd": "xyzzy"}'}}]}), {0}),
}


@pytest.mark.parametrize("tool_calls", [False, True])
def test_response_fields_pass_untouched_and_unread_text_is_guarded_as_the_wrapper_does(
        llm, tool_calls):
    from guardmerge import guard_client
    from test_serve import JB_POLICY

    policy = JB_POLICY.replace("output:\n", "output:\n  check_tool_calls: true\n") \
        if tool_calls else JB_POLICY
    guard = make_guard(policy=policy)
    wrapped = guard_client(openai.OpenAI(base_url=llm.url, api_key="x", max_retries=0), guard,
                           on_block="refuse")
    with Proxy(llm.url, guard=make_guard(policy=policy)) as proxy:
        for name, (answer, refused) in RESPONSES.items():
            if name == "tool" and not tool_calls:
                refused = set()  # tool calls unchecked unless the policy says so
            llm.script.append({"body": answer})
            got = httpx.post(proxy.url + "/v1/chat/completions", json={
                "model": "m", "messages": user("hi")}, timeout=30).json()
            llm.script.append({"body": answer})
            theirs = wrapped.chat.completions.create(model="m", messages=user("hi"))
            blocked = {c["index"] for c in got["choices"]
                       if c["finish_reason"] == "content_filter"}
            assert blocked == refused, name
            assert blocked == {c.index for c in theirs.choices
                               if c.finish_reason == "content_filter"}, name
            assert "xyzzy" not in str([got["choices"][i] for i in blocked])
            for key in ("system_fingerprint", "x_vendor", "id", "created", "model"):
                assert got[key] == answer[key], (name, key)
            for i, choice in enumerate(got["choices"]):
                if i not in blocked:
                    assert choice == answer["choices"][i], name  # untouched
                assert choice["x_choice_meta"] == i


def test_streamed_unknown_fields_pass_untouched_and_unread_text_is_held(llm):
    import json

    def chunk(index, delta, finish=None, **extra):
        return {"id": "s1", "object": "chat.completion.chunk", "created": 1, "model": "m",
                "x_vendor": {"k": index}, "obfuscation": "abc", **extra,
                "choices": [{"index": index, "delta": delta, "finish_reason": finish,
                             "logprobs": None, "x_choice_meta": True}]}

    clean = [chunk(0, {"role": "assistant", "content": "hello"}),
             chunk(0, {"content": " there"}, "stop"),
             {"id": "s1", "object": "chat.completion.chunk", "created": 1, "model": "m",
              "choices": [], "usage": {"prompt_tokens": 1, "completion_tokens": 2,
                                       "total_tokens": 3}, "x_usage_extra": 7}]
    with Proxy(llm.url) as proxy:
        def events(script):
            llm.script.append({"events": script})
            with httpx.stream("POST", proxy.url + "/v1/chat/completions", json={
                    "model": "m", "stream": True, "messages": user("hi")}, timeout=30) as r:
                lines = [line for line in r.iter_lines() if line.startswith("data: ")]
            assert lines[-1] == "data: [DONE]"
            return [json.loads(line[6:]) for line in lines[:-1]]

        assert events(clean) == clean  # every field, as it came
        for hidden in ({"refusal": "xyzzy no"}, {"reasoning_content": "xyzzy hmm"},
                       {"audio": {"transcript": "xyzzy spoken"}}):
            got = events([chunk(0, {"role": "assistant", "content": "ok "}),
                          chunk(1, {"role": "assistant", "content": "fine"}),
                          chunk(0, hidden), chunk(0, {}, "stop"), chunk(1, {}, "stop")])
            assert "xyzzy" not in json.dumps(got), hidden
            finish = {c["choices"][0]["index"]: c["choices"][0]["finish_reason"]
                      for c in got if c["choices"] and c["choices"][0]["finish_reason"]}
            assert finish[0] == "content_filter", hidden
