"""Records in, a tokenized (optionally packed) dataset out, with a report of what happened."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from lorakit.data.collate import ModelInputs, collate
from lorakit.data.formatting import format_record
from lorakit.data.packing import PackedRow, pack_examples
from lorakit.data.records import Record
from lorakit.data.tokenize import Example, encode_formatted, special_prefix, truncate

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


@dataclass(frozen=True)
class TokenizedDataset:
    """A map-style dataset of training rows: examples, or packed rows of several examples.

    Indexable and sized, so it also works with ``torch.utils.data.DataLoader`` (with
    ``collate_fn=dataset.collate``); `lorakit.data.batches` is the resumable way to iterate it.
    """

    items: tuple[Example | PackedRow, ...]
    """The rows, all `Example` (unpacked) or all `PackedRow` (packed)."""
    pad_id: int
    """Token id used for padding."""
    max_length: int
    """No row is longer than this."""

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> Example | PackedRow:
        return self.items[index]

    @property
    def packed(self) -> bool:
        """Whether the rows are packed (batches then carry position ids and no attention mask)."""
        return bool(self.items) and isinstance(self.items[0], PackedRow)

    def collate(self, items: Sequence[Example | PackedRow]) -> ModelInputs:
        """Turn rows of this dataset into a model-ready batch (see `lorakit.data.collate`)."""
        return collate(items, self.pad_id)


@dataclass(frozen=True)
class BuildReport:
    """What `build_dataset` did to the records."""

    num_records: int
    """Records given."""
    num_examples: int
    """Examples kept (``num_records - num_dropped``)."""
    num_truncated: int
    """Kept examples that were longer than ``max_length`` and lost their end."""
    num_dropped: int
    """Examples removed because no answer token was left after truncation."""
    num_rows: int
    """Rows in the dataset: ``num_examples``, or fewer when packed."""
    num_tokens: int
    """Tokens in the kept examples."""
    num_label_tokens: int
    """Tokens the loss is computed on."""
    max_length: int
    """The length limit used."""
    packed: bool
    """Whether examples were packed."""

    @property
    def fill(self) -> float:
        """Share of the ``num_rows * max_length`` token slots that hold real tokens."""
        return self.num_tokens / (self.num_rows * self.max_length) if self.num_rows else 0.0

    def summary(self) -> str:
        """One line for logs."""
        text = (
            f"{self.num_examples} examples from {self.num_records} records "
            f"({self.num_truncated} truncated, {self.num_dropped} dropped at max_length={self.max_length}); "
            f"{self.num_tokens} tokens, {self.num_label_tokens} trained"
        )
        if self.packed:
            text += f"; packed into {self.num_rows} rows, {self.fill:.0%} full"
        return text


def pad_token_id(tokenizer: PreTrainedTokenizerBase) -> int:
    """The id to pad with: the pad token, else EOS, else 0 (padding is masked, any id works)."""
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if isinstance(candidate, int):
            return candidate
    return 0


def build_dataset(
    records: Sequence[Record],
    tokenizer: PreTrainedTokenizerBase,
    max_length: int = 1024,
    train_on_prompt: bool = False,
    pack: bool = False,
) -> tuple[TokenizedDataset, BuildReport]:
    """Format, tokenize, truncate and optionally pack records for supervised fine-tuning.

    Args:
        records: From `lorakit.data.load_records` (any mix of formats).
        tokenizer: The model's transformers tokenizer; chat records need its ``chat_template``.
        max_length: Longest example (and, when packing, longest row) in tokens. Longer examples
            keep their start; those left without any answer token are dropped.
        train_on_prompt: Compute the loss on prompt tokens too, not only on answers.
        pack: Lay several examples in each row of up to ``max_length`` tokens (see
            `lorakit.data.packing`); batches then carry ``position_ids`` and no ``attention_mask``.

    Returns:
        The dataset and a report (counts of truncated and dropped examples, tokens, fill).

    Raises:
        ValueError: If ``max_length`` is below 2, no example is left, or a chat record cannot be
            rendered (the message names the record's file and line).
    """
    if max_length < 2:
        raise ValueError(
            f"max_length must be at least 2 (one token to read, one to predict), got {max_length}"
        )
    prefix = special_prefix(tokenizer)
    examples: list[Example] = []
    num_truncated = 0
    for record in records:
        full = encode_formatted(format_record(record, tokenizer), tokenizer, train_on_prompt, prefix)
        example = truncate(full, max_length)
        if example.num_label_tokens == 0:
            continue
        num_truncated += len(example) < len(full)
        examples.append(example)

    num_dropped = len(records) - len(examples)
    if not examples:
        raise ValueError(
            f"no example left out of {len(records)} records: none keeps an answer token within "
            f"max_length={max_length}; raise max_length"
        )
    items: tuple[Example | PackedRow, ...] = (
        tuple(pack_examples(examples, max_length)) if pack else tuple(examples)
    )
    dataset = TokenizedDataset(items=items, pad_id=pad_token_id(tokenizer), max_length=max_length)
    report = BuildReport(
        num_records=len(records),
        num_examples=len(examples),
        num_truncated=num_truncated,
        num_dropped=num_dropped,
        num_rows=len(items),
        num_tokens=sum(len(example) for example in examples),
        num_label_tokens=sum(example.num_label_tokens for example in examples),
        max_length=max_length,
        packed=pack,
    )
    return dataset, report
