"""A deterministic, resumable, rank-aware batch iterator.

Every epoch visits the dataset in one order: a shuffle seeded by ``(seed, epoch)``, the same on
every run and every rank. Steps take consecutive *global* batches of ``batch_size * world_size``
rows from that order, and rank r keeps every ``world_size``-th of them starting at r, so the
ranks share each step without overlap and without talking to each other.

Where the iterator stands is a `DataPosition`: the epoch and the number of rows of that epoch's
order already handed out (by all ranks together). Each batch carries the position to resume from
after it; saved with a checkpoint (``position.to_dict()`` is JSON) and given back as ``start``, it
continues exactly where the run stopped, also with a different number of ranks.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, replace
from typing import Any

import torch

from lorakit.data.collate import ModelInputs
from lorakit.data.dataset import TokenizedDataset


@dataclass(frozen=True)
class DataPosition:
    """Where a pass over the data stands: ``index`` rows of epoch ``epoch`` are done."""

    epoch: int = 0
    """The epoch, counted from 0."""
    index: int = 0
    """Rows of this epoch's order already handed out, over all ranks."""

    def __post_init__(self) -> None:
        if (
            not (isinstance(self.epoch, int) and isinstance(self.index, int))
            or self.epoch < 0
            or self.index < 0
        ):
            raise ValueError(
                f"epoch and index must be integers >= 0, got epoch={self.epoch!r}, index={self.index!r}"
            )

    def to_dict(self) -> dict[str, int]:
        """A JSON-serializable form, for checkpoints."""
        return {"epoch": self.epoch, "index": self.index}

    @classmethod
    def from_dict(cls, state: Mapping[str, Any]) -> DataPosition:
        """Read back what `to_dict` wrote."""
        missing = [key for key in ("epoch", "index") if key not in state]
        if missing:
            raise ValueError(f"a data position needs 'epoch' and 'index', got keys {sorted(state)}")
        return cls(epoch=state["epoch"], index=state["index"])


@dataclass(frozen=True)
class Batch:
    """One step's share of the data for this rank."""

    inputs: ModelInputs
    """Model-ready keyword arguments (tensors, and ``use_cache=False``): ``model(**batch.inputs)``."""
    position: DataPosition
    """Where to resume after this batch: save it with the checkpoint of this step."""
    num_rows: int
    """Rows in this rank's batch."""
    num_label_tokens: int
    """Tokens the loss is computed on in this rank's batch (after the model's label shift)."""

    def to(self, device: torch.device | str) -> Batch:
        """The same batch with its tensors on ``device``."""
        moved = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in self.inputs.items()}
        return replace(self, inputs=moved)


def epoch_order(num_rows: int, epoch: int, seed: int = 0, shuffle: bool = True) -> list[int]:
    """The order in which epoch ``epoch`` visits the rows.

    A string seed goes through SHA-512 in Python's `random`, so the order is the same on every
    platform and Python version, whatever ``PYTHONHASHSEED`` is.
    """
    order = list(range(num_rows))
    if shuffle:
        random.Random(f"lorakit.data:{seed}:{epoch}").shuffle(order)
    return order


def steps_per_epoch(num_rows: int, batch_size: int, world_size: int = 1, drop_last: bool = False) -> int:
    """How many steps `batches` takes per full epoch (the same on every rank)."""
    per_step = batch_size * world_size
    full, rest = divmod(num_rows, per_step)
    # A last partial step needs at least one row for every rank, else it is dropped.
    return full + (not drop_last and rest >= world_size)


def batches(
    dataset: TokenizedDataset,
    batch_size: int,
    *,
    seed: int = 0,
    shuffle: bool = True,
    start: DataPosition | Mapping[str, Any] | None = None,
    epochs: int | None = None,
    rank: int = 0,
    world_size: int = 1,
    drop_last: bool = False,
) -> Iterator[Batch]:
    """Iterate over a dataset in batches, resumably, for one rank of ``world_size``.

    Args:
        dataset: From `lorakit.data.build_dataset`.
        batch_size: Rows per step on each rank.
        seed: Seeds the per-epoch shuffle.
        shuffle: Shuffle each epoch; False visits rows in dataset order (for evaluation).
        start: Where to begin: a `DataPosition`, or its ``to_dict()`` form, as saved from
            ``Batch.position``. Default: the start of epoch 0.
        epochs: Stop when this many epochs (counted from epoch 0, not from ``start``) are done;
            None iterates forever, for loops that stop after a number of steps.
        rank: This process's rank, 0 <= rank < world_size.
        world_size: How many processes share each step.
        drop_last: Drop an epoch's last step when it is smaller than ``batch_size * world_size``.
            A last step with fewer rows than ranks is always dropped, so that every rank takes the
            same number of steps.

    Yields:
        Batches; ``Batch.position`` is where to resume after each one.

    Raises:
        ValueError: For a bad argument, a dataset too small to give every rank a row, or a start
            position past the end of the dataset.

    Example:
        >>> for batch in batches(dataset, 8, seed=1, start=saved_position):  # doctest: +SKIP
        ...     loss = model(**batch.inputs).loss
        ...     saved_position = batch.position.to_dict()
    """
    problems = []
    if batch_size < 1:
        problems.append(f"batch_size must be >= 1, got {batch_size}")
    if world_size < 1:
        problems.append(f"world_size must be >= 1, got {world_size}")
    elif not 0 <= rank < world_size:
        problems.append(f"rank must be in 0..{world_size - 1} for world_size={world_size}, got {rank}")
    if epochs is not None and epochs < 0:
        problems.append(f"epochs must be >= 0 or None, got {epochs}")
    if problems:
        raise ValueError("; ".join(problems))
    num_rows = len(dataset)
    if steps_per_epoch(num_rows, batch_size, world_size, drop_last) == 0:
        raise ValueError(
            f"the dataset has {num_rows} rows, too few for one step of batch_size={batch_size} "
            f"on world_size={world_size} ranks (drop_last={drop_last})"
        )
    position = (
        start
        if isinstance(start, DataPosition)
        else DataPosition.from_dict(start or {"epoch": 0, "index": 0})
    )
    if position.index > num_rows:
        raise ValueError(
            f"start position {position.to_dict()} is past the end of the dataset ({num_rows} rows); "
            "was it saved for another dataset?"
        )
    return _iterate(dataset, batch_size, seed, shuffle, position, epochs, rank, world_size, drop_last)


def _iterate(
    dataset: TokenizedDataset,
    batch_size: int,
    seed: int,
    shuffle: bool,
    position: DataPosition,
    epochs: int | None,
    rank: int,
    world_size: int,
    drop_last: bool,
) -> Iterator[Batch]:
    epoch, index = position.epoch, position.index
    per_step = batch_size * world_size
    while epochs is None or epoch < epochs:
        order = epoch_order(len(dataset), epoch, seed, shuffle)
        while True:
            step = order[index : index + per_step]
            if len(step) < world_size or (drop_last and len(step) < per_step):
                break
            index += len(step)
            # If this was the epoch's last step, resume at the start of the next epoch.
            rest = len(order) - index
            done = rest < world_size or (drop_last and rest < per_step)
            after = DataPosition(epoch + 1, 0) if done else DataPosition(epoch, index)
            rows = [dataset[i] for i in step[rank::world_size]]
            yield Batch(
                inputs=dataset.collate(rows),
                position=after,
                num_rows=len(rows),
                num_label_tokens=sum(row.num_label_tokens for row in rows),
            )
        epoch, index = epoch + 1, 0
