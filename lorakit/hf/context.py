"""How many new tokens fit after a prompt in a model's context: one rule for `generate` and `serve`.

A rotary model will happily decode past `max_position_embeddings` (its positions have no table
to run off), so nothing downstream stops a request that does not fit; this check refuses it
before the first token, naming the value and the limit.
"""

from __future__ import annotations

from typing import Any

DEFAULT_CONTEXT = 2048
"""The context assumed for a model whose config names none."""


class PromptTooLong(ValueError):
    """The prompt leaves no room for even one new token (the fault is the prompt, not the count)."""


def model_context(model: Any) -> int:
    """The model's context in tokens: its config's max_position_embeddings, else DEFAULT_CONTEXT."""
    config = getattr(model, "config", None)
    return int(getattr(config, "max_position_embeddings", 0) or DEFAULT_CONTEXT)


def tokens_to_generate(prompt_tokens: int, max_new: int | None, context: int, name: str) -> int:
    """The most tokens to generate after a prompt: `max_new`, or up to the end of the context if None.

    Args:
        prompt_tokens: The prompt's length in tokens.
        max_new: The tokens asked for, or None for "as many as fit".
        context: The model's context in tokens (see `model_context`).
        name: How the caller spells `max_new` (e.g. "max_tokens"), for the error.

    Raises:
        PromptTooLong: If the prompt fills the whole context.
        ValueError: If `max_new` is more than the room left after the prompt.
    """
    room = context - prompt_tokens
    if room < 1:
        raise PromptTooLong(f"the prompt is {prompt_tokens} tokens, longer than the model's context of "
                            f"{context} tokens (with room for one new token); shorten it")
    if max_new is not None and max_new > room:
        raise ValueError(f"{name}={max_new} does not fit: the prompt is {prompt_tokens} tokens and the "
                         f"model's context is {context} tokens, so at most {room} can be generated")
    return room if max_new is None else max_new
