"""A small OpenAI-compatible chat-completions client over httpx, with bounded tenacity retries.

``ChatClient(base_url).chat.completions.create(model=..., messages=[...])`` returns the parsed
JSON body (a dict); with ``stream=True`` it returns a ``ChatStream`` of chunk dicts parsed from
server-sent events. Retries: connection errors, timeouts, 408 / 409 / 429 / 5xx, with
exponential backoff and jitter, honouring ``Retry-After`` (seconds or an HTTP date, and
``retry-after-ms``) up to ``retry_after_max``; a value that is garbage, negative, not finite or
larger than that falls back to the backoff. Always bounded by ``max_attempts`` and
``max_retry_time``. Other 4xx raise ``UpstreamError`` at once, with the
status and body. A stream is retried only until its first byte; a connection dropped mid-stream,
a stream that ends without ``[DONE]`` and malformed JSON raise ``UpstreamError``.
"""

from __future__ import annotations

import email.utils
import inspect
import json
import logging
import math
import random
import time
from datetime import timezone
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Callable, Iterator, Mapping

import httpx
import tenacity

from .exceptions import ConfigError, UpstreamError, UpstreamTimeout

__all__ = ["ChatClient", "AsyncChatClient", "ChatStream", "AsyncChatStream", "RetryPolicy"]

logger = logging.getLogger("guardmerge.http")

RETRY_STATUSES = frozenset({408, 409, 429, 500, 502, 503, 504})
_BODY_LIMIT = 2000


class _Retryable(Exception):
    """Internal: an attempt failed in a way worth retrying."""

    def __init__(self, error: UpstreamError, retry_after: float | None = None) -> None:
        self.error = error
        self.retry_after = retry_after
        super().__init__(str(error))


@dataclass(frozen=True)
class RetryPolicy:
    """How hard to try: at most ``max_attempts`` tries and ``max_retry_time`` seconds of retrying.

    ``retry_after_max``: the longest ``Retry-After`` honoured; a longer one (or garbage) is
    ignored and the backoff applies. A honoured one that would outlast ``max_retry_time`` ends
    the retries at once instead of sleeping in vain.
    ``sleep``: what waits between attempts (default ``time.sleep`` / ``asyncio.sleep``); tests
    pass a recorder so retries run deterministically and instantly.
    """

    max_attempts: int = 4
    max_retry_time: float = 30.0
    backoff_initial: float = 0.5
    backoff_max: float = 8.0
    jitter: float = 0.5
    retry_after_max: float = 60.0
    sleep: Callable[[float], Any] | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ConfigError(f"max_attempts: must be >= 1, got {self.max_attempts}")
        if self.max_retry_time < 0 or self.backoff_initial < 0 or self.retry_after_max < 0:
            raise ConfigError("max_retry_time, backoff_initial and retry_after_max must be >= 0")

    def _after(self, state: tenacity.RetryCallState) -> float | None:
        """The server's Retry-After for this failure, if there is one worth honouring."""
        exc = state.outcome.exception() if state.outcome else None
        after = exc.retry_after if isinstance(exc, _Retryable) else None
        return after if after is not None and after <= self.retry_after_max else None

    def wait(self, state: tenacity.RetryCallState) -> float:
        after = self._after(state)
        if after is None:
            after = min(self.backoff_max, self.backoff_initial * 2 ** (state.attempt_number - 1))
            after += random.uniform(0, self.jitter * after)
        remaining = self.max_retry_time - (time.monotonic() - state.start_time)
        return max(0.0, min(after, remaining))

    def stop(self, state: tenacity.RetryCallState) -> bool:
        if state.attempt_number >= self.max_attempts:
            return True
        elapsed = time.monotonic() - state.start_time
        after = self._after(state)
        # a server asking us to wait past the budget: give up now rather than sleep in vain
        return elapsed >= self.max_retry_time or (
            after is not None and elapsed + after > self.max_retry_time)

    def _kwargs(self, *, asynchronous: bool = False) -> dict[str, Any]:
        kwargs: dict[str, Any] = {"stop": self.stop, "wait": self.wait, "reraise": True,
                                  "retry": tenacity.retry_if_exception_type(_Retryable),
                                  "before_sleep": _log_retry}
        if self.sleep is not None:
            sleep = self.sleep
            if asynchronous:
                async def asleep(seconds: float) -> None:
                    result = sleep(seconds)
                    if inspect.isawaitable(result):
                        await result

                kwargs["sleep"] = asleep
            else:
                kwargs["sleep"] = sleep
        return kwargs


def _log_retry(state: tenacity.RetryCallState) -> None:
    exc = state.outcome.exception() if state.outcome else None
    logger.warning("upstream attempt %d failed (%s); retrying in %.2fs", state.attempt_number,
                   exc, state.next_action.sleep if state.next_action else 0.0)


def _seconds(value: str, scale: float = 1.0) -> float | None:
    try:
        seconds = float(value) * scale
    except ValueError:
        return None
    return seconds if math.isfinite(seconds) and seconds >= 0 else None


def _retry_after(headers: httpx.Headers) -> float | None:
    """Seconds the server asks us to wait: ``retry-after-ms``, or ``Retry-After`` as seconds or
    an HTTP date (a date in the past is 0). None for a missing or unreadable value."""
    ms = headers.get("retry-after-ms")
    if ms and _seconds(ms, 1e-3) is not None:
        return _seconds(ms, 1e-3)
    value = (headers.get("retry-after") or "").strip()
    if not value:
        return None
    seconds = _seconds(value)
    if seconds is not None:
        return seconds
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if when.tzinfo is None:  # "-0000": UTC, by RFC 5322
        when = when.replace(tzinfo=timezone.utc)
    try:
        return max(0.0, when.timestamp() - time.time())
    except (OverflowError, OSError, ValueError):
        return None


def _check_status(response: httpx.Response, body: str) -> None:
    if response.status_code < 400:
        return
    error = UpstreamError(f"upstream returned HTTP {response.status_code}: {body[:300]}",
                          status=response.status_code, body=body[:_BODY_LIMIT])
    if response.status_code in RETRY_STATUSES:
        raise _Retryable(error, _retry_after(response.headers))
    raise error


def _transport_error(exc: httpx.HTTPError) -> _Retryable:
    if isinstance(exc, httpx.TimeoutException):
        return _Retryable(UpstreamTimeout(f"upstream timed out ({type(exc).__name__})"))
    return _Retryable(UpstreamError(f"upstream connection failed: {type(exc).__name__}: {exc}"))


def _stream_error(exc: httpx.HTTPError) -> UpstreamError:
    if isinstance(exc, httpx.TimeoutException):
        return UpstreamTimeout(f"upstream stream timed out ({type(exc).__name__})")
    return UpstreamError(f"upstream connection dropped mid-stream: {type(exc).__name__}: {exc}")


def _parse_json(body: str) -> Any:
    try:
        return json.loads(body)
    except json.JSONDecodeError as exc:
        raise UpstreamError(f"upstream sent malformed JSON: {exc}", body=body[:_BODY_LIMIT]) from exc


def _final(exc: _Retryable, attempts: int) -> UpstreamError:
    err = exc.error
    err.attempts = attempts
    if attempts > 1:
        err.args = (f"{err.args[0]} (after {attempts} attempts)",)
    return err


class _SSEParser:
    """Server-sent events -> JSON payloads; ``done`` once ``data: [DONE]`` arrived."""

    def __init__(self) -> None:
        self.data: list[str] = []
        self.done = False

    def feed(self, line: str) -> Any | None:
        if line == "":
            if not self.data:
                return None
            payload = "\n".join(self.data)
            self.data = []
            if payload.strip() == "[DONE]":
                self.done = True
                return None
            event = _parse_json(payload)
            if isinstance(event, dict) and "error" in event:
                raise UpstreamError(f"upstream stream error: {event['error']}", body=payload[:_BODY_LIMIT])
            return event
        if line.startswith(":"):
            return None
        field, _, value = line.partition(":")
        if field == "data":
            self.data.append(value[1:] if value.startswith(" ") else value)
        return None

    def finish(self) -> Any | None:
        """At the end of the body: flush a last event; a stream without ``[DONE]`` was cut."""
        event = self.feed("")
        if not self.done:
            raise UpstreamError("upstream stream ended before [DONE] (connection dropped?)")
        return event


def _request_body(kwargs: Mapping[str, Any]) -> dict[str, Any]:
    body = {k: v for k, v in kwargs.items() if v is not None}
    if "model" not in body or "messages" not in body:
        raise TypeError("create() needs model= and messages=")
    return body


class _Base:
    def __init__(self, base_url: str, api_key: str | None, retry: RetryPolicy | None,
                 headers: Mapping[str, str] | None) -> None:
        self.retry = retry or RetryPolicy()
        self._headers = {"Accept": "application/json", **(headers or {})}
        if api_key:
            self._headers["Authorization"] = f"Bearer {api_key}"
        self._base_url = base_url.rstrip("/")


class ChatStream:
    """Iterator of chunk dicts; ``close()`` (or ``with``) releases the connection."""

    def __init__(self, response: httpx.Response) -> None:
        self.response = response
        self._iter = self._events()

    def _events(self) -> Iterator[dict[str, Any]]:
        parser = _SSEParser()
        try:
            for line in self.response.iter_lines():
                event = parser.feed(line)
                if event is not None:
                    yield event
                if parser.done:
                    return
            event = parser.finish()
            if event is not None:
                yield event
        except httpx.HTTPError as exc:
            raise _stream_error(exc) from exc
        finally:
            self.response.close()

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return self._iter

    def __next__(self) -> dict[str, Any]:
        return next(self._iter)

    def close(self) -> None:
        self._iter.close()
        self.response.close()

    def __enter__(self) -> "ChatStream":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class ChatClient(_Base):
    """Synchronous client. ``client.chat.completions.create(**kwargs)`` like the OpenAI SDK."""

    def __init__(self, base_url: str, api_key: str | None = None, *,
                 timeout: float | httpx.Timeout = 60.0, retry: RetryPolicy | None = None,
                 headers: Mapping[str, str] | None = None,
                 transport: httpx.BaseTransport | None = None) -> None:
        super().__init__(base_url, api_key, retry, headers)
        self._http = httpx.Client(timeout=timeout, headers=self._headers, transport=transport)
        self.chat = _Namespace(completions=_Namespace(create=self.create_chat_completion))

    def create_chat_completion(self, **kwargs: Any) -> "dict[str, Any] | ChatStream":
        body = _request_body(kwargs)
        stream = bool(body.get("stream"))
        url = f"{self._base_url}/chat/completions"
        state = {"attempts": 0}

        def attempt() -> Any:
            state["attempts"] += 1
            try:
                request = self._http.build_request("POST", url, json=body)
                response = self._http.send(request, stream=stream)
            except httpx.HTTPError as exc:
                raise _transport_error(exc) from exc
            if stream:
                if response.status_code >= 400:
                    text = response.read().decode("utf-8", "replace")
                    response.close()
                    _check_status(response, text)
                return ChatStream(response)
            _check_status(response, response.text)
            return _parse_json(response.text)

        try:
            return tenacity.Retrying(**self.retry._kwargs())(attempt)
        except _Retryable as exc:
            raise _final(exc, state["attempts"]) from None

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> "ChatClient":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class AsyncChatStream:
    """Async iterator of chunk dicts; ``await close()`` releases the connection."""

    def __init__(self, response: httpx.Response) -> None:
        self.response = response
        self._iter = self._events()

    async def _events(self) -> AsyncIterator[dict[str, Any]]:
        parser = _SSEParser()
        try:
            async for line in self.response.aiter_lines():
                event = parser.feed(line)
                if event is not None:
                    yield event
                if parser.done:
                    return
            event = parser.finish()
            if event is not None:
                yield event
        except httpx.HTTPError as exc:
            raise _stream_error(exc) from exc
        finally:
            await self.response.aclose()

    def __aiter__(self) -> AsyncIterator[dict[str, Any]]:
        return self._iter

    async def __anext__(self) -> dict[str, Any]:
        return await self._iter.__anext__()

    async def close(self) -> None:
        await self._iter.aclose()
        await self.response.aclose()

    async def __aenter__(self) -> "AsyncChatStream":
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()


class AsyncChatClient(_Base):
    """Asynchronous client with the same interface (``await ...create(**kwargs)``)."""

    def __init__(self, base_url: str, api_key: str | None = None, *,
                 timeout: float | httpx.Timeout = 60.0, retry: RetryPolicy | None = None,
                 headers: Mapping[str, str] | None = None,
                 transport: httpx.AsyncBaseTransport | None = None) -> None:
        super().__init__(base_url, api_key, retry, headers)
        self._http = httpx.AsyncClient(timeout=timeout, headers=self._headers, transport=transport)
        self.chat = _Namespace(completions=_Namespace(create=self.create_chat_completion))

    async def create_chat_completion(self, **kwargs: Any) -> "dict[str, Any] | AsyncChatStream":
        body = _request_body(kwargs)
        stream = bool(body.get("stream"))
        url = f"{self._base_url}/chat/completions"
        state = {"attempts": 0}

        async def attempt() -> Any:
            state["attempts"] += 1
            try:
                request = self._http.build_request("POST", url, json=body)
                response = await self._http.send(request, stream=stream)
            except httpx.HTTPError as exc:
                raise _transport_error(exc) from exc
            if stream:
                if response.status_code >= 400:
                    text = (await response.aread()).decode("utf-8", "replace")
                    await response.aclose()
                    _check_status(response, text)
                return AsyncChatStream(response)
            _check_status(response, response.text)
            return _parse_json(response.text)

        try:
            return await tenacity.AsyncRetrying(**self.retry._kwargs(asynchronous=True))(attempt)
        except _Retryable as exc:
            raise _final(exc, state["attempts"]) from None

    async def close(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> "AsyncChatClient":
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()


class _Namespace:
    def __init__(self, **attrs: Any) -> None:
        self.__dict__.update(attrs)
