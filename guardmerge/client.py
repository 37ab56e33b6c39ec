"""Guard an OpenAI-style client: ``guarded = guard_client(client, guard)``.

Every request path of the guarded client that can carry text to a model is guarded or
refused; none passes through unguarded by default:

- guarded, prompt before the upstream call and response after it (streamed: window by window,
  then once more in full): ``chat.completions.create`` / ``parse`` / ``stream``,
  ``completions.create`` (legacy), ``responses.create`` / ``parse`` / ``stream`` (and their
  ``beta.`` twins), each also through ``with_raw_response`` and ``with_streaming_response`` at
  any level, and on ``copy()`` / ``with_options()`` clients;
- passed through, because they carry no text to or from a model: ``models.list`` /
  ``retrieve`` / ``delete``, ``close``, ``is_closed``, and plain attributes (``base_url``,
  ``timeout``, ...);
- everything else (embeddings, audio, images, files, batches, the assistants and realtime
  APIs, stored completions, raw ``client.post``, private attributes, any method a future SDK
  adds) raises ``UnguardedCallError`` naming the method when called. ``guarded.wrapped`` is the
  unguarded client, for calls you deliberately do not guard.

Parameters outside the API (``extra_body`` keys, unknown keywords) are default-deny for text:
text fields in ``extra_body`` are checked and sent as the parameter they replace, any other
value holding text is refused with ``UnguardedCallError`` naming it (see ``_apis``).

The guard acts at the call, never inside the HTTP transport: the SDK retries and re-wraps
transport exceptions, so a block raised there would be scanned several times and reported as
a connection error. Works with ``openai.OpenAI`` / ``openai.AsyncOpenAI`` (responses stay SDK
objects) and with guardmerge's ``ChatClient`` / ``AsyncChatClient`` (dicts). Every verdict of
a guarded call (prompt and response, pass included) reaches ``on_verdict``; flags also reach
``on_flag``.

A raw HTTP response cannot be rewritten, so through ``with_raw_response`` /
``with_streaming_response`` a block always raises (``PromptBlockedError`` /
``ResponseBlockedError``), whatever ``on_block`` says; a streamed raw response hands out only
``parse()`` (the guarded stream) and its metadata, never its body.
"""

from __future__ import annotations

import inspect
import logging
from enum import Enum
from collections.abc import Mapping  # isinstance on it: typing.Mapping is several times slower
from typing import Any, AsyncIterator, Awaitable, Callable, Iterator, Literal

from ._apis import API, CHAT, COMPLETIONS, RESPONSES
from ._stream import DONE, NEED_DATA, Blocked, Check, Emit, StreamMachine
from .exceptions import ConfigError, PromptBlockedError, ResponseBlockedError, UnguardedCallError
from .guard import Guard
from .verdict import Action, Verdict

__all__ = ["guard_client", "GuardedClient", "AsyncGuardedClient", "ROUTES", "SAFE_CALLS"]

logger = logging.getLogger("guardmerge.client")

OnBlock = Literal["raise", "refuse"]
StreamMode = Literal["hold", "release"]
VerdictCallback = Callable[[Verdict], Any]

#: guarded methods: path (without ``with_raw_response`` / ``with_streaming_response``) ->
#: (API, "create" | "stream"); "stream" is the SDK's stream manager over the guarded create
ROUTES: dict[tuple[str, ...], tuple[API, str]] = {}
for _prefix in ((), ("beta",)):
    ROUTES[(*_prefix, "chat", "completions", "create")] = (CHAT, "create")
    ROUTES[(*_prefix, "chat", "completions", "parse")] = (CHAT, "create")
    ROUTES[(*_prefix, "chat", "completions", "stream")] = (CHAT, "stream")
    ROUTES[(*_prefix, "responses", "create")] = (RESPONSES, "create")
ROUTES[("completions", "create")] = (COMPLETIONS, "create")
ROUTES[("responses", "parse")] = (RESPONSES, "create")
ROUTES[("responses", "stream")] = (RESPONSES, "stream")
#: methods passed through unguarded: they carry no text to or from a model
SAFE_CALLS = frozenset({("models", "list"), ("models", "retrieve"), ("models", "delete"),
                        ("close",), ("is_closed",)})
_MODES = ("with_raw_response", "with_streaming_response")
_RAW_METADATA = frozenset({"headers", "status_code", "url", "method", "http_version", "elapsed",
                           "is_closed", "request_id", "retries_taken", "http_request"})


def _is_data(value: Any) -> bool:
    """Plain attribute values (passed through); anything else is a namespace to guard."""
    if isinstance(value, (str, bytes, int, float, complex, bool, type(None), Mapping, list,
                          tuple, set, frozenset, Enum, type)):
        return True
    return type(value).__name__ in ("URL", "Timeout", "NotGiven", "Omit", "Headers")


class _Core:
    """What every guarded call shares: the guard, the options, the decisions."""

    def __init__(self, guard: Guard, *, on_block: OnBlock, on_flag: VerdictCallback | None,
                 on_verdict: VerdictCallback | None, check_output: bool, stream_mode: StreamMode,
                 window_chars: int, overlap_chars: int, sdk_types: bool, is_async: bool,
                 acheck: Callable[[Any, str], Awaitable[Verdict]] | None = None) -> None:
        if on_block not in ("raise", "refuse"):
            raise ConfigError(f"on_block must be 'raise' or 'refuse', got {on_block!r}")
        if stream_mode not in ("hold", "release"):
            raise ConfigError(f"stream_mode must be 'hold' or 'release', got {stream_mode!r}")
        if not 0 <= overlap_chars < window_chars:
            raise ConfigError(f"need 0 <= overlap_chars < window_chars, got {overlap_chars} "
                              f"and {window_chars}")
        self.guard = guard
        self.on_block = on_block
        self.on_flag = on_flag
        self.on_verdict = on_verdict
        self.check_output = check_output
        self.stream_mode = stream_mode
        self.window_chars = window_chars
        self.overlap_chars = overlap_chars
        self.sdk_types = sdk_types
        self.is_async = is_async
        self._acheck = acheck

    def acheck(self, messages: Any, direction: str) -> Awaitable[Verdict]:
        """The async check: ``guard.acheck``, unless the caller gave another (the proxy gives
        its batched check, so its streams run on this same driver)."""
        return (self._acheck or self.guard.acheck)(messages, direction)

    @property
    def refusal_message(self) -> str:
        return self.guard.policy.refusal_message

    @property
    def tool_calls(self) -> bool:
        return self.guard.policy.output.check_tool_calls

    def note(self, verdict: Verdict) -> Verdict:
        if self.on_verdict is not None:
            self.on_verdict(verdict)
        if verdict.action is Action.FLAG:
            logger.warning("guard flagged %s", verdict.summary())
            if self.on_flag is not None:
                self.on_flag(verdict)
        return verdict

    def prompt_outcome(self, api: API, kwargs: Mapping[str, Any], verdict: Verdict,
                       mode: str | None) -> Any:
        """None to go on; a refusal (response, or the items of a refused stream); or raises."""
        self.note(verdict)
        if not verdict.blocked:
            return None
        if self.on_block == "raise" or mode is not None:
            raise PromptBlockedError(verdict)
        if kwargs.get("stream"):
            return api.early_stream(kwargs, self.refusal_message, self.sdk_types)
        return api.refuse_prompt(kwargs, self.refusal_message, self.sdk_types)

    def output_outcome(self, api: API, response: Any, verdict: Verdict, mode: str | None) -> Any:
        self.note(verdict)
        if not verdict.blocked:
            return response
        if self.on_block == "raise" or mode is not None:
            raise ResponseBlockedError(verdict)
        try:
            return api.refuse_output(response, verdict, self.refusal_message)
        except Exception:  # a response it cannot rebuild (not a mapping or an SDK model)
            raise ResponseBlockedError(verdict) from None

    def machine(self, api: API) -> StreamMachine:
        """A fresh hold-back machine for one stream of ``api``."""
        reader = api.reader(self.tool_calls, self.refusal_message, self.sdk_types)
        return StreamMachine(reader.read, window_chars=self.window_chars,
                             overlap_chars=self.overlap_chars, hold=self.stream_mode == "hold",
                             tail=reader.tail, label=reader.label,
                             error=lambda exc: self.guard.policy.error_verdict("output", exc))


# -- the two stream drivers: I/O only, every decision is the machine's ---------------------------


class _StreamCloser:
    """``stream.response`` for the SDK's stream helpers: closing it closes the guarded stream."""

    def __init__(self, stream: Any) -> None:
        self._stream = stream

    def close(self) -> None:
        self._stream.close()

    async def aclose(self) -> None:
        await self._stream.close()


class GuardedStream:
    """A guarded sync stream: iterate it, ``close()`` it, or use it in ``with``."""

    def __init__(self, upstream: Any, core: _Core, api: API) -> None:
        self._upstream = upstream
        self._core = core
        self._machine = core.machine(api)
        self._iter = self._run()
        self.response = _StreamCloser(self)

    @property
    def verdict(self) -> Verdict | None:
        """The last verdict: the final check's, or the one that blocked (None: no text)."""
        return self._machine.verdict

    def _run(self) -> Iterator[Any]:
        machine = self._machine
        try:
            for item in self._upstream:
                machine.feed(item)
                yield from self._drain()
                if machine.stopped:
                    return
            machine.finish()
            yield from self._drain()
        finally:
            self._close_upstream()

    def _drain(self) -> Iterator[Any]:
        machine, core = self._machine, self._core
        while True:
            event = machine.next_event()
            if isinstance(event, Check):
                try:
                    result: Any = core.guard.check(event.texts, "output")
                except Exception as exc:  # follows on_error; held text stays held
                    result = exc
                core.note(machine.checked_result(result))
            elif isinstance(event, Emit):
                yield from event.items
            elif isinstance(event, Blocked):
                self._close_upstream()
                if core.on_block == "raise" or not event.tail:
                    raise ResponseBlockedError(event.verdict)
                yield from event.tail
                return
            else:
                assert event in (NEED_DATA, DONE)
                return

    def _close_upstream(self) -> None:
        close = getattr(self._upstream, "close", None)
        if callable(close):
            close()

    def __iter__(self) -> Iterator[Any]:
        return self._iter

    def __next__(self) -> Any:
        return next(self._iter)

    def close(self) -> None:
        self._iter.close()
        self._close_upstream()

    def __enter__(self) -> "GuardedStream":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class AsyncGuardedStream:
    """A guarded async stream: ``async for``, ``await close()``, or ``async with``."""

    def __init__(self, upstream: Any, core: _Core, api: API, *, grouped: bool = False) -> None:
        self._upstream = upstream
        self._core = core
        self._machine = core.machine(api)
        #: ``grouped``: yield lists, each the items released together (the proxy writes each
        #: list in one send: held-back events released by a check leave in one TCP write)
        self._iter = self._run() if grouped else self._items(self._run())
        self.response = _StreamCloser(self)

    @property
    def verdict(self) -> Verdict | None:
        return self._machine.verdict

    async def _run(self) -> AsyncIterator[list[Any]]:
        """The guarded stream as lists of the items released together."""
        machine = self._machine
        try:
            async for item in self._upstream:
                machine.feed(item)
                async for group in self._drain():
                    yield group
                if machine.stopped:
                    return
            machine.finish()
            async for group in self._drain():
                yield group
        finally:
            await self._close_upstream()

    @staticmethod
    async def _items(groups: AsyncIterator[list[Any]]) -> AsyncIterator[Any]:
        """One item at a time (what the library wrapper's callers iterate)."""
        try:
            async for group in groups:
                for item in group:
                    yield item
        finally:
            await groups.aclose()  # type: ignore[attr-defined]

    async def _drain(self) -> AsyncIterator[list[Any]]:
        """The items the machine releases, as lists (those released together; never empty)."""
        machine, core = self._machine, self._core
        while True:
            event = machine.next_event()
            if isinstance(event, Check):
                try:
                    result: Any = await core.acheck(event.texts, "output")
                except Exception as exc:  # follows on_error; held text stays held
                    result = exc
                core.note(machine.checked_result(result))
            elif isinstance(event, Emit):
                if event.items:
                    yield list(event.items)
            elif isinstance(event, Blocked):
                await self._close_upstream()
                if core.on_block == "raise" or not event.tail:
                    raise ResponseBlockedError(event.verdict)
                yield list(event.tail)
                return
            else:
                assert event in (NEED_DATA, DONE)
                return

    async def _close_upstream(self) -> None:
        close = getattr(self._upstream, "close", None) or getattr(self._upstream, "aclose", None)
        if callable(close):
            result = close()
            if hasattr(result, "__await__"):
                await result

    def __aiter__(self) -> AsyncIterator[Any]:
        return self._iter

    async def __anext__(self) -> Any:
        return await self._iter.__anext__()

    async def close(self) -> None:
        await self._iter.aclose()
        await self._close_upstream()

    async def __aenter__(self) -> "AsyncGuardedStream":
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()


async def _aiter(items: list[Any]) -> AsyncIterator[Any]:
    for item in items:
        yield item


# -- raw and streamed HTTP responses --------------------------------------------------------------


class _GuardedRawStream:
    """A streamed raw response: ``parse()`` is the guarded stream; metadata passes; the body
    (``text``, ``iter_lines``, ``http_response``, ...) would bypass the hold-back: refused."""

    def __init__(self, raw: Any, stream: Any, label: str) -> None:
        self._raw = raw
        self._stream = stream
        self._label = label
        # the SDK's async streaming response has ``async def parse``: ``await resp.parse()``
        self._awaitable = inspect.iscoroutinefunction(getattr(raw, "parse", None))

    def parse(self, **_: Any) -> Any:
        if self._awaitable:
            return self._parsed()
        return self._stream

    async def _parsed(self) -> Any:
        return self._stream

    def close(self) -> Any:
        return self._stream.close()

    def __getattr__(self, name: str) -> Any:
        if name in _RAW_METADATA:
            return getattr(self._raw, name)
        raise UnguardedCallError(f"{self._label}(stream=True).{name}",
                                 "the raw body of a guarded stream would bypass the hold-back; "
                                 "use .parse()")


class _StreamedResponse:
    """``with_streaming_response``: entering sends the request; a non-streamed body is read and
    checked before the caller sees the response, a streamed one is handed out guarded."""

    def __init__(self, call: "_Call", kwargs: dict[str, Any]) -> None:
        self._call = call
        self._kwargs = kwargs
        self._cm: Any = None

    def __enter__(self) -> Any:
        call = self._call
        kwargs, _ = call.check_prompt(self._kwargs)  # a block raises: the mode is not plain
        self._cm = call._sync_result(call._fn(**kwargs))
        response = self._cm.__enter__()
        try:
            return call.finish(response.parse(), kwargs, response)
        except BaseException:
            self._cm.__exit__(None, None, None)
            raise

    def __exit__(self, *exc: Any) -> Any:
        return self._cm.__exit__(*exc)

    async def __aenter__(self) -> Any:
        call = self._call
        kwargs, _ = await call.acheck_prompt(self._kwargs)
        self._cm = call._fn(**kwargs)
        response = await self._cm.__aenter__()
        try:
            return await call.afinish(await response.parse(), kwargs, response)
        except BaseException:
            await self._cm.__aexit__(None, None, None)
            raise

    async def __aexit__(self, *exc: Any) -> Any:
        return await self._cm.__aexit__(*exc)


# -- guarded calls ------------------------------------------------------------------------------


class _Call:
    """One guarded method: ``_fn`` is the SDK's (private: ``guarded.wrapped`` is the one way
    around the guard), ``mode`` None (plain) or a wrapper name."""

    def __init__(self, core: _Core, api: API, fn: Callable[..., Any], mode: str | None,
                 label: str) -> None:
        self.core, self.api, self._fn, self.mode, self.label = core, api, fn, mode, label

    def _sync_result(self, result: Any) -> Any:
        """The upstream's result on the sync path: an awaitable means the client is async but
        was not recognised as such (a wrapper around ``AsyncOpenAI``, say); it is an error,
        never a response to check (it would read as no text, and pass)."""
        if inspect.isawaitable(result):
            close = getattr(result, "close", None)
            if callable(close):
                close()  # a coroutine never awaited: nothing was sent
            raise ConfigError(f"{self.label}() returned an awaitable: the client is asynchronous "
                              "but guard_client did not recognise it; pass is_async=True")
        return result

    async def _async_result(self, result: Any) -> Any:
        if not inspect.isawaitable(result):
            raise ConfigError(f"{self.label}() returned a {type(result).__name__}, not an "
                              "awaitable: the client is synchronous; pass is_async=False")
        return await result

    def _stream(self, upstream: Any) -> Any:
        cls = AsyncGuardedStream if self.core.is_async else GuardedStream
        return cls(upstream, self.core, self.api)

    def check_prompt(self, kwargs: dict[str, Any]) -> tuple[dict[str, Any], Any]:
        """Check the prompt: (the kwargs to send, with the checked snapshot; None or the
        refusal to return instead of calling upstream), or raise."""
        kwargs, messages = self.api.request(kwargs)
        verdict = self.core.guard.check(messages, "input")
        return kwargs, self.core.prompt_outcome(self.api, kwargs, verdict, self.mode)

    async def acheck_prompt(self, kwargs: dict[str, Any]) -> tuple[dict[str, Any], Any]:
        kwargs, messages = self.api.request(kwargs)
        verdict = await self.core.acheck(messages, "input")
        return kwargs, self.core.prompt_outcome(self.api, kwargs, verdict, self.mode)

    def _early_result(self, kwargs: Mapping[str, Any], early: Any) -> Any:
        if kwargs.get("stream"):
            return self._stream(_aiter(early) if self.core.is_async else iter(early))
        return early

    def finish(self, parsed: Any, kwargs: Mapping[str, Any], raw: Any = None) -> Any:
        """The caller's result, once the response (``parsed``) is checked or wrapped."""
        core = self.core
        if kwargs.get("stream"):
            stream = self._stream(parsed) if core.check_output else parsed
            return _GuardedRawStream(raw, stream, self.label) if raw is not None else stream
        if not core.check_output:
            return raw if raw is not None else parsed
        verdict = core.guard.check(self.api.output_items(parsed, core.tool_calls), "output")
        result = core.output_outcome(self.api, parsed, verdict, self.mode)
        return raw if raw is not None else result

    async def afinish(self, parsed: Any, kwargs: Mapping[str, Any], raw: Any = None) -> Any:
        core = self.core
        if kwargs.get("stream") or not core.check_output:
            return self.finish(parsed, kwargs, raw)
        verdict = await core.acheck(self.api.output_items(parsed, core.tool_calls), "output")
        result = core.output_outcome(self.api, parsed, verdict, self.mode)
        return raw if raw is not None else result

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if args:
            raise TypeError(f"{self.label}() takes keyword arguments only")
        if self.mode == "with_streaming_response":
            return _StreamedResponse(self, kwargs)
        if self.core.is_async:
            return self._acall(kwargs)
        kwargs, early = self.check_prompt(kwargs)
        if early is not None:
            return self._early_result(kwargs, early)
        result = self._sync_result(self._fn(**kwargs))
        if self.mode == "with_raw_response":
            return self.finish(result.parse(), kwargs, result)
        return self.finish(result, kwargs)

    async def _acall(self, kwargs: dict[str, Any]) -> Any:
        kwargs, early = await self.acheck_prompt(kwargs)
        if early is not None:
            return self._early_result(kwargs, early)
        result = await self._async_result(self._fn(**kwargs))
        if self.mode == "with_raw_response":
            return await self.afinish(result.parse(), kwargs, result)
        return await self.afinish(result, kwargs)


def _refused(label: str, reason: str | None = None) -> Callable[..., Any]:
    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise UnguardedCallError(label, reason)

    refuse.__qualname__ = refuse.__name__ = f"refused:{label}"
    return refuse


class _Namespace:
    """A guarded view of a client or of one of its resources (see the module doc)."""

    def __init__(self, target: Any, core: _Core, path: tuple[str, ...], mode: str | None,
                 label: str) -> None:
        self._target = target
        self._core = core
        self._path = path
        self._mode = mode
        self._label = label

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        label = f"{self._label}.{name}"
        if name.startswith("_"):
            return _refused(label, "a private attribute of the client")
        value = getattr(self._target, name)
        if name in _MODES:
            return _Namespace(value, self._core, self._path, name, label)
        path = (*self._path, name)
        route = ROUTES.get(path)
        if route is not None:
            api, kind = route
            if kind == "stream":
                return self._stream_manager(value, label)
            return _Call(self._core, api, value, self._mode, label)
        if path in SAFE_CALLS or _is_data(value):
            return value
        if callable(value):
            return _refused(label)
        return _Namespace(value, self._core, path, self._mode, label)

    def _stream_manager(self, method: Any, label: str) -> Callable[..., Any]:
        """``chat.completions.stream`` / ``responses.stream``: the SDK's own stream manager, run
        on this guarded resource, so its request goes through the guarded ``create``."""
        function = getattr(method, "__func__", None)
        if function is None:
            return _refused(label, "not a method this guardmerge can route through the guard")

        def stream(**kwargs: Any) -> Any:
            return function(self, **kwargs)

        return stream

    def __dir__(self) -> list[str]:
        return sorted(set(dir(self._target)))

    def __repr__(self) -> str:
        return f"<guarded {self._label} of {self._target!r}>"


class GuardedClient(_Namespace):
    """A guarded synchronous client; use it exactly like the client it wraps."""

    def __init__(self, client: Any, core: _Core) -> None:
        super().__init__(client, core, (), None, "client")

    def with_options(self, **options: Any) -> "GuardedClient":
        return type(self)(self._target.with_options(**options), self._core)

    def copy(self, **options: Any) -> "GuardedClient":
        return type(self)(self._target.copy(**options), self._core)

    @property
    def wrapped(self) -> Any:
        """The unguarded client (for calls you deliberately do not guard)."""
        return self._target

    def __enter__(self) -> "GuardedClient":
        """``with guard_client(OpenAI(), guard) as client:``: enters (and on exit closes) the
        wrapped client; ``client`` is the guarded one."""
        self._target.__enter__()
        return self

    def __exit__(self, *exc: Any) -> Any:
        return self._target.__exit__(*exc)


class AsyncGuardedClient(GuardedClient):
    """A guarded asynchronous client; ``await guarded.chat.completions.create(...)``."""

    async def __aenter__(self) -> "AsyncGuardedClient":
        """``async with guard_client(AsyncOpenAI(), guard) as client:`` (see ``__enter__``)."""
        await self._target.__aenter__()
        return self

    async def __aexit__(self, *exc: Any) -> Any:
        return await self._target.__aexit__(*exc)


def _openai_async(obj: Any) -> bool:
    return any(cls.__name__.startswith("Async") and cls.__module__.startswith("openai")
               for cls in type(obj).__mro__)


def _is_async(client: Any) -> bool:
    """Whether ``client`` is asynchronous: guardmerge's or openai's async client, or a client
    (a tracing wrapper, say) whose resources are openai's async ones or whose text-generating
    method is a coroutine function. ``guard_client(is_async=...)`` overrides it."""
    from ._http import AsyncChatClient

    if isinstance(client, AsyncChatClient) or _openai_async(client):
        return True
    for path in (("chat", "completions", "create"), ("responses", "create")):
        obj = client
        try:
            for name in path:
                obj = getattr(obj, name)
                if _openai_async(obj):
                    return True
        except Exception:  # noqa: BLE001 - a client without this route
            continue
        return inspect.iscoroutinefunction(inspect.unwrap(obj))
    return False


def guard_client(client: Any, guard: Guard, *, on_block: OnBlock = "raise",
                 on_flag: VerdictCallback | None = None,
                 on_verdict: VerdictCallback | None = None, check_output: bool = True,
                 stream_mode: StreamMode = "hold", window_chars: int = 2000,
                 overlap_chars: int = 200, is_async: bool | None = None) -> GuardedClient:
    """Wrap an OpenAI-style client so every call that carries text goes through ``guard``.

    on_block: ``"raise"`` PromptBlockedError / ResponseBlockedError (with the verdict), or
        ``"refuse"``: return an OpenAI-shaped response with ``finish_reason="content_filter"``
        (Responses API: ``status="incomplete"``, reason ``content_filter``) and the policy's
        ``refusal_message`` (streams end with a ``content_filter`` chunk or a
        ``response.incomplete`` event). Raw and streaming-response wrappers always raise.
    on_flag: called with every flag verdict (flags are also logged); the call goes on.
    on_verdict: called with every verdict of every guarded call, in order: the prompt's, then
        the response's (for streams: each window's check and the final one). This is how a
        caller sees what the guard decided about a call that went through.
    check_output: False skips the response checks (prompts are still checked).
    stream_mode: ``"hold"`` (default): no text reaches the caller before the window holding it
        was checked, per choice (a hold-back of at most ``window_chars``); ``"release"``:
        chunks go out at once and are checked behind; weaker: up to one window of a blocked
        response is seen.
    """
    sdk_types = any(cls.__module__.startswith("openai") for cls in type(client).__mro__)
    asynchronous = is_async if is_async is not None else _is_async(client)
    core = _Core(guard, on_block=on_block, on_flag=on_flag, on_verdict=on_verdict,
                 check_output=check_output, stream_mode=stream_mode, window_chars=window_chars,
                 overlap_chars=overlap_chars, sdk_types=sdk_types, is_async=asynchronous)
    return (AsyncGuardedClient if asynchronous else GuardedClient)(client, core)
