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

Importing this package needs starlette, uvicorn and prometheus-client (``pip install
'guardmerge[server]'``); ray is imported only by ``deployment``, when it is used. It may
import the library (``guardmerge.guard``, ``client``, ``_apis``...), never
``guardmerge.tools`` or ``guardmerge.testing``; the library never imports it (only the CLI
does, inside ``guardmerge serve``). The public API is exactly ``__all__``.
"""

try:
    import prometheus_client as _prometheus_client  # noqa: F401
    import starlette as _starlette  # noqa: F401
    import uvicorn as _uvicorn  # noqa: F401
except ImportError as _exc:  # pragma: no cover - depends on the installed extras
    raise ImportError(f"guardmerge.serve needs the [server] extra (pip install "
                      f"'guardmerge[server]'): {_exc}") from _exc

from .app import create_app, load_guard
from .batcher import Batcher, BatcherStats
from .config import ServeOptions, load_config
from .deployment import build_deployment
from .metrics import Metrics
from .runner import BackgroundServer, run
from .service import GuardService

__all__ = [
    "BackgroundServer",
    "Batcher",
    "BatcherStats",
    "GuardService",
    "Metrics",
    "ServeOptions",
    "build_deployment",
    "create_app",
    "load_config",
    "load_guard",
    "run",
]
