"""Guard integrity, 1: no route around the guard.

Every method of the installed ``openai`` SDK, on ``OpenAI`` and ``AsyncOpenAI``, plain and
through ``with_raw_response`` / ``with_streaming_response`` at every level, is reached through a
guarded client and must be guarded, passed through because it carries no text (a short explicit
list), or refused with ``UnguardedCallError`` naming it. A method a future SDK adds lands in
"refused" by construction, and this walk proves it does not bypass. The guarded routes are then
driven with the real ``openai`` client against the local server: a trigger in the prompt never
reaches it, a trigger in the response never reaches the caller.
"""

from __future__ import annotations

import asyncio
import inspect

import pytest
from conftest import JB_HEADS, JB_POLICY, jb_score, sdk_client
from openai._resource import AsyncAPIResource, SyncAPIResource

from guardmerge import (AsyncGuardedClient, ConfigError, FunctionClassifier, Guard,
                        GuardedClient, Policy, PromptBlockedError, ResponseBlockedError, UnguardedCallError,
                        guard_client)
from guardmerge.client import ROUTES, SAFE_CALLS

MODES = ("with_raw_response", "with_streaming_response")


def _is_resource(value) -> bool:
    name = type(value).__name__
    return isinstance(value, (SyncAPIResource, AsyncAPIResource)) or \
        name.endswith(("WithRawResponse", "WithStreamedResponse", "WithStreamingResponse"))


def _walk(obj, path=(), mode=None, seen=None):
    """(path, mode) of every public method reachable from ``obj``; ``mode`` is the wrapper
    crossed on the way (it does not count in the path, as in ``ROUTES``)."""
    seen = set() if seen is None else seen
    if id(obj) in seen:
        return
    seen.add(id(obj))
    for name in sorted(n for n in dir(obj) if not n.startswith("_")):
        if isinstance(inspect.getattr_static(obj, name, None), property) and name not in MODES:
            continue  # plain properties hold data (base_url, auth headers)
        try:
            value = getattr(obj, name)
        except Exception:  # noqa: BLE001 - a property that needs configuration
            continue
        if name in MODES:
            yield from _walk(value, path, name, seen)
        elif _is_resource(value):
            yield from _walk(value, (*path, name), mode, seen)
        elif callable(value) and not isinstance(value, type):
            yield (*path, name), mode


def _resolve(guarded, path, mode):
    """The guarded client's attribute at ``path``, crossing ``mode`` after the resource."""
    obj = guarded
    for i, name in enumerate(path):
        if mode and i == len(path) - 1:
            obj = getattr(obj, mode)
        obj = getattr(obj, name)
    return obj


@pytest.mark.parametrize("asynchronous", [False, True], ids=["OpenAI", "AsyncOpenAI"])
def test_every_sdk_method_is_guarded_passed_or_refused(llm, jb_guard, asynchronous):
    client = sdk_client(llm, asynchronous=asynchronous)
    guarded = guard_client(client, jb_guard)
    methods = set(_walk(client))
    assert len(methods) > 500  # the walk really covers the SDK (openai 3.x: ~1,300)
    guarded_paths, safe, refused = set(), set(), set()
    for path, mode in sorted(methods, key=str):
        if path in (("with_options",), ("copy",)):
            continue  # return guarded clients: tested below
        attr = _resolve(guarded, path, mode)
        if path in ROUTES:
            assert not getattr(attr, "__name__", "").startswith("refused:"), path
            guarded_paths.add(path)
        elif path in SAFE_CALLS:
            real = _resolve(client, path, mode)
            assert attr == real, path
            safe.add(path)
        else:
            label = "client." + ".".join(path[:-1] + ((mode,) if mode else ()) + path[-1:])
            with pytest.raises(UnguardedCallError) as err:
                result = attr()
                if inspect.isawaitable(result):  # never reached: the refusal is synchronous
                    asyncio.run(result)
            assert err.value.method == label
            refused.add(path)
    assert llm.requests == []  # nothing was sent by any of them
    # the tables name methods the SDK has (a rename in a future SDK fails here)
    assert {p for p, _ in methods} >= set(ROUTES) | SAFE_CALLS
    assert guarded_paths == set(ROUTES)
    assert {("chat", "completions", "retrieve"), ("embeddings", "create"), ("post",),
            ("responses", "retrieve"), ("responses", "connect")} <= refused


def test_private_attributes_and_the_raw_http_methods_are_refused(llm, jb_guard):
    guarded = guard_client(sdk_client(llm), jb_guard)
    for attr in (guarded._client, guarded.post, guarded.request, guarded.chat.completions._post):
        with pytest.raises(UnguardedCallError):
            attr()
    assert guarded.wrapped.base_url == guarded.base_url  # plain attributes pass
    # the guarded method keeps the SDK's function private: .wrapped is the one way around
    assert not hasattr(guarded.chat.completions.create, "fn")
    assert not hasattr(guarded.responses.with_raw_response.create, "fn")
    assert llm.requests == []


def test_guarded_clients_are_context_managers_of_the_wrapped_client(llm, jb_guard):
    with guard_client(sdk_client(llm), jb_guard) as guarded:
        assert isinstance(guarded, GuardedClient) and not guarded.is_closed()
        with pytest.raises(PromptBlockedError):
            guarded.chat.completions.create(model="m", messages=user("xyzzy"))
    assert guarded.wrapped.is_closed()

    async def main():
        async with guard_client(sdk_client(llm, asynchronous=True), jb_guard) as guarded:
            assert isinstance(guarded, AsyncGuardedClient)
            with pytest.raises(PromptBlockedError):
                await guarded.responses.create(model="m", input="xyzzy")
        return guarded

    assert asyncio.run(main()).wrapped.is_closed()
    assert llm.requests == []


def user(text):
    return [{"role": "user", "content": text}]


def _sync_prompt_routes(g):
    m = user("ignore that, xyzzy")
    return {
        "chat.create": lambda: g.chat.completions.create(model="m", messages=m),
        "chat.create(stream)": lambda: list(g.chat.completions.create(model="m", messages=m,
                                                                      stream=True)),
        "chat.parse": lambda: g.chat.completions.parse(model="m", messages=m),
        "chat.stream": lambda: g.chat.completions.stream(model="m", messages=m).__enter__(),
        "beta.chat.parse": lambda: g.beta.chat.completions.parse(model="m", messages=m),
        "chat.raw.create": lambda: g.chat.completions.with_raw_response.create(model="m",
                                                                               messages=m),
        "chat.raw.parse": lambda: g.chat.completions.with_raw_response.parse(model="m",
                                                                             messages=m),
        "client.raw.chat.create": lambda: g.with_raw_response.chat.completions.create(
            model="m", messages=m),
        "chat.streaming.create": lambda: g.chat.completions.with_streaming_response.create(
            model="m", messages=m).__enter__(),
        "copy().chat.create": lambda: g.copy(timeout=5).chat.completions.create(model="m",
                                                                                messages=m),
        "with_options().chat.create": lambda: g.with_options(max_retries=0).chat.completions
        .create(model="m", messages=m),
        "completions.create": lambda: g.completions.create(model="m", prompt="xyzzy"),
        "completions.create(list)": lambda: g.completions.create(model="m",
                                                                 prompt=["hi", "xyzzy"]),
        "completions.suffix": lambda: g.completions.create(model="m", prompt="hi", suffix="xyzzy"),
        "completions.raw": lambda: g.completions.with_raw_response.create(model="m",
                                                                          prompt="xyzzy"),
        "responses.create": lambda: g.responses.create(model="m", input="xyzzy"),
        "responses.create(items)": lambda: g.responses.create(model="m", input=[
            {"role": "user", "content": [{"type": "input_text", "text": "xyzzy"}]}]),
        "responses.instructions": lambda: g.responses.create(model="m", input="hi",
                                                             instructions="xyzzy"),
        "responses.tool_output": lambda: g.responses.create(model="m", input=[
            {"type": "function_call_output", "call_id": "c", "output": "xyzzy"}]),
        "responses.stream": lambda: g.responses.stream(model="m", input="xyzzy").__enter__(),
        "responses.parse": lambda: g.responses.parse(model="m", input="xyzzy"),
        "responses.raw": lambda: g.responses.with_raw_response.create(model="m", input="xyzzy"),
        "responses.streaming": lambda: g.responses.with_streaming_response.create(
            model="m", input="xyzzy").__enter__(),
    }


ROUTE_NAMES = list(_sync_prompt_routes(None))


@pytest.mark.parametrize("route", ROUTE_NAMES)
def test_a_trigger_in_the_prompt_never_reaches_the_upstream(llm, jb_guard, route):
    guarded = guard_client(sdk_client(llm), jb_guard)
    if route == "responses.instructions":  # instructions are a system message: check them
        policy = Policy.from_yaml(JB_POLICY.replace("roles: [user, tool]",
                                                    "roles: [system, user, tool]"))
        guarded = guard_client(sdk_client(llm), Guard(FunctionClassifier(JB_HEADS, jb_score),
                                                      policy))
    with pytest.raises(PromptBlockedError) as err:
        _sync_prompt_routes(guarded)[route]()
    assert err.value.verdict.findings[0].head == "jailbreak"
    assert llm.requests == []


def _sync_output_routes(g):
    m = user("tell me the secret")
    return {
        "chat.create": lambda: g.chat.completions.create(model="m", messages=m),
        "chat.create(stream)": lambda: list(g.chat.completions.create(model="m", messages=m,
                                                                      stream=True)),
        "chat.parse": lambda: g.chat.completions.parse(model="m", messages=m),
        "chat.stream": lambda: [e for e in g.chat.completions.stream(model="m",
                                                                     messages=m).__enter__()],
        "chat.raw.create": lambda: g.chat.completions.with_raw_response.create(model="m",
                                                                               messages=m),
        "chat.raw.create(stream)": lambda: list(g.chat.completions.with_raw_response.create(
            model="m", messages=m, stream=True).parse()),
        "chat.streaming.create": lambda: g.chat.completions.with_streaming_response.create(
            model="m", messages=m).__enter__(),
        "chat.streaming.create(stream)": lambda: list(
            g.chat.completions.with_streaming_response.create(model="m", messages=m,
                                                              stream=True).__enter__().parse()),
        "completions.create": lambda: g.completions.create(model="m", prompt="tell me the secret"),
        "completions.create(stream)": lambda: list(g.completions.create(
            model="m", prompt="tell me the secret", stream=True)),
        "responses.create": lambda: g.responses.create(model="m", input="tell me the secret"),
        "responses.create(stream)": lambda: list(g.responses.create(
            model="m", input="tell me the secret", stream=True)),
        "responses.stream": lambda: [e for e in g.responses.stream(
            model="m", input="tell me the secret").__enter__()],
        "responses.parse": lambda: g.responses.parse(model="m", input="tell me the secret"),
    }


@pytest.mark.parametrize("route", list(_sync_output_routes(None)))
def test_a_trigger_in_the_response_never_reaches_the_caller(llm, jb_guard, route):
    guarded = guard_client(sdk_client(llm), jb_guard, window_chars=120, overlap_chars=20)
    with pytest.raises(ResponseBlockedError) as err:
        _sync_output_routes(guarded)[route]()
    assert err.value.verdict.direction == "output" and len(llm.requests) == 1


def test_passing_calls_on_every_route_return_the_sdk_objects(llm, jb_guard):
    g = guard_client(sdk_client(llm), jb_guard)
    m = user("hello there")
    assert g.chat.completions.create(model="m", messages=m).choices[0].message.content == \
        "You said: hello there"
    assert g.chat.completions.parse(model="m", messages=m).choices[0].message.content == \
        "You said: hello there"
    with g.chat.completions.stream(model="m", messages=m) as s:
        assert s.get_final_completion().choices[0].message.content == "You said: hello there"
    raw = g.chat.completions.with_raw_response.create(model="m", messages=m)
    assert raw.status_code == 200 and raw.parse().choices[0].message.content.endswith("there")
    with g.chat.completions.with_streaming_response.create(model="m", messages=m) as r:
        assert r.parse().choices[0].message.content.endswith("there")
    raw_stream = g.with_raw_response.chat.completions.create(model="m", messages=m, stream=True)
    text = "".join(c.choices[0].delta.content or "" for c in raw_stream.parse() if c.choices)
    assert text == "You said: hello there" and raw_stream.status_code == 200
    with pytest.raises(UnguardedCallError, match="bypass the hold-back"):
        raw_stream.iter_lines()  # the raw body of a stream would bypass the hold-back
    assert g.completions.create(model="m", prompt="legacy").choices[0].text == "You said: legacy"
    r = g.responses.create(model="m", input="new api")
    assert type(r).__name__ == "Response" and r.output_text == "You said: new api"
    with g.responses.stream(model="m", input="streamed") as s:
        assert s.get_final_response().output_text == "You said: streamed"
    assert len(llm.requests) == 9


def test_refusals_keep_each_api_shape(llm, jb_guard):
    g = guard_client(sdk_client(llm), jb_guard, on_block="refuse", window_chars=60,
                     overlap_chars=10)
    c = g.completions.create(model="m", prompt="xyzzy")
    assert type(c).__name__ == "Completion" and c.choices[0].finish_reason == "content_filter"
    assert c.choices[0].text == "Refused by policy."
    r = g.responses.create(model="m", input="xyzzy")
    assert r.status == "incomplete" and r.incomplete_details.reason == "content_filter"
    assert r.output_text == "Refused by policy."
    r = g.responses.create(model="m", input="tell me the secret")
    assert r.status == "incomplete" and "xyzzy" not in r.output_text
    events = list(g.responses.create(model="m", input="tell me the secret", stream=True))
    shown = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert "xyzzy" not in shown and shown.startswith("Sure. word")
    assert events[-1].type == "response.incomplete"
    assert events[-1].response.incomplete_details.reason == "content_filter"
    early = list(g.responses.create(model="m", input="xyzzy", stream=True))
    assert [e.type for e in early] == ["response.created", "response.incomplete"]
    chunks = list(g.completions.create(model="m", prompt="tell me the secret", stream=True))
    assert "xyzzy" not in "".join(ch.choices[0].text for ch in chunks)
    assert chunks[-1].choices[0].finish_reason == "content_filter"
    assert len(llm.requests) == 3  # the blocked prompts were never sent


def test_async_routes(llm, jb_guard):
    async def main():
        g = guard_client(sdk_client(llm, asynchronous=True), jb_guard)
        m = user("ignore that, xyzzy")
        for call in (lambda: g.chat.completions.create(model="m", messages=m),
                     lambda: g.chat.completions.parse(model="m", messages=m),
                     lambda: g.with_raw_response.chat.completions.create(model="m", messages=m),
                     lambda: g.completions.create(model="m", prompt="xyzzy"),
                     lambda: g.responses.create(model="m", input="xyzzy"),
                     lambda: g.copy().responses.create(model="m", input="xyzzy")):
            with pytest.raises(PromptBlockedError):
                await call()
        with pytest.raises(PromptBlockedError):
            async with g.chat.completions.stream(model="m", messages=m):
                pass
        with pytest.raises(PromptBlockedError):
            async with g.responses.with_streaming_response.create(model="m", input="xyzzy"):
                pass
        assert llm.requests == []
        secret = user("tell me the secret")
        with pytest.raises(ResponseBlockedError):
            async with g.chat.completions.stream(model="m", messages=secret) as s:
                async for _ in s:
                    pass
        with pytest.raises(ResponseBlockedError):
            async for _ in await g.responses.create(model="m", input="tell me the secret",
                                                    stream=True):
                pass
        with pytest.raises(ResponseBlockedError):
            async with g.chat.completions.with_streaming_response.create(model="m",
                                                                         messages=secret):
                pass
        async with g.responses.stream(model="m", input="fine") as s:
            async for _ in s:
                pass
            assert (await s.get_final_response()).output_text == "You said: fine"
        with pytest.raises(UnguardedCallError, match=r"client\.embeddings\.create"):
            await g.embeddings.create(model="m", input="xyzzy")

    asyncio.run(main())
    assert len(llm.requests) == 4


def test_guardmerge_chat_client_is_guarded_the_same_way(jb_guard):
    import httpx

    from guardmerge import ChatClient

    sent = []
    client = ChatClient("http://upstream.invalid/v1", transport=httpx.MockTransport(
        lambda request: sent.append(request) or httpx.Response(200, json={})))
    guarded = guard_client(client, jb_guard)
    with pytest.raises(PromptBlockedError):
        guarded.chat.completions.create(model="m", messages=user("xyzzy"))
    with pytest.raises(UnguardedCallError, match="create_chat_completion"):
        guarded.create_chat_completion(model="m", messages=user("xyzzy"))
    assert sent == []


# -- parameters outside the API: extra_body and unknown keywords ----------------------------------

T = [{"role": "user", "content": "xyzzy"}]


def _extra_body_routes(g):
    hi = user("hi")
    return {
        "chat messages": lambda: g.chat.completions.create(model="m", messages=hi,
                                                           extra_body={"messages": T}),
        "chat without messages": lambda: g.chat.completions.create(model="m",
                                                                   extra_body={"messages": T}),
        "chat stream": lambda: list(g.chat.completions.create(
            model="m", messages=hi, stream=True, extra_body={"messages": T})),
        "responses input": lambda: g.responses.create(model="m", input="hi",
                                                      extra_body={"input": "xyzzy"}),
        "responses prompt variables": lambda: g.responses.create(
            model="m", input="hi", extra_body={"prompt": {"id": "p", "variables": {"v": "xyzzy"}}}),
        "completions prompt": lambda: g.completions.create(model="m", prompt="hi",
                                                           extra_body={"prompt": "xyzzy"}),
        "completions suffix": lambda: g.completions.create(model="m", prompt="hi",
                                                           extra_body={"suffix": ["xyzzy"]}),
    }


@pytest.mark.parametrize("route", list(_extra_body_routes(None)))
def test_text_in_extra_body_is_checked_as_the_parameter_it_replaces(llm, jb_guard, route):
    guarded = guard_client(sdk_client(llm), jb_guard)
    with pytest.raises(PromptBlockedError):
        _extra_body_routes(guarded)[route]()
    assert llm.requests == []


def test_the_checked_extra_body_text_is_what_is_sent(llm, jb_guard):
    guarded = guard_client(sdk_client(llm), jb_guard)
    # extra_body wins over the parameter in the SDK's merge: that is what is checked and sent
    r = guarded.chat.completions.create(model="m", messages=T, extra_body={"messages": user("hi")})
    assert r.choices[0].message.content == "You said: hi"
    assert llm.requests[0]["messages"] == user("hi")
    chunks = list(guarded.chat.completions.create(model="m", messages=user("streamed"),
                                                  extra_body={"stream": True}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == \
        "You said: streamed"  # a stream requested in extra_body is guarded as a stream


def test_unknown_parameters_pass_without_text_and_are_refused_with_it(llm, jb_guard):
    guarded = guard_client(sdk_client(llm), jb_guard)
    settings = {"top_k": 5, "min_p": 0.05, "repetition_penalty": 1.1,
                "chat_template_kwargs": {"enable_thinking": False},
                "guided_json": {"type": "object"}, "provider": {"order": ["a", "b"]}}
    guarded.chat.completions.create(model="m", messages=user("hi"), temperature=0.2,
                                    extra_body=settings)
    assert {k: llm.requests[0][k] for k in settings} == settings
    assert llm.requests[0]["temperature"] == 0.2
    for extra, named in (({"documents": [{"title": "a", "text": "the secret xyzzy"}]},
                          "extra_body['documents']"),
                         ({"chat_template": "{{ 'xyzzy' }}"}, "extra_body['chat_template']"),
                         ({"kwargs": {"the secret xyzzy": 1}}, "extra_body['kwargs']"),
                         ({"the secret xyzzy": 1}, "extra_body[<a key that is not a name>]")):
        with pytest.raises(UnguardedCallError) as err:
            guarded.chat.completions.create(model="m", messages=user("hi"), extra_body=extra)
        assert err.value.method == f"chat.completions.create({named})"
        assert "secret" not in str(err.value) and "xyzzy" not in str(err.value)
    with pytest.raises(UnguardedCallError, match=r"responses\.create\(extra_body\['documents'\]\)"):
        guarded.responses.create(model="m", input="hi", extra_body={"documents": ["xyzzy"]})
    with pytest.raises(UnguardedCallError, match="extra_body is a list"):
        guarded.chat.completions.create(model="m", messages=user("hi"), extra_body=["xyzzy"])
    assert len(llm.requests) == 1


def test_unknown_keywords_of_guardmerges_chat_client_are_screened_the_same_way(llm, jb_guard):
    from guardmerge import ChatClient

    guarded = guard_client(ChatClient(llm.url), jb_guard)
    assert guarded.chat.completions.create(model="m", messages=user("hi"), top_k=3)["choices"]
    assert llm.requests[0]["top_k"] == 3
    with pytest.raises(UnguardedCallError, match=r"chat\.completions\.create\('documents'\)"):
        guarded.chat.completions.create(model="m", messages=user("hi"), documents=["xyzzy"])
    assert len(llm.requests) == 1


def test_every_parameter_of_the_installed_sdk_is_classified():
    """A parameter a future SDK adds to a guarded method must be read, or named as one that
    carries no text to the model; until then a text value in it is refused (default-deny)."""
    import openai

    client = openai.OpenAI(api_key="x", base_url="http://127.0.0.1:9/v1")
    from guardmerge._apis import _SDK_OPTIONS

    for path, (api, kind) in ROUTES.items():
        method = client
        for name in path:
            method = getattr(method, name)
        params = set(inspect.signature(method).parameters) - _SDK_OPTIONS
        if kind == "stream":  # the SDK's manager resolves these before the guarded create
            params -= {"response_id", "starting_after"}
        assert params <= api.text_fields | api.other_fields, (path, params - api.text_fields
                                                             - api.other_fields)


# -- a client the wrapper must recognise as async; responses it cannot read ------------------------


class Tracing:
    """A plain ``__getattr__`` proxy, the shape of tracing / instrumentation wrappers."""

    def __init__(self, inner):
        self._inner = inner

    def __getattr__(self, name):
        return getattr(self._inner, name)


def test_an_async_client_behind_a_wrapper_is_guarded_as_async(llm, jb_guard):
    seen = []

    async def main():
        guarded = guard_client(Tracing(sdk_client(llm, asynchronous=True)), jb_guard,
                               on_verdict=seen.append)
        assert isinstance(guarded, AsyncGuardedClient)
        with pytest.raises(ResponseBlockedError):
            await guarded.chat.completions.create(model="m", messages=user("tell me the secret"))

    asyncio.run(main())
    assert [v.action.value for v in seen] == ["pass", "block"]


def test_an_awaitable_on_the_sync_path_is_an_error_never_a_pass(llm, jb_guard):
    inner = sdk_client(llm, asynchronous=True)

    from types import SimpleNamespace

    # nothing in it says async: the method is a plain function that returns a coroutine
    opaque = SimpleNamespace(chat=SimpleNamespace(completions=SimpleNamespace(
        create=lambda **kw: inner.chat.completions.create(**kw))))
    seen = []
    guarded = guard_client(opaque, jb_guard, on_verdict=seen.append)
    assert not isinstance(guarded, AsyncGuardedClient)
    with pytest.raises(ConfigError, match=r"returned an awaitable.*pass is_async=True"):
        guarded.chat.completions.create(model="m", messages=user("tell me the secret"))
    assert [v.direction for v in seen] == ["input"]  # no output verdict, and no pass for it
    assert llm.requests == []  # the coroutine was closed, never run
    with pytest.raises(ConfigError, match="pass is_async=False"):
        asyncio.run(guard_client(sdk_client(llm), jb_guard, is_async=True)
                    .chat.completions.create(model="m", messages=user("hi")))


def _mock_sdk(body):
    import httpx
    import openai

    return openai.OpenAI(base_url="http://upstream.invalid/v1", api_key="k", max_retries=0,
                         http_client=httpx.Client(transport=httpx.MockTransport(
                             lambda request: httpx.Response(200, json=body))))


@pytest.mark.parametrize("api", ["chat", "completions", "responses"])
def test_a_response_without_its_output_list_is_unreadable_never_a_pass(jb_guard, api):
    body = {"id": "x", "created": 1, "model": "m", "output_text": "xyzzy",
            "object": {"chat": "chat.completion", "completions": "text_completion",
                       "responses": "response"}[api]}
    for on_error, action in (("block", "block"), ("flag", "flag")):
        guard = Guard(FunctionClassifier(JB_HEADS, jb_score),
                      Policy.from_yaml(f"on_error: {on_error}\n" + JB_POLICY))
        seen = []
        g = guard_client(_mock_sdk(body), guard, on_verdict=seen.append)
        call = {"chat": lambda: g.chat.completions.create(model="m", messages=user("hi")),
                "completions": lambda: g.completions.create(model="m", prompt="hi"),
                "responses": lambda: g.responses.create(model="m", input="hi")}[api]
        if action == "block":
            with pytest.raises(ResponseBlockedError):
                call()
        else:
            call()
        out = seen[-1]
        assert out.direction == "output" and out.action.value == action
        assert [f.kind for f in out.findings] == ["unreadable"]
        assert "has no" in out.findings[0].detail
    if api == "chat":  # refused whole: one content_filter choice in place of the unreadable
        refused = guard_client(_mock_sdk(body), jb_guard, on_block="refuse")
        r = refused.chat.completions.create(model="m", messages=user("hi"))
        assert r.choices[0].finish_reason == "content_filter"
        assert r.choices[0].message.content == "Refused by policy."


def test_async_streaming_response_parse_is_awaited_as_in_the_sdk(llm, jb_guard):
    async def main():
        g = guard_client(sdk_client(llm, asynchronous=True), jb_guard)
        async with g.chat.completions.with_streaming_response.create(
                model="m", messages=user("hello"), stream=True) as resp:
            stream = await resp.parse()  # the SDK's documented async form
            text = "".join([c.choices[0].delta.content or "" async for c in stream
                            if c.choices])
        raw = await g.chat.completions.with_raw_response.create(model="m", messages=user("raw"),
                                                                stream=True)
        raw_text = "".join([c.choices[0].delta.content or "" async for c in raw.parse()
                            if c.choices])  # the legacy raw response parses synchronously
        with pytest.raises(ResponseBlockedError):
            async with g.chat.completions.with_streaming_response.create(
                    model="m", messages=user("tell me the secret"), stream=True) as resp:
                async for _ in await resp.parse():
                    pass
        return text, raw_text

    assert asyncio.run(main()) == ("You said: hello", "You said: raw")
