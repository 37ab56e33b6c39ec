"""Running the app on uvicorn: ``run`` (the CLI, in the foreground) and ``BackgroundServer``
(a thread, for tests, benchmarks and embedding).

``run`` loads the guard before it binds, so a bad bundle or policy is a ``ConfigError`` /
``ModelLoadError`` at once (the CLI's exit 2), then serves until interrupted. uvicorn's own
access log is off: it prints query strings, which may carry keys; the app logs its own
access lines (``guardmerge.serve.access``: method, route template, status, time).
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from typing import Any

import httpx
import uvicorn

from ..exceptions import GuardmergeError
from .app import create_app, load_guard
from .config import ServeOptions

__all__ = ["BackgroundServer", "run"]

logger = logging.getLogger("guardmerge.serve")


def _log_config(level: str) -> dict[str, Any]:
    """The application's logging (the CLI is an application; the library configures none):
    one stderr handler, levelname and logger name, uvicorn's access log silenced."""
    fmt = {"format": "%(asctime)s %(levelname)s %(name)s: %(message)s"}
    return {
        "version": 1, "disable_existing_loggers": False,
        "formatters": {"plain": fmt},
        "handlers": {"stderr": {"class": "logging.StreamHandler", "formatter": "plain",
                                "stream": "ext://sys.stderr"}},
        "loggers": {
            "guardmerge": {"handlers": ["stderr"], "level": level.upper(), "propagate": False},
            "uvicorn": {"handlers": ["stderr"], "level": "INFO", "propagate": False},
            "uvicorn.error": {"level": "INFO"},
            "uvicorn.access": {"handlers": [], "level": "CRITICAL", "propagate": False},
        },
    }


def run(options: ServeOptions) -> None:
    """Load the guard, then serve ``options`` in the foreground until interrupted."""
    options.require("upstream", "bundle", "policy")
    options.check_exposure()  # before the model loads: a refused start is quick
    guard = load_guard(options)
    app = create_app(options, guard=guard)
    uvicorn.run(app, host=options.host, port=options.port, log_config=_log_config(
        options.log_level), access_log=False, lifespan="on", server_header=False)


class BackgroundServer:
    """``with BackgroundServer(app) as srv: OpenAI(base_url=srv.url + "/v1", ...)``: the app
    on uvicorn in a daemon thread, on 127.0.0.1 and a free port; ``start`` returns once the
    server listens and (``wait_ready``) ``/readyz`` says ready."""

    def __init__(self, app: Any, *, host: str = "127.0.0.1", port: int = 0,
                 wait_ready: bool = True, ready_timeout: float = 120.0) -> None:
        self.app = app
        self.host = host
        self.wait_ready = wait_ready
        self.ready_timeout = ready_timeout
        # IPPROTO_TCP, not 0: asyncio sets TCP_NODELAY only on sockets of that protocol, and
        # without it every small response waits ~40 ms for a delayed ACK
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind((host, port))
        self.port = self._sock.getsockname()[1]
        config = uvicorn.Config(app, log_config=None, access_log=False, lifespan="on",
                                server_header=False, timeout_graceful_shutdown=5)
        self.server = uvicorn.Server(config)
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> "BackgroundServer":
        self._thread = threading.Thread(target=self.server.run,
                                        kwargs={"sockets": [self._sock]},
                                        name="guardmerge-serve", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + self.ready_timeout
        while not self.server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise GuardmergeError("the guard proxy did not start")
            time.sleep(0.01)
        if self.wait_ready:
            with httpx.Client(base_url=self.url, timeout=5, trust_env=False) as http:
                while http.get("/readyz").status_code != 200:
                    state = getattr(getattr(self.app, "state", None), "guardmerge", None)
                    if state is not None and state.load_error:
                        self.stop()
                        raise GuardmergeError(f"the guard proxy failed to start: "
                                              f"{state.load_error}")
                    if time.monotonic() > deadline:
                        self.stop()
                        raise GuardmergeError("the guard proxy did not become ready")
                    time.sleep(0.01)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=15)
        self._sock.close()

    def __enter__(self) -> "BackgroundServer":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()
