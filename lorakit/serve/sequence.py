"""One request while it generates: its tokens, its text so far, and how it finished.

The scheduler thread appends tokens and sets the finish; the request's HTTP handler (on the
event loop) reads `visible_text` and is woken through `notify`. Text is decoded from all the
generated tokens each time (a token can complete a character begun by the one before), cut at
the first stop string. While generating, text that might still turn into a stop string, or an
incomplete UTF-8 character, is held back, so a stream never sends what the final text drops:
streaming and non-streaming answers are the same text.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from lorakit.serve.sampling import make_generator
from lorakit.serve.schemas import GenerationRequest

STOP, LENGTH = "stop", "length"  # OpenAI's finish reasons


@dataclass(eq=False)
class Sequence:
    """A request's generation state (created by the app, advanced by the scheduler)."""

    request: GenerationRequest
    adapter: str | None
    """The adapter its rows run; None: the base model."""
    prompt_ids: list[int]
    max_tokens: int
    eos_ids: frozenset[int]
    decode: Callable[[list[int]], str]
    notify: Callable[[], None] = lambda: None
    """Called (from the scheduler thread) whenever the state changed."""
    generated: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None
    error: BaseException | None = None
    cancelled: threading.Event = field(default_factory=threading.Event)
    """Set by the app when the client went away: the scheduler drops the row at its next step."""
    generator: torch.Generator | None = None
    admitted_at: float = 0.0

    def __post_init__(self) -> None:
        if self.request.temperature > 0:
            self.generator = make_generator(self.request.seed)

    @property
    def done(self) -> bool:
        return self.finish_reason is not None or self.error is not None

    def add_token(self, token: int) -> None:
        """Append one generated token; finish on an end-of-sequence token, a stop string or max_tokens."""
        self.generated.append(token)
        full = self.decode(self.generated)
        cut = min((i for i in (full.find(s) for s in self.request.stop) if i >= 0), default=-1)
        if cut >= 0:
            self.text, self.finish_reason = full[:cut], STOP
        else:
            self.text = full
            if token in self.eos_ids:
                self.finish_reason = STOP
            elif len(self.generated) >= self.max_tokens:
                self.finish_reason = LENGTH

    def fail(self, error: BaseException) -> None:
        self.error = error

    def visible_text(self) -> str:
        """The text that is final already: all of it once finished, else without a possible stop-string
        start or an incomplete character at its end."""
        if self.done:
            return self.text
        text = self.text.rstrip("\ufffd")
        held = max((k for s in self.request.stop for k in range(1, len(s)) if text.endswith(s[:k])),
                   default=0)
        return text[:len(text) - held]

    def usage(self) -> dict[str, Any]:
        prompt, completion = len(self.prompt_ids), len(self.generated)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}
