"""A real OpenAI-compatible HTTP server on 127.0.0.1 for tests, examples and demos.

``POST /v1/chat/completions`` answers with ``reply(messages)`` (default: echo the last user
message), as JSON or as server-sent events over chunked HTTP/1.1. ``script`` queues faults, one
per request: ``{"status": 429, "headers": {"Retry-After": "0.1"}}``, ``{"status": 500}``,
``{"delay": 2.0}``, ``{"malformed": True}``, ``{"drop_after": 2}`` (stream: close the socket
after two chunks), ``{"reply": "..."}``. Only the loopback address is ever bound.
"""

from __future__ import annotations

import json
import threading
import time
from collections import deque
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable

__all__ = ["OpenAICompatServer", "echo_reply"]


def echo_reply(messages: list[dict[str, Any]]) -> str:
    for msg in reversed(messages):
        if msg.get("role") == "user":
            content = msg.get("content")
            if isinstance(content, list):
                content = " ".join(p.get("text", "") for p in content if isinstance(p, dict))
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
            fault = owner.script.popleft() if owner.script else {}
        if not self.path.rstrip("/").endswith("/chat/completions"):
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
        text = fault.get("reply") or owner.reply(body.get("messages") or [])
        model = body.get("model", "fake-model")
        owner.counter += 1
        cid = f"chatcmpl-{owner.counter}"
        if body.get("stream"):
            self._stream(cid, model, text, int(fault.get("drop_after", -1)))
            return
        self._send_json(200, {
            "id": cid, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "finish_reason": "stop",
                         "message": {"role": "assistant", "content": text}}],
            "usage": {"prompt_tokens": 1, "completion_tokens": len(text.split()),
                      "total_tokens": 1 + len(text.split())},
        })

    def _stream(self, cid: str, model: str, text: str, drop_after: int) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Transfer-Encoding", "chunked")
        self.send_header("Connection", "close")
        self.end_headers()

        def emit(payload: str) -> None:
            data = f"data: {payload}\n\n".encode()
            self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
            self.wfile.flush()

        pieces = [w + " " for w in text.split(" ")]
        pieces[-1] = pieces[-1][:-1]
        chunk_size = self.server.owner.words_per_chunk
        groups = ["".join(pieces[i:i + chunk_size]) for i in range(0, len(pieces), chunk_size)]
        base = {"id": cid, "object": "chat.completion.chunk", "created": int(time.time()),
                "model": model}
        emit(json.dumps({**base, "choices": [{"index": 0, "delta": {"role": "assistant"},
                                              "finish_reason": None}]}))
        for n, group in enumerate(groups):
            if n == drop_after:
                self.wfile.flush()
                self.connection.shutdown(2)  # drop the connection mid-stream
                self.close_connection = True
                return
            emit(json.dumps({**base, "choices": [{"index": 0, "delta": {"content": group},
                                                  "finish_reason": None}]}))
            if self.server.owner.chunk_delay:
                time.sleep(self.server.owner.chunk_delay)
        emit(json.dumps({**base, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}))
        emit("[DONE]")
        self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    owner: "OpenAICompatServer"

    def handle_error(self, request: Any, client_address: Any) -> None:
        import sys

        exc = sys.exc_info()[1]
        if isinstance(exc, (BrokenPipeError, ConnectionResetError, TimeoutError)):
            return  # the client gave up (timeouts, drops): expected in fault tests
        super().handle_error(request, client_address)


class OpenAICompatServer:
    """``with OpenAICompatServer() as srv: OpenAI(base_url=srv.url, api_key="x")``."""

    def __init__(self, reply: Callable[[list[dict[str, Any]]], str] = echo_reply, *,
                 port: int = 0, words_per_chunk: int = 3, chunk_delay: float = 0.0) -> None:
        self.reply = reply
        self.script: deque[dict[str, Any]] = deque()
        self.requests: list[dict[str, Any]] = []
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
