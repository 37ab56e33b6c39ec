"""Chat messages as the guard reads them: one snapshot, roles normalised, every part accounted for.

``snapshot(value)`` copies JSON-like request data once (mappings, lists, pydantic models the way
the OpenAI SDK serialises them), so the value a guard checked is the value sent upstream: a
generator cannot be consumed by the check, and an object cannot answer differently the second
time it is read. ``read_messages`` turns messages into ``Message`` records: a role
(case-insensitive, stripped), the text to score, how many media parts carry no text, and every
piece of content the guard could not read (bytes, nested lists, unknown objects, parts without
a ``type``), which the policy never lets pass silently.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from collections.abc import Mapping  # isinstance on it: typing.Mapping is several times slower
from typing import Any, Iterable

__all__ = ["Message", "ROLE_ALIASES", "TEXT_PARTS", "Unreadable", "get", "normalize_role",
           "read_messages", "snapshot"]

TEXT_PARTS = {"text": "text", "input_text": "text", "output_text": "text", "refusal": "refusal"}
#: parts that are media: a text classifier cannot read them (policy: ``non_text_parts``)
MEDIA_PARTS = frozenset({"image_url", "input_image", "image", "input_audio", "audio", "file",
                         "input_file", "video", "input_video"})
_SCALARS = (str, int, float, bool, type(None))


@dataclass(frozen=True)
class Unreadable:
    """Content an API adapter knows the guard cannot read (token ids, a stored item): stands
    in a message's ``content`` and becomes an ``unreadable`` finding with its ``reason``."""

    reason: str


def get(obj: Any, key: str, default: Any = None) -> Any:
    """``obj[key]`` for mappings, ``obj.key`` for objects (SDK models)."""
    if isinstance(obj, Mapping):
        return obj.get(key, default)
    return getattr(obj, key, default)


def snapshot(value: Any) -> Any:
    """A deep copy of JSON-like data; pydantic models are dumped the way the OpenAI SDK sends
    them. Anything else (bytes, generators, arbitrary objects) is kept as it is: the guard
    reports it as unreadable instead of reading it."""
    if isinstance(value, _SCALARS) or isinstance(value, Enum):
        return value
    if isinstance(value, Mapping):
        return {k: snapshot(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [snapshot(v) for v in value]
    dump = getattr(value, "model_dump", None)
    if callable(dump) and hasattr(type(value), "model_fields"):
        return snapshot(dump(mode="json", exclude_unset=True,
                             exclude=getattr(value, "__api_exclude__", None)))
    return value


#: legacy role names read as the current ones: OpenAI's ``function`` messages (function
#: results, before tools) are tool results
ROLE_ALIASES = {"function": "tool"}


def normalize_role(role: Any) -> str:
    """Case-insensitive, stripped, aliases resolved (``function`` is ``tool``); cut to 64
    characters. A role the policy does not know is reported as ``unknown``, never echoed."""
    name = str(role).strip().lower()[:64]
    return ROLE_ALIASES.get(name, name)


@dataclass
class Message:
    """One message as the guard sees it."""

    index: int
    role: str
    text: str | None = None
    media_parts: int = 0
    unreadable: list[str] = field(default_factory=list)


def read_messages(messages: Iterable[Any] | str, default_role: str) -> list[Message]:
    """Read every message (dicts, SDK objects or plain strings) exactly once."""
    if isinstance(messages, str):
        messages = [messages]
    out = []
    for index, msg in enumerate(messages):
        if isinstance(msg, str):
            out.append(Message(index, default_role, msg))
            continue
        if not isinstance(msg, Mapping) and not hasattr(msg, "content") and \
                not hasattr(msg, "role"):
            out.append(Message(index, default_role,
                               unreadable=[f"message is a {type(msg).__name__}, not a message"]))
            continue
        role = get(msg, "role")
        m = Message(index, default_role if role is None else normalize_role(role))
        _read_content(get(msg, "content"), m, "content")
        out.append(m)
    return out


def _read_content(content: Any, m: Message, where: str) -> None:
    texts: list[str] = []
    if content is None:
        return
    if isinstance(content, Unreadable):
        m.unreadable.append(content.reason)
    elif isinstance(content, str):
        texts.append(content)
    elif isinstance(content, (list, tuple)):
        for i, part in enumerate(content):
            _read_part(part, texts, m, f"{where}[{i}]")
    else:
        m.unreadable.append(f"{where} is a {type(content).__name__}, not text or a list of parts")
    if texts:
        m.text = "\n\n".join(texts)


def _read_part(part: Any, texts: list[str], m: Message, where: str) -> None:
    if isinstance(part, str):
        texts.append(part)
        return
    if not isinstance(part, Mapping) and not hasattr(part, "type"):
        m.unreadable.append(f"{where} is a {type(part).__name__}, not a content part")
        return
    kind = get(part, "type")
    field_name = TEXT_PARTS.get(kind) if isinstance(kind, str) else None
    if field_name is not None:
        value = get(part, field_name)
        if isinstance(value, str):
            texts.append(value)
        elif value is not None:
            m.unreadable.append(f"{where}.{field_name} is a {type(value).__name__}, not text")
        return
    if isinstance(kind, str) and kind in MEDIA_PARTS:
        m.media_parts += 1
        return
    # no type, or one the guard does not know: score any text it carries, and report it
    for key in ("text", "refusal", "content"):
        value = get(part, key)
        if isinstance(value, str):
            texts.append(value)
    m.unreadable.append(f"{where} has no 'type'" if kind is None else
                        f"{where} has a type the guard does not know")  # never echoed: text
