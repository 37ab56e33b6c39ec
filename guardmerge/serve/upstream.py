"""The upstream LLM, over one pooled ``httpx.AsyncClient`` per app.

``send`` posts a JSON body (or sends a GET) and returns the upstream's status, headers and
body; ``stream`` opens a streamed response and returns an ``EventStream``: an async iterator
of the server-sent events' JSON payloads (parsed by the client's own SSE parser), whose
``aclose()`` closes the upstream connection. A connection that fails, a timeout, a body that
is not JSON or a stream cut before its end raise ``UpstreamError`` / ``UpstreamTimeout``,
which the app answers with 502 / 504. The proxy does not retry: the client's SDK retries
502 / 503 / 504 on its own, and a retry here would multiply behind it.
"""

from __future__ import annotations

import json
import time
from typing import Any, AsyncIterator, Mapping

import httpx

from .._http import _SSEParser
from ..exceptions import UpstreamError, UpstreamTimeout

__all__ = ["EventStream", "Upstream", "UpstreamReply"]

#: Responses API streams end with one of these events, and no ``[DONE]``
_TERMINAL = frozenset({"response.completed", "response.incomplete", "response.failed",
                       "error"})


class UpstreamReply:
    """A complete upstream response: ``status``, ``headers``, ``body`` (bytes)."""

    def __init__(self, status: int, headers: httpx.Headers, body: bytes) -> None:
        self.status = status
        self.headers = headers
        self.body = body

    def json(self) -> Any:
        try:
            return json.loads(self.body)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise UpstreamError("upstream sent a body that is not JSON") from exc


def _error(exc: httpx.HTTPError) -> UpstreamError:
    if isinstance(exc, httpx.TimeoutException):
        return UpstreamTimeout(f"upstream timed out ({type(exc).__name__})")
    return UpstreamError(f"upstream unreachable ({type(exc).__name__})")


class EventStream:
    """The JSON payloads of an upstream event stream; ``aclose()`` closes the connection."""

    def __init__(self, response: httpx.Response, *, needs_done: bool) -> None:
        self.response = response
        self.status = response.status_code
        self.headers = response.headers
        self._needs_done = needs_done
        self._iter = self._events()

    async def _events(self) -> AsyncIterator[Any]:
        parser = _SSEParser()
        last_type = None
        try:
            async for line in self.response.aiter_lines():
                event = parser.feed(line)
                if event is not None:
                    last_type = event.get("type") if isinstance(event, dict) else None
                    yield event
                if parser.done:
                    return
            event = parser.feed("")  # the body ended: flush a last event
            if event is not None:
                last_type = event.get("type") if isinstance(event, dict) else None
                yield event
            if self._needs_done or last_type not in _TERMINAL:
                raise UpstreamError("upstream stream ended before its end (connection "
                                    "dropped?)")
        except httpx.HTTPError as exc:
            raise _error(exc) from exc
        finally:
            await self.response.aclose()

    def __aiter__(self) -> AsyncIterator[Any]:
        return self._iter

    async def __anext__(self) -> Any:
        return await self._iter.__anext__()

    async def aclose(self) -> None:
        await self._iter.aclose()
        await self.response.aclose()


class Upstream:
    """One pooled client for the app's lifetime (``await aclose()`` at shutdown)."""

    def __init__(self, base_url: str, *, timeout: float, connect_timeout: float,
                 max_connections: int, transport: httpx.AsyncBaseTransport | None = None,
                 metrics: Any = None) -> None:
        self.base_url = base_url.rstrip("/")
        self.metrics = metrics
        self.client = httpx.AsyncClient(
            timeout=httpx.Timeout(timeout, connect=connect_timeout),
            limits=httpx.Limits(max_connections=max_connections,
                                max_keepalive_connections=max_connections),
            transport=transport, follow_redirects=False, trust_env=False)

    def _url(self, path: str) -> str:
        return self.base_url + path

    def _observe(self, route: str, start: float) -> None:
        if self.metrics is not None:
            self.metrics.upstream_latency.labels(route=route).observe(time.monotonic() - start)

    def _failed(self, exc: httpx.HTTPError) -> UpstreamError:
        error = _error(exc)
        if self.metrics is not None:
            kind = "timeout" if isinstance(error, UpstreamTimeout) else "connect"
            self.metrics.upstream_errors.labels(kind=kind).inc()
        return error

    async def send(self, method: str, path: str, route: str, *, headers: Mapping[str, str],
                   body: Any = None, params: Any = None) -> UpstreamReply:
        start = time.monotonic()
        try:
            request = self.client.build_request(
                method, self._url(path), headers=headers, params=params,
                content=None if body is None else json.dumps(body).encode())
            response = await self.client.send(request)
        except httpx.HTTPError as exc:
            raise self._failed(exc) from exc
        self._observe(route, start)
        return UpstreamReply(response.status_code, response.headers, response.content)

    async def stream(self, path: str, route: str, *, headers: Mapping[str, str],
                     body: Any, needs_done: bool) -> EventStream | UpstreamReply:
        """An ``EventStream``, or (the upstream answered an error) the whole ``UpstreamReply``."""
        start = time.monotonic()
        try:
            request = self.client.build_request("POST", self._url(path), headers=headers,
                                                content=json.dumps(body).encode())
            response = await self.client.send(request, stream=True)
        except httpx.HTTPError as exc:
            raise self._failed(exc) from exc
        self._observe(route, start)
        if response.status_code >= 400 or \
                not response.headers.get("content-type", "").startswith("text/event-stream"):
            try:
                content = await response.aread()
            except httpx.HTTPError as exc:
                raise self._failed(exc) from exc
            finally:
                await response.aclose()
            return UpstreamReply(response.status_code, response.headers, content)
        return EventStream(response, needs_done=needs_done)

    async def aclose(self) -> None:
        await self.client.aclose()
