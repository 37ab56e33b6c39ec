"""Where the text is in each OpenAI-style API the client wrapper guards.

One adapter per API (chat completions, legacy completions, Responses) answers the same
questions, so the wrapper's logic is written once: which request fields carry text to the
model (``request``: read from one snapshot, which is also what is sent), which response fields
carry text back (``output_items``: one item per choice or output), what a streamed item adds
(``reader``: per stream, what each item adds, for the stream machine, and the refusal items
that end a blocked stream), and what a refusal looks like (``refuse_prompt``,
``refuse_output``).

Decided here, where the issue was silent: tool definitions, ``response_format`` schemas,
``prediction`` and stored-conversation references (``previous_response_id``, ``conversation``)
are the application's own input and are not scored, like system prompts under the default
policy; Responses ``instructions`` are checked as a ``system`` message and prompt-template
variables as ``user`` text; input items the guard cannot read (``item_reference``, tool-call
records of unknown types) are unreadable content (``on_error``).

Parameters outside the API's own (``_screen``, run first by every ``request``): the SDK merges
``extra_body`` into the request body over the parameters, so a text-bearing field there
(``messages``, ``input``, ``prompt``, ...) or ``stream`` is folded into the snapshot in the
parameter's place (checked, and sent as the parameter). Any other key, of ``extra_body`` or
an unknown keyword argument (guardmerge's ``ChatClient`` sends every keyword it is given), is
default-deny for text: a value without a string anywhere (``top_k=20``, ``min_p=0.05``,
``chat_template_kwargs={"enable_thinking": False}``) is sent as it is; a value holding text is
refused with ``UnguardedCallError`` naming the parameter, unless its key is one of the API's
own parameters or in ``VENDOR_SETTINGS`` (vendor settings and output constraints whose strings
the model does not read as a prompt). ``extra_headers`` and ``extra_query`` are not read:
OpenAI-compatible servers take the prompt from the JSON body only, and no standard header or
query parameter carries text to the model (they carry auth, versions, routing).
"""

from __future__ import annotations

import re
import time
from collections.abc import Mapping  # isinstance on it: typing.Mapping is several times slower
from enum import Enum
from typing import Any

from ._messages import Unreadable, get, snapshot
from ._stream import Touch, blocked_keys
from .exceptions import UnguardedCallError
from .verdict import Verdict

__all__ = ["API", "CHAT", "COMPLETIONS", "RESPONSES", "VENDOR_SETTINGS"]

_UNSET = ("NotGiven", "Omit")
#: the SDK's per-call options, not API parameters; ``extra_body`` is screened (module doc)
_SDK_OPTIONS = frozenset({"extra_headers", "extra_query", "extra_body", "timeout"})
#: keys of OpenAI-compatible servers outside the OpenAI API whose strings are settings or
#: output constraints, not prompt text: vLLM guided decoding, OpenRouter routing, reasoning
#: switches, request ids
VENDOR_SETTINGS = frozenset({
    "guided_json", "guided_regex", "guided_choice", "guided_grammar", "guided_decoding_backend",
    "guided_whitespace_pattern", "structured_outputs", "provider", "models", "route",
    "transforms", "reasoning", "thinking", "request_id", "cache_salt"})
_NAME = re.compile(r"[A-Za-z0-9_.\-]{1,64}")


def _given(value: Any) -> bool:
    return value is not None and type(value).__name__ not in _UNSET


def _to_dict(obj: Any) -> dict[str, Any]:
    if isinstance(obj, Mapping):
        return dict(obj)
    return obj.model_dump(exclude_unset=True)


def _key_name(key: Any) -> str:
    """A parameter's name for an error message: never a caller's string that is not a name."""
    return repr(key) if isinstance(key, str) and _NAME.fullmatch(key) else "<a key that is not a name>"


def _holds_text(value: Any) -> bool:
    """Whether JSON-like ``value`` (a snapshot) holds a string anywhere (a mapping key that is
    not a plain name counts) or anything the guard cannot read."""
    stack, seen = [value], 0
    while stack:
        v = stack.pop()
        seen += 1
        if isinstance(v, Enum):
            v = v.value
        if isinstance(v, str) or seen > 100_000:
            return True
        if isinstance(v, Mapping):
            if any(not (isinstance(k, str) and _NAME.fullmatch(k)) for k in v):
                return True
            stack.extend(v.values())
        elif isinstance(v, (list, tuple)):
            stack.extend(v)
        elif not (isinstance(v, (int, float, type(None))) or type(v).__name__ in _UNSET):
            return True  # bytes, objects: unreadable, so treated as text
    return False


def _screen(api: "API", kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """``kwargs`` with ``extra_body``'s text fields folded in and every other parameter
    screened (see the module doc); raises ``UnguardedCallError`` naming a refused one."""
    sent = dict(kwargs)
    extra = sent.get("extra_body")
    if "extra_body" in sent and _given(extra):
        if not isinstance(extra, Mapping):
            raise UnguardedCallError(f"{api.name}.create(extra_body)",
                                     f"extra_body is a {type(extra).__name__}, not a mapping "
                                     "the guard can read")
        rest = {}
        for key, value in extra.items():
            if key in api.text_fields or key == "stream":
                sent[key] = value  # the SDK would send it in the parameter's place
            else:
                rest[key] = _screened(api, f"extra_body[{_key_name(key)}]", key, value)
        sent["extra_body"] = rest
        if not rest:
            del sent["extra_body"]
    for key in list(sent):
        if key not in _SDK_OPTIONS and key not in api.text_fields:
            sent[key] = _screened(api, _key_name(key), key, sent[key])
    return sent


def _screened(api: "API", where: str, key: Any, value: Any) -> Any:
    if key in api.other_fields or key in VENDOR_SETTINGS:
        return value
    if not (isinstance(key, str) and _NAME.fullmatch(key)):
        raise UnguardedCallError(f"{api.name}.create({where})",
                                 "a parameter name that is not a name could carry text")
    param = key
    if not _given(value):
        return value
    try:
        value = snapshot(value)  # what is screened is what is sent
    except RecursionError:
        value = object()
    if _holds_text(value):
        raise UnguardedCallError(
            f"{api.name}.create({where})",
            "a parameter the guard does not know, and its value holds text that would reach "
            "the model unchecked; pass the text in a parameter the guard reads",
            param=param if where.startswith("'") else "extra_body")
    return value


def _call_text(call: Any) -> str:
    """``name(arguments)`` of a tool call (``input`` for custom tools), as the guard scores it."""
    return f"{get(call, 'name', '')}({get(call, 'arguments', get(call, 'input', ''))})"


def _unlisted(response: Any, field: str) -> list[dict[str, Any]] | None:
    """None when ``response`` has its ``choices`` / ``output`` list; else the one unreadable
    item that stands for it: a response without one is never a response of no text."""
    if isinstance(get(response, field), (list, tuple)):
        return None
    return [{"role": "assistant", "content": Unreadable(
        f"the response (a {type(response).__name__}) has no {field!r} list")}]


#: text fields of a chat message / delta (reasoning: vLLM, DeepSeek and OpenRouter's)
_CHAT_TEXT = ("content", "refusal", "reasoning_content", "reasoning")


def _call_piece(call: Any, where: str) -> str:
    """What a streamed tool-call delta adds to its ``name(arguments`` text."""
    function = get(call, "function") or get(call, "custom") or {}
    name = _text(get(function, "name"), f"{where}.function.name")
    args = _text(get(function, "arguments", get(function, "input")), f"{where}.function.arguments")
    return (f"{name}(" if name else "") + args


def _now_id(prefix: str) -> str:
    return f"{prefix}-guardmerge-{int(time.time() * 1000)}"


class API:
    """The interface (see the module doc); ``sdk``: build SDK objects instead of dicts.
    ``text_fields``: the parameters ``request`` reads; ``other_fields``: the API's other
    parameters (the SDK's create / parse / stream signatures): settings, or the application's
    own input (module doc)."""

    name = ""
    text_fields: frozenset[str] = frozenset()
    other_fields: frozenset[str] = frozenset()

    def request(self, kwargs: dict[str, Any]) -> tuple[dict[str, Any], list[Any]]:
        raise NotImplementedError

    def output_items(self, response: Any, tool_calls: bool) -> list[dict[str, Any]]:
        raise NotImplementedError

    def refuse_prompt(self, kwargs: Mapping[str, Any], refusal: str, sdk: bool) -> Any:
        raise NotImplementedError

    def refuse_output(self, response: Any, verdict: Verdict, refusal: str) -> Any:
        raise NotImplementedError

    def reader(self, tool_calls: bool, refusal: str, sdk: bool) -> "Reader":
        raise NotImplementedError

    def early_stream(self, kwargs: Mapping[str, Any], refusal: str, sdk: bool) -> list[Any]:
        raise NotImplementedError

    def invalid(self, body: Mapping[str, Any]) -> tuple[str, str] | None:
        """``(param, problem)`` for the first field of a wire request ``body`` (parsed JSON)
        whose type the API does not allow, or None: the proxy answers it with a 400 naming
        ``param`` instead of guessing what a malformed field means. Only fields the API
        defines are checked; unknown ones are ``request``'s (``_screen``)."""
        for name, kind in self.wire_types.items():
            problem = _wire_type(body.get(name), kind, name) if name in body else None
            if problem is not None:
                return problem
        return self._invalid_text(body)

    #: the typed fields of a wire request: name -> "bool", "count" (an integer >= 1),
    #: "string", "object", "list" (each also null)
    wire_types: dict[str, str] = {}

    def _invalid_text(self, body: Mapping[str, Any]) -> tuple[str, str] | None:
        return None


def _kind(value: Any) -> str:
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string",
            list: "an array", dict: "an object", type(None): "null"}.get(type(value),
                                                                         type(value).__name__)


def _wire_type(value: Any, kind: str, where: str) -> tuple[str, str] | None:
    if value is None:
        return None
    ok = {"bool": isinstance(value, bool),
          "count": isinstance(value, int) and not isinstance(value, bool) and value >= 1,
          "string": isinstance(value, str), "object": isinstance(value, dict),
          "list": isinstance(value, list)}[kind]
    if ok:
        return None
    wanted = {"bool": "a boolean", "count": "an integer >= 1", "string": "a string",
              "object": "an object", "list": "an array"}[kind]
    got = f"{value}" if kind == "count" and isinstance(value, int) and \
        not isinstance(value, bool) else _kind(value)
    return where, f"{where} must be {wanted}, got {got}"


def _invalid_content(content: Any, where: str, *, parts: bool = True) -> tuple[str, str] | None:
    """A message's ``content``: null, a string, or (``parts``) an array of content parts,
    each an object with a string ``type`` whose text field, if it has one, is a string."""
    if content is None or isinstance(content, str):
        return None
    if not parts or not isinstance(content, list):
        wanted = "a string or an array of content parts" if parts else "a string"
        return where, f"{where} must be {wanted}, got {_kind(content)}"
    for i, part in enumerate(content):
        at = f"{where}[{i}]"
        if not isinstance(part, dict):
            return at, f"{at} must be a content part (an object), got {_kind(part)}"
        if not isinstance(part.get("type"), str):
            return f"{at}.type", f"{at}.type must be a string, got {_kind(part.get('type'))}"
        for key in ("text", "refusal"):
            if key in part and not isinstance(part[key], (str, type(None))):
                return f"{at}.{key}", f"{at}.{key} must be a string, got {_kind(part[key])}"
    return None


def _invalid_messages(messages: Any, where: str) -> tuple[str, str] | None:
    """Chat messages: an array of objects, each with a string ``role``, ``content`` as
    ``_invalid_content`` says, a string ``name`` and an array of ``tool_calls`` (if any)."""
    if not isinstance(messages, list):
        return where, f"{where} must be an array of messages, got {_kind(messages)}"
    for i, msg in enumerate(messages):
        at = f"{where}[{i}]"
        if not isinstance(msg, dict):
            return at, f"{at} must be a message (an object), got {_kind(msg)}"
        if not isinstance(msg.get("role"), str):
            return f"{at}.role", f"{at}.role must be a string, got {_kind(msg.get('role'))}"
        problem = _invalid_content(msg.get("content"), f"{at}.content")
        if problem is not None:
            return problem
        for key, kind in (("name", "string"), ("tool_call_id", "string"),
                          ("tool_calls", "list"), ("function_call", "object")):
            problem = _wire_type(msg.get(key), kind, f"{at}.{key}") if key in msg else None
            if problem is not None:
                return problem
        for j, call in enumerate(msg.get("tool_calls") or []):
            fn = call.get("function") if isinstance(call, dict) else None
            if not isinstance(call, dict) or not isinstance(fn if fn is not None else {}, dict):
                return f"{at}.tool_calls[{j}]", f"{at}.tool_calls[{j}] must be a tool call object"
            for key in ("name", "arguments"):
                value = (fn or {}).get(key)
                if value is not None and not isinstance(value, str):
                    return (f"{at}.tool_calls[{j}].function.{key}",
                            f"{at}.tool_calls[{j}].function.{key} must be a string, got "
                            f"{_kind(value)}")
    return None


class Reader:
    """One stream's view: ``read(item) -> Touch``; ``tail(verdict, blocked, released, keys)``:
    the items that end the stream after a block; ``label(key)``: the choice or output index a
    key's text belongs to. Keys are ``(index, channel, ...)``: one text per channel of a
    choice or output (content, refusal, a tool call, ...), read from the same fields the
    non-streamed ``output_items`` reads; ``(index,)`` alone orders a choice's items."""

    def read(self, item: Any) -> Touch:
        raise NotImplementedError

    @staticmethod
    def label(key: Any) -> Any:
        return key[0] if isinstance(key, tuple) else key

    def tail(self, verdict: Verdict, blocked: set[Any], released: set[Any],
             keys: list[Any]) -> list[Any]:
        raise NotImplementedError


class _Unreadable(Exception):
    """Raised by a channel reader: the item holds content the guard cannot read (the reason
    names fields and types, never text)."""


def _text(value: Any, where: str) -> str:
    """A text field of a streamed item: a string, or "" for none; anything else is unreadable."""
    if value is None or isinstance(value, str):
        return value or ""
    raise _Unreadable(f"{where} is a {type(value).__name__}, not text")


def _index(value: Any, where: str, default: int) -> int:
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise _Unreadable(f"{where} is a {type(value).__name__}, not an integer")
    return value


def _list(value: Any, where: str) -> list[Any]:
    if value is None:
        return []
    if not isinstance(value, (list, tuple)):
        raise _Unreadable(f"{where} is a {type(value).__name__}, not a list")
    return list(value)


class _Choices(API):
    """Shared by the two APIs whose responses are ``choices`` (chat and legacy completions)."""

    completion_cls = ""
    chunk_cls = ""
    obj = ""
    chunk_obj = ""

    def _shape(self, payload: dict[str, Any], cls_name: str, sdk: bool) -> Any:
        if not sdk:
            return payload
        import openai.types as types
        import openai.types.chat as chat_types

        cls = getattr(chat_types, cls_name, None) or getattr(types, cls_name)
        return cls.model_validate(payload)

    def _refused_choice(self, index: int, refusal: str) -> dict[str, Any]:
        raise NotImplementedError

    def _end_choice(self, index: int, refusal: str | None) -> dict[str, Any]:
        raise NotImplementedError

    def refuse_prompt(self, kwargs: Mapping[str, Any], refusal: str, sdk: bool) -> Any:
        payload = {"id": _now_id(self.obj), "object": self.obj, "created": int(time.time()),
                   "model": str(kwargs.get("model") or "guardmerge"),
                   "choices": [self._refused_choice(0, refusal)]}
        return self._shape(payload, self.completion_cls, sdk)

    def refuse_output(self, response: Any, verdict: Verdict, refusal: str) -> Any:
        data = _to_dict(response)
        if not isinstance(data.get("choices"), list):  # unreadable: refuse it whole
            data["choices"] = [{"index": 0}]
        choices = [dict(_to_dict(c)) for c in data["choices"]]
        for i in blocked_keys(verdict, range(len(choices))):
            if isinstance(i, int) and 0 <= i < len(choices):
                choices[i] = {**choices[i], **self._refused_choice(int(choices[i].get("index", i)),
                                                                   refusal)}
        data["choices"] = choices
        return data if isinstance(response, Mapping) else type(response).model_validate(data)

    def end_chunks(self, last: Any, blocked: set[Any], released: set[Any], keys: list[Any],
                   refusal: str, sdk: bool) -> list[Any]:
        """One ``content_filter`` chunk per choice (the refusal text where a blocked choice
        showed nothing yet): the stream was cut, so no choice finishes normally."""
        out = []
        for key in sorted(set(keys) | blocked, key=lambda k: (str(type(k)), k)):
            text = refusal if key in blocked and key not in released else None
            payload = {"id": get(last, "id", "guardmerge"), "object": self.chunk_obj,
                       "created": get(last, "created", int(time.time())),
                       "model": get(last, "model", "guardmerge"),
                       "choices": [self._end_choice(key, text)]}
            out.append(self._shape(payload, self.chunk_cls, sdk))
        return out

    def early_stream(self, kwargs: Mapping[str, Any], refusal: str, sdk: bool) -> list[Any]:
        last = {"id": _now_id(self.obj), "created": int(time.time()),
                "model": str(kwargs.get("model") or "guardmerge")}
        return self.end_chunks(last, {0}, set(), [0], refusal, sdk)

    def reader(self, tool_calls: bool, refusal: str, sdk: bool) -> Reader:
        return _ChoicesReader(self, tool_calls, refusal, sdk)

    def channels(self, choice: Any, tool_calls: bool) -> list[tuple[tuple[Any, ...], str]]:
        """(channel, text piece) of one streamed choice; raises ``_Unreadable``."""
        raise NotImplementedError


class _ChoicesReader(Reader):
    def __init__(self, api: _Choices, tool_calls: bool, refusal: str, sdk: bool) -> None:
        self.api, self.tool_calls, self.refusal, self.sdk = api, tool_calls, refusal, sdk
        self.last: Any = None

    def read(self, item: Any) -> Touch:
        self.last = item
        try:
            choices = _list(get(item, "choices"), "a chunk's choices")
            if not choices:
                return Touch(barrier=True)  # e.g. the usage chunk: after every choice's text
            pieces: list[tuple[Any, str]] = []
            keys = set()
            for position, choice in enumerate(choices):
                # a missing index is choice 0; one that is not an integer is never folded into
                # another choice's text: unreadable
                index = _index(get(choice, "index"), f"choices[{position}].index", 0)
                keys.add((index,))
                pieces += [((index, *channel), piece)
                           for channel, piece in self.api.channels(choice, self.tool_calls)]
        except _Unreadable as exc:
            return Touch(barrier=True, unreadable=str(exc))
        return Touch(pieces=tuple(pieces), keys=frozenset(keys))

    def tail(self, verdict: Verdict, blocked: set[Any], released: set[Any],
             keys: list[Any]) -> list[Any]:
        return self.api.end_chunks(self.last, blocked, released, keys, self.refusal, self.sdk)


class ChatAPI(_Choices):
    name = "chat.completions"
    completion_cls = "ChatCompletion"
    chunk_cls = "ChatCompletionChunk"
    obj = "chat.completion"
    chunk_obj = "chat.completion.chunk"

    text_fields = frozenset({"messages"})
    other_fields = frozenset({
        "model", "audio", "frequency_penalty", "function_call", "functions", "logit_bias",
        "logprobs", "max_completion_tokens", "max_tokens", "metadata", "modalities",
        "moderation", "n", "parallel_tool_calls", "prediction", "presence_penalty",
        "prompt_cache_key", "prompt_cache_options", "prompt_cache_retention",
        "reasoning_effort", "response_format", "safety_identifier", "seed", "service_tier",
        "stop", "store", "stream", "stream_options", "temperature", "tool_choice", "tools",
        "top_logprobs", "top_p", "user", "verbosity", "web_search_options"})

    wire_types = {"model": "string", "stream": "bool", "n": "count", "stream_options": "object",
                  "tools": "list", "logprobs": "bool", "parallel_tool_calls": "bool",
                  "store": "bool"}

    def _invalid_text(self, body: Mapping[str, Any]) -> tuple[str, str] | None:
        if "messages" not in body:
            return "messages", "messages is required"
        return _invalid_messages(body["messages"], "messages")

    def request(self, kwargs: dict[str, Any]) -> tuple[dict[str, Any], list[Any]]:
        kwargs = _screen(self, kwargs)
        messages = kwargs.get("messages")
        if not _given(messages):
            return kwargs, []
        if not isinstance(messages, str):
            messages = snapshot(list(messages))  # materialised once: what is checked is sent
        checked = messages if isinstance(messages, list) else [messages]
        return {**kwargs, "messages": messages}, checked

    def output_items(self, response: Any, tool_calls: bool) -> list[dict[str, Any]]:
        items = _unlisted(response, "choices")
        if items is not None:
            return items
        items = []
        for choice in get(response, "choices"):
            message = get(choice, "message") or {}
            parts = [p for p in [get(message, f) for f in _CHAT_TEXT] +
                     [get(get(message, "audio") or {}, "transcript")] if p]
            if tool_calls:
                for call in get(message, "tool_calls") or []:
                    parts.append(_call_text(get(call, "function") or get(call, "custom") or {}))
                if get(message, "function_call"):  # the legacy single function call
                    parts.append(_call_text(get(message, "function_call")))
            items.append({"role": "assistant", "content": parts or None})
        return items

    def _refused_choice(self, index: int, refusal: str) -> dict[str, Any]:
        return {"index": index, "finish_reason": "content_filter", "logprobs": None,
                "message": {"role": "assistant", "content": refusal}}

    def _end_choice(self, index: int, refusal: str | None) -> dict[str, Any]:
        delta = {"role": "assistant", "content": refusal} if refusal is not None else {}
        return {"index": index, "delta": delta, "finish_reason": "content_filter"}

    def channels(self, choice: Any, tool_calls: bool) -> list[tuple[tuple[Any, ...], str]]:
        """The fields ``output_items`` reads, as they stream: content, refusal, reasoning
        (vLLM / DeepSeek ``reasoning_content``, ``reasoning``), the audio transcript and, with
        ``tool_calls``, each tool call's ``name(arguments`` and the legacy function call."""
        delta = get(choice, "delta") or {}
        out = [((field,), _text(get(delta, field), f"delta.{field}")) for field in _CHAT_TEXT]
        audio = get(delta, "audio")
        if audio is not None:
            out.append((("audio",), _text(get(audio, "transcript"), "delta.audio.transcript")))
        if tool_calls:
            for position, call in enumerate(_list(get(delta, "tool_calls"), "delta.tool_calls")):
                n = _index(get(call, "index"), f"delta.tool_calls[{position}].index", position)
                out.append((("tool", n), _call_piece(call, f"delta.tool_calls[{position}]")))
            function_call = get(delta, "function_call")
            if function_call is not None:
                out.append((("function_call",), _call_piece(
                    {"function": function_call}, "delta.function_call")))
        return out


class CompletionsAPI(_Choices):
    name = "completions"
    completion_cls = "Completion"
    chunk_cls = "Completion"
    obj = "text_completion"
    chunk_obj = "text_completion"

    text_fields = frozenset({"prompt", "suffix"})
    other_fields = frozenset({
        "model", "best_of", "echo", "frequency_penalty", "logit_bias", "logprobs", "max_tokens",
        "n", "presence_penalty", "seed", "stop", "stream", "stream_options", "temperature",
        "top_p", "user"})

    wire_types = {"model": "string", "stream": "bool", "n": "count", "best_of": "count",
                  "echo": "bool", "suffix": "string", "stream_options": "object"}

    def _invalid_text(self, body: Mapping[str, Any]) -> tuple[str, str] | None:
        prompt = body.get("prompt")
        if isinstance(prompt, str) or prompt is None:
            return None
        if isinstance(prompt, list):
            if all(isinstance(p, str) for p in prompt):
                return None
            if all(isinstance(p, int) and not isinstance(p, bool) for p in prompt):
                return None  # token ids: unreadable, the policy's on_error decides
            if all(isinstance(p, list) for p in prompt):
                return None
        return "prompt", (f"prompt must be a string, an array of strings or token ids, got "
                          f"{_kind(prompt)}")

    def request(self, kwargs: dict[str, Any]) -> tuple[dict[str, Any], list[Any]]:
        kwargs = _screen(self, kwargs)
        prompt = snapshot(kwargs.get("prompt"))
        prompts = [prompt] if isinstance(prompt, str) or not isinstance(prompt, list) else prompt
        if prompt is not None and isinstance(prompt, list) and prompt and \
                all(isinstance(t, int) for t in prompt):
            prompts = [prompt]  # one prompt of token ids
        messages: list[Any] = []
        for i, p in enumerate(prompts):
            if p is None or not _given(p):
                continue
            content = p if isinstance(p, str) else \
                Unreadable(f"prompt[{i}] is token ids or a {type(p).__name__}, not text")
            messages.append({"role": "user", "content": content})
        suffix = kwargs.get("suffix")
        if isinstance(suffix, str):
            messages.append({"role": "user", "content": suffix})
        elif _given(suffix):
            messages.append({"role": "user", "content": Unreadable(
                f"suffix is a {type(suffix).__name__}, not text")})
        sent = {**kwargs, "prompt": prompt} if "prompt" in kwargs else kwargs
        return sent, messages

    def output_items(self, response: Any, tool_calls: bool) -> list[dict[str, Any]]:
        unlisted = _unlisted(response, "choices")
        return unlisted if unlisted is not None else \
            [{"role": "assistant", "content": get(c, "text") or None}
             for c in get(response, "choices")]

    def _refused_choice(self, index: int, refusal: str) -> dict[str, Any]:
        return {"index": index, "finish_reason": "content_filter", "logprobs": None,
                "text": refusal}

    def _end_choice(self, index: int, refusal: str | None) -> dict[str, Any]:
        return {"index": index, "finish_reason": "content_filter", "logprobs": None,
                "text": refusal or ""}

    def channels(self, choice: Any, tool_calls: bool) -> list[tuple[tuple[Any, ...], str]]:
        return [(("text",), _text(get(choice, "text"), "text"))]


#: streamed Responses events, by type stem (``<stem>.delta`` / ``<stem>.done``): (channel,
#: the event's sub-index field, the ``.done`` event's full-text field, a tool channel?)
_STREAMED: dict[str, tuple[tuple[str, ...], str | None, str | None, bool]] = {
    "response.output_text": (("text",), "content_index", "text", False),
    "response.refusal": (("refusal",), "content_index", "refusal", False),
    "response.reasoning_summary_text": (("summary",), "summary_index", "text", False),
    "response.reasoning_text": (("reasoning",), "content_index", "text", False),
    "response.audio.transcript": (("audio",), None, None, False),
    "response.function_call_arguments": (("args",), None, "arguments", True),
    "response.custom_tool_call_input": (("args",), None, "input", True),
    "response.mcp_call_arguments": (("args",), None, "arguments", True),
    "response.code_interpreter_call_code": (("code",), None, "code", True),
}
#: content parts (of messages and reasoning items) that carry text: type -> (channel, field)
_PARTS = {"output_text": ("text", "text"), "refusal": ("refusal", "refusal"),
          "reasoning_text": ("reasoning", "text"), "summary_text": ("summary", "text")}


def _item_channels(item: Any, tool_calls: bool) -> list[tuple[tuple[Any, ...], str]]:
    """(channel, text) of one Responses output item, the same channels its stream fills;
    raises ``_Unreadable`` for a text field that is not text."""
    kind = get(item, "type")
    out: list[tuple[tuple[Any, ...], str]] = []

    def add(channel: tuple[Any, ...], value: Any, where: str) -> None:
        if value is not None:
            out.append((channel, _text(value, where)))

    if kind in ("message", "reasoning"):
        for field in ("content", "summary") if kind == "reasoning" else ("content",):
            for c, part in enumerate(_list(get(item, field), f"{kind}.{field}")):
                channel, text_field = _PARTS.get(get(part, "type"), ("text", "text"))
                if field == "summary":
                    channel = "summary"
                add((channel, c), get(part, text_field), f"{kind}.{field}[{c}].{text_field}")
    elif tool_calls and kind in ("function_call", "custom_tool_call", "mcp_call"):
        add(("name",), get(item, "name"), f"{kind}.name")
        add(("args",), get(item, "arguments", get(item, "input")), f"{kind}.arguments")
        if kind == "mcp_call":  # the tool server's result and error go to the caller too
            add(("output",), get(item, "output"), "mcp_call.output")
            add(("error",), get(item, "error"), "mcp_call.error")
    elif tool_calls and kind == "code_interpreter_call":
        add(("code",), get(item, "code"), "code_interpreter_call.code")
        for j, result in enumerate(_list(get(item, "outputs"), "code_interpreter_call.outputs")):
            if get(result, "type") == "logs":
                add(("logs", j), get(result, "logs"), f"code_interpreter_call.outputs[{j}].logs")
    return out


class ResponsesAPI(API):
    name = "responses"

    text_fields = frozenset({"input", "instructions", "prompt"})
    other_fields = frozenset({
        "model", "access_programs", "background", "background_options", "betas",
        "context_management", "conversation", "image", "include", "max_output_tokens",
        "max_tool_calls", "metadata", "moderation", "multi_agent", "parallel_tool_calls",
        "parse_as", "previous_response_id", "prompt_cache_key", "prompt_cache_options",
        "prompt_cache_retention", "reasoning", "safety_identifier", "service_tier", "store",
        "stream", "stream_options", "temperature", "text", "text_format", "tool_choice",
        "tools", "top_logprobs", "top_p", "truncation", "user", "verbosity"})

    wire_types = {"model": "string", "stream": "bool", "instructions": "string",
                  "tools": "list", "store": "bool", "background": "bool", "prompt": "object",
                  "parallel_tool_calls": "bool"}

    def _invalid_text(self, body: Mapping[str, Any]) -> tuple[str, str] | None:
        value = body.get("input")
        if value is None or isinstance(value, str):
            return None
        if not isinstance(value, list):
            return "input", f"input must be a string or an array of items, got {_kind(value)}"
        for i, item in enumerate(value):
            at = f"input[{i}]"
            if isinstance(item, str):
                continue
            if not isinstance(item, dict):
                return at, f"{at} must be an item (an object), got {_kind(item)}"
            for key in ("role", "type"):
                if key in item and not isinstance(item[key], str):
                    return f"{at}.{key}", f"{at}.{key} must be a string, got {_kind(item[key])}"
            if "role" in item:
                problem = _invalid_content(item.get("content"), f"{at}.content")
                if problem is not None:
                    return problem
        return None

    def request(self, kwargs: dict[str, Any]) -> tuple[dict[str, Any], list[Any]]:
        kwargs = _screen(self, kwargs)
        sent = dict(kwargs)
        messages: list[Any] = []
        instructions = kwargs.get("instructions")
        if isinstance(instructions, str):
            messages.append({"role": "system", "content": instructions})
        elif _given(instructions):
            sent["instructions"] = instructions = snapshot(instructions)
            messages.append({"role": "system", "content": Unreadable(
                f"instructions is a {type(instructions).__name__}, not text")})
        if _given(kwargs.get("input")):
            value = kwargs["input"]
            if not isinstance(value, str):
                value = snapshot(list(value)) if not isinstance(value, Mapping) else snapshot(value)
            sent["input"] = value
            items = [value] if isinstance(value, (str, Mapping)) else value
            for i, item in enumerate(items):
                messages.append(self._input_message(i, item))
        if _given(kwargs.get("prompt")):
            prompt = sent["prompt"] = snapshot(kwargs["prompt"])
            variables = get(prompt, "variables") or {}
            if isinstance(variables, Mapping):
                for name, value in variables.items():
                    content = value if isinstance(value, str) else [value]
                    messages.append({"role": "user", "content": content})
            else:
                messages.append({"role": "user",
                                 "content": Unreadable("prompt.variables is not a mapping")})
        return sent, messages

    @staticmethod
    def _input_message(i: int, item: Any) -> Any:
        if isinstance(item, str):
            return {"role": "user", "content": item}
        kind = get(item, "type")
        if get(item, "role") is not None and kind in (None, "message"):
            return {"role": get(item, "role"), "content": get(item, "content")}
        if kind in ("function_call_output", "custom_tool_call_output", "mcp_approval_response",
                    "local_shell_call_output", "shell_call_output", "apply_patch_call_output"):
            output = get(item, "output")
            return {"role": "tool", "content": output if isinstance(output, (str, list)) else
                    Unreadable(f"input[{i}].output is a {type(output).__name__}")}
        if kind in ("function_call", "custom_tool_call"):
            return {"role": "assistant", "content": _call_text(item)}
        if kind == "reasoning":
            summary = [get(s, "text") for s in get(item, "summary") or []]
            return {"role": "assistant",
                    "content": "\n\n".join(s for s in summary if isinstance(s, str))}
        return {"role": "tool", "content": Unreadable(  # the type is not echoed: it is text
            f"input[{i}] is an item of a type the guard cannot read")}

    def output_items(self, response: Any, tool_calls: bool) -> list[dict[str, Any]]:
        items = _unlisted(response, "output")
        if items is not None:
            return items
        items = []
        for i, out in enumerate(get(response, "output")):
            try:
                parts = [text for _, text in _item_channels(out, tool_calls) if text]
            except _Unreadable as exc:
                items.append({"role": "assistant", "content": Unreadable(f"output[{i}]: {exc}")})
                continue
            items.append({"role": "assistant", "content": "\n\n".join(parts) or None})
        return items

    @staticmethod
    def _refusal_output(refusal: str) -> list[dict[str, Any]]:
        return [{"type": "message", "id": "msg-guardmerge", "role": "assistant",
                 "status": "completed",
                 "content": [{"type": "output_text", "text": refusal, "annotations": []}]}]

    def _response(self, base: Mapping[str, Any], refusal: str) -> dict[str, Any]:
        kept = {k: v for k, v in base.items() if k != "usage"}  # counts of the withheld output
        return {**kept, "status": "incomplete", "incomplete_details": {"reason": "content_filter"},
                "output": self._refusal_output(refusal)}

    def _synthetic(self, kwargs: Mapping[str, Any]) -> dict[str, Any]:
        return {"id": _now_id("resp"), "object": "response", "created_at": int(time.time()),
                "model": str(kwargs.get("model") or "guardmerge"), "output": [],
                "parallel_tool_calls": False, "tool_choice": "auto", "tools": [],
                "status": "in_progress"}

    def refuse_prompt(self, kwargs: Mapping[str, Any], refusal: str, sdk: bool) -> Any:
        payload = self._response(self._synthetic(kwargs), refusal)
        if not sdk:
            return payload
        from openai.types.responses import Response

        return Response.model_validate(payload)

    def refuse_output(self, response: Any, verdict: Verdict, refusal: str) -> Any:
        data = self._response(_to_dict(response), refusal)
        return data if isinstance(response, Mapping) else type(response).model_validate(data)

    def event(self, payload: dict[str, Any], sdk: bool) -> Any:
        if not sdk:
            return payload
        from openai.types import responses

        cls = {"response.created": responses.ResponseCreatedEvent,
               "response.incomplete": responses.ResponseIncompleteEvent}[payload["type"]]
        return cls.model_validate(payload)

    def incomplete(self, base: Mapping[str, Any], sequence: int, refusal: str, sdk: bool) -> Any:
        return self.event({"type": "response.incomplete", "sequence_number": sequence,
                           "response": self._response(base, refusal)}, sdk)

    def reader(self, tool_calls: bool, refusal: str, sdk: bool) -> Reader:
        return _ResponsesReader(self, tool_calls, refusal, sdk)

    def early_stream(self, kwargs: Mapping[str, Any], refusal: str, sdk: bool) -> list[Any]:
        base = self._synthetic(kwargs)
        return [self.event({"type": "response.created", "sequence_number": 0, "response": base},
                           sdk),
                self.incomplete(base, 1, refusal, sdk)]


class _ResponsesReader(Reader):
    """Keys ``(output_index, channel, sub-index)``, the channels ``output_items`` reads. Keeps
    the stream's response snapshot (``response.created``) and sequence number, for the
    ``response.incomplete`` event (reason ``content_filter``) that ends a blocked stream."""

    def __init__(self, api: ResponsesAPI, tool_calls: bool, refusal: str, sdk: bool) -> None:
        self.api, self.tool_calls, self.refusal, self.sdk = api, tool_calls, refusal, sdk
        self.base: dict[str, Any] | None = None
        self.sequence = 0
        self.seen: dict[Any, str] = {}  # the text each key was given, for ``_snapshot``

    def read(self, item: Any) -> Touch:
        seq = get(item, "sequence_number")
        if isinstance(seq, int):
            self.sequence = max(self.sequence, seq)
        response = get(item, "response")
        if self.base is None and response is not None:
            self.base = _to_dict(response)
        try:
            return self._touch(item, response)
        except _Unreadable as exc:
            return Touch(barrier=True, unreadable=str(exc))

    def _touch(self, item: Any, response: Any) -> Touch:
        """Deltas add to their channel; every snapshot (a ``.done`` event's text, a part, an
        item, the whole response of ``response.completed``) is checked too (``_snapshot``)."""
        kind = _text(get(item, "type"), "an event's type")
        index = get(item, "output_index")
        if index is not None:
            index = _index(index, f"{kind}.output_index", 0)
        at = 0 if index is None else index
        pieces: list[tuple[Any, str]] = []
        stem, _, phase = kind.rpartition(".")
        spec = _STREAMED.get(stem)
        if spec is not None and phase in ("delta", "done") and (self.tool_calls or not spec[3]):
            channel, sub, done_field, _ = spec
            key = (at, *channel, *(() if sub is None else
                                   (_index(get(item, sub), f"{kind}.{sub}", 0),)))
            if phase == "delta":
                self._add(pieces, key, _text(get(item, "delta"), f"{kind}.delta"))
            elif done_field is not None and get(item, done_field) is not None:
                self._snapshot(pieces, key, _text(get(item, done_field), f"{kind}.{done_field}"))
        part = get(item, "part")
        if part is not None and stem in ("response.content_part", "response.reasoning_summary_part"):
            summary = stem == "response.reasoning_summary_part"
            channel, field = _PARTS.get(get(part, "type"), ("text", "text"))
            sub = _index(get(item, "summary_index" if summary else "content_index"),
                         f"{kind} index", 0)
            if get(part, field) is not None:
                self._snapshot(pieces, (at, "summary" if summary else channel, sub),
                               _text(get(part, field), f"{kind}.part.{field}"))
        output_item = get(item, "item")
        if output_item is not None and stem == "response.output_item":
            for channel, text in _item_channels(output_item, self.tool_calls):
                self._snapshot(pieces, (at, *channel), text)
        if response is not None:
            output = get(response, "output")
            for i, out in enumerate(_list(output, f"{kind}.response.output")):
                for channel, text in _item_channels(out, self.tool_calls):
                    self._snapshot(pieces, (i, *channel), text)
        if index is None:  # response.created / completed / ...: the whole response
            return Touch(pieces=tuple(pieces), barrier=True)
        return Touch(pieces=tuple(pieces), keys=frozenset({(index,)}))

    def _add(self, pieces: list[tuple[Any, str]], key: Any, piece: str) -> None:
        pieces.append((key, piece))
        self.seen[key] = self.seen.get(key, "") + piece

    def _snapshot(self, pieces: list[tuple[Any, str]], key: Any, text: str) -> None:
        """A snapshot that continues its channel's streamed text adds the rest to it (nothing
        when it is the same text); one that differs is checked as a text of its own, because
        a caller may read either (the SDK's ``get_final_response()`` reads the snapshot)."""
        n, candidate = 0, key
        while True:
            have = self.seen.get(candidate, "")
            if text.startswith(have):
                self._add(pieces, candidate, text[len(have):])
                return
            n += 1
            candidate = (*key, "snapshot", n)

    def tail(self, verdict: Verdict, blocked: set[Any], released: set[Any],
             keys: list[Any]) -> list[Any]:
        if self.base is None:  # no response.created to build on: the driver raises instead
            return []
        return [self.api.incomplete(self.base, self.sequence + 1, self.refusal, self.sdk)]


CHAT = ChatAPI()
COMPLETIONS = CompletionsAPI()
RESPONSES = ResponsesAPI()
