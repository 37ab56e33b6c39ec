"""Strict validation helpers for YAML configs: every problem names the file and the key path,
and all problems are collected before one error is raised.

YAML is read with ``safe_load`` semantics plus two rules: a configuration file is at most
``MAX_CONFIG_BYTES`` (1 MiB), and a key given twice in one mapping is an error (plain YAML
keeps the last one silently). Every number must be finite: ``.nan`` and ``.inf`` are errors.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any, Iterable, Mapping, Sequence, TypeVar

import yaml

from ._files import MAX_CONFIG_BYTES, read_text
from .exceptions import ConfigError, GuardmergeError

E = TypeVar("E", bound=GuardmergeError)
_MISSING = object()


class _StrictLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a key repeated in one mapping (merge keys excepted)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=deep)
            try:
                first = seen.get(key)
            except TypeError:  # unhashable: the base class reports it
                continue
            if first is not None:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r} (first given on line {first + 1})",
                    key_node.start_mark)
            seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)


def load_yaml(path: str | os.PathLike[str], error: type[E]) -> Any:
    """Read a YAML file (a regular file of at most 1 MiB); problems become ``error`` naming the
    file (and line)."""
    text = read_text(path, error, limit=MAX_CONFIG_BYTES, what="configuration file")
    return parse_yaml(text, str(path), error)


def parse_yaml(text: str, source: str, error: type[E]) -> Any:
    if len(text) > MAX_CONFIG_BYTES or \
            len(text.encode("utf-8", "surrogatepass")) > MAX_CONFIG_BYTES:
        raise error(f"{source}: over the limit of {MAX_CONFIG_BYTES:,} bytes for a configuration")
    try:
        return yaml.load(text, Loader=_StrictLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise error(f"{source}: invalid YAML{where}: {problem}") from exc


def parse_json(text: str, source: str, error: type[E]) -> Any:
    """``json.loads`` that refuses duplicate keys and non-finite numbers (NaN, Infinity)."""
    def pairs(items: list[tuple[str, Any]]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, value in items:
            if key in out:
                raise ValueError(f"duplicate key {key!r}")
            out[key] = value
        return out

    def constant(name: str) -> Any:
        raise ValueError(f"non-finite number {name}")

    try:
        return json.loads(text, object_pairs_hook=pairs, parse_constant=constant)
    except RecursionError:
        raise error(f"{source}: not valid JSON (nested too deeply)") from None
    except ValueError as exc:  # JSONDecodeError is a ValueError
        raise error(f"{source}: not valid JSON ({exc})") from None


class Checker:
    """Collects ``"<source>: <key.path>: <problem>"`` lines."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.problems: list[str] = []

    def add(self, path: str, message: str) -> None:
        where = f"{self.source}: {path}: " if path else f"{self.source}: "
        self.problems.append(where + message)

    def raise_if_any(self, error: type[E]) -> None:
        if self.problems:
            if issubclass(error, ConfigError):
                raise error(self.problems, source=self.source)
            raise error("; ".join(self.problems))

    # -- typed getters: return the value, or None after recording a problem ---------------------

    def mapping(self, value: Any, path: str, *, required: Iterable[str] = (),
                allowed: Iterable[str] | None = None) -> dict[str, Any] | None:
        if not isinstance(value, Mapping):
            self.add(path, f"expected a mapping, got {_kind(value)}")
            return None
        for key in required:
            if key not in value:
                self.add(_join(path, key), "required key is missing")
        if allowed is not None:
            allowed = set(allowed)
            for key in value:
                if key not in allowed:
                    self.add(_join(path, str(key)),
                             f"unknown key (allowed: {', '.join(sorted(allowed))})")
        return dict(value)

    def string(self, value: Any, path: str, *, nonempty: bool = True) -> str | None:
        if not isinstance(value, str) or (nonempty and not value.strip()):
            self.add(path, f"expected a non-empty string, got {_kind(value)}")
            return None
        return value

    def number(self, value: Any, path: str, *, lo: float | None = None, hi: float | None = None,
               lo_open: bool = False) -> float | None:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            self.add(path, f"expected a number{_range(lo, hi, lo_open)}, got {_kind(value)}")
            return None
        v = float(value)
        if not math.isfinite(v):
            self.add(path, f"expected a finite number{_range(lo, hi, lo_open)}, got {value}")
            return None
        if (lo is not None and (v < lo or (lo_open and v == lo))) or (hi is not None and v > hi):
            self.add(path, f"expected a number{_range(lo, hi, lo_open)}, got {value}")
            return None
        return v

    def integer(self, value: Any, path: str, *, lo: int | None = None) -> int | None:
        if isinstance(value, bool) or not isinstance(value, int):
            self.add(path, f"expected an integer, got {_kind(value)}")
            return None
        if lo is not None and value < lo:
            self.add(path, f"expected an integer >= {lo}, got {value}")
            return None
        return value

    def boolean(self, value: Any, path: str) -> bool | None:
        if not isinstance(value, bool):
            self.add(path, f"expected true or false, got {_kind(value)}")
            return None
        return value

    def choice(self, value: Any, path: str, choices: Sequence[str]) -> str | None:
        if value not in choices:
            self.add(path, f"expected one of {', '.join(choices)}, got {value!r}")
            return None
        return value

    def string_list(self, value: Any, path: str, *, allow_single: bool = True) -> list[str] | None:
        if allow_single and isinstance(value, str):
            value = [value]
        if not isinstance(value, list) or not value:
            self.add(path, f"expected a non-empty list of strings, got {_kind(value)}")
            return None
        out = []
        for i, item in enumerate(value):
            s = self.string(item, f"{path}[{i}]")
            if s is not None:
                out.append(s)
        return out if len(out) == len(value) else None


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _range(lo: float | None, hi: float | None, lo_open: bool) -> str:
    if lo is not None and hi is not None:
        return f" in {'(' if lo_open else '['}{lo:g}, {hi:g}]"
    if lo is not None:
        return f" {'>' if lo_open else '>='} {lo:g}"
    return ""


def _kind(value: Any) -> str:
    if value is None:
        return "nothing (null)"
    if isinstance(value, bool):
        return f"a boolean ({value})"
    if isinstance(value, str):
        return f"a string ({value!r})" if len(value) < 40 else "a string"
    if isinstance(value, (int, float)):
        return f"a number ({value})"
    if isinstance(value, list):
        return "a list" if value else "an empty list"
    if isinstance(value, Mapping):
        return "a mapping"
    return type(value).__name__
