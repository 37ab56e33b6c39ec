"""The same app as a Ray Serve deployment (the ``[ray]`` extra): replicas, autoscaling.

``build_deployment(options, num_replicas=2)`` returns a Ray Serve application; run it with
``serve.run(app, route_prefix="/")``. Each replica builds the ordinary app in its own process
(``create_app``: its own loaded model, its own batcher, so batching happens within a
replica) and Ray's proxy spreads requests over the replicas, replaces a replica that dies and,
with ``autoscaling_config``, adds and removes replicas with the load. Replicas are stateless:
a replica holds nothing a request needs from another (the history cache is only a cache).
Ray's periodic ``check_health`` runs the check ``/readyz`` makes (``replica_health``): a
replica whose start failed or whose model thread died or is wedged is replaced.
``max_ongoing_requests`` must be large enough for concurrent checks to meet in one batch (Ray's
default, 5, would cap a batch at 5 requests).

ray is imported when ``build_deployment`` runs, never when this module is imported. Keys come
from the replicas' environment (Ray's ``runtime_env={"env_vars": ...}``), as for ``run``.
"""

from __future__ import annotations

from typing import Any, Mapping

from ..exceptions import GuardmergeError
from .app import create_app, load_guard
from .config import ServeOptions

__all__ = ["build_deployment", "replica_health"]


def replica_health(app: Any) -> None:
    """Raise ``GuardmergeError`` when the proxy ``app`` (``create_app``'s) cannot serve."""
    state = getattr(getattr(app, "state", None), "guardmerge", None)
    if state is None:
        raise GuardmergeError("the replica has no guard proxy app")
    problem = state.health()
    if problem is not None:
        raise GuardmergeError(f"guard proxy replica unhealthy: {problem}")


def build_deployment(options: ServeOptions, *, num_replicas: int | None = None,
                     autoscaling_config: Mapping[str, Any] | None = None,
                     max_ongoing_requests: int = 256,
                     ray_actor_options: Mapping[str, Any] | None = None,
                     name: str = "guardmerge") -> Any:
    """A bound Ray Serve application running ``create_app(options)`` in every replica.

    ``num_replicas`` (default 1) or ``autoscaling_config`` (Ray's: ``min_replicas``,
    ``max_replicas``, ``target_ongoing_requests``...); ``ray_actor_options`` (``num_cpus``,
    ``runtime_env``...) for each replica.
    """
    from ray import serve

    options.require("upstream", "bundle", "policy")

    def build_app() -> Any:  # runs in each replica, when it starts
        return create_app(options, guard=load_guard(options))

    settings: dict[str, Any] = {"name": name, "max_ongoing_requests": max_ongoing_requests}
    if autoscaling_config is not None:
        settings["autoscaling_config"] = dict(autoscaling_config)
    else:
        settings["num_replicas"] = num_replicas or 1
    if ray_actor_options is not None:
        settings["ray_actor_options"] = dict(ray_actor_options)

    @serve.ingress(build_app)
    class GuardProxy:
        """One replica of the guard proxy."""

        def check_health(self) -> None:
            """Ray Serve calls this periodically; raising marks the replica unhealthy and Ray
            replaces it: the check ``/readyz`` makes (a failed start, a dead or wedged model
            thread), while a replica that is still loading counts as healthy."""
            replica_health(getattr(self, "app", None) or getattr(self, "_asgi_app", None))

    return serve.deployment(GuardProxy, **settings).bind()
