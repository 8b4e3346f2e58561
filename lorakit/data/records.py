"""Training records: the four accepted shapes of one JSONL line, validated.

A record is what one line of a data file means, before any tokenizer is involved:

- chat:       ``{"messages": [{"role": "user", "content": "..."}, {"role": "assistant", ...}]}``
- alpaca:     ``{"instruction": "...", "input": "..." (optional), "output": "..."}``
- completion: ``{"prompt": "...", "completion": "..."}``
- text:       ``{"text": "..."}`` (plain language modelling, every token is trained)

`parse_record` turns a decoded JSON value into one of the frozen dataclasses below, or raises
`RecordError` with a message that says what is wrong (the JSONL reader adds file and line).
Keys other than the ones a format needs are ignored, so datasets with an ``"id"`` or
``"source"`` column load as they are.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal, TypeAlias

from lorakit.core.checks import json_type_name

Format: TypeAlias = Literal["chat", "alpaca", "completion", "text"]

FORMATS: tuple[Format, ...] = ("chat", "alpaca", "completion", "text")
"""The accepted formats, in the order auto-detection tries them."""

# The keys that identify each format; detection looks for these, validation then checks types.
FORMAT_KEYS: dict[Format, tuple[str, ...]] = {
    "chat": ("messages",),
    "alpaca": ("instruction", "output"),
    "completion": ("prompt", "completion"),
    "text": ("text",),
}


# The roles chat templates know; anything else is most likely a typo ("usr", "asistant").
CHAT_ROLES = ("system", "user", "assistant", "tool")


class RecordError(ValueError):
    """A JSON value is not a valid record of the expected format."""


@dataclass(frozen=True)
class Message:
    """One turn of a conversation."""

    role: str
    """Who speaks: one of CHAT_ROLES ("system", "user", "assistant", "tool"); passed to the chat template."""
    content: str
    """What is said."""


@dataclass(frozen=True)
class ChatRecord:
    """A conversation, rendered with the tokenizer's chat template; assistant turns are trained."""

    messages: tuple[Message, ...]
    """The turns in order; the last one is an assistant turn with non-empty content."""
    origin: str = ""
    """Where the record came from, e.g. ``"train.jsonl:12"``; used in error messages."""


@dataclass(frozen=True)
class AlpacaRecord:
    """An instruction with an optional input, and the output to train on."""

    instruction: str
    """The task."""
    input: str
    """Further context for the task; "" when there is none."""
    output: str
    """The answer (trained)."""
    origin: str = ""
    """Where the record came from, e.g. ``"train.jsonl:12"``; used in error messages."""


@dataclass(frozen=True)
class CompletionRecord:
    """A prompt and its completion, concatenated as they are (no separator is added)."""

    prompt: str
    """The untrained part, given to the model."""
    completion: str
    """The answer (trained)."""
    origin: str = ""
    """Where the record came from, e.g. ``"train.jsonl:12"``; used in error messages."""


@dataclass(frozen=True)
class TextRecord:
    """Plain text for language modelling: every token is trained."""

    text: str
    """The document."""
    origin: str = ""
    """Where the record came from, e.g. ``"train.jsonl:12"``; used in error messages."""


Record: TypeAlias = ChatRecord | AlpacaRecord | CompletionRecord | TextRecord


def record_format(record: Record) -> Format:
    """The format name of a record object."""
    if isinstance(record, ChatRecord):
        return "chat"
    if isinstance(record, AlpacaRecord):
        return "alpaca"
    if isinstance(record, CompletionRecord):
        return "completion"
    return "text"


def detect_format(value: Any) -> Format | None:
    """The first format whose identifying keys are all present in ``value``, else None.

    Order matters only for records that carry the keys of several formats; chat wins over alpaca,
    alpaca over completion, completion over text.
    """
    if not isinstance(value, Mapping):
        return None
    for fmt in FORMATS:
        if all(key in value for key in FORMAT_KEYS[fmt]):
            return fmt
    return None


def describe_formats() -> str:
    """A one-line list of the formats and their keys, for error messages."""
    parts = [f"{'+'.join(repr(k) for k in FORMAT_KEYS[f])} ({f})" for f in FORMATS]
    return ", ".join(parts[:-1]) + " or " + parts[-1]


def parse_record(value: Any, fmt: Format, origin: str = "") -> Record:
    """Validate a decoded JSON value as a record of format ``fmt``.

    Args:
        value: What ``json.loads`` gave for one line.
        fmt: The format the value must have.
        origin: Where the value came from, stored on the record for later error messages.

    Returns:
        The record.

    Raises:
        RecordError: If the value is not an object, lacks a required key, has a value of the wrong
            type, or has an empty answer. The message says which key and what was found.
    """
    if not isinstance(value, Mapping):
        raise RecordError(f"expected a JSON object, found {json_kind(value)}")
    missing = [key for key in FORMAT_KEYS[fmt] if key not in value]
    if missing:
        found = ", ".join(repr(k) for k in value) or "none"
        raise RecordError(
            f"expected a record of the {fmt} format, "
            f"with keys {', '.join(repr(k) for k in FORMAT_KEYS[fmt])}; "
            f"missing {', '.join(repr(k) for k in missing)} (keys found: {found})"
        )
    if fmt == "chat":
        return ChatRecord(messages=_parse_messages(value["messages"]), origin=origin)
    if fmt == "alpaca":
        instruction = _string(value, "instruction")
        raw_input = value.get("input")
        # "input" is optional in the Alpaca data: absent, null and "" all mean "no input".
        input_text = "" if raw_input is None else _string(value, "input")
        return AlpacaRecord(instruction, input_text, _answer(value, "output"), origin=origin)
    if fmt == "completion":
        return CompletionRecord(_string(value, "prompt"), _answer(value, "completion"), origin=origin)
    text = _string(value, "text")
    if not text.strip():
        raise RecordError("'text' is empty")
    return TextRecord(text, origin=origin)


def _parse_messages(raw: Any) -> tuple[Message, ...]:
    if not isinstance(raw, list):
        raise RecordError(
            f"'messages' must be a list of {{role, content}} objects, found {json_kind(raw)}"
        )
    if not raw:
        raise RecordError("'messages' is empty")
    messages = []
    for i, item in enumerate(raw):
        if not isinstance(item, Mapping):
            raise RecordError(
                f"messages[{i}] must be an object with 'role' and 'content', found {json_kind(item)}"
            )
        for key in ("role", "content"):
            if key not in item:
                raise RecordError(f"messages[{i}] has no {key!r}")
            if not isinstance(item[key], str):
                raise RecordError(f"messages[{i}].{key} must be a string, found {json_kind(item[key])}")
        if item["role"] not in CHAT_ROLES:
            raise RecordError(f"messages[{i}] has role {item['role']!r}; "
                              f"known roles: {', '.join(CHAT_ROLES)}")
        messages.append(Message(role=item["role"], content=item["content"]))
    last = messages[-1]
    if last.role != "assistant":
        raise RecordError(
            f"the last message must be the assistant's answer (role 'assistant'), found role {last.role!r}"
        )
    if not last.content.strip():
        raise RecordError(f"the last assistant message (messages[{len(messages) - 1}]) is empty")
    return tuple(messages)


def _string(value: Mapping[str, Any], key: str) -> str:
    item = value[key]
    if not isinstance(item, str):
        raise RecordError(f"{key!r} must be a string, found {json_kind(item)}")
    return item


def _answer(value: Mapping[str, Any], key: str) -> str:
    text = _string(value, key)
    if not text.strip():
        raise RecordError(f"{key!r} (the answer) is empty")
    return text


def json_kind(value: Any) -> str:
    """What a record's message says was found: "a string", "a number", "null" (checks.json_type_name).

    Whole and fractional numbers are both "a number", as JSON has it: no record field takes a number.
    """
    return json_type_name(value, article=True, integer=False)
