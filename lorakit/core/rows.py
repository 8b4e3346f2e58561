"""Which adapter each batch row runs: the plan `adapters_per_row` hands to every adapter module."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

_EXPANDED_HINT = (
    "generate() with num_beams > 1 or num_return_sequences > 1 expands the batch; give one adapter "
    "per expanded row (e.g. repeat each entry num_beams times) or decode without expansion"
)



class RowAdapters:
    """Which adapter each batch row uses, grouped: (adapter, row indices) per distinct adapter.

    Row indices live on one device; a group covering every row carries None instead, so a batch
    that uses one adapter throughout costs no gather at all.
    """

    def __init__(self, names: Sequence[str | None], device: torch.device) -> None:
        self.names = list(names)
        grouped: dict[str, list[int]] = {}
        for row, name in enumerate(self.names):
            if name is not None:
                grouped.setdefault(name, []).append(row)
        self._groups = [
            (name, None if len(rows) == len(self.names) else torch.tensor(rows, device=device))
            for name, rows in grouped.items()
        ]
        # What layers derive from the plan and can share (lorakit.kernels.row_stacks' slots and scales).
        self.shared: dict[object, Any] = {}

    def groups(self, batch: int, path: str) -> list[tuple[str, torch.Tensor | None]]:
        """The (adapter, rows) groups, after checking the batch has one row per given adapter."""
        if batch != len(self.names):
            raise ValueError(
                f"adapters_per_row was given {len(self.names)} rows, but {path or 'the model'} saw a "
                f"batch of {batch}; {_EXPANDED_HINT}"
            )
        return self._groups


def add_rows(result: torch.Tensor, rows: torch.Tensor | None, update: torch.Tensor, scale: float,
             in_place: bool) -> torch.Tensor:
    """result[rows] += scale * update (all rows when `rows` is None); the scale rides along as alpha."""
    if rows is None:
        return result.add_(update, alpha=scale) if in_place else result.add(update, alpha=scale)
    if in_place:
        return result.index_add_(0, rows, update, alpha=scale)
    return result.index_add(0, rows, update, alpha=scale)
