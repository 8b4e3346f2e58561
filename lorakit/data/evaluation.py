"""Prompt and reference answer pairs for generation-based evaluation (exact match)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from lorakit.data.formatting import format_record
from lorakit.data.records import Record, TextRecord
from lorakit.data.tokenize import encode_prompt, special_prefix

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


@dataclass(frozen=True)
class EvalPair:
    """What to give the model and what it should answer."""

    prompt: str
    """The text before the answer, as in training: the chat up to and including the generation
    prompt of the last assistant turn, the filled Alpaca template, or the completion prompt."""
    answer: str
    """The reference: the last assistant message, the output or the completion, as in the data."""
    prompt_ids: tuple[int, ...]
    """The prompt's tokens exactly as they start the training example (BOS included where the
    tokenizer adds one and no chat template wrote the text); generate from these."""


def eval_pairs(records: Sequence[Record], tokenizer: PreTrainedTokenizerBase) -> list[EvalPair]:
    """Prompts and reference answers of records, for generation-based evaluation.

    Args:
        records: Chat, Alpaca or completion records (text records have no answer to check).
        tokenizer: The tokenizer used for training.

    Returns:
        One pair per record, in order.

    Raises:
        ValueError: For a text record (named by its file and line).
    """
    prefix = special_prefix(tokenizer)
    pairs = []
    for record in records:
        if isinstance(record, TextRecord):
            raise ValueError(
                f"{record.origin or 'a text record'}: text records have no prompt/answer split to "
                "evaluate; use chat, alpaca or completion records"
            )
        formatted = format_record(record, tokenizer)
        prompt_ids = encode_prompt(formatted, tokenizer, prefix)
        pairs.append(EvalPair(formatted.prompt, formatted.answer, prompt_ids))
    return pairs


def exact_match(generated: str, answer: str) -> bool:
    """Whether a generated answer equals the reference, ignoring surrounding whitespace."""
    return generated.strip() == answer.strip()
