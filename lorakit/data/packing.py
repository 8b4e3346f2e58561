"""Packing: several short examples in one row, kept apart by position ids alone.

How transformers (5.x) keeps packed examples apart, for the eager and sdpa attention of Llama and
the other models built on ``masking_utils.create_causal_mask``: when the model is called with
``position_ids``, *without* an ``attention_mask`` and *without* a KV cache,
``find_packed_sequence_indices`` looks for places where the position does not go up by exactly 1;
each such place starts a new sequence. The causal mask is then restricted to query/key pairs of the
same sequence (``packed_sequence_mask_function``), and rotary embeddings use the given positions.
So a packed batch needs:

- ``position_ids`` that restart at 0 for every example;
- no ``attention_mask`` at all (passing one, even all ones, turns the detection off and the
  examples would attend to each other);
- ``use_cache=False``: the model's default is ``config.use_cache`` (True for Llama), in training
  too, and then it builds a ``DynamicCache`` before the mask, which also turns the detection off.
  The collated batch carries ``use_cache=False`` for this reason.

transformers' flash-attention path also finds sequence starts in the position ids, but only for a
batch of size 1: use ``collate_packed(rows, pad_id, flatten=True)`` there.

The labels need one more thing. The model shifts them: the logits at position t are scored against
``labels[t + 1]``. At a boundary that would train the first token of an example as the prediction
from the last token of the previous one, which the unpacked example never does. So the label of
the first token of every packed example is `IGNORE_INDEX`; with that, a packed row's loss is
exactly the sum of its examples' losses.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from dataclasses import dataclass

from lorakit.data.tokenize import IGNORE_INDEX, Example


@dataclass(frozen=True)
class PackedRow:
    """Several examples laid end to end in one row."""

    input_ids: tuple[int, ...]
    """The examples' token ids, concatenated."""
    labels: tuple[int, ...]
    """Their labels, concatenated, with `IGNORE_INDEX` on the first token of each example."""
    position_ids: tuple[int, ...]
    """0, 1, 2, ... restarting at 0 where each example starts."""

    def __post_init__(self) -> None:
        assert len(self.input_ids) == len(self.labels) == len(self.position_ids), (
            "row fields differ in length"
        )

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def num_examples(self) -> int:
        """How many examples the row holds."""
        return sum(position == 0 for position in self.position_ids)

    @property
    def num_label_tokens(self) -> int:
        """How many tokens the loss is computed on."""
        return sum(label != IGNORE_INDEX for label in self.labels)


def pack_row(examples: Sequence[Example]) -> PackedRow:
    """Lay examples end to end, restarting positions and masking the boundary labels."""
    if not examples:
        raise ValueError("cannot pack an empty list of examples")
    input_ids: list[int] = []
    labels: list[int] = []
    position_ids: list[int] = []
    for example in examples:
        input_ids += example.input_ids
        # The first token of an example is never predicted; unmasked, the model's label shift
        # would score it as the continuation of the previous example.
        labels += (IGNORE_INDEX, *example.labels[1:])
        position_ids += range(len(example))
    return PackedRow(tuple(input_ids), tuple(labels), tuple(position_ids))


def plan_packing(lengths: Sequence[int], max_length: int) -> list[list[int]]:
    """Group example indices into rows of at most ``max_length`` tokens, with little room left over.

    Best-fit decreasing: longest examples first, each into the fullest row that still has room
    for it. Deterministic (ties keep the input order), and O(n log n).

    Args:
        lengths: The token count of every example; none may exceed ``max_length``.
        max_length: The row capacity.

    Returns:
        For every row, the indices of its examples in the order they are laid out.
    """
    if max_length < 1:
        raise ValueError(f"max_length must be at least 1, got {max_length}")
    too_long = [(i, n) for i, n in enumerate(lengths) if n > max_length or n < 1]
    if too_long:
        i, n = too_long[0]
        raise ValueError(
            f"{len(too_long)} examples cannot be packed into rows of {max_length} tokens "
            f"(the first, example {i}, has {n}); truncate them first"
        )
    rows: list[list[int]] = []
    # (room left, row number), sorted; finding the tightest row that fits is a bisection.
    room: list[tuple[int, int]] = []
    for index in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        need = lengths[index]
        at = bisect.bisect_left(room, (need, -1))
        if at == len(room):
            rows.append([index])
            left, row = max_length - need, len(rows) - 1
        else:
            left, row = room.pop(at)
            rows[row].append(index)
            left -= need
        if left > 0:
            bisect.insort(room, (left, row))
    return rows


def pack_examples(examples: Sequence[Example], max_length: int) -> list[PackedRow]:
    """Pack examples into rows of at most ``max_length`` tokens (see `plan_packing`)."""
    plan = plan_packing([len(example) for example in examples], max_length)
    return [pack_row([examples[i] for i in row]) for row in plan]
