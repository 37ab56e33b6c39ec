"""The proxy's configuration: ``ServeOptions``, from a YAML file, flags and the environment.

One options dataclass is the Python signature (``create_app(ServeOptions(...))``) and the
command line (``guardmerge serve --port 9000 ...``: every CLI field is a flag). A YAML file
(``guardmerge serve --config serve.yaml``) gives the same fields in sections::

    version: 1
    server:    {host: 127.0.0.1, port: 8000, max_body_bytes: 8388608, retry_after: 1,
                passthrough: [],         # unguarded routes, explicitly: "GET /v1/files/{x}"
                verdict_detail: findings, allow_open: false}
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
(``serve.yaml: batching.max_windows: expected an integer >= 1, got 0``), as a ``ConfigError``;
a flag's problem names the flag (``--max-batch-windows: ...``), a key read from the
environment its variable (never the value), a ``ServeOptions(...)`` argument its field.
``passthrough`` entries are checked by ``passthrough_problem`` (single-segment parameters,
plain literal segments, nothing at or under one of the proxy's own routes), and
``check_exposure`` refuses a public address without proxy keys unless ``allow_open``.
No torch, no starlette: the CLI builds its flags from this module.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import re
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Mapping

from .._options import option
from .._validate import Checker, load_yaml
from ..classifier import DType, dtype_name
from ..exceptions import ConfigError

__all__ = ["ServeOptions", "load_config", "merge_flags", "options_from_dict"]

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
    upstream_max_connections: int = option(256, "connections to the upstream (one client, in pools "
                                           "of at most 16)")
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
    allow_open: bool = option(False, "serve on an address that is not the loopback without "
                              "proxy keys (anyone who reaches it can use the upstream)")
    verdict_detail: Literal["action", "findings", "scores"] = option(
        "findings", "what a verdict returned to a caller holds: action only, findings with "
        "spans and scores, or also every head's scores", cli=False)
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
        problems = field_problems(self)
        if problems:
            raise ConfigError([f"{where}: {message}" for where, message in problems])

    def require(self, *names: str) -> None:
        """A ``ConfigError`` naming every field of ``names`` left unset."""
        missing = [n for n in names if getattr(self, n) is None]
        if missing:
            raise ConfigError([f"{n}: required (in the config file or as --{n})"
                               for n in missing])

    def proxy_keys(self, environ: Mapping[str, str] | None = None) -> tuple[str, ...]:
        """The proxy's own keys, from the environment (empty: no proxy auth). A key that is
        not printable ASCII without spaces is a ``ConfigError`` naming the variable (never
        the value)."""
        raw = (environ if environ is not None else os.environ).get(self.keys_env, "")
        keys = tuple(k.strip() for k in raw.split(",") if k.strip())
        for i, key in enumerate(keys):
            if not _KEY.fullmatch(key):
                raise ConfigError(f"${self.keys_env} (auth.keys_env): key {i + 1} holds spaces "
                                  "or characters that are not printable ASCII")
        return keys

    def upstream_key(self, environ: Mapping[str, str] | None = None) -> str | None:
        """The key to send upstream, from the environment (None: none injected)."""
        value = (environ if environ is not None else os.environ).get(self.upstream_key_env, "")
        value = value.strip()
        if value and not _KEY.fullmatch(value):
            raise ConfigError(f"${self.upstream_key_env} (upstream.api_key_env): the key holds "
                              "spaces or characters that are not printable ASCII")
        return value or None

    def check_exposure(self, environ: Mapping[str, str] | None = None) -> None:
        """An open relay is refused: bound to an address that is not the loopback, the proxy
        needs keys of its own (anyone who reaches it would otherwise use the upstream, and
        the upstream key it injects, through it), unless ``allow_open`` says so."""
        if self.allow_open or is_loopback(self.host) or self.proxy_keys(environ):
            return
        raise ConfigError(
            f"server.host (--host): {self.host!r} is not a loopback address and the proxy has "
            f"no keys of its own (${self.keys_env}, auth.keys_env, is empty): anyone who can "
            "reach it could use the upstream through it"
            + (f" with the key in ${self.upstream_key_env}" if self.upstream_key(environ)
               else "")
            + "; set proxy keys, bind 127.0.0.1, or set server.allow_open: true "
              "(--allow-open)")


_KEY = re.compile(r"[\x21-\x7e]{1,4096}")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
#: the proxy's own routes (a model id stands for ``{model}``): no passthrough may match one
RESERVED_PATHS = ("/v1/chat/completions", "/v1/completions", "/v1/responses", "/v1/models",
                  "/v1/models/x", "/v1/guard/check", "/beta/litellm_basic_guardrail_api",
                  "/healthz", "/readyz", "/metrics")
_PARAM = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)(?::([a-z]+))?\}")
_CONVERTORS = {"str": "[^/]+", "int": "[0-9]+", "float": r"[0-9]+(?:\.[0-9]+)?",
               "uuid": "[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}"}
_LITERAL = re.compile(r"[A-Za-z0-9_.~\-]+")
#: one path segment the proxy forwards: no ``.`` / ``..``, no encoded slash, query or space
SAFE_SEGMENT = re.compile(r"(?!\.{1,2}$)[A-Za-z0-9_.:@+~\-]{1,256}")


def is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def passthrough_problem(entry: str) -> str | None:
    """Why a ``passthrough`` entry (``"METHOD /path"``) is refused, or None. Parameters are
    single segments (``{name}``, ``{name:int}``...; never ``:path``, which would cover any
    route below it), literal segments plain names; a template matching one of the proxy's
    own routes (``RESERVED_PATHS``) or any path below one is a bypass."""
    method, _, path = entry.partition(" ")
    if method not in _METHODS or not path.startswith("/"):
        return f"expected 'METHOD /path' (METHOD one of {', '.join(_METHODS)}), got {entry!r}"
    pattern = []
    for segment in path[1:].split("/"):
        param = _PARAM.fullmatch(segment)
        if param is not None:
            kind = param.group(2) or "str"
            if kind not in _CONVERTORS:
                return (f"{entry!r}: parameter {{{param.group(1)}:{kind}}}: only single-segment "
                        f"parameters ({', '.join(_CONVERTORS)}) are allowed")
            pattern.append(_CONVERTORS[kind])
        elif _LITERAL.fullmatch(segment) and segment not in (".", ".."):
            pattern.append(re.escape(segment))
        else:
            return (f"{entry!r}: segment {segment!r} is not a plain name or a {{parameter}} "
                    "(no empty, '.', '..', wildcard or encoded segments)")
    for reserved in RESERVED_PATHS:  # the template cut to the route's depth: at or under it
        depth = reserved.count("/")
        if len(pattern) >= depth and re.fullmatch("/" + "/".join(pattern[:depth]), reserved):
            return (f"{entry!r} covers the proxy's own route {reserved} (or paths under it): "
                    "it cannot be passed through")
    return None


def field_problems(opts: Any) -> list[tuple[str, str]]:
    """(field, problem) for every invalid value of ``opts`` (a ``ServeOptions`` or anything
    with its attributes): the callers name each field as the user gave it (a file's key
    path, a flag, the field)."""
    out: list[tuple[str, str]] = []
    if not 0 <= opts.port <= 65535:
        out.append(("port", f"must be in [0, 65535], got {opts.port}"))
    for name in ("max_batch_windows", "max_batch_tokens", "max_queue", "window_chars",
                 "upstream_max_connections", "max_body_bytes"):
        if getattr(opts, name) < 1:
            out.append((name, f"must be a positive integer, got {getattr(opts, name)}"))
    if opts.threads is not None and opts.threads < 1:
        out.append(("threads", f"must be a positive integer, got {opts.threads}"))
    if opts.cache_size < 0:
        out.append(("cache_size", f"must be >= 0, got {opts.cache_size}"))
    if not 0 <= opts.overlap_chars < opts.window_chars:
        out.append(("overlap_chars", f"need 0 <= overlap_chars < window_chars, got "
                    f"{opts.overlap_chars} and {opts.window_chars}"))
    if not 0 <= opts.max_wait_ms < float("inf"):
        out.append(("max_wait_ms", f"must be a finite number >= 0, got {opts.max_wait_ms}"))
    if opts.retry_after < 0:
        out.append(("retry_after", f"must be >= 0, got {opts.retry_after}"))
    for name in ("check_timeout", "upstream_timeout", "upstream_connect_timeout"):
        value = getattr(opts, name)
        if value is not None and not 0 < value < float("inf"):
            out.append((name, f"must be a number of seconds > 0, got {value}"))
    if opts.upstream is not None and not opts.upstream.startswith(("http://", "https://")):
        out.append(("upstream", f"expected an http:// or https:// URL, got {opts.upstream!r}"))
    if not opts.host or any(c.isspace() for c in opts.host):
        out.append(("host", f"expected a host name or address, got {opts.host!r}"))
    if opts.verdict_detail not in ("action", "findings", "scores"):
        out.append(("verdict_detail", f"expected one of action, findings, scores, got "
                    f"{opts.verdict_detail!r}"))
    for name in ("keys_env", "upstream_key_env"):
        if not _ENV_NAME.fullmatch(getattr(opts, name) or ""):
            out.append((name, f"expected an environment variable name, got "
                        f"{getattr(opts, name)!r}"))
    for i, entry in enumerate(opts.passthrough):
        problem = passthrough_problem(entry) if isinstance(entry, str) else \
            f"expected 'METHOD /path', got {type(entry).__name__}"
        if problem is not None:
            out.append((f"passthrough[{i}]", problem))
    return out


# (section, key) -> (field, kind)
_FILE_KEYS: dict[str, dict[str, tuple[str, str]]] = {
    "server": {"host": ("host", "str"), "port": ("port", "int"),
               "max_body_bytes": ("max_body_bytes", "int"),
               "retry_after": ("retry_after", "int0"),
               "passthrough": ("passthrough", "routes"),
               "allow_open": ("allow_open", "bool"),
               "verdict_detail": ("verdict_detail", "verdict_detail"),
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
#: field -> its key path in a file (``batching.max_windows``)
FILE_KEY = {field: f"{section}.{key}" for section, keys in _FILE_KEYS.items()
            for key, (field, _) in keys.items()}


def flag_name(name: str) -> str:
    """The command-line flag of field ``name`` (``--max-batch-windows``)."""
    f = next(f for f in dataclasses.fields(ServeOptions) if f.name == name)
    return f.metadata.get("flag") or "--" + name.replace("_", "-")


def _base_field(name: str) -> str:
    return name.split("[", 1)[0]


def _validated(values: Mapping[str, Any], where: Any) -> ServeOptions:
    """``ServeOptions(**values)``; its problems named by ``where(field, index_suffix)``."""
    defaults = {f.name: f.default for f in dataclasses.fields(ServeOptions)}
    merged = types.SimpleNamespace(**{**defaults, **values})
    merged.passthrough = tuple(merged.passthrough)
    problems = field_problems(merged)
    if problems:
        raise ConfigError([f"{where(_base_field(f), f[len(_base_field(f)):])}: {m}"
                           for f, m in problems])
    return ServeOptions(**values)


def load_config(path: str | os.PathLike[str]) -> ServeOptions:
    """Read and validate a serve YAML file (see the module doc)."""
    data = load_yaml(path, ConfigError)
    return options_from_dict(data, source=str(path), base=Path(path).resolve().parent)


def options_from_dict(data: Any, *, source: str = "<dict>",
                      base: Path | None = None) -> ServeOptions:
    """``ServeOptions`` from the YAML mapping; one ``ConfigError`` lists every problem, each
    named ``<file>: <section.key>``."""
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
    return _validated(values, lambda f, sub: f"{source}: {FILE_KEY.get(f, f)}{sub}")


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
    elif kind == "verdict_detail":
        out = c.choice(value, path, ("action", "findings", "scores"))
    elif kind == "log_level":
        out = c.choice(value, path, ("debug", "info", "warning", "error"))
    elif kind == "routes":
        out = [] if value == [] else c.string_list(value, path, allow_single=False)
        out = tuple(out or ())  # each entry is checked with the others (passthrough_problem)
    else:  # pragma: no cover - a programming error in _FILE_KEYS
        raise AssertionError(kind)
    return _BAD if len(c.problems) > before else out


def merge_flags(options: ServeOptions, given: Mapping[str, Any],
                source: str | None = None) -> ServeOptions:
    """``options`` (from the file ``source``, if any) with the flags the user gave on the
    command line applied on top; a problem names the flag, or the file's key path."""
    if not given:
        return options
    values = {f.name: getattr(options, f.name) for f in dataclasses.fields(ServeOptions)}
    values.update(given)

    def where(field: str, sub: str) -> str:
        if field in given:
            return flag_name(field)
        return f"{source}: {FILE_KEY.get(field, field)}{sub}" if source else field + sub

    return _validated(values, where)
