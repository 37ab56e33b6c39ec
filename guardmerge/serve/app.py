"""The ASGI app: a thin Starlette shell over one ``GuardService`` and one ``Upstream``.

Routes (every other method and path is 404: an unguarded pass-through would be a bypass;
``passthrough`` in the config lists the ones you allow, explicitly):

- ``POST /v1/chat/completions``, ``/v1/completions``, ``/v1/responses``: guarded as the
  client wrapper guards them, by the wrapper's own adapters and stream driver. Bodies are
  plain JSON objects: unknown fields pass through untouched.
- ``GET /v1/models``, ``GET /v1/models/{model}``: passed through (no text). A pass-through
  path parameter (the model id, a ``passthrough`` route's) must be one safe segment
  (``config.SAFE_SEGMENT``: never ``.`` / ``..``, an encoded slash, ``?``, ``#``) and is
  percent-encoded upstream; anything else is this proxy's 404, never another upstream route.
- ``POST /v1/guard/check``: ``{"messages": [...], "direction": "input"}`` -> the verdict.
- ``POST /beta/litellm_basic_guardrail_api``: LiteLLM's Generic Guardrail API.
- ``GET /healthz`` (the process is up), ``/readyz`` (the model is loaded and one warm-up
  batch ran), ``/metrics`` (Prometheus text).

Answers follow what OpenAI clients already handle: a blocked prompt is 400 with the OpenAI
error envelope, ``code: content_filter``, ``param`` the field that carried it
(``messages``, ``prompt``, ``input``) and ``x-should-retry: false`` (never a 5xx: the SDK
retries those); a blocked response is 200 with ``finish_reason: content_filter`` and the
policy's refusal text (Responses: ``status: incomplete``); a guard that failed, timed out,
is overloaded or not ready yet is 503 with ``Retry-After`` (fail closed, under the default
``on_error: block``); an upstream that cannot be reached is 502, one that timed out 504,
with an OpenAI error body; an upstream's own error status and body are relayed as they are.
A malformed request (``API.invalid``: a field of the wrong type, named in ``param``) is 400
and never goes upstream; a field the guard does not read that holds text is 400
``unguarded_parameter`` (the wrapper refuses it too); a body over ``max_body_bytes`` is 413.
A client that disconnects stops its work: a queued check is dropped, an upstream request or
stream is closed, and the request is recorded as 499 (never as a verdict).

Verdict detail (``server.verdict_detail``, decided here: a per-request switch would let
any caller ask for more, so it is the operator's): the default ``findings`` returns what the
issue asks for, in ``/v1/guard/check`` and under ``error.verdict`` of a blocked prompt: the
action and each finding (head, label, its score and threshold, message index, character
``span``; never text). That is an oracle an attacker can tune a prompt against, so ``action``
returns only the action and direction (and LiteLLM's ``blocked_reason`` names no head or
score); ``scores`` adds every head's scores for every text (``Guard(include_scores=True)``),
for trusted callers only.

Auth: by default the client's ``Authorization`` header goes upstream unchanged. With keys in
``$GUARDMERGE_API_KEYS`` (``keys_env``) the proxy requires one of them (constant-time
compare; 401 otherwise) and never forwards it; a key in ``$GUARDMERGE_UPSTREAM_API_KEY``
(``upstream_key_env``) is sent upstream instead of the client's. Logs and metrics carry
routes, statuses and timings only: never a key, a header or text.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import os
import time
import traceback
import uuid
from urllib.parse import quote
from typing import Any, AsyncIterator, Awaitable, Callable, Mapping

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from .._apis import API, CHAT, COMPLETIONS, RESPONSES, _invalid_messages
from ..client import AsyncGuardedStream
from ..exceptions import (ResponseBlockedError, UnguardedCallError, UpstreamError,
                          UpstreamTimeout, error_detail)
from ..guard import Guard
from ..verdict import Verdict
from .batcher import Batcher
from .config import _PARAM, SAFE_SEGMENT, ServeOptions
from .metrics import CONTENT_TYPE, Metrics
from .service import GuardService, guard_failed
from .upstream import EventStream, Upstream, UpstreamReply

__all__ = ["create_app", "load_guard"]

logger = logging.getLogger("guardmerge.serve.app")
access_logger = logging.getLogger("guardmerge.serve.access")

_FORWARD_REQUEST = ("openai-organization", "openai-project", "openai-beta")
_RELAY_RESPONSE = ("x-request-id", "openai-processing-ms", "openai-version",
                   "openai-organization", "retry-after", "retry-after-ms")
_WARM_UP = "guardmerge warm-up"
_PARSE_INLINE = 256 * 1024  # bodies at least this large are parsed in a worker thread
_DISCONNECTED = "guardmerge.disconnected"  # scope key: the client left before its answer


def mark_disconnected(scope: Any, metrics: Metrics) -> None:
    if not scope.get(_DISCONNECTED):
        scope[_DISCONNECTED] = True
        metrics.disconnects.inc()


def load_guard(options: ServeOptions) -> Guard:
    """The guard ``options`` describe (bundle, policy, dtype, threads, cache), loaded."""
    from ..classifier import BundleClassifier, RuntimeOptions
    from ..policy import Policy

    options.require("bundle", "policy")
    policy = Policy.load(options.policy)  # type: ignore[arg-type]
    runtime = RuntimeOptions(dtype=options.dtype, threads=options.threads,  # type: ignore[arg-type]
                             batch_size=options.max_batch_windows)
    classifier = BundleClassifier.from_pretrained(options.bundle, options=runtime)  # type: ignore[arg-type]
    return Guard(classifier, policy, cache_size=options.cache_size,
                 include_scores=options.verdict_detail == "scores")


def _error(status: int, message: str, kind: str, *, code: str | None = None,
           param: str | None = None, headers: Mapping[str, str] | None = None,
           extra: Mapping[str, Any] | None = None) -> JSONResponse:
    """The OpenAI error envelope."""
    body = {"error": {"message": message, "type": kind, "param": param, "code": code,
                      **(extra or {})}}
    return JSONResponse(body, status_code=status, headers=dict(headers or {}))


def not_found_response() -> JSONResponse:
    return _error(404, "unknown route: this proxy serves only the routes it guards",
                  "invalid_request_error", code="not_found")


def _bind(endpoint: Callable[[Request, str], Awaitable[Response]],
          template: str) -> Callable[[Request], Awaitable[Response]]:
    async def bound(request: Request) -> Response:
        return await endpoint(request, template)

    return bound


def _forward_path(template: str, params: Mapping[str, Any]) -> str | None:
    """The upstream path (without ``/v1``) of a pass-through route: ``template`` with each
    parameter percent-encoded, or None when one is not a single safe path segment (``..``,
    an encoded slash, a query...: a path that could reach another upstream route)."""
    def fill(match: Any) -> str:
        value = str(params.get(match.group(1), ""))
        if not SAFE_SEGMENT.fullmatch(value):
            raise LookupError
        return quote(value, safe="")

    try:
        path = _PARAM.sub(fill, template)
    except LookupError:
        return None
    return path[len("/v1"):] if path.startswith("/v1/") else path


def _invalid(param: str, message: str, code: str = "invalid_type") -> JSONResponse:
    """400 for a malformed request (the OpenAI envelope, ``param`` the field)."""
    return _error(400, message, "invalid_request_error", code=code, param=param)


def _upstream_error(exc: UpstreamError) -> JSONResponse:
    if isinstance(exc, UpstreamTimeout):
        return _error(504, "the upstream model timed out", "server_error",
                      code="upstream_timeout")
    return _error(502, "the upstream model could not be reached or sent a bad answer",
                  "server_error", code="upstream_unavailable")


def _relay_headers(headers: Mapping[str, str]) -> dict[str, str]:
    return {k: v for k, v in headers.items()
            if k.lower() in _RELAY_RESPONSE or k.lower().startswith("x-ratelimit-")}


def _relay(reply: UpstreamReply) -> Response:
    """An upstream answer, status and body as they came."""
    return Response(reply.body, status_code=reply.status,
                    media_type=reply.headers.get("content-type", "application/json"),
                    headers=_relay_headers(reply.headers))


async def _watch_disconnect(receive: Callable[[], Awaitable[Any]]) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return


class _EventStreamResponse(StreamingResponse):
    """Server-sent events whose body stops as soon as the client disconnects: the body
    iterator is cancelled once (asyncio, edge-triggered: its cleanup closes the upstream)."""

    media_type = "text/event-stream"

    def __init__(self, content: Any, *, on_disconnect: Callable[[Any], None],
                 headers: Mapping[str, str] | None = None) -> None:
        super().__init__(content, headers={"cache-control": "no-cache", **(headers or {})})
        self._on_disconnect = on_disconnect

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        task = asyncio.ensure_future(self.stream_response(send))
        watcher = asyncio.ensure_future(_watch_disconnect(receive))
        try:
            await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
            if not task.done():
                self._on_disconnect(scope)
                task.cancel()
            with contextlib.suppress(asyncio.CancelledError, OSError):
                await task
        finally:
            watcher.cancel()
            if not task.done():
                task.cancel()
            close = getattr(self.body_iterator, "aclose", None)
            if close is not None:
                await close()


def _sse(item: Any, api: API) -> bytes:
    data = json.dumps(item, separators=(",", ":"), ensure_ascii=False)
    if api is RESPONSES and isinstance(item, Mapping) and isinstance(item.get("type"), str):
        return f"event: {item['type']}\ndata: {data}\n\n".encode()
    return f"data: {data}\n\n".encode()


class _State:
    """What the routes share: options, metrics, the upstream, the guard (once loaded)."""

    def __init__(self, options: ServeOptions, guard: Guard | None,
                 transport: Any, environ: Mapping[str, str] | None) -> None:
        self.options = options
        self.metrics = Metrics()
        self.guard = guard
        self.transport = transport
        self.keys = options.proxy_keys(environ)
        self.upstream_key = options.upstream_key(environ)
        self.replica = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.service: GuardService | None = None
        self.batcher: Batcher | None = None
        self.upstream: Upstream | None = None
        self.ready = False
        self.load_error: str | None = None

    # -- start-up ----------------------------------------------------------------------------

    async def start(self) -> None:
        opts = self.options
        self.upstream = Upstream(opts.upstream or "http://upstream.invalid/v1",
                                 timeout=opts.upstream_timeout,
                                 connect_timeout=opts.upstream_connect_timeout,
                                 max_connections=opts.upstream_max_connections,
                                 transport=self.transport, metrics=self.metrics)
        try:
            guard = self.guard if self.guard is not None else \
                await asyncio.to_thread(load_guard, opts)
            batcher = Batcher(guard.classifier, enabled=opts.batching,
                              max_windows=opts.max_batch_windows,
                              max_tokens=opts.max_batch_tokens,
                              max_wait=opts.max_wait_ms / 1000.0, max_queue=opts.max_queue,
                              observe=self.metrics).start()
            self.batcher = batcher
            timeout = opts.check_timeout or guard.timeout or 10.0
            self.service = GuardService(guard, batcher, timeout=timeout, metrics=self.metrics,
                                        stream_mode=opts.stream_mode,
                                        window_chars=opts.window_chars,
                                        overlap_chars=opts.overlap_chars)
            work = await asyncio.to_thread(batcher.prepare, [_WARM_UP], guard.policy.max_tokens)
            scores = await asyncio.wait_for(batcher.run(work), timeout * 3)
            from ..classifier import validate_scores

            validate_scores(scores, 1, guard.classifier.heads, guard.classifier.name)
        except Exception as exc:
            self.load_error = f"{type(exc).__name__}: {exc}"
            logger.error("guard failed to start: %s", self.load_error)
            return
        self.ready = True
        self.metrics.ready.set(1)
        logger.info("guard ready (replica %s, batching %s)", self.replica,
                    "on" if opts.batching else "off")

    def health(self) -> str | None:
        """Why this replica cannot serve (a failed start, a dead or wedged model thread), or
        None: ``/readyz`` (with ``ready``) and Ray Serve's ``check_health`` both use it."""
        if self.load_error is not None:
            return "the guard failed to start"
        if self.batcher is None or self.service is None:
            return None  # still loading: not ready, but not broken
        return self.batcher.health(wedged_after=3 * self.service.timeout)

    async def stop(self) -> None:
        if self.batcher is not None:
            self.batcher.stop()
        if self.upstream is not None:
            await self.upstream.aclose()

    # -- per request -------------------------------------------------------------------------

    def deny(self, request: Request, *, needs_guard: bool = True) -> Response | None:
        """401 for a missing or wrong proxy key; 503 while the guard is not ready."""
        if self.keys:
            scheme, _, token = request.headers.get("authorization", "").partition(" ")
            given = token.strip().encode() if scheme.lower() == "bearer" else b""
            ok = False
            for key in self.keys:  # every key compared, in constant time each
                ok |= hmac.compare_digest(given, key.encode())
            if not ok:
                return _error(401, "a valid API key for this proxy is required",
                              "invalid_request_error", code="invalid_api_key")
        if needs_guard and (not self.ready or self.health() is not None):
            self.metrics.fail_closed.labels(reason="not_ready").inc()
            return self.unavailable("the guard is not ready", "guard_not_ready")
        return None

    def shown(self, verdict: Verdict) -> dict[str, Any]:
        """The verdict as callers see it (``verdict_detail``, module doc)."""
        detail = self.options.verdict_detail
        if detail == "action":
            return {"action": verdict.action.value, "direction": verdict.direction}
        out = verdict.to_dict()
        if detail != "scores":
            out.pop("scores", None)
        return out

    def unavailable(self, message: str, code: str = "guard_unavailable") -> JSONResponse:
        return _error(503, message, "server_error", code=code,
                      headers={"retry-after": str(self.options.retry_after)})

    def failed_guard(self, verdict: Verdict) -> JSONResponse | None:
        """503 when the guard failed and the policy fails closed (``on_error: block``)."""
        if guard_failed(verdict) and verdict.blocked:
            return self.unavailable("the guard could not check this request (failed, timed "
                                    "out or overloaded); try again")
        return None

    def upstream_headers(self, request: Request) -> dict[str, str]:
        headers = {"content-type": "application/json", "accept": "application/json"}
        for name in _FORWARD_REQUEST:
            if name in request.headers:
                headers[name] = request.headers[name]
        if self.upstream_key is not None:
            headers["authorization"] = f"Bearer {self.upstream_key}"
        elif not self.keys and self.options.forward_client_key and \
                "authorization" in request.headers:
            headers["authorization"] = request.headers["authorization"]
        return headers

    async def body(self, request: Request) -> dict[str, Any] | Response:
        limit = self.options.max_body_bytes
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            return _error(413, f"the request body is over {limit} bytes",
                          "invalid_request_error", code="request_too_large")
        chunks, size = [], 0
        try:
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    return _error(413, f"the request body is over {limit} bytes",
                                  "invalid_request_error", code="request_too_large")
                chunks.append(chunk)
        except ClientDisconnect:  # the client left mid-upload: 499, never a 500
            return self.client_left(request)
        raw = b"".join(chunks) or b"null"
        try:  # a large body is parsed off the event loop
            data = json.loads(raw) if size < _PARSE_INLINE else \
                await asyncio.to_thread(json.loads, raw)
        except (UnicodeDecodeError, json.JSONDecodeError):
            return _error(400, "the request body is not valid JSON", "invalid_request_error",
                          code="invalid_json")
        if not isinstance(data, dict):
            return _error(400, "the request body must be a JSON object",
                          "invalid_request_error", code="invalid_json")
        return data

    async def forward(self, request: Request, method: str, path: str, route: str, *,
                      body: Any = None) -> Response:
        """An unguarded pass-through: the upstream's answer, relayed as it came."""
        assert self.upstream is not None
        try:
            reply = await self.upstream.send(method, path, route,
                                             headers=self.upstream_headers(request), body=body,
                                             params=request.query_params)
        except UpstreamError as exc:
            return _upstream_error(exc)
        return _relay(reply)

    async def unless_disconnected(self, request: Request,
                                  work: Callable[[], Awaitable[Response]]) -> Response:
        """``work()``, cancelled if the client disconnects first (a queued check is then
        dropped, an upstream request closed)."""
        task = asyncio.ensure_future(work())
        watcher = asyncio.ensure_future(_watch_disconnect(request.receive))
        try:
            await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            watcher.cancel()
        if task.done():
            return task.result()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        return self.client_left(request)

    def client_left(self, request: Request) -> Response:
        """The client disconnected: counted once, recorded as 499 (nginx's "client closed
        request"; never sent) by ``_Observe``, whatever was started."""
        mark_disconnected(request.scope, self.metrics)
        return Response(status_code=499)


def create_app(options: ServeOptions, *, guard: Guard | None = None, transport: Any = None,
               environ: Mapping[str, str] | None = None) -> Starlette:
    """The proxy's ASGI app. ``guard``: an already loaded ``Guard`` (default: loaded from
    ``options.bundle`` / ``options.policy`` in a worker thread at start-up, while
    ``/healthz`` already answers and ``/readyz`` says 503). ``transport``: an httpx async
    transport for the upstream (tests); ``environ``: where the keys are read (default
    ``os.environ``)."""
    if guard is None:
        options.require("bundle", "policy")
    options.check_exposure(environ)  # no open relay on a public address
    state = _State(options, guard, transport, environ)

    def service() -> GuardService:
        assert state.service is not None
        return state.service

    async def guarded(request: Request, api: API, route: str, param: str) -> Response:
        denied = state.deny(request)
        if denied is not None:
            return denied
        body = await state.body(request)
        if isinstance(body, Response):
            return body
        return await state.unless_disconnected(
            request, lambda: _guarded_call(request, api, route, param, body))

    async def _guarded_call(request: Request, api: API, route: str, param: str,
                            body: dict[str, Any]) -> Response:
        svc = service()
        core = svc.core
        problem = api.invalid(body)
        if problem is not None:  # never guessed at, never sent upstream
            return _invalid(*problem)
        try:
            kwargs, messages = api.request(body)
        except UnguardedCallError as exc:  # a field the guard does not read holds text
            return _invalid(exc.param or param, f"{exc.param or 'a parameter'}: a field the "
                            "guard does not read holds text; it would reach the model "
                            "unchecked", code="unguarded_parameter")
        verdict = core.note(await svc.check(messages, "input"))
        failed = state.failed_guard(verdict)
        if failed is not None:
            return failed
        if verdict.blocked:
            return _error(400, "the prompt was blocked by the guard policy",
                          "invalid_request_error", code="content_filter", param=param,
                          headers={"x-should-retry": "false"},
                          extra={"verdict": state.shown(verdict)})
        headers = state.upstream_headers(request)
        path = route[len("/v1"):]
        assert state.upstream is not None
        try:
            if kwargs.get("stream"):
                opened = await state.upstream.stream(path, route, headers=headers, body=kwargs,
                                                     needs_done=api is not RESPONSES)
                if isinstance(opened, EventStream):
                    return _stream(opened, api)
                reply = opened
            else:
                reply = await state.upstream.send("POST", path, route, headers=headers,
                                                  body=kwargs)
            if reply.status >= 400:
                return _relay(reply)
            data = reply.json()
        except UpstreamError as exc:
            return _upstream_error(exc)
        if not isinstance(data, dict):
            return _upstream_error(UpstreamError("upstream sent a JSON body that is not an "
                                                 "object"))
        out = await svc.check(api.output_items(data, core.tool_calls), "output")
        failed = state.failed_guard(out)
        if failed is not None:
            core.note(out)
            return failed
        result = core.output_outcome(api, data, out, None)
        return JSONResponse(result, headers=_relay_headers(reply.headers))

    def _stream(stream: EventStream, api: API) -> Response:
        core = service().core
        arrivals: dict[int, float] = {}
        metrics = state.metrics

        async def upstream_items() -> AsyncIterator[Any]:
            try:
                async for item in stream:
                    arrivals[id(item)] = time.monotonic()
                    yield item
            finally:
                await stream.aclose()

        source = upstream_items()
        guarded_stream = AsyncGuardedStream(source, core, api, grouped=True)

        async def events() -> AsyncIterator[bytes]:
            try:
                async for group in guarded_stream:  # the events a check released: one write
                    now = time.monotonic()
                    for item in group:
                        arrived = arrivals.pop(id(item), None)
                        if arrived is not None:
                            metrics.holdback.observe(now - arrived)
                    yield b"".join(_sse(item, api) for item in group)
                if api is not RESPONSES:
                    yield b"data: [DONE]\n\n"
            except ResponseBlockedError:  # a block with no refusal events to end on
                yield _sse({"type": "error", "error": {
                    "message": "the response was blocked by the guard policy",
                    "type": "invalid_request_error", "code": "content_filter",
                    "param": None}}, api)
            except UpstreamError as exc:
                metrics.upstream_errors.labels(kind="stream").inc()
                logger.warning("upstream stream failed (%s)", type(exc).__name__)
                yield _sse({"type": "error", "error": {
                    "message": "the upstream stream failed", "type": "server_error",
                    "code": "upstream_unavailable", "param": None}}, api)
            finally:
                arrivals.clear()
                await guarded_stream.close()
                await stream.aclose()

        return _EventStreamResponse(events(), on_disconnect=lambda scope: mark_disconnected(
            scope, metrics), headers=_relay_headers(stream.headers))

    async def chat(request: Request) -> Response:
        return await guarded(request, CHAT, "/v1/chat/completions", "messages")

    async def completions(request: Request) -> Response:
        return await guarded(request, COMPLETIONS, "/v1/completions", "prompt")

    async def responses(request: Request) -> Response:
        return await guarded(request, RESPONSES, "/v1/responses", "input")

    async def models(request: Request) -> Response:
        denied = state.deny(request, needs_guard=False)
        if denied is not None:
            return denied
        path = _forward_path("/v1/models" if "model" not in request.path_params else
                             "/v1/models/{model}", request.path_params)
        if path is None:
            return not_found_response()
        return await state.forward(request, "GET", path, "/v1/models")

    async def passthrough(request: Request, template: str) -> Response:
        denied = state.deny(request, needs_guard=False)
        if denied is not None:
            return denied
        path = _forward_path(template, request.path_params)
        if path is None:
            return not_found_response()
        body = None
        if request.method not in ("GET", "DELETE"):
            parsed = await state.body(request)
            if isinstance(parsed, Response):
                return parsed
            body = parsed
        return await state.forward(request, request.method, path, "passthrough", body=body)

    async def guard_check(request: Request) -> Response:
        denied = state.deny(request)
        if denied is not None:
            return denied
        body = await state.body(request)
        if isinstance(body, Response):
            return body
        direction = body.get("direction", "input")
        if direction not in ("input", "output"):
            return _error(400, "direction must be 'input' or 'output'",
                          "invalid_request_error", param="direction")
        if "text" in body:
            if not isinstance(body["text"], str):
                return _error(400, "text must be a string", "invalid_request_error",
                              param="text")
            messages: Any = [body["text"]]
        else:
            messages = body.get("messages")
            problem = _invalid_messages(messages, "messages")
            if problem is not None:
                return _invalid(*problem)

        async def work() -> Response:
            verdict = await service().check(messages, direction)
            return state.failed_guard(verdict) or JSONResponse(state.shown(verdict))

        return await state.unless_disconnected(request, work)

    async def litellm(request: Request) -> Response:
        """LiteLLM's Generic Guardrail API: ``{"texts", "structured_messages", "images",
        "input_type": "request" | "response"}`` -> ``{"action": "NONE" | "BLOCKED"}``."""
        denied = state.deny(request)
        if denied is not None:
            return denied
        body = await state.body(request)
        if isinstance(body, Response):
            return body
        direction = "output" if body.get("input_type") == "response" else "input"
        texts = body.get("texts") or []
        structured = body.get("structured_messages")
        if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
            return _invalid("texts", "texts must be an array of strings")
        if structured is not None:
            problem = _invalid_messages(structured, "structured_messages")
            if problem is not None:
                return _invalid(*problem)
        role = "user" if direction == "input" else "assistant"
        if direction == "input" and structured:
            messages: list[Any] = list(structured)
        else:
            messages = [{"role": role, "content": t} for t in texts]
        images = body.get("images") or []
        if isinstance(images, list) and images:  # media parts: the policy's non_text_parts
            messages.append({"role": role, "content": [{"type": "image_url"} for _ in images]})

        async def work() -> Response:
            verdict = await service().check(messages, direction)
            failed = state.failed_guard(verdict)
            if failed is not None:
                return failed
            if verdict.blocked:
                return JSONResponse({"action": "BLOCKED",
                                     "blocked_reason": "guardmerge: " + (
                                         verdict.summary() if options.verdict_detail != "action"
                                         else "blocked by the guard policy")})
            return JSONResponse({"action": "NONE"})

        return await state.unless_disconnected(request, work)

    async def healthz(request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def readyz(request: Request) -> Response:
        problem = state.health()
        state.metrics.ready.set(1 if state.ready and problem is None else 0)
        if state.ready and problem is None:
            return JSONResponse({"status": "ready", "replica": state.replica})
        status = "failed" if state.load_error else "unhealthy" if problem else "loading"
        body = {"status": status, **({"reason": problem} if status == "unhealthy" else {})}
        return JSONResponse(body, status_code=503,
                            headers={"retry-after": str(options.retry_after)})

    async def metrics(request: Request) -> Response:
        if state.batcher is not None:
            state.metrics.queue_depth.set(state.batcher.depth)
        return Response(state.metrics.render(), media_type=CONTENT_TYPE)

    async def not_found(request: Request, exc: Exception) -> Response:
        return not_found_response()

    async def server_error(request: Request, exc: Exception) -> Response:
        # never exc_info: a third-party error's message (and so its traceback) may hold text
        logger.error("request failed (%s)", error_detail(exc))
        if logger.isEnabledFor(logging.DEBUG):
            logger.debug("request failure raised at: %s", " <- ".join(
                f"{f.filename}:{f.lineno} in {f.name}"
                for f in reversed(traceback.extract_tb(exc.__traceback__))))
        return _error(500, "internal error in the guard proxy", "server_error")

    routes = [
        Route("/v1/chat/completions", chat, methods=["POST"]),
        Route("/v1/completions", completions, methods=["POST"]),
        Route("/v1/responses", responses, methods=["POST"]),
        Route("/v1/models", models, methods=["GET"]),
        Route("/v1/models/{model}", models, methods=["GET"]),
        Route("/v1/guard/check", guard_check, methods=["POST"]),
        Route("/beta/litellm_basic_guardrail_api", litellm, methods=["POST"]),
        Route("/healthz", healthz, methods=["GET"]),
        Route("/readyz", readyz, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
    ]
    labels = {chat: "/v1/chat/completions", completions: "/v1/completions",
              responses: "/v1/responses", models: "/v1/models", guard_check: "/v1/guard/check",
              litellm: "/beta/litellm_basic_guardrail_api", healthz: "/healthz",
              readyz: "/readyz", metrics: "/metrics"}
    for entry in options.passthrough:  # validated by ServeOptions (passthrough_problem)
        method, _, path = entry.partition(" ")
        endpoint = _bind(passthrough, path)
        labels[endpoint] = "passthrough"
        routes.append(Route(path, endpoint, methods=[method]))

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        loading = asyncio.ensure_future(state.start())  # /healthz answers meanwhile
        try:
            yield
        finally:
            loading.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await loading
            await state.stop()

    app = Starlette(routes=routes, lifespan=lifespan,
                    middleware=[Middleware(_Observe, state=state, labels=labels)],
                    exception_handlers={404: not_found, 405: not_found,
                                        Exception: server_error})
    app.state.guardmerge = state
    return app


class _Observe:
    """ASGI middleware: the replica header, request counts by route template and status, and
    one access-log line per request (method, route template, status, milliseconds: never a
    query string, a header or a body)."""

    def __init__(self, app: Any, state: _State, labels: Mapping[Any, str]) -> None:
        self.app = app
        self.state = state
        self.labels = labels

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.monotonic()
        status = [0]
        replica = self.state.replica.encode()

        async def send_observed(message: Any) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
                message = {**message, "headers": [*message.get("headers", []),
                                                  (b"x-guardmerge-replica", replica)]}
            await send(message)

        try:
            await self.app(scope, receive, send_observed)
        finally:
            route = self.labels.get(scope.get("endpoint"), "unmatched")
            code = "499" if scope.get(_DISCONNECTED) or not status[0] else str(status[0])
            self.state.metrics.requests.labels(route=route, status=code).inc()
            access_logger.info("%s %s %s %.1fms", scope.get("method", "?"), route, code,
                               (time.monotonic() - start) * 1000)
