"""Options dataclasses that are both a Python signature and a set of command-line flags.

An entry point declares its options once, as a frozen dataclass whose fields carry their help
text (``option(default, "help")``); ``add_options(parser, Cls)`` turns the fields into argparse
flags and ``from_args(Cls, namespace)`` builds the dataclass back from the parsed flags. The
Python API and the CLI therefore cannot drift: a new field is a new flag, with the same default.
Validation lives in the dataclass's ``__post_init__`` (``ConfigError`` naming the option), so a
bad value is the same error from Python and from the shell.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from typing import Any, Literal, TypeVar, get_args, get_origin

__all__ = ["option", "add_options", "from_args"]

T = TypeVar("T")


def option(default: Any, help: str, *, flag: str | None = None, metavar: str | None = None,
           cli: bool = True, negative: str | None = None, identity: bool = False) -> Any:
    """A dataclass field with CLI metadata.

    ``flag``: the flag name (default ``--field-name``); ``cli=False`` keeps the field out of the
    command line (Python-only options); ``negative``: for a bool defaulting to True, the flag
    that turns it off (e.g. ``--no-progress``); ``identity``: the field is part of what makes a
    run "the same run" (used by the search's resume check).
    """
    return dataclasses.field(default=default, metadata={
        "help": help, "flag": flag, "metavar": metavar, "cli": cli, "negative": negative,
        "identity": identity})


def _flag(f: dataclasses.Field) -> str:
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")


def add_options(parser: argparse.ArgumentParser, cls: type, *, skip: tuple[str, ...] = ()) -> None:
    """Add one flag per CLI field of the options dataclass ``cls`` to ``parser``."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if not f.metadata.get("cli", False) or f.name in skip:
            continue
        kind = hints[f.name]
        default = f.default
        help_text = f.metadata["help"]
        kw: dict[str, Any] = {"dest": f.name, "help": help_text}
        if kind is bool:
            if default:
                neg = f.metadata.get("negative") or "--no-" + f.name.replace("_", "-")
                parser.add_argument(neg, action="store_false", **kw)
            else:
                parser.add_argument(_flag(f), action="store_true", **kw)
            continue
        base = _unwrap_optional(kind)
        if get_origin(base) is Literal:
            kw["choices"] = list(get_args(base))
            kw["type"] = type(get_args(base)[0])
        elif get_origin(base) is tuple:
            parts = get_args(base)
            kw["nargs"] = len(parts)
            kw["type"] = parts[0]
        elif base in (int, float, str):
            kw["type"] = base
        else:  # pragma: no cover - a programming error in an options class
            raise TypeError(f"{cls.__name__}.{f.name}: no CLI mapping for {kind!r}")
        if f.metadata.get("metavar"):
            kw["metavar"] = f.metadata["metavar"]
        shown = "none" if default is None else (" ".join(map(str, default))
                                                 if isinstance(default, tuple) else default)
        kw["help"] = f"{help_text} (default: {shown})".replace("%", "%%")
        kw["default"] = default
        parser.add_argument(_flag(f), **kw)


def _unwrap_optional(kind: Any) -> Any:
    """``int | None`` -> ``int`` (an optional option's flag takes the value's type)."""
    args = get_args(kind)
    if get_origin(kind) in (typing.Union, types.UnionType) and type(None) in args:
        return next(a for a in args if a is not type(None))
    return kind


def from_args(cls: type[T], args: argparse.Namespace, **extra: Any) -> T:
    """The options dataclass ``cls`` from parsed flags (fields not on the command line keep
    their defaults unless given in ``extra``)."""
    values: dict[str, Any] = {}
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        if f.metadata.get("cli", False) and hasattr(args, f.name):
            value = getattr(args, f.name)
            values[f.name] = tuple(value) if isinstance(value, list) else value
    values.update(extra)
    return cls(**values)


def identity(options: Any) -> dict[str, Any]:
    """The fields of ``options`` marked ``identity=True``, as a plain dict."""
    return {f.name: _plain(getattr(options, f.name)) for f in dataclasses.fields(options)
            if f.metadata.get("identity")}


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value
