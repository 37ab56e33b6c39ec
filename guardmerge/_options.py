"""Options dataclasses that are both a Python signature and a set of command-line flags.

An entry point declares its options once, as a frozen dataclass whose fields carry their help
text (``option(default, "help")``); ``add_options(parser, Cls)`` turns the fields into argparse
flags and ``from_args(Cls, namespace)`` builds the dataclass back from the parsed flags. The
Python API and the CLI therefore cannot drift: a new field is a new flag, with the same default.
Validation lives in the dataclass's ``__post_init__`` (``ConfigError`` naming the option), so a
bad value is the same error from Python and from the shell; ``parse=`` gives the flag the same
normalisation the dataclass applies (so ``--dtype bf16`` works where ``dtype="bf16"`` does).
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from typing import Any, Callable, Literal, TypeVar, get_args, get_origin

__all__ = ["option", "add_options", "from_args", "identity"]

T = TypeVar("T")


def option(default: Any, help: str, *, flag: str | None = None,
           metavar: str | tuple[str, ...] | None = None, cli: bool = True,
           negative: str | None = None, negative_help: str | None = None,
           parse: Callable[[str], Any] | None = None, identity: bool = False) -> Any:
    """A dataclass field with CLI metadata.

    ``flag``: the flag name (default ``--field-name``); ``cli=False`` keeps the field out of the
    command line (Python-only options); ``negative`` / ``negative_help``: for a bool defaulting
    to True, the flag that turns it off (default ``--no-field-name``) and its help; ``parse``:
    converts the flag's text (a ``ConfigError`` / ``ValueError`` is a usage error);
    ``identity``: the field is part of what makes a run "the same run" (the search's resume
    check). The help text should say what the option does; the default is appended.
    """
    return dataclasses.field(default=default, metadata={
        "help": help, "flag": flag, "metavar": metavar, "cli": cli, "negative": negative,
        "negative_help": negative_help, "parse": parse, "identity": identity})


def _flag(f: dataclasses.Field) -> str:
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")


def _escape(text: str) -> str:
    return text.replace("%", "%%")


def _parser(parse: Callable[[str], Any], name: str) -> Callable[[str], Any]:
    def convert(text: str) -> Any:
        try:
            return parse(text)
        except ValueError as exc:  # ConfigError is a ValueError
            raise argparse.ArgumentTypeError(str(exc).removeprefix(f"{name}: ")) from None
    convert.__name__ = name
    return convert


def add_options(parser: argparse.ArgumentParser, cls: type, *, skip: tuple[str, ...] = ()) -> None:
    """Add one flag per CLI field of the options dataclass ``cls`` to ``parser``."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if not f.metadata.get("cli", False) or f.name in skip:
            continue
        kind = hints[f.name]
        default = f.default
        help_text = f.metadata["help"]
        if kind is bool:
            if default:
                neg = f.metadata.get("negative") or "--no-" + f.name.replace("_", "-")
                parser.add_argument(neg, dest=f.name, action="store_false",
                                    help=_escape(f.metadata.get("negative_help")
                                                 or f"turn off: {help_text}"))
            else:
                parser.add_argument(_flag(f), dest=f.name, action="store_true",
                                    help=_escape(help_text))
            continue
        kw: dict[str, Any] = {"dest": f.name, "default": default}
        base = _unwrap_optional(kind)
        if f.metadata.get("parse"):
            kw["type"] = _parser(f.metadata["parse"], f.name)
            if get_origin(base) is Literal:
                kw["metavar"] = "{" + ",".join(map(str, get_args(base))) + "}"
        elif get_origin(base) is Literal:
            kw["choices"] = list(get_args(base))
            kw["type"] = type(get_args(base)[0])
        elif get_origin(base) is tuple:
            parts = get_args(base)
            if len(parts) == 2 and parts[1] is Ellipsis:
                kw["nargs"] = "+"
                kw["type"] = parts[0]
            else:
                kw["nargs"] = len(parts)
                kw["type"] = parts[0]
        elif base in (int, float, str):
            kw["type"] = base
        else:  # pragma: no cover - a programming error in an options class
            raise TypeError(f"{cls.__name__}.{f.name}: no CLI mapping for {kind!r}")
        if f.metadata.get("metavar"):
            kw["metavar"] = f.metadata["metavar"]
        if default is None or "default" in help_text:  # the help already says what None means
            kw["help"] = _escape(help_text)
        else:
            shown = " ".join(map(str, default)) if isinstance(default, tuple) else default
            kw["help"] = _escape(f"{help_text} (default: {shown})")
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
