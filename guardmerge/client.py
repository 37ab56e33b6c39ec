"""Guard an OpenAI-style client: ``guarded = guard_client(client, guard)``.

``guarded.chat.completions.create(**same kwargs)`` checks the prompt before the upstream call
and the response after it (for streams, window by window as the text grows, then once more in
full at the end). The guard acts at the call, never inside the HTTP transport: the SDK retries
and re-wraps transport exceptions, so a block raised there would be scanned several times and
reported as a connection error.

Works with ``openai.OpenAI`` / ``openai.AsyncOpenAI`` (responses stay SDK objects) and with
guardmerge's ``ChatClient`` / ``AsyncChatClient`` (dicts). Every verdict of a guarded call
(prompt and response, pass included) reaches ``on_verdict``; flags also reach ``on_flag``.
Everything except ``chat.completions.create`` passes through untouched; ``with_options``
returns a guarded client. ``chat.completions.with_raw_response`` / ``with_streaming_response``
are NOT guarded.
"""

from __future__ import annotations

import logging
import time
from dataclasses import replace
from typing import Any, AsyncIterator, Callable, Iterator, Literal, Mapping

from .exceptions import ConfigError, PromptBlockedError, ResponseBlockedError
from .guard import Guard
from .verdict import Action, Verdict

__all__ = ["guard_client", "GuardedClient", "AsyncGuardedClient"]

logger = logging.getLogger("guardmerge.client")

OnBlock = Literal["raise", "refuse"]
StreamMode = Literal["hold", "release"]
VerdictCallback = Callable[[Verdict], Any]


def _get(obj: Any, key: str, default: Any = None) -> Any:
    if isinstance(obj, Mapping):
        return obj.get(key, default)
    return getattr(obj, key, default)


def _to_dict(obj: Any) -> Any:
    if isinstance(obj, Mapping):
        return obj
    dump = getattr(obj, "model_dump", None)
    return dump(exclude_unset=False) if callable(dump) else obj


class _Core:
    """Everything the sync and async wrappers share: decisions, shapes, stream bookkeeping."""

    def __init__(self, guard: Guard, *, on_block: OnBlock, on_flag: VerdictCallback | None,
                 on_verdict: VerdictCallback | None, check_output: bool, stream_mode: StreamMode,
                 window_chars: int, overlap_chars: int, sdk_types: bool) -> None:
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

    # -- verdicts ----------------------------------------------------------------------------

    def note(self, verdict: Verdict) -> None:
        if self.on_verdict is not None:
            self.on_verdict(verdict)
        if verdict.action is Action.FLAG:
            logger.warning("guard flagged %s", verdict.summary())
            if self.on_flag is not None:
                self.on_flag(verdict)

    def refusal(self, model: str, verdict: Verdict) -> Any:
        payload = {
            "id": f"guardmerge-{int(time.time() * 1000)}", "object": "chat.completion",
            "created": int(time.time()), "model": model or "guardmerge",
            "choices": [{"index": 0, "finish_reason": "content_filter", "logprobs": None,
                         "message": {"role": "assistant", "content": self.guard.policy.refusal_message}}],
        }
        return self._shape(payload, "ChatCompletion")

    def _shape(self, payload: dict[str, Any], kind: str) -> Any:
        if not self.sdk_types:
            return payload
        from openai.types.chat import ChatCompletion, ChatCompletionChunk

        cls = ChatCompletion if kind == "ChatCompletion" else ChatCompletionChunk
        return cls.model_validate(payload)

    def input_outcome(self, kwargs: Mapping[str, Any], verdict: Verdict) -> Any:
        """None to go on; a refusal response; or raises PromptBlockedError."""
        self.note(verdict)
        if not verdict.blocked:
            return None
        if self.on_block == "raise":
            raise PromptBlockedError(verdict)
        if kwargs.get("stream"):
            return [self.end_chunk({"model": kwargs.get("model", "guardmerge")}, 0, False)]
        return self.refusal(str(kwargs.get("model", "")), verdict)

    def output_items(self, response: Any) -> list[dict[str, Any]]:
        """One item per choice: its content (and tool-call arguments if the policy asks)."""
        items = []
        for choice in _get(response, "choices", []) or []:
            message = _get(choice, "message") or {}
            parts = []
            content = _get(message, "content")
            if content:
                parts.append(content if isinstance(content, str) else str(content))
            refusal = _get(message, "refusal")
            if refusal:
                parts.append(str(refusal))
            if self.guard.policy.output.check_tool_calls:
                for call in _get(message, "tool_calls") or []:
                    fn = _get(call, "function") or {}
                    parts.append(f"{_get(fn, 'name', '')}({_get(fn, 'arguments', '')})")
            items.append({"role": "assistant", "content": "\n\n".join(parts)})
        return items

    def output_outcome(self, response: Any, verdict: Verdict) -> Any:
        self.note(verdict)
        if not verdict.blocked:
            return response
        if self.on_block == "raise":
            raise ResponseBlockedError(verdict)
        blocked = {f.message_index for f in verdict.findings if f.action is Action.BLOCK}
        if None in blocked:  # the guard itself failed: every choice is withheld
            blocked = set(range(len(_get(response, "choices", []) or [])))
        data = dict(_to_dict(response))
        choices = []
        for i, choice in enumerate(data.get("choices") or []):
            choice = dict(_to_dict(choice))
            if i in blocked:
                choice["finish_reason"] = "content_filter"
                choice["message"] = {"role": "assistant",
                                     "content": self.guard.policy.refusal_message}
            choices.append(choice)
        data["choices"] = choices
        if isinstance(response, Mapping):
            return data
        return type(response).model_validate(data)

    def end_chunk(self, last: Any, choice_index: int, released_text: bool) -> Any:
        delta = {} if released_text else {"role": "assistant",
                                          "content": self.guard.policy.refusal_message}
        payload = {"id": _get(last, "id", "guardmerge"), "object": "chat.completion.chunk",
                   "created": _get(last, "created", int(time.time())),
                   "model": _get(last, "model", "guardmerge"),
                   "choices": [{"index": choice_index, "delta": delta,
                                "finish_reason": "content_filter"}]}
        return self._shape(payload, "ChatCompletionChunk")


class _StreamState:
    """Sans-IO hold-back bookkeeping for one stream.

    ``feed(chunk)`` records a chunk; ``due()`` gives the text windows that must be checked now
    (one per choice whose unchecked text reached ``window_chars``); after they pass,
    ``release()`` gives the chunks the caller may see. In ``hold`` mode no chunk is released
    before all text it carries was checked; in ``release`` mode chunks go out at once.
    """

    def __init__(self, core: _Core) -> None:
        self.core = core
        self.held: list[Any] = []
        self.text: dict[int, str] = {}
        self.checked: dict[int, int] = {}
        self.released_text: dict[int, bool] = {}
        self.last: Any = None

    def feed(self, chunk: Any) -> None:
        self.last = chunk
        self.held.append(chunk)
        for choice in _get(chunk, "choices", []) or []:
            idx = int(_get(choice, "index", 0) or 0)
            delta = _get(choice, "delta") or {}
            piece = _get(delta, "content") or ""
            if self.core.guard.policy.output.check_tool_calls:
                for call in _get(delta, "tool_calls") or []:
                    piece += _get(_get(call, "function") or {}, "arguments", "") or ""
            if piece:
                self.text[idx] = self.text.get(idx, "") + piece

    def due(self, final: bool = False) -> list[tuple[int, str]]:
        out = []
        for idx, text in self.text.items():
            done = self.checked.get(idx, 0)
            if final:
                out.append((idx, text))  # the definitive check: the whole text, as non-streaming
            elif len(text) - done >= self.core.window_chars:
                out.append((idx, text[max(0, done - self.core.overlap_chars):]))
        return out

    def mark_checked(self) -> None:
        for idx, text in self.text.items():
            self.checked[idx] = len(text)

    def release(self) -> list[Any]:
        out, self.held = self.held, []
        for chunk in out:
            for choice in _get(chunk, "choices", []) or []:
                if _get(_get(choice, "delta") or {}, "content"):
                    self.released_text[int(_get(choice, "index", 0) or 0)] = True
        return out

    def record_check(self, checks: list[tuple[int, str]], verdict: Verdict) -> Verdict:
        """Record a finished check: findings name the choice (not the position in this batch),
        the checked text is marked, and flags reach the callback."""
        verdict.findings = [replace(f, message_index=checks[f.message_index][0])
                            if f.message_index is not None else f for f in verdict.findings]
        self.mark_checked()
        self.core.note(verdict)
        return verdict

    def blocked_tail(self, verdict: Verdict) -> list[Any]:
        """What the caller gets after a block in 'refuse' mode: one content_filter chunk per
        blocked choice (with the refusal text if none of that choice's text went out)."""
        self.held = []
        blocked = sorted({f.message_index for f in verdict.findings
                          if f.action is Action.BLOCK and f.message_index is not None} or {0})
        return [self.core.end_chunk(self.last, i, self.released_text.get(i, False))
                for i in blocked]


class GuardedStream:
    """A guarded sync stream: iterate it, ``close()`` it, or use it in ``with``."""

    def __init__(self, upstream: Any, core: _Core) -> None:
        self._upstream = upstream
        self._core = core
        self._state = _StreamState(core)
        self._iter = self._run()
        self.verdict: Verdict | None = None

    def _check(self, final: bool) -> Verdict | None:
        checks = self._state.due(final)
        if not checks:
            return None
        return self._state.record_check(checks, self._core.guard.check([t for _, t in checks], "output"))

    def _run(self) -> Iterator[Any]:
        state = self._state
        try:
            for chunk in self._upstream:
                state.feed(chunk)
                if self._core.stream_mode == "release":
                    yield from state.release()
                verdict = self._check(final=False)
                if verdict is not None and verdict.blocked:
                    yield from self._block(verdict)
                    return
                if verdict is not None or not state.text:
                    yield from state.release()
            verdict = self._check(final=True)
            self.verdict = verdict
            if verdict is not None and verdict.blocked:
                yield from self._block(verdict)
                return
            yield from state.release()
        finally:
            self._close_upstream()

    def _block(self, verdict: Verdict) -> Iterator[Any]:
        self.verdict = verdict
        self._close_upstream()
        if self._core.on_block == "raise":
            raise ResponseBlockedError(verdict)
        yield from self._state.blocked_tail(verdict)

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

    def __init__(self, upstream: Any, core: _Core) -> None:
        self._upstream = upstream
        self._core = core
        self._state = _StreamState(core)
        self._iter = self._run()
        self.verdict: Verdict | None = None

    async def _check(self, final: bool) -> Verdict | None:
        checks = self._state.due(final)
        if not checks:
            return None
        verdict = await self._core.guard.acheck([t for _, t in checks], "output")
        return self._state.record_check(checks, verdict)

    async def _run(self) -> AsyncIterator[Any]:
        state = self._state
        try:
            async for chunk in self._upstream:
                state.feed(chunk)
                if self._core.stream_mode == "release":
                    for c in state.release():
                        yield c
                verdict = await self._check(final=False)
                if verdict is not None and verdict.blocked:
                    async for c in self._block(verdict):
                        yield c
                    return
                if verdict is not None or not state.text:
                    for c in state.release():
                        yield c
            verdict = await self._check(final=True)
            self.verdict = verdict
            if verdict is not None and verdict.blocked:
                async for c in self._block(verdict):
                    yield c
                return
            for c in state.release():
                yield c
        finally:
            await self._close_upstream()

    async def _block(self, verdict: Verdict) -> AsyncIterator[Any]:
        self.verdict = verdict
        await self._close_upstream()
        if self._core.on_block == "raise":
            raise ResponseBlockedError(verdict)
        for c in self._state.blocked_tail(verdict):
            yield c

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


class _Passthrough:
    """Forwards every attribute to the wrapped object, except those a subclass defines."""

    def __init__(self, wrapped: Any) -> None:
        self._wrapped = wrapped

    def __getattr__(self, name: str) -> Any:
        return getattr(self._wrapped, name)


class _Completions(_Passthrough):
    def __init__(self, wrapped: Any, core: _Core) -> None:
        super().__init__(wrapped)
        self._core = core

    def create(self, **kwargs: Any) -> Any:
        core = self._core
        early = core.input_outcome(kwargs, core.guard.check(kwargs.get("messages") or [], "input"))
        if early is not None:
            return GuardedStream(iter(early), core) if kwargs.get("stream") else early
        result = self._wrapped.create(**kwargs)
        if not core.check_output:
            return result
        if kwargs.get("stream"):
            return GuardedStream(result, core)
        return core.output_outcome(result, core.guard.check(core.output_items(result), "output"))


class _AsyncCompletions(_Passthrough):
    def __init__(self, wrapped: Any, core: _Core) -> None:
        super().__init__(wrapped)
        self._core = core

    async def create(self, **kwargs: Any) -> Any:
        core = self._core
        verdict = await core.guard.acheck(kwargs.get("messages") or [], "input")
        early = core.input_outcome(kwargs, verdict)
        if early is not None:
            return AsyncGuardedStream(_aiter(early), core) if kwargs.get("stream") else early
        result = await self._wrapped.create(**kwargs)
        if not core.check_output:
            return result
        if kwargs.get("stream"):
            return AsyncGuardedStream(result, core)
        verdict = await core.guard.acheck(core.output_items(result), "output")
        return core.output_outcome(result, verdict)


class _Chat(_Passthrough):
    def __init__(self, wrapped: Any, completions: Any) -> None:
        super().__init__(wrapped)
        self.completions = completions


class GuardedClient(_Passthrough):
    """A guarded synchronous client; use it exactly like the client it wraps."""

    _completions_cls: type[_Passthrough] = _Completions

    def __init__(self, client: Any, core: _Core) -> None:
        super().__init__(client)
        self._core = core
        self.chat = _Chat(client.chat, self._completions_cls(client.chat.completions, core))

    def with_options(self, **options: Any) -> "GuardedClient":
        return type(self)(self._wrapped.with_options(**options), self._core)

    @property
    def wrapped(self) -> Any:
        """The unguarded client (for calls you deliberately do not guard)."""
        return self._wrapped


class AsyncGuardedClient(GuardedClient):
    """A guarded asynchronous client; ``await guarded.chat.completions.create(...)``."""

    _completions_cls = _AsyncCompletions


def _is_async(client: Any) -> bool:
    from ._http import AsyncChatClient

    if isinstance(client, AsyncChatClient):
        return True
    return any(cls.__name__.startswith("Async") and cls.__module__.startswith("openai")
               for cls in type(client).__mro__)


def guard_client(client: Any, guard: Guard, *, on_block: OnBlock = "raise",
                 on_flag: VerdictCallback | None = None,
                 on_verdict: VerdictCallback | None = None, check_output: bool = True,
                 stream_mode: StreamMode = "hold", window_chars: int = 2000,
                 overlap_chars: int = 200, is_async: bool | None = None) -> GuardedClient:
    """Wrap an OpenAI-style client so every chat completion goes through ``guard``.

    on_block: ``"raise"`` PromptBlockedError / ResponseBlockedError (with the verdict), or
        ``"refuse"``: return an OpenAI-shaped completion with ``finish_reason="content_filter"``
        and the policy's ``refusal_message`` (streams end with a ``content_filter`` chunk).
    on_flag: called with every flag verdict (flags are also logged); the call goes on.
    on_verdict: called with every verdict of every guarded call, in order: the prompt's, then
        the response's (for streams: each window's check and the final one). This is how a
        caller sees what the guard decided about a call that went through.
    stream_mode: ``"hold"`` (default): no text reaches the caller before the window holding it
        was checked (a hold-back of at most ``window_chars``); ``"release"``: chunks go out at
        once and are checked behind; weaker: up to one window of a blocked response is seen.
    """
    sdk_types = any(cls.__module__.startswith("openai") for cls in type(client).__mro__)
    core = _Core(guard, on_block=on_block, on_flag=on_flag, on_verdict=on_verdict,
                 check_output=check_output,
                 stream_mode=stream_mode, window_chars=window_chars, overlap_chars=overlap_chars,
                 sdk_types=sdk_types)
    if is_async if is_async is not None else _is_async(client):
        return AsyncGuardedClient(client, core)
    return GuardedClient(client, core)
