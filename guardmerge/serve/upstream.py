"""The upstream LLM, over one pooled ``httpx.AsyncClient`` per app.

``send`` posts a JSON body (or sends a GET) and returns the upstream's status, headers and
body; ``stream`` opens a streamed response and returns an ``EventStream``: an async iterator
of the server-sent events' JSON payloads (parsed by the client's own SSE parser), whose
``aclose()`` closes the upstream connection. A connection that fails, a timeout, a body that
is not JSON or a stream cut before its end raise ``UpstreamError`` / ``UpstreamTimeout``,
which the app answers with 502 / 504. The proxy does not retry: the client's SDK retries
502 / 503 / 504 on its own, and a retry here would multiply behind it.

The client's connections are split into pools of at most ``SHARD_CONNECTIONS`` (``Shards``,
the client's transport): httpcore's pool does work in proportion to its connections on every
request and every response close (it polls each idle socket), and at 64 concurrent requests
one pool of 64 held a bare relay to ~95 req/s where 16-connection pools gave ~290 (measured
with ``guardmerge bench serve``'s load generator). A request goes to the pool with the fewest
requests in flight that has room (the first on a tie), so light traffic keeps reusing the
first pool's connections; when every connection is busy it waits for the first to come free.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
from typing import Any, AsyncIterator, Mapping

import httpx

from .._http import _SSEParser
from ..exceptions import UpstreamError, UpstreamTimeout

__all__ = ["EventStream", "Shards", "Upstream", "UpstreamReply"]

#: connections per httpcore pool (see the module docstring)
SHARD_CONNECTIONS = 16

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


class _Counted(httpx.AsyncByteStream):
    """A response body that tells its pool's counter when it is closed (once)."""

    def __init__(self, stream: httpx.AsyncByteStream, done: Any) -> None:
        self._stream = stream
        self._done = done

    async def __aiter__(self) -> AsyncIterator[bytes]:
        async for chunk in self._stream:
            yield chunk

    async def aclose(self) -> None:
        try:
            await self._stream.aclose()
        finally:
            done, self._done = self._done, None
            if done is not None:
                done()


class Shards(httpx.AsyncBaseTransport):
    """``max_connections`` split over pools of at most ``per_pool`` (``httpx`` transports).
    A request waits (up to its pool timeout) until fewer than ``max_connections`` are in
    flight, then goes to the pool with the fewest in flight that has room (the first on a
    tie); closing its response gives the slot back. One event loop, as httpcore's pool."""

    def __init__(self, max_connections: int, per_pool: int = SHARD_CONNECTIONS) -> None:
        if max_connections < 1 or per_pool < 1:
            raise ValueError("max_connections and per_pool must be >= 1")
        n = math.ceil(max_connections / per_pool)
        sizes = [max_connections // n + (i < max_connections % n) for i in range(n)]
        # one for all pools (each costs ~17 ms to build), made as httpx makes its own
        tls = httpx.create_ssl_context(verify=True, trust_env=False)
        self.pools = [httpx.AsyncHTTPTransport(verify=tls, trust_env=False, limits=httpx.Limits(
            max_connections=size, max_keepalive_connections=size)) for size in sizes]
        self.sizes = sizes
        self.in_flight = [0] * n
        self._slots = asyncio.Semaphore(max_connections)

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if self._slots.locked():
            await self._wait_for_slot(request)
        else:
            await self._slots.acquire()  # a slot is free: returns at once
        i = min((k for k in range(len(self.pools)) if self.in_flight[k] < self.sizes[k]),
                key=self.in_flight.__getitem__)
        self.in_flight[i] += 1

        def done() -> None:
            self.in_flight[i] -= 1
            self._slots.release()

        try:
            response = await self.pools[i].handle_async_request(request)
            response.stream = _Counted(response.stream, done)  # type: ignore[arg-type]
        except BaseException:
            done()
            raise
        return response

    async def _wait_for_slot(self, request: httpx.Request) -> None:
        """Wait for a slot up to the request's pool timeout (``httpx.PoolTimeout`` after). A
        slot granted just as the wait ends (timeout or cancellation) is given back."""
        wait = (request.extensions.get("timeout") or {}).get("pool")
        task = asyncio.ensure_future(self._slots.acquire())
        try:
            await asyncio.wait({task}, timeout=wait)
        except BaseException:
            self._abandon(task)
            raise
        if task.done():  # acquired (nothing else cancels it; acquire raises nothing else)
            return
        self._abandon(task)
        raise httpx.PoolTimeout("no upstream connection came free within the pool timeout",
                                request=request)

    def _abandon(self, task: "asyncio.Future[Any]") -> None:
        def give_back(t: "asyncio.Future[Any]") -> None:
            if not t.cancelled() and t.exception() is None:
                self._slots.release()

        if task.done():
            give_back(task)
        else:
            task.cancel()
            task.add_done_callback(give_back)

    async def aclose(self) -> None:
        errors = []
        for pool in self.pools:
            try:
                await pool.aclose()
            except Exception as exc:  # close every pool, then report the first failure
                errors.append(exc)
        if errors:
            raise errors[0]


class Upstream:
    """One pooled client for the app's lifetime (``await aclose()`` at shutdown); its
    connections in pools of at most ``SHARD_CONNECTIONS`` (``Shards``) unless a
    ``transport`` is given."""

    def __init__(self, base_url: str, *, timeout: float, connect_timeout: float,
                 max_connections: int, transport: httpx.AsyncBaseTransport | None = None,
                 metrics: Any = None) -> None:
        self.base_url = base_url.rstrip("/")
        self.metrics = metrics
        self.client = httpx.AsyncClient(
            timeout=httpx.Timeout(timeout, connect=connect_timeout),
            transport=Shards(max_connections) if transport is None else transport,
            follow_redirects=False,
            trust_env=False)

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
