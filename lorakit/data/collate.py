"""Collation: a list of examples (or packed rows) into the inputs of a transformers model.

Both kinds of batch are right-padded to their longest row and can be passed as ``model(**batch)``:

- unpacked: ``input_ids``, ``attention_mask`` (1 on tokens, 0 on padding) and ``labels``;
- packed: ``input_ids``, ``position_ids`` and ``labels``, and deliberately no ``attention_mask``:
  transformers keeps packed examples apart only when there is none (see `lorakit.data.packing`).
  The padding of a packed row is its own little sequence (positions restart at 0), so real tokens
  never attend to it.

Labels are `IGNORE_INDEX` on padding in both. Both also carry ``use_cache=False``: a training
forward needs no KV cache, and for packed rows it is required, because transformers turns its
packed-sequence detection off whenever a cache exists, and the model creates one by default.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeAlias

import torch

from lorakit.data.packing import PackedRow
from lorakit.data.tokenize import IGNORE_INDEX, Example

ModelInputs: TypeAlias = dict[str, torch.Tensor | bool]
"""Keyword arguments for a transformers causal LM: (B, T) int64 tensors, and ``use_cache=False``."""


def collate_examples(examples: Sequence[Example], pad_id: int) -> ModelInputs:
    """Right-pad unpacked examples into a batch.

    Args:
        examples: The batch's examples.
        pad_id: Token id written into padded positions (its value does not matter, they are masked).

    Returns:
        ``input_ids``, ``attention_mask`` and ``labels``, each a (B, T) int64 tensor, T the longest
        example, and ``use_cache=False``.
    """
    if not examples:
        raise ValueError("cannot collate an empty batch")
    width = max(len(example) for example in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, example in enumerate(examples):
        n = len(example)
        input_ids[row, :n] = torch.tensor(example.input_ids, dtype=torch.long)
        labels[row, :n] = torch.tensor(example.labels, dtype=torch.long)
        attention_mask[row, :n] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels, "use_cache": False}


def collate_packed(rows: Sequence[PackedRow], pad_id: int, flatten: bool = False) -> ModelInputs:
    """Right-pad packed rows into a batch, with position ids and without an attention mask.

    Args:
        rows: The batch's packed rows.
        pad_id: Token id written into padded positions.
        flatten: Lay all rows end to end in a single row of batch size 1, without padding. This is
            the layout transformers' flash-attention path needs: it only looks for packed
            sequences when the batch size is 1. Eager and sdpa attention work with either layout,
            but compute attention over the whole row, so the unflattened one is cheaper there.

    Returns:
        ``input_ids``, ``position_ids`` and ``labels``, each a (B, T) int64 tensor (B = 1 when
        flattened), and ``use_cache=False``.
    """
    if not rows:
        raise ValueError("cannot collate an empty batch")
    if flatten:
        rows = [
            PackedRow(
                input_ids=tuple(token for row in rows for token in row.input_ids),
                labels=tuple(label for row in rows for label in row.labels),
                position_ids=tuple(position for row in rows for position in row.position_ids),
            )
        ]
    width = max(len(row) for row in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    # Padding restarts at position 0, so transformers sees it as one more sequence in the row.
    position_ids = torch.arange(width, dtype=torch.long).repeat(len(rows), 1)
    for index, row in enumerate(rows):
        n = len(row)
        input_ids[index, :n] = torch.tensor(row.input_ids, dtype=torch.long)
        labels[index, :n] = torch.tensor(row.labels, dtype=torch.long)
        position_ids[index, :n] = torch.tensor(row.position_ids, dtype=torch.long)
        position_ids[index, n:] -= n
    # use_cache=False is what makes this work: with a cache, transformers skips packed detection.
    return {"input_ids": input_ids, "position_ids": position_ids, "labels": labels, "use_cache": False}


def collate(items: Sequence[Example | PackedRow], pad_id: int) -> ModelInputs:
    """Collate examples with `collate_examples`, or packed rows with `collate_packed`."""
    rows = [item for item in items if isinstance(item, PackedRow)]
    if rows and len(rows) == len(items):
        return collate_packed(rows, pad_id)
    examples = [item for item in items if isinstance(item, Example)]
    if examples and len(examples) == len(items):
        return collate_examples(examples, pad_id)
    kinds = sorted({type(item).__name__ for item in items})
    raise TypeError(f"a batch must be all Example or all PackedRow, got {', '.join(kinds) or 'nothing'}")
