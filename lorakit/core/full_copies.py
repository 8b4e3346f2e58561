"""Modules trained in full beside an adapter (`modules_to_save`), e.g. a classification head.

The original module stays frozen; each adapter gets its own trainable copy. Attribute names
follow PEFT (`original_module`, `modules_to_save.<adapter>`) so state-dict keys line up with it.
Like a LoRA layer, it holds adapters by name, an active list and a disabled flag, and takes
a per-row plan inside `adapters_per_row`.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from lorakit.core.rows import RowAdapters


class ModulesToSave(nn.Module):
    """Runs the first active adapter's copy of the module, or the original when none has one."""

    def __init__(self, original: nn.Module, path: str) -> None:
        super().__init__()
        self.original_module = original
        self.modules_to_save = nn.ModuleDict()
        self.path = path
        self.active_adapters: list[str] = []
        self.disabled = False
        self.row_adapters: RowAdapters | None = None
        self.training = original.training  # follow the model's mode, not nn.Module's default

    def add(self, name: str) -> None:
        trainable = copy.deepcopy(self.original_module)
        trainable.requires_grad_(True)
        self.modules_to_save[name] = trainable

    def adapter_names(self) -> list[str]:
        return list(self.modules_to_save)

    def set_active(self, names: Sequence[str]) -> None:
        """Run the first held adapter among `names` and train exactly the held ones among them."""
        self.active_adapters = [n for n in names if n in self.modules_to_save]
        for held, module in self.modules_to_save.items():
            module.requires_grad_(held in names)

    def delete(self, name: str) -> None:
        del self.modules_to_save[name]
        if name in self.active_adapters:
            self.active_adapters.remove(name)

    def peft_state(self, name: str) -> dict[str, torch.Tensor]:
        """Adapter `name`'s copy: its live parameters and buffers by state-dict key."""
        return self.modules_to_save[name].state_dict(keep_vars=True)

    def original(self) -> nn.Module:
        """The module this holder stands for."""
        return self.original_module

    def current(self) -> nn.Module:
        """The module that runs now: an active adapter's copy, or the original."""
        if not self.disabled:
            for name in self.active_adapters:
                if name in self.modules_to_save:
                    return self.modules_to_save[name]
        return self.original_module

    def unloaded(self, names: Sequence[str], quantized: str | None) -> nn.Module:
        """What takes this holder's place in merge_and_unload: the module that runs now."""
        return self.current()

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self.row_adapters is None or self.disabled:
            return self.current()(*args, **kwargs)
        # Per row: the original runs on every row, then rows of an adapter with a copy take its output.
        output = self.original_module(*args, **kwargs)
        if not isinstance(output, torch.Tensor):
            raise TypeError("adapters_per_row supports modules_to_save only for modules returning one "
                            f"tensor; {self.path!r} returned {type(output).__name__}")
        batch = output.shape[0]
        for name, rows in self.row_adapters.groups(batch, self.path):
            if name not in self.modules_to_save:
                continue
            copy_ = self.modules_to_save[name]
            if rows is None:
                output = copy_(*args, **kwargs)
                continue
            picked = [_rows_of(a, rows, batch) for a in args]
            picked_kwargs = {k: _rows_of(v, rows, batch) for k, v in kwargs.items()}
            output = output.index_copy(0, rows, copy_(*picked, **picked_kwargs).to(output.dtype))
        return output


def _rows_of(value: Any, rows: torch.Tensor, batch: int) -> Any:
    if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == batch:
        return value.index_select(0, rows)
    return value
