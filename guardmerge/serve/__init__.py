"""``guardmerge serve``: an OpenAI-compatible guard proxy (the ``[server]`` extra).

What lives here, in the order a request flows:

- ``config``: ``ServeOptions`` (the YAML file, the flags, the environment), validated with
  file and key path errors (no torch, no starlette: the CLI builds its flags from it)
- ``app``: the thin Starlette app: routes, status codes, auth, the upstream calls
- ``service``: the library's ``Guard`` split around its model work, and the client
  wrapper's own decision core and stream driver, so the proxy guards as the wrapper does
- ``batcher``: cross-request micro-batching (a bounded queue, one model thread that drains
  what is queued when the model is free)
- ``upstream``: the pooled ``httpx.AsyncClient`` and the upstream's event streams
- ``metrics``: the Prometheus metrics (``guardmerge_*``), one registry per app
- ``runner``: uvicorn in the foreground (``run``) or in a thread (``BackgroundServer``)
- ``deployment``: the same app as a Ray Serve deployment (the ``[ray]`` extra)

Importing this package needs starlette, uvicorn and prometheus-client installed (``pip
install 'guardmerge[server]'``); names load on first use, so the CLI reads ``config`` without
importing them. ray is imported only by ``deployment``, when it is used. It may
import the library (``guardmerge.guard``, ``client``, ``_apis``...), never
``guardmerge.tools`` or ``guardmerge.testing``; the library never imports it (only the CLI
does, inside ``guardmerge serve``). The public API is exactly ``__all__``.
"""

import importlib as _importlib
import importlib.util as _util
import typing as _typing

_MISSING = [m for m in ("starlette", "uvicorn", "prometheus_client")
            if _util.find_spec(m) is None]
if _MISSING:  # pragma: no cover - depends on the installed extras
    raise ImportError(f"guardmerge.serve needs the [server] extra (pip install "
                      f"'guardmerge[server]'): {', '.join(_MISSING)} not installed")

_EXPORTS = {
    "create_app": "app", "load_guard": "app",
    "Batcher": "batcher", "BatcherStats": "batcher",
    "ServeOptions": "config", "load_config": "config",
    "build_deployment": "deployment",
    "Metrics": "metrics",
    "BackgroundServer": "runner", "run": "runner",
    "GuardService": "service",
}

__all__ = sorted(_EXPORTS)

if _typing.TYPE_CHECKING:  # pragma: no cover - for type checkers and IDEs
    from .app import create_app, load_guard
    from .batcher import Batcher, BatcherStats
    from .config import ServeOptions, load_config
    from .deployment import build_deployment
    from .metrics import Metrics
    from .runner import BackgroundServer, run
    from .service import GuardService


def __getattr__(name: str) -> "_typing.Any":
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'guardmerge.serve' has no attribute {name!r}")
    value = getattr(_importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> "list[str]":
    return sorted(set(globals()) | set(__all__))
