"""The proxy's configuration: ``ServeOptions``, from a YAML file, flags and the environment.

One options dataclass is the Python signature (``create_app(ServeOptions(...))``) and the
command line (``guardmerge serve --port 9000 ...``: every CLI field is a flag). A YAML file
(``guardmerge serve --config serve.yaml``) gives the same fields in sections::

    version: 1
    server:    {host: 127.0.0.1, port: 8000, max_body_bytes: 8388608, retry_after: 1,
                passthrough: []}         # unguarded routes, explicitly: "GET /v1/models/{x}"
    upstream:  {base_url: "http://127.0.0.1:8001/v1", connect_timeout: 5, timeout: 600,
                max_connections: 256, api_key_env: GUARDMERGE_UPSTREAM_API_KEY}
    guard:     {bundle: bundles/guard, policy: policies/default.yaml, dtype: float32,
                threads: null, cache_size: 1024, timeout: 10, stream_mode: hold,
                window_chars: 2000, overlap_chars: 200}
    batching:  {enabled: true, max_windows: 32, max_tokens: 8192, max_wait_ms: 0,
                max_queue: 256}
    auth:      {keys_env: GUARDMERGE_API_KEYS, forward_client_key: true}

Paths in the file are relative to the file. Flags override the file; secrets never sit in
either: the proxy's own keys (comma-separated) come from the environment variable
``auth.keys_env`` names, the key injected upstream from ``upstream.api_key_env``. Every
problem in a file is reported at once, each naming the file and the key path
(``serve.yaml: batching.max_windows: expected an integer >= 1, got 0``), as a ``ConfigError``.
No torch, no starlette: the CLI builds its flags from this module.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Mapping

from .._options import option
from .._validate import Checker, load_yaml
from ..classifier import DType, dtype_name
from ..exceptions import ConfigError

__all__ = ["ServeOptions", "load_config", "options_from_dict"]

_METHODS = ("GET", "POST", "PUT", "PATCH", "DELETE")


@dataclass(frozen=True)
class ServeOptions:
    """Everything ``guardmerge serve`` needs (see the module doc for the YAML form)."""

    host: str = option("127.0.0.1", "address to bind (the loopback interface unless told "
                       "otherwise)")
    port: int = option(8000, "port to listen on")
    upstream: str | None = option(None, "the upstream OpenAI-compatible base URL, e.g. "
                                  "http://127.0.0.1:8001/v1 (required)", metavar="URL")
    bundle: str | None = option(None, "guard bundle folder (required)", metavar="DIR")
    policy: str | None = option(None, "policy YAML file (required)", metavar="FILE")
    dtype: DType = option("float32", "guard model dtype: float32, bfloat16, float16 or auto",
                          parse=dtype_name)
    threads: int | None = option(None, "torch CPU threads (default: torch's own)")
    batching: bool = option(True, "cross-request micro-batching of guard windows",
                            negative="--no-batching",
                            negative_help="one check per forward pass (no cross-request "
                                          "batching)")
    max_batch_windows: int = option(32, "most windows in one batch (one forward pass)")
    max_batch_tokens: int = option(8192, "most padded tokens (windows x longest) in one batch")
    max_wait_ms: float = option(0.0, "how long a batch that is not full waits for more checks "
                                "(0: drain what is queued when the model is free)")
    max_queue: int = option(256, "most checks waiting for the model; more are refused (503)")
    check_timeout: float | None = option(None, "seconds one guard check may take, queue "
                                         "included (default: the policy's timeout, else 10)")
    upstream_timeout: float = option(600.0, "seconds to wait for upstream data (read timeout)")
    upstream_connect_timeout: float = option(5.0, "seconds to connect to the upstream")
    upstream_max_connections: int = option(256, "connections in the upstream pool")
    log_level: Literal["debug", "info", "warning", "error"] = option(
        "info", "log level of the proxy's own loggers")
    cache_size: int = option(1024, "texts whose scores the shared history cache keeps "
                             "(0: off)", cli=False)
    stream_mode: Literal["hold", "release"] = option("hold", "streams: hold text until "
                                                     "checked, or release and check behind",
                                                     cli=False)
    window_chars: int = option(2000, "streams: characters per checked window", cli=False)
    overlap_chars: int = option(200, "streams: checked text repeated before a window",
                                cli=False)
    max_body_bytes: int = option(8 * 2**20, "largest request body accepted", cli=False)
    retry_after: int = option(1, "seconds in Retry-After of a 503", cli=False)
    passthrough: tuple[str, ...] = option((), "unguarded pass-through routes, each "
                                          "'METHOD /path' (a bypass: only what you list)",
                                          cli=False)
    keys_env: str = option("GUARDMERGE_API_KEYS", "environment variable holding the proxy's "
                           "own API keys (comma-separated); set, the proxy requires one",
                           cli=False)
    upstream_key_env: str = option("GUARDMERGE_UPSTREAM_API_KEY", "environment variable "
                                   "holding the key the proxy sends upstream", cli=False)
    forward_client_key: bool = option(True, "forward the client's Authorization header "
                                      "upstream (when the proxy has no keys of its own and "
                                      "injects none)", cli=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "dtype", dtype_name(self.dtype))
        object.__setattr__(self, "passthrough", tuple(self.passthrough))
        problems = []
        if not 0 <= self.port <= 65535:
            problems.append(f"port: must be in [0, 65535], got {self.port}")
        for name in ("max_batch_windows", "max_batch_tokens", "max_queue", "window_chars",
                     "upstream_max_connections", "max_body_bytes"):
            if getattr(self, name) < 1:
                problems.append(f"{name}: must be >= 1, got {getattr(self, name)}")
        if self.threads is not None and self.threads < 1:
            problems.append(f"threads: must be >= 1, got {self.threads}")
        if self.cache_size < 0:
            problems.append(f"cache_size: must be >= 0, got {self.cache_size}")
        if not 0 <= self.overlap_chars < self.window_chars:
            problems.append(f"overlap_chars: need 0 <= overlap_chars < window_chars, got "
                            f"{self.overlap_chars} and {self.window_chars}")
        if self.max_wait_ms < 0:
            problems.append(f"max_wait_ms: must be >= 0, got {self.max_wait_ms}")
        if self.retry_after < 0:
            problems.append(f"retry_after: must be >= 0, got {self.retry_after}")
        for name in ("check_timeout", "upstream_timeout", "upstream_connect_timeout"):
            value = getattr(self, name)
            if value is not None and not 0 < value < float("inf"):
                problems.append(f"{name}: must be a number of seconds > 0, got {value}")
        if self.upstream is not None and not self.upstream.startswith(("http://", "https://")):
            problems.append(f"upstream: expected an http:// or https:// URL, got "
                            f"{self.upstream!r}")
        for route in self.passthrough:
            method, _, path = route.partition(" ")
            if method not in _METHODS or not path.startswith("/"):
                problems.append(f"passthrough: {route!r} is not 'METHOD /path' "
                                f"(METHOD one of {', '.join(_METHODS)})")
        if problems:
            raise ConfigError(problems)

    def require(self, *names: str) -> None:
        """A ``ConfigError`` naming every field of ``names`` left unset."""
        missing = [n for n in names if getattr(self, n) is None]
        if missing:
            raise ConfigError([f"{n}: required (in the config file or as --{n})"
                               for n in missing])

    def proxy_keys(self, environ: Mapping[str, str] | None = None) -> tuple[str, ...]:
        """The proxy's own keys, from the environment (empty: no proxy auth)."""
        raw = (environ if environ is not None else os.environ).get(self.keys_env, "")
        return tuple(k.strip() for k in raw.split(",") if k.strip())

    def upstream_key(self, environ: Mapping[str, str] | None = None) -> str | None:
        """The key to send upstream, from the environment (None: none injected)."""
        value = (environ if environ is not None else os.environ).get(self.upstream_key_env, "")
        return value.strip() or None


# (section, key) -> (field, kind)
_FILE_KEYS: dict[str, dict[str, tuple[str, str]]] = {
    "server": {"host": ("host", "str"), "port": ("port", "int"),
               "max_body_bytes": ("max_body_bytes", "int"),
               "retry_after": ("retry_after", "int"),
               "passthrough": ("passthrough", "routes"),
               "log_level": ("log_level", "log_level")},
    "upstream": {"base_url": ("upstream", "str"), "timeout": ("upstream_timeout", "seconds"),
                 "connect_timeout": ("upstream_connect_timeout", "seconds"),
                 "max_connections": ("upstream_max_connections", "int"),
                 "api_key_env": ("upstream_key_env", "str")},
    "guard": {"bundle": ("bundle", "path"), "policy": ("policy", "path"),
              "dtype": ("dtype", "dtype"), "threads": ("threads", "int_or_null"),
              "cache_size": ("cache_size", "int0"), "timeout": ("check_timeout", "seconds"),
              "stream_mode": ("stream_mode", "stream_mode"),
              "window_chars": ("window_chars", "int"),
              "overlap_chars": ("overlap_chars", "int0")},
    "batching": {"enabled": ("batching", "bool"), "max_windows": ("max_batch_windows", "int"),
                 "max_tokens": ("max_batch_tokens", "int"),
                 "max_wait_ms": ("max_wait_ms", "ms"), "max_queue": ("max_queue", "int")},
    "auth": {"keys_env": ("keys_env", "str"), "forward_client_key": ("forward_client_key",
                                                                       "bool")},
}


def load_config(path: str | os.PathLike[str]) -> ServeOptions:
    """Read and validate a serve YAML file (see the module doc)."""
    data = load_yaml(path, ConfigError)
    return options_from_dict(data, source=str(path), base=Path(path).resolve().parent)


def options_from_dict(data: Any, *, source: str = "<dict>",
                      base: Path | None = None) -> ServeOptions:
    """``ServeOptions`` from the YAML mapping; one ``ConfigError`` lists every problem."""
    c = Checker(source)
    top = c.mapping(data, "", allowed={"version", *_FILE_KEYS})
    values: dict[str, Any] = {}
    if top is not None:
        if top.get("version", 1) != 1:
            c.add("version", f"unsupported version {top.get('version')!r} (this guardmerge "
                  "reads 1)")
        for section, keys in _FILE_KEYS.items():
            if top.get(section) is None:
                continue
            sec = c.mapping(top[section], section, allowed=keys)
            for key, value in (sec or {}).items():
                if key in keys:
                    field, kind = keys[key]
                    got = _value(c, f"{section}.{key}", value, kind, base)
                    if got is not _BAD:
                        values[field] = got
    c.raise_if_any(ConfigError)
    try:
        return ServeOptions(**values)
    except ConfigError as exc:  # cross-field problems: name the file
        raise ConfigError([f"{source}: {p}" for p in exc.problems], source=source) from None


_BAD = object()


def _value(c: Checker, path: str, value: Any, kind: str, base: Path | None) -> Any:
    before = len(c.problems)
    out: Any
    if kind in ("str", "path"):
        out = c.string(value, path)
        if out is not None and kind == "path" and base is not None and \
                not Path(out).expanduser().is_absolute():
            out = str(base / Path(out).expanduser())
    elif kind in ("int", "int0"):
        out = c.integer(value, path, lo=1 if kind == "int" else 0)
    elif kind == "int_or_null":
        out = None if value is None else c.integer(value, path, lo=1)
    elif kind == "seconds":
        out = c.number(value, path, lo=0.0, lo_open=True)
    elif kind == "ms":
        out = c.number(value, path, lo=0.0)
    elif kind == "bool":
        out = c.boolean(value, path)
    elif kind == "dtype":
        try:
            out = dtype_name(value)
        except ConfigError as exc:
            c.add(path, str(exc).removeprefix("dtype: "))
            out = None
    elif kind == "stream_mode":
        out = c.choice(value, path, ("hold", "release"))
    elif kind == "log_level":
        out = c.choice(value, path, ("debug", "info", "warning", "error"))
    elif kind == "routes":
        out = [] if value == [] else c.string_list(value, path, allow_single=False)
        for i, route in enumerate(out or []):
            method, _, where = route.partition(" ")
            if method not in _METHODS or not where.startswith("/"):
                c.add(f"{path}[{i}]", f"expected 'METHOD /path' (METHOD one of "
                      f"{', '.join(_METHODS)}), got {route!r}")
        out = tuple(out or ())
    else:  # pragma: no cover - a programming error in _FILE_KEYS
        raise AssertionError(kind)
    return _BAD if len(c.problems) > before else out


def merge_flags(options: ServeOptions, given: Mapping[str, Any]) -> ServeOptions:
    """``options`` with the flags the user gave on the command line applied on top."""
    return dataclasses.replace(options, **dict(given)) if given else options
