"""The request bodies the server accepts, checked field by field before anything runs.

Bodies are read as plain JSON and checked here rather than by pydantic models, so that every
refusal is one sentence naming the field, the value given and what is accepted, with the status
OpenAI's clients expect (400, not FastAPI's 422). Options the server does not implement (n > 1,
tools, logprobs, penalties, ...) are refused when set, never silently ignored; fields at their
neutral value (n = 1, logprobs false, ...) are accepted, since clients send them.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

from lorakit.core.checks import is_int, is_real, json_type_name

# Fields at these values change nothing, so they are accepted; any other value is refused.
NEUTRAL: dict[str, tuple[Any, ...]] = {
    "n": (1,), "best_of": (1,), "echo": (False,), "logprobs": (False, 0), "top_logprobs": (0,),
    "presence_penalty": (0, 0.0), "frequency_penalty": (0, 0.0), "logit_bias": ({},), "tools": ([],),
    "tool_choice": ("none",), "parallel_tool_calls": (False, True), "response_format": ({"type": "text"},),
    "suffix": ("",), "functions": ([],), "function_call": ("none",),
}
HARMLESS = {"user"}  # an end-user id for abuse monitoring: nothing to do with the output
SAMPLING = {"model", "max_tokens", "temperature", "top_p", "seed", "stop", "stream", "stream_options"}
CHAT_FIELDS = SAMPLING | {"messages", "max_completion_tokens"}
COMPLETION_FIELDS = SAMPLING | {"prompt"}
ROLES = ("system", "developer", "user", "assistant")
MAX_STOP = 4  # as OpenAI's API


class ApiError(Exception):
    """A refusal: HTTP `status`, one-sentence `message`, the offending `param` (OpenAI's error shape)."""

    def __init__(self, status: int, message: str, param: str | None = None,
                 kind: str = "invalid_request_error", headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.kind = status, message, param, kind
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param,
                          "code": self.status}}


@dataclass(frozen=True)
class GenerationRequest:
    """A checked /v1/chat/completions or /v1/completions request."""

    model: str
    chat: bool
    prompt: str | None = None
    """The text to continue (completions)."""
    messages: list[dict[str, str]] = field(default_factory=list)
    """role/content pairs, content flattened to text (chat)."""
    max_tokens: int | None = None
    """None: up to the end of the model's context."""
    temperature: float = 1.0
    """0 means greedy decoding."""
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stream: bool = False
    include_usage: bool = False


def read_json(body: bytes) -> dict[str, Any]:
    """The body as a JSON object, or a 400 that says where it is malformed."""
    try:
        data = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ApiError(400, f"the request body is not valid JSON ({err}); send a JSON object") from None
    if not isinstance(data, dict):
        raise ApiError(400, f"the request body must be a JSON object, got {json_type_name(data)}")
    return data


def parse_generation(body: bytes, chat: bool) -> GenerationRequest:
    """Check a chat (`chat=True`) or completion request body; ApiError(400) names the first bad field."""
    data = read_json(body)
    allowed = CHAT_FIELDS if chat else COMPLETION_FIELDS
    for name, value in data.items():
        if name in allowed or name in HARMLESS or value is None:
            continue
        if name in NEUTRAL:
            # equal to a neutral value of the same kind: n=true is not n=1, logprobs=0 is logprobs=false's
            if not any(value == v and isinstance(value, bool) == isinstance(v, bool) for v in NEUTRAL[name]):
                raise ApiError(400, f"{name}={json.dumps(value)} is not supported by this server; "
                                    f"leave {name} out (or at {json.dumps(NEUTRAL[name][0])})", name)
            continue
        raise ApiError(400, f"unsupported field {name!r}; this endpoint accepts {', '.join(sorted(allowed))}",
                       name)
    model = _get(data, "model", str, required=True)
    max_tokens = _get(data, "max_tokens", int)
    if chat and data.get("max_completion_tokens") is not None:
        max_tokens = _get(data, "max_completion_tokens", int)
    if max_tokens is not None and max_tokens < 1:
        raise ApiError(400, f"max_tokens must be at least 1, got {max_tokens}", "max_tokens")
    temperature = _number(data, "temperature", 1.0, 0.0, 2.0)
    top_p = _number(data, "top_p", 1.0, 0.0, 1.0)
    if top_p == 0:
        raise ApiError(400, "top_p must be in (0, 1], got 0", "top_p")
    stream = bool(_get(data, "stream", bool))
    include_usage = False
    options = _get(data, "stream_options", dict)
    if options is not None:
        if not stream:
            raise ApiError(400, "stream_options is only allowed with stream: true", "stream_options")
        unknown = sorted(set(options) - {"include_usage"})
        if unknown:
            raise ApiError(400, f"unsupported stream_options {unknown}; accepted: include_usage",
                           "stream_options")
        include_usage = bool(_get(options, "include_usage", bool, where="stream_options.include_usage"))
    common = dict(model=model, chat=chat, max_tokens=max_tokens, temperature=temperature, top_p=top_p,
                  seed=_get(data, "seed", int), stop=_stop(data.get("stop")), stream=stream,
                  include_usage=include_usage)
    if chat:
        return GenerationRequest(messages=_messages(data.get("messages")), **common)  # type: ignore[arg-type]
    return GenerationRequest(prompt=_prompt(data.get("prompt")), **common)  # type: ignore[arg-type]


def parse_load(body: bytes) -> tuple[str, str]:
    """(lora_name, lora_path) of a /v1/load_lora_adapter body (vLLM's field names)."""
    data = read_json(body)
    _only(data, {"lora_name", "lora_path", "load_inplace"})
    if data.get("load_inplace"):
        raise ApiError(400, "load_inplace=true is not supported; unload the adapter, then load it again",
                       "load_inplace")
    return _name(data), _get(data, "lora_path", str, required=True)


def parse_unload(body: bytes) -> str:
    """lora_name of a /v1/unload_lora_adapter body (vLLM's field names)."""
    data = read_json(body)
    _only(data, {"lora_name", "lora_int_id"})
    return _name(data)


def _name(data: dict[str, Any]) -> str:
    name = _get(data, "lora_name", str, required=True)
    if not name.strip():
        raise ApiError(400, "lora_name must not be empty", "lora_name")
    return name


def _only(data: dict[str, Any], accepted: set[str]) -> None:
    unknown = sorted(set(data) - accepted)
    if unknown:
        raise ApiError(400, f"unsupported field {unknown[0]!r}; "
                            f"this endpoint accepts {', '.join(sorted(accepted))}", unknown[0])


def _get(data: dict[str, Any], name: str, kind: type, required: bool = False,
         where: str | None = None) -> Any:
    """data[name] if it has JSON type `kind` (None when absent and not required), else ApiError(400)."""
    where = where or name
    value = data.get(name)
    if value is None:
        if required:
            raise ApiError(400, f"field {where!r} is required", where)
        return None
    # JSON has no separate boolean-as-number: true is not an integer here, nor 1.5; 2 is a float.
    if kind is int:
        ok = is_int(value)
    elif kind is float:
        ok = is_real(value)
    else:
        ok = isinstance(value, kind)
    if not ok:
        raise ApiError(400, f"field {where!r} must be {_JSON_NAMES[kind]}, got {json_type_name(value)} "
                            f"{json.dumps(value)[:60]}", where)
    return value


def _number(data: dict[str, Any], name: str, default: float, low: float, high: float) -> float:
    value = _get(data, name, float)
    if value is None:
        return default
    if not (math.isfinite(value) and low <= value <= high):
        raise ApiError(400, f"{name} must be between {low:g} and {high:g}, got {value}", name)
    return float(value)


def _stop(value: Any) -> list[str]:
    if value is None:
        return []
    stops = [value] if isinstance(value, str) else value
    if (not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops)
            or len(stops) > MAX_STOP):
        raise ApiError(400, f"field 'stop' must be a non-empty string or a list of at most {MAX_STOP} "
                            f"non-empty strings, got {json.dumps(value)[:80]}", "stop")
    return stops


def _prompt(value: Any) -> str:
    if isinstance(value, list) and len(value) == 1 and isinstance(value[0], str):
        value = value[0]  # one prompt in a list, as some clients send it
    if isinstance(value, list):
        raise ApiError(400, f"field 'prompt' holds {len(value)} entries; this server takes one prompt "
                            "string per request (token-id prompts are not supported)", "prompt")
    if not isinstance(value, str):
        raise ApiError(400, f"field 'prompt' must be a string, got {json_type_name(value)}", "prompt")
    if not value:
        raise ApiError(400, "field 'prompt' is empty; give some text to continue", "prompt")
    return value


def _messages(value: Any) -> list[dict[str, str]]:
    if not isinstance(value, list) or not value:
        raise ApiError(400, "field 'messages' must be a non-empty list of messages, got "
                            f"{json_type_name(value)}", "messages")
    checked = []
    for i, message in enumerate(value):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise ApiError(400, f"{where} must be an object with 'role' and 'content', got "
                                f"{json_type_name(message)}", where)
        _only_message(message, where)
        role = _get(message, "role", str, required=True, where=f"{where}.role")
        if role not in ROLES:
            raise ApiError(400, f"{where}.role {role!r} is not supported; accepted: {', '.join(ROLES)} "
                                "(tool calls are not implemented)", f"{where}.role")
        checked.append({"role": role, "content": _content(message.get("content"), f"{where}.content")})
    return checked


def _only_message(message: dict[str, Any], where: str) -> None:
    unknown = sorted(set(message) - {"role", "content"})
    if unknown:
        raise ApiError(400, f"{where}.{unknown[0]} is not supported; a message has 'role' and 'content'",
                       f"{where}.{unknown[0]}")


def _content(value: Any, where: str) -> str:
    """A message's text: a string, or a list of {"type": "text", "text": ...} parts joined."""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(p, dict) and p.get("type") == "text"
                                       and isinstance(p.get("text"), str) for p in value):
        return "".join(p["text"] for p in value)
    raise ApiError(400, f"{where} must be a string or a list of text parts, got {json.dumps(value)[:80]} "
                        "(images and audio are not supported)", where)


_JSON_NAMES = {str: "a string", int: "an integer", float: "a number", bool: "a boolean", dict: "an object",
               list: "a list"}
