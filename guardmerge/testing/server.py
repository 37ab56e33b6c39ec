"""A real OpenAI-compatible HTTP server on 127.0.0.1 for tests, examples and demos.

Routes, each as JSON or (``stream: true``) as server-sent events over chunked HTTP/1.1:

- ``POST /v1/chat/completions``: ``reply(messages)`` (default: echo the last user message);
  with ``n > 1``, one choice per ``n`` (``reply`` may return a list: one text per choice), and
  streamed chunks of the choices interleaved;
- ``POST /v1/completions`` (legacy): ``reply([{"role": "user", "content": prompt}])``;
- ``POST /v1/responses``: ``reply(messages)`` with ``input`` read as messages (a string is one
  user message), answered as a Response (streamed: ``response.created``, text deltas,
  ``response.completed``).

- ``GET /v1/models``, ``GET /v1/models/{id}``: a model list with one model (``fake-model``).

``script`` queues faults, one per request: ``{"status": 429, "headers": {"Retry-After":
"0.1"}}``, ``{"status": 500}``, ``{"delay": 2.0}``, ``{"malformed": True}``,
``{"drop_after": 2}`` (stream: close the socket after two chunks), ``{"reply": "..."}``,
``{"tool_call": {"name": "f", "arguments": "{...}"}}`` (chat: the answer is that tool call,
streamed as argument deltas), ``{"body": {...}}`` (this JSON answer, exactly) and
``{"events": [{...}, ...]}`` (these payloads as server-sent events, then ``[DONE]``). ``requests`` records every request body, ``paths`` its path,
``headers`` its headers (lower-case names). ``disconnected`` is set (and ``disconnects``
counted) when a client goes away in the middle of a streamed answer. Only the loopback
address is ever bound.
"""

from __future__ import annotations

import json
import threading
import time
from collections import deque
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable

__all__ = ["OpenAICompatServer", "echo_reply"]


def echo_reply(messages: list[dict[str, Any]]) -> str | list[str]:
    """The default reply: "You said: " and the last user message's text."""
    for msg in reversed(messages):
        if msg.get("role") == "user":
            content = msg.get("content")
            if isinstance(content, list):
                content = " ".join(str(p.get("text", "")) for p in content if isinstance(p, dict))
            return f"You said: {content}"
    return "Hello."


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: "_Server"

    def log_message(self, format: str, *args: Any) -> None:  # quiet
        return

    def _send_json(self, status: int, payload: Any, headers: dict[str, str] | None = None,
                   raw: bytes | None = None) -> None:
        body = raw if raw is not None else json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Connection", "close")
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:  # noqa: N802
        owner = self.server.owner
        with owner._lock:
            owner.paths.append(self.path)
            owner.headers.append({k.lower(): v for k, v in self.headers.items()})
        model = {"id": "fake-model", "object": "model", "created": 0, "owned_by": "guardmerge"}
        path = self.path.split("?")[0].rstrip("/")
        if path.endswith("/models"):
            self._send_json(200, {"object": "list", "data": [model]})
        elif "/models/" in path and path.rsplit("/", 1)[1] == "fake-model":
            self._send_json(200, model)
        else:
            self._send_json(404, {"error": {"message": "no such route or model"}})

    def do_POST(self) -> None:  # noqa: N802
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length)
        owner = self.server.owner
        try:
            body = json.loads(raw or b"{}")
        except json.JSONDecodeError:
            self._send_json(400, {"error": {"message": "invalid JSON body"}})
            return
        with owner._lock:
            owner.requests.append(body)
            owner.paths.append(self.path)
            owner.headers.append({k.lower(): v for k, v in self.headers.items()})
            fault = owner.script.popleft() if owner.script else {}
        route = next((r for r in ("/chat/completions", "/completions", "/responses")
                      if self.path.rstrip("/").endswith(r)), None)
        if route is None:
            self._send_json(404, {"error": {"message": f"no route {self.path}"}})
            return
        if fault.get("delay"):
            time.sleep(float(fault["delay"]))
        if fault.get("status"):
            self._send_json(int(fault["status"]), {"error": {"message": "injected fault"}},
                            headers=fault.get("headers"))
            return
        if fault.get("malformed"):
            self._send_json(200, None, raw=b'{"id": "x", "choices": [ {oops')
            return
        if "body" in fault:  # this JSON answer, exactly
            self._send_json(200, fault["body"])
            return
        if "events" in fault:  # these payloads as server-sent events, then [DONE]
            self._begin_events()
            for payload in fault["events"]:
                self._emit(json.dumps(payload))
            self._emit("[DONE]")
            self._end_events()
            return
        messages = _as_messages(route, body)
        n = max(1, int(body.get("n") or 1)) if route != "/responses" else 1
        texts = fault.get("reply") or owner.reply(messages)
        texts = [texts] * n if isinstance(texts, str) else list(texts)[:n]
        model = body.get("model", "fake-model")
        with owner._lock:
            owner.counter += 1
            number = owner.counter
        drop = int(fault.get("drop_after", -1))
        if route == "/responses":
            self._respond_responses(f"resp_{number}", model, texts[0], bool(body.get("stream")),
                                    drop)
            return
        chat = route == "/chat/completions"
        cid = f"{'chatcmpl' if chat else 'cmpl'}-{number}"
        if chat and fault.get("tool_call"):
            self._tool_call(cid, model, dict(fault["tool_call"]), bool(body.get("stream")))
            return
        if body.get("stream"):
            self._stream_choices(cid, model, texts, drop, chat)
            return
        words = sum(len(t.split()) for t in texts)
        self._send_json(200, {
            "id": cid, "object": "chat.completion" if chat else "text_completion",
            "created": int(time.time()), "model": model,
            "choices": [{"index": i, "finish_reason": "stop", "logprobs": None,
                         **({"message": {"role": "assistant", "content": t}} if chat else
                            {"text": t})} for i, t in enumerate(texts)],
            "usage": {"prompt_tokens": 1, "completion_tokens": words, "total_tokens": 1 + words},
        })

    def _tool_call(self, cid: str, model: str, call: dict[str, Any], stream: bool) -> None:
        name, arguments = str(call.get("name", "f")), str(call.get("arguments", "{}"))
        base = {"id": cid, "created": int(time.time()), "model": model}
        if not stream:
            self._send_json(200, {**base, "object": "chat.completion", "choices": [{
                "index": 0, "finish_reason": "tool_calls", "logprobs": None,
                "message": {"role": "assistant", "content": None, "tool_calls": [{
                    "id": "call_1", "type": "function",
                    "function": {"name": name, "arguments": arguments}}]}}]})
            return
        self._begin_events()
        chunk = {**base, "object": "chat.completion.chunk"}
        first = {"index": 0, "id": "call_1", "type": "function",
                 "function": {"name": name, "arguments": ""}}
        self._emit(json.dumps({**chunk, "choices": [{"index": 0, "finish_reason": None,
                                                     "delta": {"role": "assistant",
                                                               "tool_calls": [first]}}]}))
        size = max(1, self.server.owner.words_per_chunk * 4)
        for i in range(0, len(arguments), size):
            delta = {"tool_calls": [{"index": 0, "function": {"arguments":
                                                              arguments[i:i + size]}}]}
            self._emit(json.dumps({**chunk, "choices": [{"index": 0, "finish_reason": None,
                                                         "delta": delta}]}))
        self._emit(json.dumps({**chunk, "choices": [{"index": 0, "finish_reason": "tool_calls",
                                                     "delta": {}}]}))
        self._emit("[DONE]")
        self._end_events()

    def _begin_events(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Transfer-Encoding", "chunked")
        self.send_header("Connection", "close")
        self.end_headers()

    def _emit(self, payload: str, event: str | None = None) -> None:
        data = (f"event: {event}\n" if event else "") + f"data: {payload}\n\n"
        raw = data.encode()
        self.wfile.write(f"{len(raw):x}\r\n".encode() + raw + b"\r\n")
        self.wfile.flush()

    def _end_events(self) -> None:
        self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()

    def _drop(self) -> None:
        self.wfile.flush()
        self.connection.shutdown(2)  # drop the connection mid-stream
        self.close_connection = True

    def _groups(self, text: str) -> list[str]:
        pieces = [w + " " for w in text.split(" ")]
        pieces[-1] = pieces[-1][:-1]
        size = self.server.owner.words_per_chunk
        return ["".join(pieces[i:i + size]) for i in range(0, len(pieces), size)]

    def _stream_choices(self, cid: str, model: str, texts: list[str], drop_after: int,
                        chat: bool) -> None:
        self._begin_events()
        base = {"id": cid, "object": "chat.completion.chunk" if chat else "text_completion",
                "created": int(time.time()), "model": model}

        def choice(i: int, piece: str | None, finish: str | None) -> dict[str, Any]:
            if chat:
                delta = {"role": "assistant"} if piece is None else \
                    ({"content": piece} if piece else {})
                return {"index": i, "delta": delta, "finish_reason": finish}
            return {"index": i, "text": piece or "", "finish_reason": finish, "logprobs": None}

        if chat:
            for i in range(len(texts)):
                self._emit(json.dumps({**base, "choices": [choice(i, None, None)]}))
        groups = [self._groups(t) for t in texts]
        sent = 0
        for step in range(max(len(g) for g in groups)):
            for i, g in enumerate(groups):  # the choices interleaved, one group each in turn
                if step >= len(g):
                    continue
                if sent == drop_after:
                    self._drop()
                    return
                self._emit(json.dumps({**base, "choices": [choice(i, g[step], None)]}))
                sent += 1
                if self.server.owner.chunk_delay:
                    time.sleep(self.server.owner.chunk_delay)
        for i in range(len(texts)):
            self._emit(json.dumps({**base, "choices": [choice(i, "", "stop")]}))
        self._emit("[DONE]")
        self._end_events()

    def _respond_responses(self, rid: str, model: str, text: str, stream: bool,
                           drop_after: int) -> None:
        message = {"type": "message", "id": f"msg_{rid}", "role": "assistant",
                   "status": "completed",
                   "content": [{"type": "output_text", "text": text, "annotations": []}]}
        response = {"id": rid, "object": "response", "created_at": int(time.time()),
                    "model": model, "status": "completed", "output": [message],
                    "parallel_tool_calls": True, "tool_choice": "auto", "tools": [],
                    "usage": {"input_tokens": 1, "output_tokens": len(text.split()),
                              "total_tokens": 1 + len(text.split()),
                              "input_tokens_details": {"cached_tokens": 0,
                                                       "cache_write_tokens": 0},
                              "output_tokens_details": {"reasoning_tokens": 0}}}
        if not stream:
            self._send_json(200, response)
            return
        self._begin_events()
        seq = iter(range(1_000_000))

        def emit(kind: str, **fields: Any) -> None:
            self._emit(json.dumps({"type": kind, "sequence_number": next(seq), **fields}), kind)

        started = {**response, "status": "in_progress", "output": []}
        emit("response.created", response=started)
        emit("response.output_item.added", output_index=0,
             item={**message, "status": "in_progress", "content": []})
        emit("response.content_part.added", output_index=0, item_id=message["id"],
             content_index=0, part={"type": "output_text", "text": "", "annotations": []})
        for n, group in enumerate(self._groups(text)):
            if n == drop_after:
                self._drop()
                return
            emit("response.output_text.delta", output_index=0, item_id=message["id"],
                 content_index=0, delta=group, logprobs=[])
            if self.server.owner.chunk_delay:
                time.sleep(self.server.owner.chunk_delay)
        emit("response.output_text.done", output_index=0, item_id=message["id"],
             content_index=0, text=text, logprobs=[])
        emit("response.content_part.done", output_index=0, item_id=message["id"],
             content_index=0, part=message["content"][0])
        emit("response.output_item.done", output_index=0, item=message)
        emit("response.completed", response=response)
        self._end_events()


def _as_messages(route: str, body: dict[str, Any]) -> list[dict[str, Any]]:
    """The request's text as chat messages, for ``reply``."""
    if route == "/chat/completions":
        return body.get("messages") or []
    if route == "/completions":
        prompt = body.get("prompt")
        prompts = prompt if isinstance(prompt, list) else [prompt]
        return [{"role": "user", "content": p} for p in prompts if isinstance(p, str)]
    value = body.get("input")
    if isinstance(value, str):
        return [{"role": "user", "content": value}]
    return [{"role": item.get("role", "user"), "content": item.get("content")}
            for item in value or [] if isinstance(item, dict)]


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 256  # concurrent clients (a proxy under load) are not refused
    owner: "OpenAICompatServer"

    def handle_error(self, request: Any, client_address: Any) -> None:
        import sys

        exc = sys.exc_info()[1]
        if isinstance(exc, (BrokenPipeError, ConnectionResetError)):
            with self.owner._lock:
                self.owner.disconnects += 1
            self.owner.disconnected.set()  # the client went away mid-answer
            return
        if isinstance(exc, TimeoutError):
            return  # the client gave up (timeouts, drops): expected in fault tests
        super().handle_error(request, client_address)


class OpenAICompatServer:
    """``with OpenAICompatServer() as srv: OpenAI(base_url=srv.url, api_key="x")``."""

    def __init__(self, reply: Callable[[list[dict[str, Any]]], str] = echo_reply, *,
                 port: int = 0, words_per_chunk: int = 3, chunk_delay: float = 0.0) -> None:
        self.reply = reply
        self.script: deque[dict[str, Any]] = deque()
        self.requests: list[dict[str, Any]] = []
        self.paths: list[str] = []
        self.headers: list[dict[str, str]] = []
        self.disconnects = 0
        self.disconnected = threading.Event()
        self.words_per_chunk = words_per_chunk
        self.chunk_delay = chunk_delay
        self.counter = 0
        self._lock = threading.Lock()
        self._server = _Server(("127.0.0.1", port), _Handler)
        self._server.owner = self
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}/v1"

    def start(self) -> "OpenAICompatServer":
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                                        name="fake-openai", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        if self._thread:
            self._thread.join(timeout=5)

    def __enter__(self) -> "OpenAICompatServer":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()
