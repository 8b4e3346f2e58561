"""Tokenizing formatted records into ``input_ids`` and ``labels``, and truncating them.

Labels are the input ids with every prompt token replaced by `IGNORE_INDEX` (-100), the value
PyTorch's cross-entropy and transformers' causal-LM loss skip. transformers shifts the labels
inside the model (the logits at position t are scored against ``labels[t + 1]``), so labels are
stored unshifted, aligned with ``input_ids``.

How the text is split into tokens: each segment is tokenized as the continuation of everything
before it (the tokens of ``prompt + answer`` minus the tokens of ``prompt``), so a row is exactly
what tokenizing the whole text gives. Where that is impossible because one token would straddle
the prompt/answer boundary (a prompt ending in a space, say), the segment is tokenized on its own;
the prompt tokens then stay exactly what the prompt alone gives, which is what generation sees.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from lorakit.data.formatting import Formatted, Segment

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

IGNORE_INDEX = -100
"""Label value for tokens that are not trained (prompt, padding, packed-example boundaries)."""


@dataclass(frozen=True)
class Example:
    """One tokenized training example."""

    input_ids: tuple[int, ...]
    """Token ids, starting with the tokenizer's BOS when it adds one."""
    labels: tuple[int, ...]
    """Same length as ``input_ids``; the id where the token is trained, `IGNORE_INDEX` elsewhere."""

    def __post_init__(self) -> None:
        assert len(self.input_ids) == len(self.labels), "input_ids and labels must have the same length"

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def num_label_tokens(self) -> int:
        """How many tokens the loss is computed on: labels from position 1 on, since the first
        token is never predicted."""
        return sum(label != IGNORE_INDEX for label in self.labels[1:])


def special_prefix(tokenizer: PreTrainedTokenizerBase) -> tuple[int, ...]:
    """The special tokens the tokenizer puts before a text by default (usually BOS, or nothing).

    Found by comparing ``encode(text)`` with ``encode(text, add_special_tokens=False)``, so it
    follows the tokenizer's own policy (Llama adds ``<s>``, Qwen and SmolLM2 add nothing) instead
    of guessing from ``bos_token``. Suffixes the tokenizer might add are left out: the EOS of an
    answer is appended explicitly.
    """
    probe = "a"
    plain = list(tokenizer.encode(probe, add_special_tokens=False))
    special = list(tokenizer.encode(probe, add_special_tokens=True))
    for start in range(len(special) - len(plain) + 1):
        if special[start : start + len(plain)] == plain:
            return tuple(special[:start])
    return ()


def encode_formatted(
    formatted: Formatted,
    tokenizer: PreTrainedTokenizerBase,
    train_on_prompt: bool = False,
    prefix: tuple[int, ...] | None = None,
) -> Example:
    """Tokenize a formatted record, without truncation.

    Args:
        formatted: The record's prompt and answer segments (see `lorakit.data.formatting`).
        tokenizer: A transformers tokenizer.
        train_on_prompt: Keep the prompt tokens in the labels too.
        prefix: The tokenizer's leading special tokens, from `special_prefix` (computed when
            None; pass it to save the work over many records). Not used for chat records, whose
            template writes its own.

    Returns:
        The example. Its final answer ends with ``tokenizer.eos_token_id`` (appended when the answer
        does not already contain it), so the model learns where to stop.
    """
    if prefix is None:
        prefix = special_prefix(tokenizer)
    start = () if formatted.templated else prefix
    input_ids: list[int] = list(start)
    labels: list[int] = list(start) if train_on_prompt else [IGNORE_INDEX] * len(start)
    new: list[int] = []
    for segment, new in _segment_tokens(formatted, tokenizer):
        input_ids += new
        labels += new if (segment.trained or train_on_prompt) else [IGNORE_INDEX] * len(new)

    eos = tokenizer.eos_token_id
    # `new` holds the final answer's tokens; chat templates usually end the turn with EOS already.
    if isinstance(eos, int) and eos not in new:
        input_ids.append(eos)
        labels.append(eos)
    return Example(tuple(input_ids), tuple(labels))


def encode_prompt(
    formatted: Formatted, tokenizer: PreTrainedTokenizerBase, prefix: tuple[int, ...] | None = None
) -> tuple[int, ...]:
    """The tokens before the final answer, exactly as `encode_formatted` lays them out in training.

    This is what a model should be given to generate the answer at evaluation time.
    """
    if prefix is None:
        prefix = special_prefix(tokenizer)
    ids = list(() if formatted.templated else prefix)
    for _, new in _segment_tokens(formatted, tokenizer, upto=len(formatted.segments) - 1):
        ids += new
    return tuple(ids)


def truncate(example: Example, max_length: int) -> Example:
    """Keep the first ``max_length`` tokens (the start of the prompt matters; the end is dropped)."""
    if len(example) <= max_length:
        return example
    return Example(example.input_ids[:max_length], example.labels[:max_length])


def _segment_tokens(
    formatted: Formatted, tokenizer: Any, upto: int | None = None
) -> Iterator[tuple[Segment, list[int]]]:
    """Each segment (the first ``upto``) with its tokens, each the continuation of those before."""
    text = ""
    body: list[int] = []  # the tokens of `text`
    for segment in formatted.segments[:upto]:
        new = _continuation(tokenizer, text, body, segment.text)
        text += segment.text
        body += new
        yield segment, new


def _continuation(tokenizer: Any, text: str, body: list[int], addition: str) -> list[int]:
    """The tokens that ``addition`` contributes after ``text`` (whose tokens are ``body``)."""
    if not addition:
        return []
    if not text:
        return list(tokenizer.encode(addition, add_special_tokens=False))
    joined = list(tokenizer.encode(text + addition, add_special_tokens=False))
    if joined[: len(body)] == body:
        return joined[len(body) :]
    return list(tokenizer.encode(addition, add_special_tokens=False))
