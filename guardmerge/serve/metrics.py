"""The proxy's Prometheus metrics (text format at ``GET /metrics``), all named ``guardmerge_*``.

One private ``prometheus_client`` registry per app, so two apps in one process (tests, a
benchmark) never mix their counts. Labels are bounded and never carry request content: a
route label is the route's template (``/v1/chat/completions``, or ``unmatched``), never the
path a client sent; no key, header or text is ever a label or a value.

- ``guardmerge_requests_total{route, status}``
- ``guardmerge_verdicts_total{direction, action}``
- ``guardmerge_guard_latency_seconds{direction}``: one check, queue and model included
- ``guardmerge_batch_checks``, ``guardmerge_batch_windows``, ``guardmerge_batch_padded_tokens``,
  ``guardmerge_model_seconds``: per batch (forward passes shared by concurrent checks)
- ``guardmerge_queue_depth``, ``guardmerge_queue_wait_seconds``,
  ``guardmerge_queue_dropped_total`` (checks whose caller left before they ran)
- ``guardmerge_stream_holdback_seconds``: per streamed item, upstream arrival to release
- ``guardmerge_upstream_latency_seconds{route}`` (to the response headers),
  ``guardmerge_upstream_errors_total{kind}``
- ``guardmerge_fail_closed_total{reason}``, ``guardmerge_fail_open_total{reason}``: guard
  failures (``timeout``, ``overloaded``, ``error``) under ``on_error: block``, or not
- ``guardmerge_client_disconnects_total``, ``guardmerge_ready``
"""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client import CONTENT_TYPE_LATEST

__all__ = ["Metrics", "CONTENT_TYPE"]

CONTENT_TYPE = CONTENT_TYPE_LATEST
_SECONDS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
            10.0, 30.0)
_COUNTS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
_TOKENS = (64, 256, 1024, 4096, 16384, 65536)


class Metrics:
    """The metric objects of one app, and ``render()`` for ``/metrics``."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter("guardmerge_requests", "HTTP requests by route and status",
                                ["route", "status"], registry=r)
        self.verdicts = Counter("guardmerge_verdicts", "guard verdicts by direction and action",
                                ["direction", "action"], registry=r)
        self.guard_latency = Histogram("guardmerge_guard_latency_seconds",
                                       "one guard check, queue and model included",
                                       ["direction"], buckets=_SECONDS, registry=r)
        self.batch_checks = Histogram("guardmerge_batch_checks", "checks per batch",
                                      buckets=_COUNTS, registry=r)
        self.batch_windows = Histogram("guardmerge_batch_windows", "windows per batch",
                                       buckets=_COUNTS, registry=r)
        self.batch_tokens = Histogram("guardmerge_batch_padded_tokens",
                                      "padded tokens per batch (windows x longest)",
                                      buckets=_TOKENS, registry=r)
        self.model_seconds = Histogram("guardmerge_model_seconds",
                                       "model time per batch (forward passes)",
                                       buckets=_SECONDS, registry=r)
        self.queue_depth = Gauge("guardmerge_queue_depth", "checks waiting for the model",
                                 registry=r)
        self.queue_wait = Histogram("guardmerge_queue_wait_seconds",
                                    "time a check waited for the model", buckets=_SECONDS,
                                    registry=r)
        self.queue_dropped = Counter("guardmerge_queue_dropped",
                                     "queued checks dropped before they ran (caller left)",
                                     registry=r)
        self.holdback = Histogram("guardmerge_stream_holdback_seconds",
                                  "per streamed item: upstream arrival to release",
                                  buckets=_SECONDS, registry=r)
        self.upstream_latency = Histogram("guardmerge_upstream_latency_seconds",
                                          "upstream time to response headers", ["route"],
                                          buckets=_SECONDS, registry=r)
        self.upstream_errors = Counter("guardmerge_upstream_errors",
                                       "upstream calls that failed (connect, timeout, body)",
                                       ["kind"], registry=r)
        self.fail_closed = Counter("guardmerge_fail_closed",
                                   "guard failures that blocked (on_error: block)", ["reason"],
                                   registry=r)
        self.fail_open = Counter("guardmerge_fail_open",
                                 "guard failures let through (on_error: pass or flag)",
                                 ["reason"], registry=r)
        self.disconnects = Counter("guardmerge_client_disconnects",
                                   "clients that left before their answer", registry=r)
        self.ready = Gauge("guardmerge_ready", "1 once the model is loaded and warmed up",
                           registry=r)

    def batcher(self, what: str, value: Any) -> None:
        """The batcher's observations (called from its thread; prometheus_client is
        thread-safe)."""
        if what == "queue_depth":
            self.queue_depth.set(value)
        elif what == "queue_wait":
            self.queue_wait.observe(value)
        elif what == "dropped":
            self.queue_dropped.inc(value)
        elif what == "batch":
            checks, windows, padded, seconds = value
            self.batch_checks.observe(checks)
            self.batch_windows.observe(windows)
            self.batch_tokens.observe(padded)
            self.model_seconds.observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def value(self, name: str, labels: dict[str, str] | None = None) -> float:
        """One sample's value (0 when absent): ``value("guardmerge_requests_total",
        {"route": "/healthz", "status": "200"})``."""
        got = self.registry.get_sample_value(name, labels or {})
        return 0.0 if got is None else got
