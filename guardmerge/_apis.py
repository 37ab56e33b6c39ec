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
"""

from __future__ import annotations

import time
from collections.abc import Mapping  # isinstance on it: typing.Mapping is several times slower
from typing import Any

from ._messages import Unreadable, get, snapshot
from ._stream import Touch
from .verdict import Action, Verdict

__all__ = ["API", "CHAT", "COMPLETIONS", "RESPONSES"]

_UNSET = ("NotGiven", "Omit")


def _given(value: Any) -> bool:
    return value is not None and type(value).__name__ not in _UNSET


def _to_dict(obj: Any) -> dict[str, Any]:
    if isinstance(obj, Mapping):
        return dict(obj)
    return obj.model_dump(exclude_unset=True)


def _call_text(call: Any) -> str:
    """``name(arguments)`` of a tool call (``input`` for custom tools), as the guard scores it."""
    return f"{get(call, 'name', '')}({get(call, 'arguments', get(call, 'input', ''))})"


def _now_id(prefix: str) -> str:
    return f"{prefix}-guardmerge-{int(time.time() * 1000)}"


class API:
    """The interface (see the module doc); ``sdk``: build SDK objects instead of dicts."""

    name = ""

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


class Reader:
    """One stream's view: ``read(item) -> Touch``; ``tail(verdict, blocked, released, keys)``:
    the items that end the stream after a block."""

    def read(self, item: Any) -> Touch:
        raise NotImplementedError

    def tail(self, verdict: Verdict, blocked: set[Any], released: set[Any],
             keys: list[Any]) -> list[Any]:
        raise NotImplementedError


def _blocked_indices(verdict: Verdict, n: int) -> set[int]:
    blocked = {f.message_index for f in verdict.findings if f.action is Action.BLOCK}
    if None in blocked or not blocked:  # the guard itself failed: everything is withheld
        return set(range(n))
    return {i for i in blocked if isinstance(i, int)}


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
        choices = [dict(_to_dict(c)) for c in data.get("choices") or []]
        for i in _blocked_indices(verdict, len(choices)):
            if i < len(choices):
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

    def pieces(self, choice: Any, tool_calls: bool) -> str:
        raise NotImplementedError

    @staticmethod
    def index(choice: Any) -> int:
        value = get(choice, "index", 0)
        return value if isinstance(value, int) else 0


class _ChoicesReader(Reader):
    def __init__(self, api: _Choices, tool_calls: bool, refusal: str, sdk: bool) -> None:
        self.api, self.tool_calls, self.refusal, self.sdk = api, tool_calls, refusal, sdk
        self.last: Any = None

    def read(self, item: Any) -> Touch:
        self.last = item
        choices = get(item, "choices") or []
        if not choices:
            return Touch(barrier=True)  # e.g. the usage chunk: after every choice's text
        return Touch(pieces=tuple((self.api.index(c), self.api.pieces(c, self.tool_calls))
                                  for c in choices))

    def tail(self, verdict: Verdict, blocked: set[Any], released: set[Any],
             keys: list[Any]) -> list[Any]:
        return self.api.end_chunks(self.last, blocked, released, keys, self.refusal, self.sdk)


class ChatAPI(_Choices):
    name = "chat.completions"
    completion_cls = "ChatCompletion"
    chunk_cls = "ChatCompletionChunk"
    obj = "chat.completion"
    chunk_obj = "chat.completion.chunk"

    def request(self, kwargs: dict[str, Any]) -> tuple[dict[str, Any], list[Any]]:
        messages = kwargs.get("messages")
        if not _given(messages):
            return kwargs, []
        if not isinstance(messages, str):
            messages = snapshot(list(messages))  # materialised once: what is checked is sent
        checked = messages if isinstance(messages, list) else [messages]
        return {**kwargs, "messages": messages}, checked

    def output_items(self, response: Any, tool_calls: bool) -> list[dict[str, Any]]:
        items = []
        for choice in get(response, "choices") or []:
            message = get(choice, "message") or {}
            parts = [p for p in (get(message, "content"), get(message, "refusal"),
                                 get(get(message, "audio") or {}, "transcript")) if p]
            if tool_calls:
                for call in get(message, "tool_calls") or []:
                    parts.append(_call_text(get(call, "function") or get(call, "custom") or {}))
            items.append({"role": "assistant", "content": parts or None})
        return items

    def _refused_choice(self, index: int, refusal: str) -> dict[str, Any]:
        return {"index": index, "finish_reason": "content_filter", "logprobs": None,
                "message": {"role": "assistant", "content": refusal}}

    def _end_choice(self, index: int, refusal: str | None) -> dict[str, Any]:
        delta = {"role": "assistant", "content": refusal} if refusal is not None else {}
        return {"index": index, "delta": delta, "finish_reason": "content_filter"}

    def pieces(self, choice: Any, tool_calls: bool) -> str:
        delta = get(choice, "delta") or {}
        piece = "".join(p for p in (get(delta, "content"), get(delta, "refusal"))
                        if isinstance(p, str))
        if tool_calls:
            for call in get(delta, "tool_calls") or []:
                args = get(get(call, "function") or {}, "arguments")
                piece += args if isinstance(args, str) else ""
        return piece


class CompletionsAPI(_Choices):
    name = "completions"
    completion_cls = "Completion"
    chunk_cls = "Completion"
    obj = "text_completion"
    chunk_obj = "text_completion"

    def request(self, kwargs: dict[str, Any]) -> tuple[dict[str, Any], list[Any]]:
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
        sent = {**kwargs, "prompt": prompt} if "prompt" in kwargs else kwargs
        return sent, messages

    def output_items(self, response: Any, tool_calls: bool) -> list[dict[str, Any]]:
        return [{"role": "assistant", "content": get(c, "text") or None}
                for c in get(response, "choices") or []]

    def _refused_choice(self, index: int, refusal: str) -> dict[str, Any]:
        return {"index": index, "finish_reason": "content_filter", "logprobs": None,
                "text": refusal}

    def _end_choice(self, index: int, refusal: str | None) -> dict[str, Any]:
        return {"index": index, "finish_reason": "content_filter", "logprobs": None,
                "text": refusal or ""}

    def pieces(self, choice: Any, tool_calls: bool) -> str:
        text = get(choice, "text")
        return text if isinstance(text, str) else ""


_TEXT_DELTAS = {"response.output_text.delta", "response.refusal.delta",
                "response.reasoning_summary_text.delta", "response.reasoning_text.delta"}
_TOOL_DELTAS = {"response.function_call_arguments.delta",
                "response.custom_tool_call_input.delta",
                "response.code_interpreter_call_code.delta"}


class ResponsesAPI(API):
    name = "responses"

    def request(self, kwargs: dict[str, Any]) -> tuple[dict[str, Any], list[Any]]:
        sent = dict(kwargs)
        messages: list[Any] = []
        instructions = kwargs.get("instructions")
        if isinstance(instructions, str):
            messages.append({"role": "system", "content": instructions})
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
        return {"role": "tool", "content": Unreadable(
            f"input[{i}] is an item of type {kind!r}, which the guard cannot read")}

    def output_items(self, response: Any, tool_calls: bool) -> list[dict[str, Any]]:
        items = []
        for out in get(response, "output") or []:
            kind = get(out, "type")
            parts: list[str] = []
            if kind == "message":
                for part in get(out, "content") or []:
                    text = get(part, "text") if get(part, "type") == "output_text" else \
                        get(part, "refusal")
                    if isinstance(text, str):
                        parts.append(text)
            elif kind == "reasoning":
                parts += [get(s, "text") for s in get(out, "summary") or []
                          if isinstance(get(s, "text"), str)]
            elif tool_calls and kind in ("function_call", "custom_tool_call"):
                parts.append(_call_text(out))
            elif tool_calls and kind == "code_interpreter_call" and \
                    isinstance(get(out, "code"), str):
                parts.append(get(out, "code"))
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
    """Keeps the stream's response snapshot (``response.created``) and sequence number, for
    the ``response.incomplete`` event (reason ``content_filter``) that ends a blocked stream."""

    def __init__(self, api: ResponsesAPI, tool_calls: bool, refusal: str, sdk: bool) -> None:
        self.api, self.tool_calls, self.refusal, self.sdk = api, tool_calls, refusal, sdk
        self.base: dict[str, Any] | None = None
        self.sequence = 0

    def read(self, item: Any) -> Touch:
        seq = get(item, "sequence_number")
        if isinstance(seq, int):
            self.sequence = max(self.sequence, seq)
        response = get(item, "response")
        if self.base is None and response is not None:
            self.base = _to_dict(response)
        kind = get(item, "type")
        index = get(item, "output_index")
        if not isinstance(index, int):
            return Touch(barrier=True)  # response.created / completed / ...: the whole response
        if kind in _TEXT_DELTAS or (self.tool_calls and kind in _TOOL_DELTAS):
            delta = get(item, "delta")
            return Touch(pieces=((index, delta if isinstance(delta, str) else ""),))
        return Touch(keys=frozenset({index}))

    def tail(self, verdict: Verdict, blocked: set[Any], released: set[Any],
             keys: list[Any]) -> list[Any]:
        if self.base is None:  # no response.created to build on: the driver raises instead
            return []
        return [self.api.incomplete(self.base, self.sequence + 1, self.refusal, self.sdk)]


CHAT = ChatAPI()
COMPLETIONS = CompletionsAPI()
RESPONSES = ResponsesAPI()
