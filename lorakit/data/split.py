"""Holding out a validation set: a deterministic fraction of the records.

A separate validation file needs nothing here: load it with `lorakit.data.load_records` too.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from typing import TypeVar

T = TypeVar("T")


def split_validation(records: Sequence[T], fraction: float, seed: int = 0) -> tuple[list[T], list[T]]:
    """Split records into a training and a validation part.

    Which records go to validation depends only on ``seed`` and the number of records, never on
    the run; both parts keep the file order.

    Args:
        records: The records (or anything else) to split.
        fraction: Share held out for validation, 0 <= fraction < 1. A positive fraction holds out at
            least one record; 0 holds out none.
        seed: Chooses which records are held out.

    Returns:
        ``(train, validation)``.

    Raises:
        ValueError: If ``fraction`` is outside [0, 1), or the split would leave either part empty.
    """
    if not 0 <= fraction < 1:
        raise ValueError(f"fraction must be in [0, 1), got {fraction}")
    if fraction == 0:
        return list(records), []
    n = len(records)
    num_val = max(1, math.floor(n * fraction))
    if num_val >= n:
        raise ValueError(
            f"holding out {num_val} of {n} records (fraction={fraction}) leaves nothing to train on; "
            "use a smaller fraction or a separate validation file"
        )
    held_out = set(random.Random(f"lorakit.data.split:{seed}").sample(range(n), num_val))
    train = [record for i, record in enumerate(records) if i not in held_out]
    validation = [record for i, record in enumerate(records) if i in held_out]
    return train, validation
