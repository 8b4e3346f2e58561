"""OpenAI's response shapes: whole answers, stream chunks, and the model list."""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

from lorakit.serve.sequence import Sequence


def new_id(chat: bool) -> str:
    return f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"


def answer(sequence: Sequence, request_id: str, created: int) -> dict[str, Any]:
    """The non-streaming body of a finished request."""
    request = sequence.request
    choice: dict[str, Any] = {"index": 0, "finish_reason": sequence.finish_reason, "logprobs": None}
    if request.chat:
        choice["message"] = {"role": "assistant", "content": sequence.text}
    else:
        choice["text"] = sequence.text
    return {"id": request_id, "object": "chat.completion" if request.chat else "text_completion",
            "created": created, "model": request.model, "choices": [choice], "usage": sequence.usage()}


def chunk(sequence: Sequence, request_id: str, created: int, text: str | None,
          finish_reason: str | None = None, role: bool = False) -> str:
    """One server-sent event: new text (or the assistant role first, or the finish reason last)."""
    request = sequence.request
    choice: dict[str, Any] = {"index": 0, "finish_reason": finish_reason, "logprobs": None}
    if request.chat:
        delta: dict[str, Any] = {"role": "assistant", "content": ""} if role else {}
        if text:
            delta["content"] = text
        choice["delta"] = delta
    else:
        choice["text"] = text or ""
    body: dict[str, Any] = {"id": request_id,
                            "object": "chat.completion.chunk" if request.chat else "text_completion",
                            "created": created, "model": request.model, "choices": [choice]}
    if request.include_usage:
        body["usage"] = None  # as OpenAI: null on every chunk, the figures in one last chunk
    return event(body)


def usage_chunk(sequence: Sequence, request_id: str, created: int) -> str:
    request = sequence.request
    return event({"id": request_id, "object": "chat.completion.chunk" if request.chat else "text_completion",
                  "created": created, "model": request.model, "choices": [], "usage": sequence.usage()})


def event(body: dict[str, Any]) -> str:
    return f"data: {json.dumps(body)}\n\n"


DONE = "data: [DONE]\n\n"


def model_list(base_name: str, adapters: dict[str, str]) -> dict[str, Any]:
    """GET /v1/models: the base model, then every adapter (with its folder as root and the base as parent)."""
    created = int(time.time())
    data = [{"id": base_name, "object": "model", "created": created, "owned_by": "lorakit", "root": base_name,
             "parent": None}]
    data += [{"id": name, "object": "model", "created": created, "owned_by": "lorakit", "root": path,
              "parent": base_name} for name, path in adapters.items()]
    return {"object": "list", "data": data}
