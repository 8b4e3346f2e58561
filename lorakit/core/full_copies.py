"""Modules trained in full beside an adapter (`modules_to_save`), e.g. a classification head.

The original module stays frozen; each adapter gets its own trainable copy. Attribute names
follow PEFT (`original_module`, `modules_to_save.<adapter>`) so state-dict keys line up with it.
"""

from __future__ import annotations

import copy
from typing import Any

from torch import nn


class ModulesToSave(nn.Module):
    """Runs the first active adapter's copy of the module, or the original when none has one."""

    def __init__(self, original: nn.Module, path: str) -> None:
        super().__init__()
        self.original_module = original
        self.modules_to_save = nn.ModuleDict()
        self.path = path
        self.active_adapters: list[str] = []
        self.disabled = False
        self.training = original.training  # follow the model's mode, not nn.Module's default

    def add(self, name: str) -> None:
        trainable = copy.deepcopy(self.original_module)
        trainable.requires_grad_(True)
        self.modules_to_save[name] = trainable

    def delete(self, name: str) -> None:
        del self.modules_to_save[name]
        if name in self.active_adapters:
            self.active_adapters.remove(name)

    def current(self) -> nn.Module:
        """The module that runs now: an active adapter's copy, or the original."""
        if not self.disabled:
            for name in self.active_adapters:
                if name in self.modules_to_save:
                    return self.modules_to_save[name]
        return self.original_module

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.current()(*args, **kwargs)
